// DirtyBitmap: the in-memory dirty bitmap every write hits.
//
// One bit per granule (granularity g = 2^k bytes, 512 B .. 2 GiB, QEMU's
// range): bit n covers disk bytes [n*g, (n+1)*g); the last granule may be
// partial. Pure data structure: no I/O, no logging, no nbdkit.
//
// Layout: level 0 is the bit array itself (64-bit words). Each summary level
// above holds one bit per word of the level below, set when that word may be
// non-zero, so searches skip clean areas 64 (then 4096, ...) granules at a
// time. Summary bits are a superset: set with the word, cleared only under the
// exclusive lock. Memory: ~1 bit per granule * (1 + 1/64 + ...), plus one bit
// per serialisation chunk.
//
// Serialisation follows QEMU's on-disk order (qcow2 bitmap data): bit n is bit
// n%8 (least significant first) of byte n/8; the byte string is cut into chunks
// of chunk_bytes (the qcow2 cluster size). A "changed" bit per chunk records
// which chunks differ from what was last taken, so persistence can write only
// those.
//
// Threading: Mark, Test, the queries and the serialisers may run from any
// number of threads at once. Mark is lock-free when every touched bit is
// already set; setting fresh bits takes a shared lock. ClearAll, ClearRange and
// LoadChunk take the exclusive lock. A Mark racing a Clear of the same granule
// is ordered one way or the other.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <span>
#include <vector>

#include "common/status.h"

namespace cbt {

struct Extent {
  uint64_t offset;
  uint64_t length;
  bool dirty;
  bool operator==(const Extent&) const = default;
};

class DirtyBitmap {
 public:
  static constexpr uint32_t kMinGranularityBits = 9;   // 512 B
  static constexpr uint32_t kMaxGranularityBits = 31;  // 2 GiB
  static constexpr uint32_t kDefaultChunkBytes = 65536;

  // granularity: power of two in [512, 2 GiB]. chunk_bytes: power of two in
  // [512, 2 MiB] (qcow2 cluster sizes). disk_size may be 0.
  // Failure: InvalidArgument naming the bad value and the allowed range.
  static Result<std::unique_ptr<DirtyBitmap>> Create(uint64_t disk_size, uint64_t granularity,
                                                     uint32_t chunk_bytes = kDefaultChunkBytes);
  DirtyBitmap(const DirtyBitmap&) = delete;
  DirtyBitmap& operator=(const DirtyBitmap&) = delete;

  uint64_t disk_size() const { return disk_size_; }
  uint64_t granularity() const { return uint64_t{1} << gbits_; }
  uint32_t granularity_bits() const { return gbits_; }
  uint64_t granule_count() const { return nbits_; }

  // Marks every granule touching [offset, offset + length). Returns true if a
  // bit went from clean to dirty. Zero length: no-op, false. A range that
  // reaches past disk_size: InvalidArgument, nothing marked.
  Result<bool> Mark(uint64_t offset, uint64_t length);

  // Is the granule holding byte `offset` dirty? Past the end: false.
  bool Test(uint64_t offset) const;
  // Are all granules touching [offset, offset + length) dirty? Lock-free.
  // Zero length: true. Past the end: false.
  bool IsDirty(uint64_t offset, uint64_t length) const;
  // Dirty bytes (the last partial granule counts its real size). O(1).
  uint64_t DirtyBytes() const;
  uint64_t DirtyGranules() const { return dirty_granules_.load(std::memory_order_relaxed); }

  void ClearAll();
  // Clears granules lying wholly inside [offset, offset + length); the last
  // partial granule counts as inside when the range reaches disk_size. Partly
  // covered granules stay dirty (a superset, never a miss).
  Status ClearRange(uint64_t offset, uint64_t length);
  // Union: every granule of this bitmap overlapping a dirty granule of src
  // becomes dirty. src may have another granularity or size; its extents
  // past this disk's end are ignored.
  void Merge(const DirtyBitmap& src);

  // First byte >= offset lying in a dirty (clean) granule; nullopt if none
  // before disk_size.
  std::optional<uint64_t> NextDirty(uint64_t offset) const;
  std::optional<uint64_t> NextClean(uint64_t offset) const;
  // Calls fn for maximal alternating extents exactly covering
  // [offset, min(offset + length, disk_size)); fn returns false to stop.
  void ForEachExtent(uint64_t offset, uint64_t length,
                     const std::function<bool(const Extent&)>& fn) const;
  std::vector<Extent> Extents(uint64_t offset, uint64_t length) const;

  // --- serialisation in QEMU's on-disk order ---
  uint32_t chunk_bytes() const { return chunk_bytes_; }
  // ceil(ceil(granule_count / 8) / chunk_bytes): the qcow2 bitmap table size.
  uint64_t chunk_count() const { return nchunks_; }
  // REQUIRES: idx < chunk_count(), out.size() == chunk_bytes(). Bytes past
  // the bitmap's end are written as zeros.
  void SerializeChunk(uint64_t idx, std::span<std::byte> out) const;
  // True when no bit of chunk idx is set (uses the summary, no full scan).
  bool ChunkIsZero(uint64_t idx) const;
  // Replaces chunk idx with `in` (as read from disk); bits past the end are
  // ignored. Does not mark the chunk changed. REQUIRES: in.size() == chunk_bytes().
  void LoadChunk(uint64_t idx, std::span<const std::byte> in);

  // Indexes of the chunks changed since the last call (ascending); resets
  // the record. A chunk changed again during the call appears next time.
  std::vector<uint64_t> TakeChangedChunks();
  bool HasChangedChunks() const;
  // How many chunks are on the changed record now (a scan of one bit per
  // chunk; a racing change may or may not be counted).
  uint64_t ChangedChunkCount() const;
  // Puts every chunk on the changed record (e.g. after a failed persist).
  void MarkChunksChanged(std::span<const uint64_t> idx);
  void MarkAllChunksChanged();

 private:
  DirtyBitmap(uint64_t disk_size, uint32_t gbits, uint32_t chunk_bytes);

  using Word = std::atomic<uint64_t>;
  // Sets bits [first, last] (granule indexes). Returns newly set count.
  uint64_t SetBits(uint64_t first, uint64_t last);
  bool AllSet(uint64_t first, uint64_t last) const;
  void SetSummary(uint64_t word_index);
  void NoteChunkChanged(uint64_t word_index);
  void ClearBitsLocked(uint64_t first, uint64_t last);
  void RebuildSummaryLocked();
  // Next set (or clear, if `want_set` false) bit index >= from; nbits_ if none.
  uint64_t FindNext(uint64_t from, bool want_set) const;
  uint64_t FindNextSetWordFrom(size_t level, uint64_t word) const;

  const uint64_t disk_size_;
  const uint32_t gbits_;
  const uint64_t nbits_;
  const uint32_t chunk_bytes_;
  const uint64_t nchunks_;
  const uint32_t words_per_chunk_shift_;  // log2(chunk_bytes / 8)

  // Guards: shared for setting fresh bits and for reads that need a stable
  // summary; exclusive for clears and loads (they also clear summary bits).
  mutable std::shared_mutex mu_;
  std::vector<std::unique_ptr<Word[]>> levels_;  // levels_[0] = bits
  std::vector<uint64_t> level_words_;
  std::unique_ptr<Word[]> changed_;  // one bit per chunk
  uint64_t changed_words_;
  std::atomic<uint64_t> dirty_granules_{0};
};

}  // namespace cbt
