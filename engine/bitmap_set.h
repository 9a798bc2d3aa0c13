// BitmapSet: one immutable version of the tracker's bitmaps. The tracker
// swaps whole sets (Tracker::Edit) while no change is in flight (ChangeGate
// drained), so the data path reads the current set without a lock; anyone
// else holds a shared_ptr to the version they read. The DirtyBitmaps inside
// are shared between versions (an edit that keeps a bitmap keeps its
// object) and are themselves thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bitmap/dirty_bitmap.h"

namespace cbt {

struct LiveBitmap {
  std::string name;
  uint32_t granularity_bits = 16;
  bool recording = false;  // marked by every change
  bool persistent = true;  // stored in the container
  bool consistent = true;  // false: left in use by someone else; not loaded
  // The bits in memory; null only when !consistent.
  std::shared_ptr<DirtyBitmap> bits;
  // persistent && recording: the bits known to be on disk and flushed (the
  // durable shadow). A change whose granules are all set here is covered on
  // disk and needs neither marking nor in_use. Between edits it only grows;
  // an edit replaces it while nothing is in flight.
  std::shared_ptr<DirtyBitmap> durable;
};

struct BitmapSet {
  std::vector<LiveBitmap> all;  // container order, then transient ones
  // Indexes into `all`.
  std::vector<size_t> recording;
  std::vector<size_t> stored;  // persistent and consistent: what Persist writes
  // Names of the persistent recording bitmaps: those in_use is set on.
  std::vector<std::string> in_use_names;

  // Fills the index lists from `all`.
  static std::shared_ptr<const BitmapSet> Make(std::vector<LiveBitmap> all) {
    auto s = std::make_shared<BitmapSet>();
    s->all = std::move(all);
    for (size_t i = 0; i < s->all.size(); ++i) {
      const LiveBitmap& b = s->all[i];
      if (!b.consistent) continue;
      if (b.recording) s->recording.push_back(i);
      if (b.persistent) s->stored.push_back(i);
      if (b.recording && b.persistent) s->in_use_names.push_back(b.name);
    }
    return s;
  }
  const LiveBitmap* Find(const std::string& name) const {
    for (const auto& b : all)
      if (b.name == name) return &b;
    return nullptr;
  }
};

}  // namespace cbt
