// Tracker: persisting (P3) and the store of an edit. What Persist writes
// and when in_use may be cleared: the protocol table and the argument for
// the race-free clear are at the top of tracker.cc.
#include <spdlog/spdlog.h>

#include <map>
#include <thread>

#include "engine/tracker.h"

namespace cbt {

namespace {

// Hands a bitmap's slots to qcow2 and keeps a copy of exactly what was
// written, so the durable shadow can be updated once it is flushed.
class RecordingSource final : public qcow2::BitmapDataSource {
 public:
  explicit RecordingSource(const DirtyBitmap& b) : b_(b) {}
  bool SlotIsZero(uint64_t slot) const override {
    bool zero = b_.ChunkIsZero(slot);
    if (zero) written_[slot].clear();
    return zero;
  }
  void FillSlot(uint64_t slot, std::span<std::byte> out) const override {
    b_.SerializeChunk(slot, out);
    written_[slot].assign(out.begin(), out.end());
  }
  // slot -> bytes written (empty: zeros)
  const std::map<uint64_t, std::vector<std::byte>>& written() const { return written_; }

 private:
  const DirtyBitmap& b_;
  mutable std::map<uint64_t, std::vector<std::byte>> written_;
};

}  // namespace

Status Tracker::Persist() {
  std::lock_guard lock(store_mu_);
  return PersistLocked();
}

// The changed chunks of the stored bitmaps, taken and written in place.
struct Tracker::SlotWrites {
  const BitmapSet* set = nullptr;
  std::vector<std::vector<uint64_t>> taken;  // per set->stored entry
  std::vector<std::unique_ptr<RecordingSource>> sources;
  uint64_t bytes = 0;
  bool wrote = false;
};

// Writes every changed chunk of every stored bitmap in place; not flushed.
// On failure every taken chunk is pending again.
Status Tracker::WriteChangedLocked(SlotWrites& w) {
  const BitmapSet& set = *stored_set_;  // what the container holds
  w.set = &set;
  const size_t n = set.stored.size();
  w.taken.assign(n, {});
  Status first;
  for (size_t k = 0; k < n; ++k) {
    const LiveBitmap& b = set.all[set.stored[k]];
    w.sources.push_back(std::make_unique<RecordingSource>(*b.bits));
    w.taken[k] = b.bits->TakeChangedChunks();
    if (w.taken[k].empty()) continue;
    auto r = image_->WriteSlots(b.name, w.taken[k], *w.sources[k]);
    if (!r.ok()) {
      if (first.ok()) first = r.status().WithContext("persist bitmap '" + b.name + "'");
      continue;
    }
    w.bytes += *r;
    w.wrote = true;
  }
  AddStat(&TrackerStats::bytes_written, w.bytes);
  if (!first.ok()) RestoreLocked(w);
  return first;
}

// A write or its flush failed: keep every taken chunk pending (in_use
// stays set on disk).
void Tracker::RestoreLocked(const SlotWrites& w) {
  for (size_t k = 0; k < w.taken.size(); ++k)
    w.set->all[w.set->stored[k]].bits->MarkChunksChanged(w.taken[k]);
}

// Flushed: what was written is now durable on disk; the shadows learn it.
void Tracker::ApplyDurableLocked(const SlotWrites& w) {
  std::vector<std::byte> zeros;
  for (size_t k = 0; k < w.taken.size(); ++k) {
    DirtyBitmap* d = w.set->all[w.set->stored[k]].durable.get();
    if (!d) continue;  // not recording: nobody asks
    for (const auto& [slot, bytes] : w.sources[k]->written()) {
      if (bytes.empty()) {
        zeros.assign(d->chunk_bytes(), std::byte{0});
        d->LoadChunk(slot, zeros);
      } else {
        d->LoadChunk(slot, bytes);
      }
    }
  }
  if (w.wrote) {
    AddStat(&TrackerStats::persists);
    spdlog::debug("persist: {} bytes written to the container", w.bytes);
  }
}

Status Tracker::PersistLocked() {
  if (!image_) return Status::IOError("cbt: container already closed", ESHUTDOWN);
  if (opts_.readonly || !stored_set_) return Status::OK();
  SlotWrites w;
  CBT_RETURN_IF_ERROR(WriteChangedLocked(w));
  if (w.wrote) {
    Status f = image_->io()->flush();
    if (!f.ok()) {
      RestoreLocked(w);
      return f.WithContext("persist");  // the caller reports it
    }
  }
  ApplyDurableLocked(w);
  return ClearInUseLocked();
}

// An edit's store: the changed chunks in place (their flush is the
// commit's own, before its header switch), then the new set with one
// directory switch. On failure before the switch nothing changed.
Status Tracker::StoreEditLocked(std::vector<qcow2::BitmapSpec>& specs) {
  SlotWrites w;
  CBT_RETURN_IF_ERROR(WriteChangedLocked(w));
  Status c = image_->Commit(specs);
  if (!c.ok()) {
    // Failed while freeing the old clusters: the new set is in place.
    std::vector<qcow2::BitmapInfo> now = image_->Bitmaps();
    bool switched = now.size() == specs.size();
    for (size_t i = 0; switched && i < now.size(); ++i)
      switched = now[i].name == specs[i].name && now[i].enabled == specs[i].enabled;
    if (!switched) {
      RestoreLocked(w);
      return c.WithContext(Where());
    }
    spdlog::warn("{}: {}", Where(), c.message());
  }
  ApplyDurableLocked(w);
  return Status::OK();
}

Status Tracker::ClearInUseLocked() {
  if (!in_use_on_disk_.load()) return Status::OK();
  in_use_durable_.store(false);  // (C) new writers now queue at the gate
  while (marks_in_progress_.load() != 0) std::this_thread::yield();  // (D)
  // An edit has swapped in a set it has not stored yet: changes may be
  // marked only in its new bitmaps, which this persist did not write; the
  // edit's commit decides in_use. Checked after (C): a set swapped in
  // later has writers that read in_use_durable_ false and queue.
  if (Snapshot()->generation != stored_set_->generation) {
    in_use_durable_.store(true);
    return Status::OK();
  }
  const BitmapSet& set = *stored_set_;
  for (size_t i : set.stored) {
    if (set.all[i].bits->HasChangedChunks()) {  // (E) a change raced in: keep in_use
      in_use_durable_.store(true);
      return Status::OK();
    }
  }
  // The clear is written but not flushed. No flush is needed for safety:
  // the clusters it vouches for were flushed above, so if a power cut loses
  // the clear, in_use stays set and the bitmap is refused (the safe side);
  // if it lands, the bitmap on disk is exact. The page cache keeps it across
  // kill -9. This saves one sync per NBD flush (see docs/perf.md). From here
  // in_use_durable_ stays false, so the next writer sets in_use again and
  // flushes before its change is forwarded (P2).
  CBT_RETURN_IF_ERROR(image_->SetInUse(set.in_use_names, false));
  in_use_on_disk_.store(false);
  if (intents_ && armed_) {
    // Everything is persisted: the record may be emptied (same reasoning as
    // in_use: lost, it only recovers granules that are dirty already).
    intents_->ClearAll();
    CBT_RETURN_IF_ERROR(
        image_->RewriteExtensionInPlace(kIntentExtensionType, intents_->Serialize({})));
  }
  return Status::OK();
}

Status Tracker::Close() {
  Status s = Persist();
  std::lock_guard lock(store_mu_);
  // A clean stop: the disk's identity, taken now that every change is
  // written, for the next start to compare (disk_identity.h).
  if (s.ok() && image_ && attached_rw_.load() && !opts_.readonly && !in_use_on_disk_.load() &&
      !HasPendingChanges())
    s = RecordIdentityLocked();
  image_.reset();
  return s;
}

bool Tracker::HasPendingChanges() const {
  std::shared_ptr<const BitmapSet> set = Snapshot();
  for (size_t i : set->stored)
    if (set->all[i].bits->HasChangedChunks()) return true;
  return false;
}

uint64_t Tracker::PendingBytes() const {
  std::shared_ptr<const BitmapSet> set = Snapshot();
  uint64_t n = 0;
  for (size_t i : set->stored) {
    const DirtyBitmap& b = *set->all[i].bits;
    n += b.ChangedChunkCount() * b.chunk_bytes();
  }
  return n;
}

TrackerStats Tracker::stats() const {
  std::lock_guard lock(stats_mu_);
  return stats_;
}

void Tracker::AddStat(uint64_t TrackerStats::*field, uint64_t n) {
  std::lock_guard lock(stats_mu_);
  stats_.*field += n;
}

}  // namespace cbt
