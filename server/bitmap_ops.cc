// BitmapEditor: the offline verbs mapped onto the engine's BitmapEditSet
// (engine/bitmap_edit.h holds the semantics and the copy-on-write design).
// Nothing reaches the file until Commit(), whose directory switch makes the
// whole call atomic.
#include "server/bitmap_ops.h"

namespace cbt::cli {

namespace {

struct OpWords {
  const char* flag;  // as on the command line
  const char* done;  // what one done is called
};

// One kind's words; a merge's source follows either.
OpWords WordsOf(OpKind kind) {
  switch (kind) {
    case OpKind::kAdd:
      return {"--add", "added"};
    case OpKind::kRemove:
      return {"--remove", "removed"};
    case OpKind::kClear:
      return {"--clear", "cleared"};
    case OpKind::kEnable:
      return {"--enable", "enabled"};
    case OpKind::kDisable:
      return {"--disable", "disabled"};
    case OpKind::kMerge:
      return {"--merge", "merged from"};
    case OpKind::kPersistent:
      return {"--persistent", "made persistent"};
    case OpKind::kTransient:
      return {"--transient", "made transient"};
  }
  return {"?", "?"};
}

std::string WithSource(const char* word, const BitmapOp& op) {
  return op.kind == OpKind::kMerge ? std::string(word) + " " + op.source : std::string(word);
}

}  // namespace

std::string OpName(const BitmapOp& op) {
  return WithSource(WordsOf(op.kind).flag, op);
}

std::string OpsDone(const std::vector<BitmapOp>& ops) {
  std::string s;
  for (const BitmapOp& op : ops)
    s += (s.empty() ? "" : ", ") + WithSource(WordsOf(op.kind).done, op);
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
