// Fleece: copy-before-write and the point-in-time view (fleece.h).
#include "engine/fleece.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <bit>
#include <cstring>

#include "common/posix_file.h"

namespace cbt {

namespace {

// A copy reads at most this much of the disk at once.
constexpr uint64_t kMaxRunBytes = uint64_t{4} << 20;
// The state array costs one byte per block.
constexpr uint64_t kMaxBlocks = uint64_t{1} << 27;

bool IsZero(std::span<const std::byte> b) {
  return b.empty() ||
         (b[0] == std::byte{0} && std::memcmp(b.data(), b.data() + 1, b.size() - 1) == 0);
}

std::string Range(uint64_t offset, uint64_t length) {
  return "[" + std::to_string(offset) + ", +" + std::to_string(length) + ")";
}

}  // namespace

Result<std::unique_ptr<Fleece>> Fleece::Create(std::shared_ptr<BlockIO> store,
                                               const FleeceOptions& opts) {
  if (!store) return Status::InvalidArgument("fleece: no store");
  if (opts.block_size < 4096 || opts.block_size > (16u << 20) ||
      !std::has_single_bit(opts.block_size))
    return Status::InvalidArgument("fleece: block size " + std::to_string(opts.block_size) +
                                   " is not a power of two between 4 KiB and 16 MiB");
  if (opts.disk_size / opts.block_size >= kMaxBlocks)
    return Status::InvalidArgument("fleece: " + std::to_string(opts.disk_size) +
                                   " bytes are too many blocks of " +
                                   std::to_string(opts.block_size) + " bytes");
  return std::unique_ptr<Fleece>(new Fleece(std::move(store), opts));
}

Fleece::Fleece(std::shared_ptr<BlockIO> store, const FleeceOptions& opts)
    : opts_(opts), store_(std::move(store)) {
  const uint64_t n = blocks();
  state_ = std::make_unique<std::atomic<uint8_t>[]>(n);
  for (uint64_t i = 0; i < n; ++i) state_[i].store(kOld, std::memory_order_relaxed);
}

Fleece::~Fleece() = default;

uint64_t Fleece::BlockBytes(uint64_t b) const {
  return std::min<uint64_t>(opts_.block_size, opts_.disk_size - b * opts_.block_size);
}

bool Fleece::AllPreserved(uint64_t first, uint64_t last) const {
  for (uint64_t b = first; b <= last; ++b)
    if (Get(b) < kStored) return false;
  return true;
}

bool Fleece::FrozenOverlapLocked(uint64_t first, uint64_t last) const {
  for (const FrozenRead& r : frozen_)
    if (r.first <= last && first <= r.last) return true;
  return false;
}

Status Fleece::BrokenStatusLocked() const {
  return Status::IOError("backup session broken: " + *broken_ +
                             "; end it (backup-end) and run the backup again: the next run "
                             "still covers every change",
                         EIO);
}

void Fleece::Break(const std::string& why) {
  std::lock_guard lock(mu_);
  if (!broken_) {
    broken_ = why;
    broken_flag_.store(true);
    spdlog::warn("backup session broken: {}", why);
  }
  cv_.notify_all();
}

std::optional<std::string> Fleece::broken() const {
  std::lock_guard lock(mu_);
  return broken_;
}

FleeceStats Fleece::stats() const {
  std::lock_guard lock(mu_);
  return stats_;
}

Status Fleece::CopyRun(uint64_t first, uint64_t last, const DiskRead& read_old) {
  const uint64_t bs = opts_.block_size;
  const uint64_t start = first * bs;
  uint64_t bytes = 0;
  for (uint64_t b = first; b <= last; ++b) bytes += BlockBytes(b);
  // Not zero-filled: read_old fills it (a memset would be one more pass
  // over the data on every first overwrite).
  std::unique_ptr<std::byte[]> buf(new std::byte[bytes]);
  Status s = read_old(start, std::span<std::byte>(buf.get(), bytes));
  std::vector<bool> zero(last - first + 1);
  uint64_t need = 0;
  bool reserved = false;
  if (s.ok()) {
    for (uint64_t b = first; b <= last; ++b) {
      std::span<const std::byte> blk(buf.get() + (b - first) * bs, BlockBytes(b));
      zero[b - first] = IsZero(blk);
      if (!zero[b - first]) need += blk.size();
    }
    std::lock_guard lock(mu_);
    if (opts_.max_bytes && reserved_bytes_ + need > opts_.max_bytes) {
      s = Status::IOError(
          "the fleece store is full (cbt-fleece-max=" + std::to_string(opts_.max_bytes) + " bytes)",
          ENOSPC);
    } else {
      reserved_bytes_ += need;
      reserved = true;
    }
  } else {
    s = s.WithContext("reading the old data");
  }
  // Consecutive non-zero blocks go to the store in one write.
  for (uint64_t b = first; s.ok() && b <= last;) {
    if (zero[b - first]) {
      ++b;
      continue;
    }
    uint64_t e = b;
    while (e + 1 <= last && !zero[e + 1 - first]) ++e;
    const uint64_t off = b * bs, len = (e - b) * bs + BlockBytes(e);
    s = store_->pwrite(std::span<const std::byte>(buf.get() + (off - start), len), off);
    b = e + 1;
  }

  std::lock_guard lock(mu_);
  if (s.ok()) {
    for (uint64_t b = first; b <= last; ++b) {
      state_[b].store(zero[b - first] ? kZero : kStored);
      ++stats_.copied_blocks;
      if (zero[b - first]) ++stats_.zero_blocks;
    }
    stats_.stored_bytes += need;
    return s;
  }
  for (uint64_t b = first; b <= last; ++b) state_[b].store(kOld);
  if (reserved) reserved_bytes_ -= need;
  s = s.WithContext("copy-before-write of " + Range(start, bytes));
  if (opts_.on_error == FleeceErrorPolicy::kFailWrite) {
    // The caller reports the failed write, with the policy named.
    return Status::IOError(s.message() + " (cbt-fleece-error=fail-write: the write fails)",
                           s.err());
  }
  if (!broken_) {
    broken_ = s.message();
    broken_flag_.store(true);
    spdlog::warn("backup session broken: {} (cbt-fleece-error=break-backup: writes go on)",
                 s.message());
  }
  return s;
}

Status Fleece::BeforeChange(uint64_t offset, uint64_t length, const DiskRead& read_old) {
  if (length == 0 || offset >= opts_.disk_size) return Status::OK();
  length = std::min(length, opts_.disk_size - offset);
  const uint64_t bs = opts_.block_size;
  const uint64_t first = offset / bs, last = (offset + length - 1) / bs;
  if (broken_flag_.load() || ended_.load()) return Status::OK();
  // Fast path: everything preserved and no view read on the disk.
  if (AllPreserved(first, last) && frozen_count_.load() == 0) return Status::OK();

  std::unique_lock lock(mu_);
  bool waited = false;
  for (;;) {
    if (broken_ || ended_.load()) return Status::OK();
    // Claim the first run of blocks nobody preserved yet.
    uint64_t rf = first;
    while (rf <= last && Get(rf) != kOld) ++rf;
    if (rf <= last) {
      uint64_t rl = rf;
      while (rl + 1 <= last && Get(rl + 1) == kOld && (rl + 2 - rf) * bs <= kMaxRunBytes) ++rl;
      for (uint64_t b = rf; b <= rl; ++b) state_[b].store(kCopying);
      lock.unlock();
      Status s = CopyRun(rf, rl, read_old);
      lock.lock();
      cv_.notify_all();
      if (!s.ok()) {
        if (opts_.on_error == FleeceErrorPolicy::kFailWrite) return s;
        return Status::OK();  // broken: the change goes on
      }
      continue;
    }
    // Others' copies of our blocks, and view reads of them from the disk,
    // must finish before the change reaches the disk.
    bool busy = FrozenOverlapLocked(first, last);
    for (uint64_t b = first; !busy && b <= last; ++b) busy = Get(b) == kCopying;
    if (!busy) break;
    waited = true;
    cv_.wait(lock);
  }
  if (waited) ++stats_.write_waits;
  return Status::OK();
}

Status Fleece::BeginView(uint64_t first, uint64_t last, std::list<FrozenRead>::iterator& reg,
                         bool& frozen, std::vector<State>& states) {
  std::lock_guard lock(mu_);
  if (ended_.load())
    return Status::IOError(
        "the backup session ended (backup-end, or the server restarted): this view is gone; "
        "begin a new backup",
        EIO);
  if (broken_) return BrokenStatusLocked();
  ++views_;
  ++stats_.view_reads;
  states.resize(last - first + 1);
  frozen = false;
  for (uint64_t b = first; b <= last; ++b) {
    states[b - first] = Get(b);
    if (states[b - first] < kStored) frozen = true;
  }
  if (frozen) {
    frozen_.push_back({first, last});
    reg = std::prev(frozen_.end());
    frozen_count_.fetch_add(1);
  }
  return Status::OK();
}

Status Fleece::EndView(std::list<FrozenRead>::iterator reg, bool frozen, Status s) {
  std::lock_guard lock(mu_);
  if (frozen) {
    frozen_.erase(reg);
    frozen_count_.fetch_sub(1);
  }
  --views_;
  cv_.notify_all();
  // A session that broke meanwhile may have let a change through under us.
  if (s.ok() && broken_) return BrokenStatusLocked();
  return s;
}

Status Fleece::Read(uint64_t offset, std::span<std::byte> out, const DiskRead& read_disk) {
  if (out.empty()) return Status::OK();
  if (offset > opts_.disk_size || out.size() > opts_.disk_size - offset)
    return Status::InvalidArgument("read " + Range(offset, out.size()) + " past the end");
  const uint64_t bs = opts_.block_size;
  const uint64_t end = offset + out.size();
  const uint64_t first = offset / bs, last = (end - 1) / bs;
  std::list<FrozenRead>::iterator reg;
  bool frozen = false;
  std::vector<State> st;
  CBT_RETURN_IF_ERROR(BeginView(first, last, reg, frozen, st));
  // Final states decide the source; kOld and kCopying read the disk.
  auto source = [&](uint64_t b) { return st[b - first] < kStored ? kOld : st[b - first]; };
  Status s;
  for (uint64_t pos = offset; s.ok() && pos < end;) {
    const uint64_t b = pos / bs;
    const State src = source(b);
    uint64_t e = b;
    while (e + 1 <= last && source(e + 1) == src) ++e;
    const uint64_t run_end = std::min(end, (e + 1) * bs);
    std::span<std::byte> piece = out.subspan(pos - offset, run_end - pos);
    if (src == kStored)
      s = store_->pread(piece, pos);
    else if (src == kZero)
      std::fill(piece.begin(), piece.end(), std::byte{0});
    else
      s = read_disk(pos, piece);
    pos = run_end;
  }
  return EndView(reg, frozen, std::move(s));
}

Status Fleece::Extents(uint64_t offset, uint64_t length, const DiskExtents& disk,
                       std::vector<ViewExtent>& out) {
  if (offset >= opts_.disk_size || length == 0) return Status::OK();
  length = std::min(length, opts_.disk_size - offset);
  const uint64_t bs = opts_.block_size;
  const uint64_t end = offset + length;
  const uint64_t first = offset / bs, last = (end - 1) / bs;
  std::list<FrozenRead>::iterator reg;
  bool frozen = false;
  std::vector<State> st;
  CBT_RETURN_IF_ERROR(BeginView(first, last, reg, frozen, st));
  auto source = [&](uint64_t b) { return st[b - first] < kStored ? kOld : st[b - first]; };
  auto add = [&](ViewExtent e) {
    if (!out.empty() && out.back().hole == e.hole && out.back().zero == e.zero &&
        out.back().offset + out.back().length == e.offset)
      out.back().length += e.length;
    else
      out.push_back(e);
  };
  Status s;
  std::vector<ViewExtent> tmp;
  for (uint64_t pos = offset; s.ok() && pos < end;) {
    const uint64_t b = pos / bs;
    const State src = source(b);
    uint64_t e = b;
    while (e + 1 <= last && source(e + 1) == src) ++e;
    const uint64_t run_end = std::min(end, (e + 1) * bs);
    if (src != kOld) {
      add({pos, run_end - pos, false, src == kZero});
      pos = run_end;
      continue;
    }
    // The disk's answer, checked: contiguous, non-empty, clipped to the run.
    // Whatever it leaves out is reported as data (never a hole we cannot
    // vouch for).
    while (s.ok() && pos < run_end) {
      tmp.clear();
      s = disk(pos, run_end - pos, tmp);
      uint64_t p = pos;
      for (const ViewExtent& x : tmp) {
        if (!s.ok() || x.offset != p || x.length == 0) break;
        const uint64_t len = std::min(x.length, run_end - p);
        add({p, len, x.hole, x.zero});
        p += len;
        if (p == run_end) break;
      }
      if (p == pos) {
        add({pos, run_end - pos, false, false});
        p = run_end;
      }
      pos = p;
    }
  }
  return EndView(reg, frozen, std::move(s));
}

void Fleece::End() {
  std::unique_lock lock(mu_);
  ended_.store(true);
  cv_.notify_all();  // writers waiting for a copy or a view read go on
  cv_.wait(lock, [&] { return views_ == 0; });
  store_.reset();
}

Result<std::shared_ptr<BlockIO>> CreateFleeceFile(const std::string& dir) {
  CBT_ASSIGN_OR_RETURN(std::unique_ptr<PosixFile> f, PosixFile::CreateTemporary(dir));
  return std::shared_ptr<BlockIO>(std::move(f));
}

}  // namespace cbt
