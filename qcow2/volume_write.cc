// qcow2 Volume: writes, zeroes, trims and the ordered flush. See volume.h
// for the ordering rules and docs/qcow2-plugin.md for the crash analysis.
#include <algorithm>
#include <cstring>

#include "common/endian.h"
#include "qcow2/format.h"
#include "qcow2/util.h"
#include "qcow2/volume.h"

namespace cbt::qcow2 {

using internal::Hex;

void Volume::SetBeforeFirstWrite(std::function<Status()> hook) {
  std::lock_guard lk(hook_mu_);
  before_first_write_ = std::move(hook);
}

Status Volume::BeforeChange() {
  if (!opts_.writable) return Status::InvalidArgument(path_ + ": opened read-only", EROFS);
  if (first_write_done_.load(std::memory_order_acquire)) return Status::OK();
  std::lock_guard lk(hook_mu_);
  if (first_write_done_.load(std::memory_order_relaxed)) return Status::OK();
  if (before_first_write_) CBT_RETURN_IF_ERROR(before_first_write_());
  first_write_done_.store(true, std::memory_order_release);
  return Status::OK();
}

bool Volume::WaitIdle(uint64_t guest_cluster, std::unique_lock<std::mutex>& lk) {
  if (!busy_.count(guest_cluster)) return false;
  busy_cv_.wait(lk, [&] { return !busy_.count(guest_cluster); });
  return true;
}

Status Volume::MarkCorrupt(const std::string& why) {
  // As QEMU: set the corrupt bit so that nothing writes the image again
  // until it is checked. Best effort; the caller fails the request anyway.
  if (!corrupt_) {
    corrupt_ = true;
    std::byte b[8];
    StoreBE64(b, header_.incompatible | kIncompatCorrupt);
    if (io_->pwrite(b, kOffIncompatible).ok()) (void)io_->flush();
  }
  return Status::Corruption(path_ + ": " + why + "; image marked corrupt");
}

Result<uint64_t> Volume::AllocateCluster(bool* fresh) {
  std::unique_lock rl(rc_->mu);
  CBT_ASSIGN_OR_RETURN(uint64_t off, rc_->rc->Allocate(1));
  NoteRefcountStructure();
  rl.unlock();
  if (IsMetadata(off, cs_)) {
    // The refcounts say free what the image uses as metadata: refuse, as
    // QEMU's overlap check does.
    return MarkCorrupt("refcount of metadata cluster " + Hex(off) + " is 0");
  }
  CBT_ASSIGN_OR_RETURN(uint64_t fsize, io_->size());
  *fresh = off >= std::max(high_water_, fsize);
  high_water_ = std::max(high_water_, off + cs_);
  return off;
}

Result<uint64_t> Volume::AllocateDataCluster(std::unique_lock<std::mutex>& lk, bool* fresh) {
  uint64_t off = 0, fsize = 0;
  Status s;
  {
    std::lock_guard rl(rc_->mu);
    auto a = rc_->rc->Allocate(1);
    if (a.ok()) {
      off = *a;
      auto fs = io_->size();
      if (fs.ok()) {
        fsize = *fs;
      } else {
        (void)rc_->rc->Free(off, 1);
        s = std::move(fs).status();
      }
    } else {
      s = std::move(a).status();
    }
  }
  lk.lock();
  CBT_RETURN_IF_ERROR(s);
  {
    std::lock_guard rl(rc_->mu);  // order: mu_, then rc_->mu
    NoteRefcountStructure();
  }
  if (IsMetadata(off, cs_)) {
    // The refcounts say free what the image uses as metadata: refuse, as
    // QEMU's overlap check does (the cluster stays allocated: leaked).
    return MarkCorrupt("refcount of metadata cluster " + Hex(off) + " is 0");
  }
  // high_water_ only grows: reading it after the allocation is safe.
  *fresh = off >= std::max(high_water_, fsize);
  high_water_ = std::max(high_water_, off + cs_);
  return off;
}

Status Volume::SetEntry(uint64_t guest_cluster, uint64_t entry) {
  CBT_ASSIGN_OR_RETURN(L2Table * t, GetL2(guest_cluster / l2_entries_, true));
  if (!t->dirty()) ++l2_dirty_count_;
  ++t->gen;
  t->e[guest_cluster % l2_entries_] = entry;
  return Status::OK();
}

void Volume::ReleaseOld(const Mapping& m) {
  switch (m.kind) {
    case Kind::kNormal:
    case Kind::kZeroAlloc:
      pending_free_.emplace_back(m.host, 1);
      break;
    case Kind::kCompressed: {
      // Every host cluster the compressed bytes touch holds a reference.
      uint64_t last = m.host + m.csize - 1;
      uint64_t first = m.host / cs_ * cs_;
      pending_free_.emplace_back(first, (last / cs_ * cs_ - first) / cs_ + 1);
      break;
    }
    default:
      break;
  }
}

Status Volume::FillOld(const Mapping& m, uint64_t guest_cluster, std::span<std::byte> cluster) {
  switch (m.kind) {
    case Kind::kNormal:
      return ReadHost(cluster, m.host);
    case Kind::kCompressed:
      return ReadCompressed(m, cluster);
    case Kind::kUnallocated:
      return ReadBelow(cluster, guest_cluster * cs_);
    default:
      std::memset(cluster.data(), 0, cluster.size());
      return Status::OK();
  }
}

Status Volume::WritePiece(uint64_t gc, uint64_t in_off, std::span<const std::byte> data) {
  std::unique_lock lk(mu_);
  CBT_RETURN_IF_ERROR(Ready(gc, true, lk));
  if (corrupt_) return Status::IOError(path_ + ": image is marked corrupt");
  CBT_ASSIGN_OR_RETURN(Mapping m, Lookup(gc));
  if (m.kind == Kind::kNormal && m.copied) {
    // The common case: the cluster is ours alone; no metadata changes.
    if (IsMetadata(m.host, cs_))
      return MarkCorrupt("guest offset " + Hex(gc * cs_) + " maps onto metadata at " + Hex(m.host));
    Pin pin = TakePin();
    lk.unlock();
    return io_->pwrite(data, m.host + in_off);
  }
  // A new cluster (or the zeroed one already allocated) gets the whole
  // cluster: the old content around the write, then the write. busy_ keeps
  // others off this guest cluster, the hold keeps its table cached.
  auto table = GetL2(gc / l2_entries_, true);  // linking must not need to allocate
  if (!table.ok()) return std::move(table).status();
  L2Table* t = *table;
  busy_.insert(gc);
  ++t->holds;
  auto done = [&] {  // mu_ held
    --t->holds;
    busy_.erase(gc);
    busy_cv_.notify_all();
  };
  const bool reuse = m.kind == Kind::kZeroAlloc && m.copied;
  uint64_t target = m.host;
  bool fresh = false;
  if (reuse) {
    if (IsMetadata(target, cs_)) {
      done();
      return MarkCorrupt("guest offset " + Hex(gc * cs_) + " maps onto metadata");
    }
  } else {
    lk.unlock();
    auto a = AllocateDataCluster(lk, &fresh);  // relocks lk
    if (!a.ok()) {
      done();
      return std::move(a).status();
    }
    target = *a;
  }
  Pin pin;
  if (m.kind == Kind::kNormal || m.kind == Kind::kCompressed) pin = TakePin();
  lk.unlock();

  const bool old_zero = m.kind == Kind::kZeroPlain || m.kind == Kind::kZeroAlloc ||
                        (m.kind == Kind::kUnallocated && !backing_);
  const bool whole = in_off == 0 && data.size() == cs_;
  Status s;
  if (whole || (fresh && old_zero)) {
    // A fresh cluster past everything written reads as zeros already.
    s = io_->pwrite(data, target + in_off);
  } else {
    std::vector<std::byte> buf(cs_);
    s = FillOld(m, gc, buf);
    if (s.ok()) {
      std::memcpy(buf.data() + in_off, data.data(), data.size());
      s = io_->pwrite(buf, target);
    }
  }
  pin.Release();

  lk.lock();
  if (s.ok()) {
    // Held since before the unlock: still cached, no lookup needed.
    if (!t->dirty()) ++l2_dirty_count_;
    ++t->gen;
    t->e[gc % l2_entries_] = target | kOflagCopied;
  } else {
    // Nothing references the new cluster: give it back now (R6).
    if (!reuse) {
      std::lock_guard rl(rc_->mu);
      (void)rc_->rc->Free(target, 1);
    }
    done();
    return s;
  }
  if (!reuse) {
    ReleaseOld(m);
    ++stats_.allocated_clusters;
  }
  done();
  return Status::OK();
}

Status Volume::Write(std::span<const std::byte> in, uint64_t offset) {
  CBT_RETURN_IF_ERROR(BeforeChange());
  uint64_t done = 0;
  while (done < in.size()) {
    uint64_t off = offset + done;
    uint64_t n = std::min(cs_ - off % cs_, in.size() - done);
    CBT_RETURN_IF_ERROR(WritePiece(off / cs_, off % cs_, in.subspan(done, n)));
    done += n;
  }
  return MaybeWriteback();
}

Status Volume::ReadsAsZero(uint64_t gc, bool* zero) {
  std::unique_lock lk(mu_);
  CBT_RETURN_IF_ERROR(Ready(gc, false, lk));
  CBT_ASSIGN_OR_RETURN(Mapping m, Lookup(gc));
  *zero = m.kind == Kind::kZeroPlain || m.kind == Kind::kZeroAlloc ||
          (m.kind == Kind::kUnallocated && !backing_);
  return Status::OK();
}

Status Volume::ZeroWhole(uint64_t gc, bool may_trim, bool fast, bool trim) {
  const bool v3 = header_.version >= 3;
  if (!v3 && backing_ && !trim) {
    // Version 2 has no zero flag: over a backing file, real zeros.
    if (fast) return Status::NotSupported(path_ + ": zeroing needs data writes", ENOTSUP);
    std::vector<std::byte> zeros(cs_);
    return WritePiece(gc, 0, zeros);
  }
  std::unique_lock lk(mu_);
  CBT_RETURN_IF_ERROR(Ready(gc, true, lk));
  if (corrupt_) return Status::IOError(path_ + ": image is marked corrupt");
  // From here on mu_ stays held: SetEntry finds the table cached.
  CBT_ASSIGN_OR_RETURN(Mapping m, Lookup(gc));
  uint64_t next;
  if (!v3 || (trim && !backing_)) {
    next = 0;  // unallocated: reads zeros (or, v2 trim, the backing file)
  } else if (!trim && !may_trim && m.kind == Kind::kNormal && m.copied) {
    next = m.host | kOflagCopied | kOflagZero;  // keep the allocation
  } else if (!trim && (m.kind == Kind::kZeroPlain || m.kind == Kind::kZeroAlloc) &&
             !(may_trim && m.kind == Kind::kZeroAlloc)) {
    return Status::OK();  // already zero
  } else {
    next = kOflagZero;
  }
  if (next == m.entry) return Status::OK();
  if (m.kind == Kind::kUnallocated && next == 0) return Status::OK();
  CBT_RETURN_IF_ERROR(SetEntry(gc, next));
  if ((next & kL2OffsetMask) != m.host || m.kind == Kind::kCompressed) ReleaseOld(m);
  return Status::OK();
}

Status Volume::Zero(uint64_t offset, uint64_t len, bool may_trim, bool fast) {
  CBT_RETURN_IF_ERROR(BeforeChange());
  const uint64_t end = offset + len;
  auto whole = [&](uint64_t off, uint64_t n) {
    return off % cs_ == 0 && (n == cs_ || off + n == size_);
  };
  if (fast) {
    // Decide before changing anything: partial clusters that do not read as
    // zero, or v2 over a backing file, would need data writes.
    if (header_.version < 3 && backing_) return Status::NotSupported("zeroing is slow", ENOTSUP);
    for (uint64_t off : {offset, end - 1}) {
      uint64_t start = off / cs_ * cs_;
      uint64_t a = std::max(start, offset), b = std::min(start + cs_, end);
      if (whole(a, b - a)) continue;
      bool z = false;
      CBT_RETURN_IF_ERROR(ReadsAsZero(off / cs_, &z));
      if (!z) return Status::NotSupported("zeroing is slow", ENOTSUP);
    }
  }
  std::vector<std::byte> zeros;
  for (uint64_t off = offset; off < end;) {
    uint64_t n = std::min(cs_ - off % cs_, end - off);
    if (whole(off, n)) {
      CBT_RETURN_IF_ERROR(ZeroWhole(off / cs_, may_trim, fast, false));
    } else {
      bool z = false;
      CBT_RETURN_IF_ERROR(ReadsAsZero(off / cs_, &z));
      if (!z) {
        zeros.resize(cs_);
        CBT_RETURN_IF_ERROR(WritePiece(off / cs_, off % cs_, std::span(zeros).first(n)));
      }
    }
    off += n;
  }
  return MaybeWriteback();
}

Status Volume::Trim(uint64_t offset, uint64_t len) {
  if (!opts_.discard) return Status::OK();
  CBT_RETURN_IF_ERROR(BeforeChange());
  const uint64_t end = offset + len;
  for (uint64_t off = offset; off < end;) {
    uint64_t n = std::min(cs_ - off % cs_, end - off);
    if (off % cs_ == 0 && (n == cs_ || off + n == size_))
      CBT_RETURN_IF_ERROR(ZeroWhole(off / cs_, true, false, true));
    off += n;
  }
  return MaybeWriteback();
}

Status Volume::MaybeWriteback() {
  {
    std::lock_guard lk(mu_);
    // Dirty tables cannot be evicted: write them back only once they hold
    // the cache over its budget (by default the cache covers the image).
    if (l2_.size() <= cache_tables_ || l2_dirty_count_ == 0) return Status::OK();
  }
  return Flush();
}

Status Volume::Flush() {
  if (!opts_.writable) return Status::OK();
  std::lock_guard fl(flush_mu_);
  struct Snap {
    uint64_t l1i;
    uint64_t host;
    uint64_t gen;
    std::vector<std::byte> bytes;
  };
  std::vector<Snap> tables;
  std::vector<std::pair<uint64_t, uint64_t>> l1;  // index, value
  std::vector<std::pair<uint64_t, uint64_t>> frees;
  uint64_t boundary;
  {
    std::lock_guard lk(mu_);
    for (auto& [i, t] : l2_) {
      if (!t->dirty()) continue;
      Snap s{i, t->host, t->gen, std::vector<std::byte>(cs_)};
      for (uint64_t k = 0; k < l2_entries_; ++k) StoreBE64(s.bytes.data() + k * 8, t->e[k]);
      tables.push_back(std::move(s));
    }
    for (uint64_t i : l1_dirty_) l1.emplace_back(i, l1_[i]);
    frees.swap(pending_free_);
    boundary = ++pin_gen_;
  }
  auto restore_frees = [&] {
    std::lock_guard lk(mu_);
    pending_free_.insert(pending_free_.begin(), frees.begin(), frees.end());
  };
  // 1. Data and refcount increments durable before anything points at them.
  Status s = io_->flush();
  // 2. L2 tables (new ones before their L1 entries).
  for (size_t i = 0; s.ok() && i < tables.size(); ++i)
    s = io_->pwrite(tables[i].bytes, tables[i].host);
  if (s.ok() && !tables.empty()) s = io_->flush();
  // 3. L1 entries (8 bytes each: a sector write is atomic).
  for (size_t i = 0; s.ok() && i < l1.size(); ++i) {
    std::byte b[8];
    StoreBE64(b, l1[i].second);
    s = io_->pwrite(b, header_.l1_table_offset + l1[i].first * 8);
  }
  if (s.ok() && !l1.empty()) s = io_->flush();
  if (!s.ok()) {
    restore_frees();
    return s;
  }
  std::unique_lock lk(mu_);
  for (const Snap& sn : tables) {
    auto it = l2_.find(sn.l1i);
    if (it == l2_.end() || it->second->written_gen >= sn.gen) continue;
    bool was_dirty = it->second->dirty();
    it->second->written_gen = sn.gen;
    if (was_dirty && !it->second->dirty()) --l2_dirty_count_;
  }
  for (auto [i, v] : l1)
    if (l1_[i] == v) l1_dirty_.erase(i);
  ++stats_.flushes;
  if (frees.empty()) return Status::OK();
  // 4. The references are gone on disk; wait until no I/O that started
  // before the change can still use the old clusters, then release them.
  pin_cv_.wait(lk, [&] { return pins_.empty() || pins_.begin()->first >= boundary; });
  // The frees (refcount write-through, punching) need only the allocator:
  // nothing in memory references these clusters any more.
  lk.unlock();
  std::lock_guard rl(rc_->mu);
  for (size_t i = 0; i < frees.size(); ++i) {
    auto [host, n] = frees[i];
    s = rc_->rc->Free(host, n);
    if (!s.ok()) {
      // Refcounts wrong on disk already: leave the rest leaked (safe).
      return s.WithContext(path_ + ": releasing clusters at " + Hex(host));
    }
    if (!opts_.discard) continue;
    for (uint64_t c = 0; c < n; ++c) {
      auto rc = rc_->rc->Get((host + c * cs_) / cs_);
      if (rc.ok() && *rc == 0) (void)io_->punch_hole(host + c * cs_, cs_);
    }
  }
  return Status::OK();
}

}  // namespace cbt::qcow2
