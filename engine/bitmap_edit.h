// BitmapEditSet: the bitmap-editing operations (qemu-img bitmap's and QMP's
// block-dirty-bitmap-*), applied in order to a working copy of a set of
// bitmaps; nothing is written. Shared by the offline tool (server/
// bitmap_ops.h: `cbt bitmap FILE`) and the running filter (Tracker::Edit:
// the control socket), which then store the result with ONE
// qcow2::Image::Commit (a directory switch), so several operations take
// effect all together or not at all.
//
// Copy on write: an entry's content is a shared DirtyBitmap (the live one in
// the filter) or, offline, the stored data read on demand. An operation that
// changes content (clear, merge, copy) makes a new DirtyBitmap and never
// touches the old one, so a refused or failed edit leaves every live bitmap
// exactly as it was.
//
// Semantics (qemu-img 7.2 / QMP where they have them):
//   add      new, empty; granularity default = cluster size clamped to
//            4 KiB..64 KiB; recording unless disabled; persistent unless
//            asked transient (online only). The name must be free.
//   remove   drops it; the only operation allowed on an inconsistent bitmap
//            (in_use left set by a program that did not close it).
//   clear    all bits clean.
//   enable / disable   recording on / off ("auto" flag).
//   merge    target |= every source, across granularities.
//   copy     a new bitmap with the source's bits, granularity and
//            persistence, not recording (as QMP's merge into a fresh one).
//   rename   same bits under a new, free name.
//   set-persistent  persistent <-> transient (online only): a transient
//            bitmap is not in the container and is gone at stop.
//   checkpoint  disable `freeze` (which must be recording) and add `new`
//            recording, with freeze's granularity and persistence.
// Threading: one thread.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bitmap/dirty_bitmap.h"
#include "common/status.h"
#include "engine/bitmap_store.h"
#include "qcow2/image.h"

namespace cbt {

struct EditEntry {
  std::string name;
  uint32_t granularity_bits = 16;
  bool recording = true;
  bool persistent = true;
  bool consistent = true;  // false: in use by someone else; remove only
  // Name of the stored bitmap this entry is, in the container; empty: not
  // stored (transient, or new).
  std::string stored;
  // The content. Null: the stored bitmap's data (read when needed), or all
  // zeros when not stored.
  std::shared_ptr<DirtyBitmap> data;
  // `data` is new content the container does not hold under `stored`.
  bool new_content = false;
};

// Default granularity for add on a container with this cluster size.
uint64_t DefaultGranularity(uint64_t cluster_size);

// The message for an operation refused on an inconsistent bitmap of `file`.
std::string InconsistentMessage(const std::string& file, const std::string& bitmap,
                                const std::string& op);

class BitmapEditSet {
 public:
  enum class Where {
    kOffline,  // `cbt bitmap FILE`: every bitmap persistent; messages name the tool
    kOnline,   // the running filter: new bitmaps get memory at once
  };
  // REQUIRES: img outlives the set. disk_size: the disk the bitmaps cover
  // (online: the tracker's; offline: the image's virtual size).
  BitmapEditSet(qcow2::Image& img, uint64_t disk_size, std::vector<EditEntry> entries, Where where);
  // Offline: every stored bitmap, content not loaded.
  static std::vector<EditEntry> FromImage(const qcow2::Image& img);

  // Failure (nothing changed): NotFound, AlreadyExists, InvalidArgument
  // (bad name or granularity, inconsistent bitmap, transient offline, ...),
  // Corruption/IOError reading stored data.
  Status Add(const std::string& name, std::optional<uint64_t> granularity, bool persistent,
             bool disabled);
  Status Remove(const std::string& name);
  Status Clear(const std::string& name);
  Status SetRecording(const std::string& name, bool recording);
  // source_image: merge `sources` from another image (offline only); null:
  // from this set (earlier operations of the same call are seen).
  Status Merge(const std::string& target, const std::vector<std::string>& sources,
               qcow2::Image* source_image = nullptr);
  Status Copy(const std::string& source, const std::string& target);
  Status Rename(const std::string& name, const std::string& new_name);
  Status SetPersistent(const std::string& name, bool persistent);
  Status Checkpoint(const std::string& freeze, const std::string& new_name);

  const std::vector<EditEntry>& entries() const { return entries_; }
  // True once an operation changed what the container must hold.
  bool stored_set_changed() const { return stored_changed_; }
  // The container's new set for Image::Commit: the persistent entries. The
  // returned specs point into this object: keep it alive until Commit.
  std::vector<qcow2::BitmapSpec> Specs();

 private:
  EditEntry* Find(const std::string& name);
  Status NotFound(const std::string& name, const qcow2::Image& img) const;
  Status RequireConsistent(const EditEntry& e, const std::string& op) const;
  Status CheckFreeName(const std::string& name) const;
  // Appends a new, empty bitmap (the name is checked by the caller).
  Status AddEmpty(const std::string& name, uint32_t gbits, bool recording, bool persistent);
  // The entry's current content, loading (and caching) it if needed;
  // null = all zeros. Never adds or removes entries: pointers stay valid.
  Result<std::shared_ptr<DirtyBitmap>> Content(EditEntry& e);
  Result<std::shared_ptr<DirtyBitmap>> Empty(uint32_t granularity_bits) const;
  Result<std::shared_ptr<DirtyBitmap>> Clone(const DirtyBitmap& src, uint32_t gbits) const;

  qcow2::Image& img_;
  const uint64_t disk_size_;
  const Where where_;
  std::vector<EditEntry> entries_;
  bool stored_changed_ = false;
  std::vector<std::unique_ptr<DirtyBitmapSource>> sources_;
};

}  // namespace cbt
