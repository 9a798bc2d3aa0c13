// DirtyBitmap implementation. Design notes:
//
// Levels. levels_[0] holds the granule bits. levels_[l+1] holds one bit per
// word of levels_[l]; the top level is a single word. Invariant: a word that
// is non-zero at level l has its bit set at level l+1 (a summary bit may be
// set over a zero word only transiently, between a clear and its summary
// update, which both happen under the exclusive lock).
//
// Setting fresh bits (shared lock): fetch_or the level-0 word; if the word was
// zero, walk every summary level up to the top and set the bit there if it is
// not set yet. Every thread that makes a word non-zero walks the whole way up
// (it does not stop at a bit some other thread has set), so once Mark returns
// every level above its bits is set and no search can miss them. Then the
// chunk's "changed" bit is set. A persister that takes the changed bit and
// then serialises sees the new bits, or takes the changed bit again later.
//
// Clearing (exclusive lock): clear level-0 bits, then clear summary bits of
// words that became zero, cascading up while summary words become zero.
//
// Searches read the atomics without a lock: a concurrent Mark may or may not
// be seen, a concurrent Clear may be seen half done (as a superset).
#include "bitmap/dirty_bitmap.h"

#include <algorithm>
#include <bit>
#include <mutex>
#include <string>

#include "common/endian.h"

namespace cbt {

namespace {

constexpr uint64_t kNone = ~uint64_t{0};
// 2^36 bits = 8 GiB of memory: beyond that the user wants a larger granularity.
constexpr uint64_t kMaxBits = uint64_t{1} << 36;

bool IsPow2(uint64_t v) {
  return v != 0 && (v & (v - 1)) == 0;
}

// Mask of bits [lo, hi] within one 64-bit word (0 <= lo <= hi <= 63).
uint64_t RangeMask(unsigned lo, unsigned hi) {
  uint64_t upper = hi == 63 ? ~uint64_t{0} : ((uint64_t{1} << (hi + 1)) - 1);
  return upper & (~uint64_t{0} << lo);
}

std::unique_ptr<std::atomic<uint64_t>[]> ZeroWords(uint64_t n) {
  // Value-initialised: every word starts at zero.
  return std::unique_ptr<std::atomic<uint64_t>[]>(new std::atomic<uint64_t>[n]());
}

}  // namespace

Result<std::unique_ptr<DirtyBitmap>> DirtyBitmap::Create(uint64_t disk_size, uint64_t granularity,
                                                         uint32_t chunk_bytes) {
  if (!IsPow2(granularity) || granularity < (uint64_t{1} << kMinGranularityBits) ||
      granularity > (uint64_t{1} << kMaxGranularityBits))
    return Status::InvalidArgument("granularity " + std::to_string(granularity) +
                                   ": must be a power of two from 512 B to 2 GiB");
  if (!IsPow2(chunk_bytes) || chunk_bytes < 512 || chunk_bytes > (2u << 20))
    return Status::InvalidArgument("chunk size " + std::to_string(chunk_bytes) +
                                   ": must be a power of two from 512 B to 2 MiB");
  uint32_t gbits = static_cast<uint32_t>(std::countr_zero(granularity));
  uint64_t nbits = (disk_size >> gbits) + ((disk_size & (granularity - 1)) ? 1 : 0);
  if (nbits > kMaxBits)
    return Status::InvalidArgument("disk size " + std::to_string(disk_size) + " with granularity " +
                                   std::to_string(granularity) +
                                   ": more than 2^36 granules; use a larger granularity");
  return std::unique_ptr<DirtyBitmap>(new DirtyBitmap(disk_size, gbits, chunk_bytes));
}

DirtyBitmap::DirtyBitmap(uint64_t disk_size, uint32_t gbits, uint32_t chunk_bytes)
    : disk_size_(disk_size),
      gbits_(gbits),
      nbits_((disk_size >> gbits) + ((disk_size & ((uint64_t{1} << gbits) - 1)) ? 1 : 0)),
      chunk_bytes_(chunk_bytes),
      nchunks_(((nbits_ + 7) / 8 + chunk_bytes - 1) / chunk_bytes),
      words_per_chunk_shift_(static_cast<uint32_t>(std::countr_zero(chunk_bytes / 8u))) {
  uint64_t words = std::max<uint64_t>(1, (nbits_ + 63) / 64);
  for (;;) {
    levels_.push_back(ZeroWords(words));
    level_words_.push_back(words);
    if (words == 1) break;
    words = (words + 63) / 64;
  }
  changed_words_ = std::max<uint64_t>(1, (nchunks_ + 63) / 64);
  changed_ = ZeroWords(changed_words_);
}

// ---- marking -------------------------------------------------------------

Result<bool> DirtyBitmap::Mark(uint64_t offset, uint64_t length) {
  if (length == 0) return false;
  if (offset > disk_size_ || length > disk_size_ - offset)
    return Status::InvalidArgument("mark [" + std::to_string(offset) + ", +" +
                                   std::to_string(length) + "): past the end of the disk (" +
                                   std::to_string(disk_size_) + " bytes)");
  const uint64_t first = offset >> gbits_;
  const uint64_t last = (offset + length - 1) >> gbits_;
  if (AllSet(first, last)) return false;  // lock-free fast path
  std::shared_lock lock(mu_);
  return SetBits(first, last) != 0;
}

bool DirtyBitmap::AllSet(uint64_t first, uint64_t last) const {
  const Word* bits = levels_[0].get();
  for (uint64_t wi = first >> 6; wi <= (last >> 6); ++wi) {
    unsigned lo = wi == (first >> 6) ? unsigned(first & 63) : 0;
    unsigned hi = wi == (last >> 6) ? unsigned(last & 63) : 63;
    uint64_t m = RangeMask(lo, hi);
    if ((bits[wi].load() & m) != m) return false;
  }
  return true;
}

bool DirtyBitmap::IsDirty(uint64_t offset, uint64_t length) const {
  if (length == 0) return true;
  if (offset > disk_size_ || length > disk_size_ - offset) return false;
  return AllSet(offset >> gbits_, (offset + length - 1) >> gbits_);
}

uint64_t DirtyBitmap::SetBits(uint64_t first, uint64_t last) {
  Word* bits = levels_[0].get();
  uint64_t added = 0;
  for (uint64_t wi = first >> 6; wi <= (last >> 6); ++wi) {
    unsigned lo = wi == (first >> 6) ? unsigned(first & 63) : 0;
    unsigned hi = wi == (last >> 6) ? unsigned(last & 63) : 63;
    uint64_t m = RangeMask(lo, hi);
    if ((bits[wi].load(std::memory_order_acquire) & m) == m) continue;
    uint64_t old = bits[wi].fetch_or(m, std::memory_order_acq_rel);
    uint64_t fresh = m & ~old;
    if (fresh == 0) continue;
    added += static_cast<uint64_t>(std::popcount(fresh));
    SetSummary(wi);
    NoteChunkChanged(wi);
  }
  if (added) dirty_granules_.fetch_add(added, std::memory_order_relaxed);
  return added;
}

void DirtyBitmap::SetSummary(uint64_t word_index) {
  // Walk all the way up; see the design note for why we never stop early.
  uint64_t idx = word_index;
  for (size_t l = 1; l < levels_.size(); ++l) {
    uint64_t bit = uint64_t{1} << (idx & 63);
    Word& w = levels_[l][idx >> 6];
    if ((w.load(std::memory_order_acquire) & bit) == 0) w.fetch_or(bit, std::memory_order_acq_rel);
    idx >>= 6;
  }
}

// Always a read-modify-write, never "load, and skip if already set": the
// protocol with TakeChangedChunks needs every marker's note to be ordered
// against the persister's exchange on the same word. All RMWs of one atomic
// are totally ordered (its modification order), so one of two holds:
//  - the note comes first: the exchange reads it (or a later RMW of the
//    release sequence it heads) and synchronises with it, so the data bits
//    this marker set before the note are visible to the persister's read of
//    the chunk, which follows the exchange;
//  - the exchange comes first: the note leaves the bit set for the next take.
// A plain load that sees the bit set gives no such order (the store-buffer
// pattern: it may read the value from before the exchange while the
// persister reads the data from before the mark), and a persist could then
// miss the change and clear in_use over it.
void DirtyBitmap::NoteChunkChanged(uint64_t word_index) {
  uint64_t c = word_index >> words_per_chunk_shift_;
  changed_[c >> 6].fetch_or(uint64_t{1} << (c & 63), std::memory_order_acq_rel);
}

// ---- queries -------------------------------------------------------------

bool DirtyBitmap::Test(uint64_t offset) const {
  if (offset >= disk_size_) return false;
  uint64_t n = offset >> gbits_;
  return (levels_[0][n >> 6].load(std::memory_order_acquire) >> (n & 63)) & 1;
}

uint64_t DirtyBitmap::DirtyBytes() const {
  uint64_t granules = DirtyGranules();
  if (granules == 0) return 0;
  uint64_t bytes = granules << gbits_;
  uint64_t tail = disk_size_ - ((nbits_ - 1) << gbits_);  // size of the last granule
  if (tail != granularity() && Test(disk_size_ - 1)) bytes -= granularity() - tail;
  return bytes;
}

// Next set bit >= from at `level`, or kNone. At summary levels the bit found
// may be stale (its word zero); callers re-check the level below.
static uint64_t NextSetAt(const std::vector<std::unique_ptr<std::atomic<uint64_t>[]>>& levels,
                          const std::vector<uint64_t>& level_words, size_t level, uint64_t from,
                          uint64_t nbits_at_level) {
  for (;;) {
    if (from >= nbits_at_level) return kNone;
    uint64_t wi = from >> 6;
    uint64_t w = levels[level][wi].load(std::memory_order_acquire) & (~uint64_t{0} << (from & 63));
    if (w) {
      uint64_t bit = (wi << 6) + static_cast<uint64_t>(std::countr_zero(w));
      return bit < nbits_at_level ? bit : kNone;
    }
    if (level + 1 == levels.size()) return kNone;  // top level is one word
    uint64_t nw = NextSetAt(levels, level_words, level + 1, wi + 1, level_words[level]);
    if (nw == kNone) return kNone;
    from = nw << 6;
  }
}

uint64_t DirtyBitmap::FindNext(uint64_t from, bool want_set) const {
  if (from >= nbits_) return nbits_;
  if (want_set) {
    uint64_t b = NextSetAt(levels_, level_words_, 0, from, nbits_);
    return b == kNone ? nbits_ : b;
  }
  const Word* bits = levels_[0].get();
  for (uint64_t wi = from >> 6; wi < level_words_[0]; ++wi) {
    uint64_t w = ~bits[wi].load(std::memory_order_acquire);
    if (wi == (from >> 6)) w &= ~uint64_t{0} << (from & 63);
    if (w) return std::min(nbits_, (wi << 6) + static_cast<uint64_t>(std::countr_zero(w)));
  }
  return nbits_;
}

std::optional<uint64_t> DirtyBitmap::NextDirty(uint64_t offset) const {
  if (offset >= disk_size_) return std::nullopt;
  uint64_t b = FindNext(offset >> gbits_, true);
  if (b >= nbits_) return std::nullopt;
  return std::max(offset, b << gbits_);
}

std::optional<uint64_t> DirtyBitmap::NextClean(uint64_t offset) const {
  if (offset >= disk_size_) return std::nullopt;
  uint64_t b = FindNext(offset >> gbits_, false);
  if (b >= nbits_) return std::nullopt;
  return std::max(offset, b << gbits_);
}

void DirtyBitmap::ForEachExtent(uint64_t offset, uint64_t length,
                                const std::function<bool(const Extent&)>& fn) const {
  if (offset >= disk_size_) return;
  uint64_t end = length > disk_size_ - offset ? disk_size_ : offset + length;
  uint64_t pos = offset;
  while (pos < end) {
    bool dirty = Test(pos);
    std::optional<uint64_t> next = dirty ? NextClean(pos) : NextDirty(pos);
    uint64_t stop = next ? std::min(*next, end) : end;
    if (!fn(Extent{pos, stop - pos, dirty})) return;
    pos = stop;
  }
}

std::vector<Extent> DirtyBitmap::Extents(uint64_t offset, uint64_t length) const {
  std::vector<Extent> out;
  ForEachExtent(offset, length, [&](const Extent& e) {
    out.push_back(e);
    return true;
  });
  return out;
}

// ---- clearing and merging --------------------------------------------------

void DirtyBitmap::ClearAll() {
  std::unique_lock lock(mu_);
  Word* bits = levels_[0].get();
  for (uint64_t wi = 0; wi < level_words_[0]; ++wi) {
    if (bits[wi].load(std::memory_order_relaxed) == 0) continue;
    bits[wi].store(0, std::memory_order_release);
    NoteChunkChanged(wi);
  }
  for (size_t l = 1; l < levels_.size(); ++l)
    for (uint64_t i = 0; i < level_words_[l]; ++i)
      levels_[l][i].store(0, std::memory_order_release);
  dirty_granules_.store(0, std::memory_order_relaxed);
}

Status DirtyBitmap::ClearRange(uint64_t offset, uint64_t length) {
  if (offset > disk_size_ || length > disk_size_ - offset)
    return Status::InvalidArgument("clear [" + std::to_string(offset) + ", +" +
                                   std::to_string(length) + "): past the end of the disk (" +
                                   std::to_string(disk_size_) + " bytes)");
  if (length == 0) return Status::OK();
  const uint64_t g = granularity();
  const uint64_t end = offset + length;
  uint64_t first = (offset + g - 1) >> gbits_;
  uint64_t stop = end == disk_size_ ? nbits_ : end >> gbits_;  // exclusive
  if (first >= stop) return Status::OK();
  std::unique_lock lock(mu_);
  ClearBitsLocked(first, stop - 1);
  return Status::OK();
}

void DirtyBitmap::ClearBitsLocked(uint64_t first, uint64_t last) {
  Word* bits = levels_[0].get();
  uint64_t removed = 0;
  for (uint64_t wi = first >> 6; wi <= (last >> 6); ++wi) {
    unsigned lo = wi == (first >> 6) ? unsigned(first & 63) : 0;
    unsigned hi = wi == (last >> 6) ? unsigned(last & 63) : 63;
    uint64_t m = RangeMask(lo, hi);
    uint64_t old = bits[wi].load(std::memory_order_relaxed);
    if ((old & m) == 0) continue;
    uint64_t now = old & ~m;
    bits[wi].store(now, std::memory_order_release);
    removed += static_cast<uint64_t>(std::popcount(old & m));
    NoteChunkChanged(wi);
    if (now != 0) continue;
    // Word became zero: clear summary bits upward while words become zero.
    uint64_t idx = wi;
    for (size_t l = 1; l < levels_.size(); ++l) {
      Word& s = levels_[l][idx >> 6];
      uint64_t v = s.load(std::memory_order_relaxed) & ~(uint64_t{1} << (idx & 63));
      s.store(v, std::memory_order_release);
      if (v != 0) break;
      idx >>= 6;
    }
  }
  dirty_granules_.fetch_sub(removed, std::memory_order_relaxed);
}

void DirtyBitmap::Merge(const DirtyBitmap& src) {
  if (&src == this) return;
  // Collect first so no lock of ours is held while reading src.
  std::vector<Extent> dirty;
  uint64_t pos = 0;
  while (auto d = src.NextDirty(pos)) {
    if (*d >= disk_size_) break;
    auto c = src.NextClean(*d);
    uint64_t end = c ? *c : src.disk_size();
    dirty.push_back(Extent{*d, end - *d, true});
    if (!c) break;
    pos = end;
  }
  std::shared_lock lock(mu_);
  for (const Extent& e : dirty) {
    uint64_t end = std::min(e.offset + e.length, disk_size_);
    SetBits(e.offset >> gbits_, (end - 1) >> gbits_);
  }
}

// ---- serialisation ---------------------------------------------------------

void DirtyBitmap::SerializeChunk(uint64_t idx, std::span<std::byte> out) const {
  const uint64_t wpc = uint64_t{1} << words_per_chunk_shift_;
  const uint64_t w0 = idx * wpc;
  const uint64_t w1 = std::min(w0 + wpc, (nbits_ + 63) / 64);
  size_t pos = 0;
  for (uint64_t wi = w0; wi < w1; ++wi, pos += 8)
    StoreLE64(out.data() + pos, levels_[0][wi].load(std::memory_order_acquire));
  std::fill(out.begin() + static_cast<ptrdiff_t>(pos), out.end(), std::byte{0});
}

bool DirtyBitmap::ChunkIsZero(uint64_t idx) const {
  const uint64_t first_bit = idx << (words_per_chunk_shift_ + 6);
  const uint64_t end_bit = first_bit + (uint64_t{1} << (words_per_chunk_shift_ + 6));
  return FindNext(first_bit, true) >= std::min(end_bit, nbits_);
}

void DirtyBitmap::LoadChunk(uint64_t idx, std::span<const std::byte> in) {
  const uint64_t wpc = uint64_t{1} << words_per_chunk_shift_;
  const uint64_t nwords = (nbits_ + 63) / 64;
  const uint64_t w0 = idx * wpc;
  const uint64_t w1 = std::min(w0 + wpc, nwords);
  std::unique_lock lock(mu_);
  int64_t delta = 0;
  for (uint64_t wi = w0; wi < w1; ++wi) {
    uint64_t v = LoadLE64(in.data() + (wi - w0) * 8);
    if (wi == nwords - 1 && (nbits_ & 63)) v &= (uint64_t{1} << (nbits_ & 63)) - 1;
    uint64_t old = levels_[0][wi].exchange(v, std::memory_order_acq_rel);
    delta += std::popcount(v) - std::popcount(old);
    if (v != 0) {
      SetSummary(wi);
    } else if (old != 0) {
      uint64_t i = wi;
      for (size_t l = 1; l < levels_.size(); ++l) {
        Word& s = levels_[l][i >> 6];
        uint64_t nv = s.load(std::memory_order_relaxed) & ~(uint64_t{1} << (i & 63));
        s.store(nv, std::memory_order_release);
        if (nv != 0) break;
        i >>= 6;
      }
    }
  }
  dirty_granules_.fetch_add(static_cast<uint64_t>(delta), std::memory_order_relaxed);
}

std::vector<uint64_t> DirtyBitmap::TakeChangedChunks() {
  std::vector<uint64_t> out;
  for (uint64_t i = 0; i < changed_words_; ++i) {
    // Skipping a word that reads zero is safe: a note not yet visible here
    // stays set for the next take (see NoteChunkChanged).
    if (changed_[i].load(std::memory_order_acquire) == 0) continue;
    uint64_t w = changed_[i].exchange(0, std::memory_order_acq_rel);
    while (w) {
      out.push_back((i << 6) + static_cast<uint64_t>(std::countr_zero(w)));
      w &= w - 1;
    }
  }
  return out;
}

bool DirtyBitmap::HasChangedChunks() const {
  for (uint64_t i = 0; i < changed_words_; ++i)
    if (changed_[i].load(std::memory_order_acquire)) return true;
  return false;
}

uint64_t DirtyBitmap::ChangedChunkCount() const {
  uint64_t n = 0;
  for (uint64_t i = 0; i < changed_words_; ++i)
    n += static_cast<uint64_t>(std::popcount(changed_[i].load(std::memory_order_acquire)));
  return n;
}

void DirtyBitmap::MarkChunksChanged(std::span<const uint64_t> idx) {
  for (uint64_t c : idx)
    if (c < nchunks_) changed_[c >> 6].fetch_or(uint64_t{1} << (c & 63), std::memory_order_acq_rel);
}

void DirtyBitmap::MarkAllChunksChanged() {
  for (uint64_t c = 0; c < nchunks_; ++c)
    changed_[c >> 6].fetch_or(uint64_t{1} << (c & 63), std::memory_order_acq_rel);
}

}  // namespace cbt
