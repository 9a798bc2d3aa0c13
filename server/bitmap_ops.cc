// BitmapEditor: the offline verbs mapped onto the engine's BitmapEditSet
// (engine/bitmap_edit.h holds the semantics and the copy-on-write design).
// Nothing reaches the file until Commit(), whose directory switch makes the
// whole call atomic.
#include "server/bitmap_ops.h"

namespace cbt::cli {

std::string OpName(const BitmapOp& op) {
  switch (op.kind) {
    case OpKind::kAdd:
      return "--add";
    case OpKind::kRemove:
      return "--remove";
    case OpKind::kClear:
      return "--clear";
    case OpKind::kEnable:
      return "--enable";
    case OpKind::kDisable:
      return "--disable";
    case OpKind::kMerge:
      return "--merge " + op.source;
    case OpKind::kPersistent:
      return "--persistent";
    case OpKind::kTransient:
      return "--transient";
  }
  return "?";
}

std::string OpsDone(const std::vector<BitmapOp>& ops) {
  std::string s;
  for (const BitmapOp& op : ops) {
    std::string done;
    switch (op.kind) {
      case OpKind::kAdd:
        done = "added";
        break;
      case OpKind::kRemove:
        done = "removed";
        break;
      case OpKind::kClear:
        done = "cleared";
        break;
      case OpKind::kEnable:
        done = "enabled";
        break;
      case OpKind::kDisable:
        done = "disabled";
        break;
      case OpKind::kMerge:
        done = "merged from " + op.source;
        break;
      case OpKind::kPersistent:
        done = "made persistent";
        break;
      case OpKind::kTransient:
        done = "made transient";
        break;
    }
    s += (s.empty() ? "" : ", ") + done;
  }
  return s;
}

BitmapEditor::BitmapEditor(qcow2::Image& img)
    : img_(img),
      set_(img, img.virtual_size(), BitmapEditSet::FromImage(img), BitmapEditSet::Where::kOffline) {
}

Status BitmapEditor::Apply(const std::string& name, const BitmapOp& op, const OpOptions& opts,
                           qcow2::Image* source_image) {
  switch (op.kind) {
    case OpKind::kAdd: {
      Status s = set_.Add(name, opts.granularity, !opts.add_transient, opts.add_disabled);
      // Offline, the granularity comes from -g.
      if (s.IsInvalidArgument() && s.message().rfind("granularity ", 0) == 0)
        return Status::InvalidArgument("-g " + s.message().substr(12));
      return s;
    }
    case OpKind::kRemove:
      return set_.Remove(name);
    case OpKind::kClear:
      return set_.Clear(name);
    case OpKind::kEnable:
    case OpKind::kDisable:
      return set_.SetRecording(name, op.kind == OpKind::kEnable);
    case OpKind::kMerge:
      return set_.Merge(name, {op.source}, source_image);
    case OpKind::kPersistent:
    case OpKind::kTransient:
      // ParseBitmapArgs allows these with --socket only; the set refuses
      // them offline too.
      return set_.SetPersistent(name, op.kind == OpKind::kPersistent);
  }
  return Status::InvalidArgument("internal: unhandled bitmap operation");
}

Status BitmapEditor::Commit() {
  std::vector<qcow2::BitmapSpec> specs = set_.Specs();
  return img_.Commit(specs);
}

}  // namespace cbt::cli
