// BitmapEditor: see bitmap_ops.h. Design note: the working set is a list of
// qcow2::BitmapSpec, initially Image::CurrentSpecs() (every stored bitmap
// kept as it is). Operations edit specs; only clear and merge touch bit data:
// clear turns the spec into a new (all-zero) bitmap, merge loads the target
// into a DirtyBitmap (chunk size = cluster size, so DirtyBitmapSource can
// hand it to Commit slot by slot) and ORs the source into it. Nothing reaches
// the file until Commit(), whose directory switch makes the whole call
// atomic.
#include "server/bitmap_ops.h"

#include <algorithm>

#include "qcow2/bitmap_dir.h"
#include "server/size_parse.h"

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
  }
  return "?";
}

uint64_t DefaultGranularity(uint64_t cluster_size) {
  return std::clamp<uint64_t>(cluster_size, 4096, 65536);
}

std::string InconsistentMessage(const std::string& file, const std::string& bitmap,
                                const std::string& op) {
  return "bitmap '" + bitmap + "' in " + file +
         " is inconsistent (marked in use by a program that did not close it cleanly), so " + op +
         " is refused; its contents cannot be trusted. Remove it with 'cbt bitmap " + file + " " +
         bitmap + " --remove', or make it usable with 'cbt recover " + file + " --bitmap " +
         bitmap + "' (from cbt's crash-safety record) or '--mark-all' (everything dirty)";
}

BitmapEditor::BitmapEditor(qcow2::Image& img) : img_(img) {
  std::vector<qcow2::BitmapSpec> specs = img.CurrentSpecs();
  std::vector<qcow2::BitmapInfo> infos = img.Bitmaps();
  for (size_t i = 0; i < specs.size(); ++i) {
    Entry e;
    e.spec = std::move(specs[i]);
    e.consistent = true;
    for (const auto& info : infos)
      if (info.name == e.spec.existing) e.consistent = info.consistent;
    entries_.push_back(std::move(e));
  }
}

BitmapEditor::Entry* BitmapEditor::FindEntry(const std::string& name) {
  for (auto& e : entries_)
    if (e.spec.name == name) return &e;
  return nullptr;
}

std::string BitmapEditor::NotFoundMessage(const std::string& name, const std::string& file) const {
  return "bitmap '" + name + "' not found in " + file + "; list bitmaps with 'cbt info " + file +
         "'";
}

std::vector<qcow2::BitmapSpec> BitmapEditor::Specs() const {
  std::vector<qcow2::BitmapSpec> out;
  for (const auto& e : entries_) out.push_back(e.spec);
  return out;
}

Status BitmapEditor::Apply(const std::string& name, const BitmapOp& op, const OpOptions& opts,
                           qcow2::Image* source_image) {
  if (op.kind == OpKind::kAdd) return Add(name, opts);
  Entry* e = FindEntry(name);
  if (!e) return Status::NotFound(NotFoundMessage(name, img_.name()));
  if (op.kind == OpKind::kRemove) {
    entries_.erase(entries_.begin() + (e - entries_.data()));
    return Status::OK();
  }
  if (!e->consistent)
    return Status::InvalidArgument(InconsistentMessage(img_.name(), name, OpName(op)));
  switch (op.kind) {
    case OpKind::kClear:
      // A new, all-zero bitmap under the same name: the old data is freed
      // by Commit, nothing needs to be loaded.
      e->spec.existing.clear();
      e->spec.data = nullptr;
      e->source.reset();
      e->data.reset();
      return Status::OK();
    case OpKind::kEnable:
    case OpKind::kDisable:
      e->spec.enabled = op.kind == OpKind::kEnable;
      return Status::OK();
    case OpKind::kMerge:
      return Merge(*e, op.source, source_image);
    default:
      return Status::InvalidArgument("internal: unhandled bitmap operation");
  }
}

Status BitmapEditor::Add(const std::string& name, const OpOptions& opts) {
  if (Entry* old = FindEntry(name)) {
    std::string msg = "bitmap '" + name + "' already exists in " + img_.name();
    if (!old->consistent)
      msg += " (inconsistent: remove it first with 'cbt bitmap " + img_.name() + " " + name +
             " --remove')";
    else
      msg += "; choose another name, or remove it first with --remove";
    return Status::AlreadyExists(std::move(msg));
  }
  Status s = qcow2::ValidateBitmapName(name);
  if (!s.ok()) return Status::InvalidArgument(s.message() + "; bitmap names are 1 to 1023 bytes");
  const uint64_t g = opts.granularity.value_or(DefaultGranularity(img_.cluster_size()));
  s = qcow2::ValidateGranularity(g);
  if (!s.ok()) return Status::InvalidArgument("-g " + std::to_string(g) + ": " + s.message());
  uint32_t gbits = 0;
  while ((uint64_t{1} << gbits) < g) ++gbits;
  uint32_t cbits = 0;
  while ((uint64_t{1} << cbits) < img_.cluster_size()) ++cbits;
  s = qcow2::ValidateBitmapSize(img_.virtual_size(), gbits, cbits);
  if (!s.ok()) return Status::InvalidArgument("bitmap '" + name + "': " + s.message());
  Entry e;
  e.spec.name = name;
  e.spec.granularity_bits = gbits;
  e.spec.enabled = !opts.add_disabled;
  entries_.push_back(std::move(e));
  return Status::OK();
}

Status BitmapEditor::Materialise(Entry& e) {
  if (e.data) return Status::OK();
  if (!e.spec.existing.empty()) {
    CBT_ASSIGN_OR_RETURN(e.data, LoadBitmap(img_, e.spec.existing));
  } else {
    CBT_ASSIGN_OR_RETURN(
        e.data, DirtyBitmap::Create(img_.virtual_size(), uint64_t{1} << e.spec.granularity_bits,
                                    static_cast<uint32_t>(img_.cluster_size())));
  }
  e.source = std::make_unique<DirtyBitmapSource>(*e.data);
  e.spec.data = e.source.get();
  return Status::OK();
}

Status BitmapEditor::Merge(Entry& target, const std::string& src, qcow2::Image* source_image) {
  std::unique_ptr<DirtyBitmap> loaded;
  const DirtyBitmap* from = nullptr;
  if (source_image) {
    Result<qcow2::BitmapInfo> info = source_image->Find(src);
    if (!info.ok()) return Status::NotFound(NotFoundMessage(src, source_image->name()));
    // As qemu-img bitmap: a bitmap covers its disk; OR-ing one of another
    // size would drop the bits past the shorter end (or invent clean ones).
    if (source_image->virtual_size() != img_.virtual_size())
      return Status::InvalidArgument(
          "bitmaps are of different sizes (" + img_.name() + " is a disk of " +
          std::to_string(img_.virtual_size()) + " bytes, -b " + source_image->name() + " of " +
          std::to_string(source_image->virtual_size()) + " bytes) and can't be merged");
    if (!info->consistent)
      return Status::InvalidArgument(
          InconsistentMessage(source_image->name(), src, "--merge from it"));
    CBT_ASSIGN_OR_RETURN(loaded, LoadBitmap(*source_image, src));
    from = loaded.get();
  } else {
    Entry* s = FindEntry(src);
    if (!s) return Status::NotFound(NotFoundMessage(src, img_.name()));
    if (!s->consistent)
      return Status::InvalidArgument(InconsistentMessage(img_.name(), src, "--merge from it"));
    if (s == &target) return Status::OK();  // x | x == x
    if (s->data) {
      from = s->data.get();
    } else if (!s->spec.existing.empty()) {
      CBT_ASSIGN_OR_RETURN(loaded, LoadBitmap(img_, s->spec.existing));
      from = loaded.get();
    } else {
      return Status::OK();  // new or cleared: all zeros
    }
  }
  if (from->DirtyGranules() == 0) return Status::OK();  // nothing to add
  CBT_RETURN_IF_ERROR(Materialise(target));
  target.data->Merge(*from);
  return Status::OK();
}

Status BitmapEditor::Commit() {
  std::vector<qcow2::BitmapSpec> specs = Specs();
  return img_.Commit(specs);
}

}  // namespace cbt::cli
