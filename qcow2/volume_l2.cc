// qcow2 Volume: the L2 cache and lookups (mu_ held). Tables load with mu_
// released (see the threading notes in volume.h).
#include <algorithm>

#include "common/endian.h"
#include "qcow2/format.h"
#include "qcow2/util.h"
#include "qcow2/volume.h"

namespace cbt::qcow2 {

using internal::Hex;

void Volume::EvictIfNeeded() {
  while (l2_.size() >= cache_tables_) {
    auto victim = l2_.end();
    for (auto it = l2_.begin(); it != l2_.end(); ++it)
      if (!it->second->dirty() && it->second->holds == 0 &&
          (victim == l2_.end() || it->second->used < victim->second->used))
        victim = it;
    // All dirty or held: the next writeback (or release) frees them.
    if (victim == l2_.end()) return;
    l2_.erase(victim);
  }
}

bool Volume::Cached(uint64_t l1_index) const {
  return l1_index < l1_.size() && (!(l1_[l1_index] & kL1OffsetMask) || l2_.count(l1_index));
}

Result<bool> Volume::LoadL2(uint64_t l1_index, std::unique_lock<std::mutex>& lk) {
  if (l1_index >= l1_.size()) return Status::Corruption(path_ + ": guest offset beyond L1 table");
  bool dropped = false;
  while (!Cached(l1_index)) {
    if (loading_.count(l1_index)) {
      l2_cv_.wait(lk);
      dropped = true;
      continue;  // loaded (maybe evicted again since) or failed: look again
    }
    // On disk, not cached: L1 entries of existing tables never change, so
    // the offset read here stays right while mu_ is released.
    const uint64_t off = l1_[l1_index] & kL1OffsetMask;
    loading_.insert(l1_index);
    lk.unlock();
    auto t = std::make_unique<L2Table>();
    std::vector<std::byte> buf(cs_);
    Status s = io_->pread(buf, off);
    if (s.IsOutOfRange())
      s = Status::Corruption(path_ + ": L2 table at " + Hex(off) + " truncated");
    if (s.ok()) {
      t->host = off;
      t->e.resize(l2_entries_);
      for (uint64_t i = 0; i < l2_entries_; ++i) t->e[i] = LoadBE64(buf.data() + i * 8);
    }
    lk.lock();
    dropped = true;
    loading_.erase(l1_index);
    l2_cv_.notify_all();
    CBT_RETURN_IF_ERROR(s);
    // Nobody else inserts a table that is on disk while it is in loading_.
    EvictIfNeeded();
    t->used = ++l2_clock_;
    l2_.emplace(l1_index, std::move(t));
    // Inserted with mu_ held: cached now, Cached() ends the loop.
  }
  return dropped;
}

Status Volume::Ready(uint64_t gc, bool wait_idle, std::unique_lock<std::mutex>& lk) {
  for (;;) {
    CBT_ASSIGN_OR_RETURN(bool dropped, LoadL2(gc / l2_entries_, lk));
    if (wait_idle && WaitIdle(gc, lk)) continue;  // the table may be gone again
    if (!dropped) return Status::OK();
  }
}

Result<Volume::L2Table*> Volume::GetL2(uint64_t l1_index, bool create) {
  if (l1_index >= l1_.size()) return Status::Corruption(path_ + ": guest offset beyond L1 table");
  auto it = l2_.find(l1_index);
  if (it != l2_.end()) {
    it->second->used = ++l2_clock_;
    return it->second.get();
  }
  if (l1_[l1_index] & kL1OffsetMask)
    return Status::IOError(path_ + ": internal error: L2 table " + std::to_string(l1_index) +
                           " used before it was loaded");
  if (!create) return nullptr;
  // A new table: allocated with mu_ held (rare: once per table's range).
  auto t = std::make_unique<L2Table>();
  bool fresh = false;
  CBT_ASSIGN_OR_RETURN(t->host, AllocateCluster(&fresh));
  t->e.assign(l2_entries_, 0);
  t->gen = 1;  // dirty: written by the next flush, before the L1 entry
  ++l2_dirty_count_;
  AddMetadata(t->host, cs_);
  l1_[l1_index] = t->host | kOflagCopied;
  l1_dirty_.insert(l1_index);
  EvictIfNeeded();
  t->used = ++l2_clock_;
  return l2_.emplace(l1_index, std::move(t)).first->second.get();
}

Volume::Mapping Volume::Classify(uint64_t entry) const {
  Mapping m;
  m.entry = entry;
  if (entry & kOflagCompressed) {
    // Host byte offset in bits 0..x-1, extra 512-byte sectors above it.
    const uint32_t x = 62 - (cluster_bits_ - 8);
    m.kind = Kind::kCompressed;
    m.host = entry & ((uint64_t{1} << x) - 1);
    const uint64_t nsect = ((entry >> x) & ((uint64_t{1} << (cluster_bits_ - 8)) - 1)) + 1;
    m.csize = nsect * 512 - (m.host & 511);
    return m;
  }
  m.host = entry & kL2OffsetMask;
  m.copied = entry & kOflagCopied;
  if (header_.version >= 3 && (entry & kOflagZero))
    m.kind = m.host ? Kind::kZeroAlloc : Kind::kZeroPlain;
  else
    m.kind = m.host ? Kind::kNormal : Kind::kUnallocated;
  return m;
}

Result<Volume::Mapping> Volume::Lookup(uint64_t guest_cluster) {
  uint64_t l1i = guest_cluster / l2_entries_;
  if (l1i >= l1_.size()) return Status::Corruption(path_ + ": guest offset beyond L1 table");
  if (!(l1_[l1i] & kL1OffsetMask) && !l2_.count(l1i)) return Mapping{};
  CBT_ASSIGN_OR_RETURN(L2Table * t, GetL2(l1i, false));
  uint64_t e = t->e[guest_cluster % l2_entries_];
  if (!(e & kOflagCompressed)) {
    if ((e & kL2OffsetMask) % cs_ != 0)
      return Status::Corruption(path_ + ": L2 entry for guest offset " + Hex(guest_cluster * cs_) +
                                " has unaligned host offset " + Hex(e & kL2OffsetMask));
    if (header_.version < 3 && (e & kOflagZero))
      return Status::Corruption(path_ + ": zero flag in a version 2 image at guest offset " +
                                Hex(guest_cluster * cs_));
  }
  return Classify(e);
}

uint64_t Volume::ExtendRun(const Mapping& m, uint64_t gc, uint64_t in, uint64_t n, uint64_t left,
                           uint64_t cap) {
  while (m.kind == Kind::kNormal && n < left && n < cap) {
    const uint64_t next_gc = gc + (in + n) / cs_;
    // Not cached: the caller's next round loads it properly (mu_ released).
    if (!Cached(next_gc / l2_entries_)) break;
    auto next = Lookup(next_gc);
    if (!next.ok() || next->kind != Kind::kNormal || next->host != m.host + in + n) break;
    n += std::min(cs_, left - n);
  }
  return n;
}

}  // namespace cbt::qcow2
