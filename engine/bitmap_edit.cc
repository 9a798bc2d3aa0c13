// BitmapEditSet: see bitmap_edit.h.
#include "engine/bitmap_edit.h"

#include <algorithm>
#include <bit>

#include "qcow2/bitmap_dir.h"

namespace cbt {

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

BitmapEditSet::BitmapEditSet(qcow2::Image& img, uint64_t disk_size, std::vector<EditEntry> entries,
                             Where where)
    : img_(img), disk_size_(disk_size), where_(where), entries_(std::move(entries)) {}

std::vector<EditEntry> BitmapEditSet::FromImage(const qcow2::Image& img) {
  std::vector<EditEntry> out;
  for (const qcow2::BitmapInfo& info : img.Bitmaps()) {
    EditEntry e;
    e.name = info.name;
    e.granularity_bits = info.granularity_bits;
    e.recording = info.enabled;
    e.consistent = info.consistent;
    e.stored = info.name;
    out.push_back(std::move(e));
  }
  return out;
}

EditEntry* BitmapEditSet::Find(const std::string& name) {
  for (auto& e : entries_)
    if (e.name == name) return &e;
  return nullptr;
}

Status BitmapEditSet::NotFound(const std::string& name, const qcow2::Image& img) const {
  if (where_ == Where::kOnline && &img == &img_)
    return Status::NotFound("bitmap '" + name + "' not found; list the bitmaps with query-bitmaps");
  return Status::NotFound("bitmap '" + name + "' not found in " + img.name() +
                          "; list bitmaps with 'cbt info " + img.name() + "'");
}

Status BitmapEditSet::RequireConsistent(const EditEntry& e, const std::string& op) const {
  if (e.consistent) return Status::OK();
  return Status::InvalidArgument(InconsistentMessage(img_.name(), e.name, op));
}

Status BitmapEditSet::CheckFreeName(const std::string& name) const {
  for (const auto& e : entries_) {
    if (e.name != name) continue;
    std::string msg = "bitmap '" + name + "' already exists";
    if (where_ == Where::kOffline) msg += " in " + img_.name();
    if (!e.consistent)
      msg += " (inconsistent: remove it first with 'cbt bitmap " + img_.name() + " " + name +
             " --remove')";
    else
      msg += "; choose another name, or remove it first";
    return Status::AlreadyExists(std::move(msg));
  }
  Status s = qcow2::ValidateBitmapName(name);
  if (!s.ok()) return Status::InvalidArgument(s.message() + "; bitmap names are 1 to 1023 bytes");
  return Status::OK();
}

Result<std::shared_ptr<DirtyBitmap>> BitmapEditSet::Empty(uint32_t gbits) const {
  CBT_ASSIGN_OR_RETURN(std::unique_ptr<DirtyBitmap> b,
                       DirtyBitmap::Create(disk_size_, uint64_t{1} << gbits,
                                           static_cast<uint32_t>(img_.cluster_size())));
  return std::shared_ptr<DirtyBitmap>(std::move(b));
}

Result<std::shared_ptr<DirtyBitmap>> BitmapEditSet::Clone(const DirtyBitmap& src,
                                                          uint32_t gbits) const {
  CBT_ASSIGN_OR_RETURN(std::shared_ptr<DirtyBitmap> b, Empty(gbits));
  b->Merge(src);
  return b;
}

Result<std::shared_ptr<DirtyBitmap>> BitmapEditSet::Content(EditEntry& e) {
  if (e.data || e.stored.empty()) return e.data;
  // Online every consistent bitmap is in memory, and the container is not
  // read here (the edit runs without the store lock).
  if (where_ == Where::kOnline)
    return Status::InvalidArgument("internal: bitmap '" + e.name + "' is not loaded");
  CBT_ASSIGN_OR_RETURN(std::unique_ptr<DirtyBitmap> b, LoadBitmap(img_, e.stored, disk_size_));
  // Cache it: equal to the stored data, so still not new content.
  e.data = std::shared_ptr<DirtyBitmap>(std::move(b));
  return e.data;
}

Status BitmapEditSet::Add(const std::string& name, std::optional<uint64_t> granularity,
                          bool persistent, bool disabled) {
  CBT_RETURN_IF_ERROR(CheckFreeName(name));
  if (!persistent && where_ == Where::kOffline)
    return Status::InvalidArgument(
        "a transient bitmap exists only in a running server; add it through its control socket");
  const uint64_t g = granularity.value_or(DefaultGranularity(img_.cluster_size()));
  Status s = qcow2::ValidateGranularity(g);
  if (!s.ok())
    return Status::InvalidArgument("granularity " + std::to_string(g) + ": " + s.message());
  const auto gbits = static_cast<uint32_t>(std::countr_zero(g));
  const auto cbits = static_cast<uint32_t>(std::countr_zero(img_.cluster_size()));
  s = qcow2::ValidateBitmapSize(img_.virtual_size(), gbits, cbits);
  if (!s.ok()) return Status::InvalidArgument("bitmap '" + name + "': " + s.message());
  return AddEmpty(name, gbits, !disabled, persistent);
}

Status BitmapEditSet::AddEmpty(const std::string& name, uint32_t gbits, bool recording,
                               bool persistent) {
  EditEntry e;
  e.name = name;
  e.granularity_bits = gbits;
  e.recording = recording;
  e.persistent = persistent;
  if (where_ == Where::kOnline) {
    CBT_ASSIGN_OR_RETURN(e.data, Empty(gbits));  // memory to record into
    e.new_content = true;
  }  // offline: not stored and no data = all zeros
  entries_.push_back(std::move(e));
  stored_changed_ = stored_changed_ || persistent;
  return Status::OK();
}

Status BitmapEditSet::Remove(const std::string& name) {
  EditEntry* e = Find(name);
  if (!e) return NotFound(name, img_);
  stored_changed_ = stored_changed_ || e->persistent;
  entries_.erase(entries_.begin() + (e - entries_.data()));
  return Status::OK();
}

Status BitmapEditSet::Clear(const std::string& name) {
  EditEntry* e = Find(name);
  if (!e) return NotFound(name, img_);
  CBT_RETURN_IF_ERROR(RequireConsistent(*e, "--clear"));
  if (where_ == Where::kOnline) {
    CBT_ASSIGN_OR_RETURN(e->data, Empty(e->granularity_bits));
  } else {
    e->data.reset();  // all zeros: nothing needs to be loaded
    e->stored.clear();
  }
  e->new_content = true;
  stored_changed_ = stored_changed_ || e->persistent;
  return Status::OK();
}

Status BitmapEditSet::SetRecording(const std::string& name, bool recording) {
  EditEntry* e = Find(name);
  if (!e) return NotFound(name, img_);
  CBT_RETURN_IF_ERROR(RequireConsistent(*e, recording ? "--enable" : "--disable"));
  if (e->recording == recording) return Status::OK();
  e->recording = recording;
  stored_changed_ = stored_changed_ || e->persistent;
  return Status::OK();
}

Status BitmapEditSet::Merge(const std::string& target, const std::vector<std::string>& sources,
                            qcow2::Image* source_image) {
  EditEntry* t = Find(target);
  if (!t) return NotFound(target, img_);
  const std::string op = "--merge";
  CBT_RETURN_IF_ERROR(RequireConsistent(*t, op));
  std::vector<std::shared_ptr<DirtyBitmap>> from;  // keeps loaded sources alive
  for (const std::string& src : sources) {
    if (source_image) {
      Result<qcow2::BitmapInfo> info = source_image->Find(src);
      if (!info.ok()) return NotFound(src, *source_image);
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
      CBT_ASSIGN_OR_RETURN(std::unique_ptr<DirtyBitmap> b,
                           LoadBitmap(*source_image, src, disk_size_));
      from.push_back(std::move(b));
      continue;
    }
    EditEntry* s = Find(src);
    if (!s) return NotFound(src, img_);
    if (!s->consistent)
      return Status::InvalidArgument(InconsistentMessage(img_.name(), src, "--merge from it"));
    if (s == t) continue;  // x | x == x
    CBT_ASSIGN_OR_RETURN(std::shared_ptr<DirtyBitmap> c, Content(*s));
    if (c && c->DirtyGranules() != 0) from.push_back(std::move(c));
  }
  if (from.empty()) return Status::OK();  // nothing to add
  CBT_ASSIGN_OR_RETURN(std::shared_ptr<DirtyBitmap> base, Content(*t));
  std::shared_ptr<DirtyBitmap> merged;
  if (base) {
    CBT_ASSIGN_OR_RETURN(merged, Clone(*base, t->granularity_bits));
  } else {
    CBT_ASSIGN_OR_RETURN(merged, Empty(t->granularity_bits));
  }
  for (const auto& f : from) merged->Merge(*f);
  t->data = std::move(merged);
  t->new_content = true;
  stored_changed_ = stored_changed_ || t->persistent;
  return Status::OK();
}

Status BitmapEditSet::Copy(const std::string& source, const std::string& target) {
  EditEntry* s = Find(source);
  if (!s) return NotFound(source, img_);
  CBT_RETURN_IF_ERROR(RequireConsistent(*s, "copy"));
  CBT_RETURN_IF_ERROR(CheckFreeName(target));
  CBT_ASSIGN_OR_RETURN(std::shared_ptr<DirtyBitmap> c, Content(*s));
  EditEntry e;
  e.name = target;
  e.granularity_bits = s->granularity_bits;
  e.recording = false;
  e.persistent = s->persistent;
  if (c) {
    CBT_ASSIGN_OR_RETURN(e.data, Clone(*c, s->granularity_bits));
  } else if (where_ == Where::kOnline) {
    CBT_ASSIGN_OR_RETURN(e.data, Empty(s->granularity_bits));
  }
  e.new_content = true;
  stored_changed_ = stored_changed_ || e.persistent;
  entries_.push_back(std::move(e));
  return Status::OK();
}

Status BitmapEditSet::Rename(const std::string& name, const std::string& new_name) {
  EditEntry* e = Find(name);
  if (!e) return NotFound(name, img_);
  CBT_RETURN_IF_ERROR(RequireConsistent(*e, "rename"));
  if (name == new_name) return Status::OK();
  CBT_RETURN_IF_ERROR(CheckFreeName(new_name));
  e->name = new_name;
  stored_changed_ = stored_changed_ || e->persistent;
  return Status::OK();
}

Status BitmapEditSet::SetPersistent(const std::string& name, bool persistent) {
  if (where_ == Where::kOffline)
    return Status::InvalidArgument(
        "a bitmap's persistence can be changed only in a running server");
  EditEntry* e = Find(name);
  if (!e) return NotFound(name, img_);
  CBT_RETURN_IF_ERROR(RequireConsistent(*e, "set-persistent"));
  if (e->persistent == persistent) return Status::OK();
  if (persistent) {
    const auto cbits = static_cast<uint32_t>(std::countr_zero(img_.cluster_size()));
    Status s = qcow2::ValidateBitmapSize(img_.virtual_size(), e->granularity_bits, cbits);
    if (!s.ok()) return Status::InvalidArgument("bitmap '" + name + "': " + s.message());
  }
  CBT_ASSIGN_OR_RETURN(std::shared_ptr<DirtyBitmap> c, Content(*e));
  if (!c) {
    CBT_ASSIGN_OR_RETURN(c, Empty(e->granularity_bits));
  }
  e->data = std::move(c);
  e->persistent = persistent;
  e->stored.clear();  // transient: dropped from the container; persistent: written anew
  e->new_content = persistent;
  stored_changed_ = true;
  return Status::OK();
}

Status BitmapEditSet::Checkpoint(const std::string& freeze, const std::string& new_name) {
  EditEntry* f = Find(freeze);
  if (!f) return NotFound(freeze, img_);
  CBT_RETURN_IF_ERROR(RequireConsistent(*f, "checkpoint"));
  if (!f->recording)
    return Status::InvalidArgument("bitmap '" + freeze +
                                   "' is not recording; a checkpoint freezes a recording bitmap");
  CBT_RETURN_IF_ERROR(CheckFreeName(new_name));
  const uint32_t gbits = f->granularity_bits;
  const bool persistent = f->persistent;
  f->recording = false;
  stored_changed_ = stored_changed_ || persistent;
  return AddEmpty(new_name, gbits, /*recording=*/true, persistent);
}

std::vector<qcow2::BitmapSpec> BitmapEditSet::Specs() {
  std::vector<qcow2::BitmapSpec> out;
  sources_.clear();
  for (const EditEntry& e : entries_) {
    if (!e.persistent) continue;
    qcow2::BitmapSpec s;
    s.name = e.name;
    s.granularity_bits = e.granularity_bits;
    s.enabled = e.recording;
    if (!e.new_content && !e.stored.empty()) {
      s.existing = e.stored;  // its stored table is kept
    } else if (e.data) {
      sources_.push_back(std::make_unique<DirtyBitmapSource>(*e.data));
      s.data = sources_.back().get();
    }  // else: new and all zeros
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace cbt
