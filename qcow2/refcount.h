// qcow2 refcounts: read, allocate (first fit), free, and grow the refcount
// structure, for any refcount_order 0..6.
//
// The refcount table is kept in memory; refcount blocks are read on demand
// and cached. Every change is written through to the file at once (only the
// bytes of the changed entries), but never flushed here except where the
// structure itself needs ordering (a new refcount block must be durable before
// the table entry that points at it; a new refcount table before the header
// switch to it). The caller must flush before anything points at an
// allocated cluster (P8).
//
// Crash behaviour: Allocate() leaves clusters with refcount 1 that nothing
// references yet (a leak: qemu-img check exit 3, never corruption). Growing
// the table writes the new table and its block beyond the old coverage,
// flushes, switches the header's two fields in one sector, flushes, and only
// then frees the old table: a crash leaks at most the old or new table.
//
// Threading: not thread-safe; the owner (Image) serialises calls.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "common/block_io.h"
#include "common/status.h"

namespace cbt::qcow2 {

class Refcounts {
 public:
  // Reads and validates the refcount table (header fields given).
  // Failure: Corruption (bad table entry, truncated file), IOError.
  static Result<Refcounts> Load(BlockIO* io, uint32_t cluster_bits, uint32_t refcount_order,
                                uint64_t table_offset, uint32_t table_clusters, std::string ctx);

  // Refuses (Corruption) a table that names one block twice: every count
  // would be wrong, and a search for free clusters would scan far more than
  // the file holds. Writers call it before their first allocation.
  Status CheckForAllocation() const;
  // Refcount of cluster `index` (0 if not covered by any block).
  Result<uint64_t> Get(uint64_t index);
  // Allocates n contiguous clusters (first fit) with refcount 1 and writes
  // the refcounts. Returns the byte offset of the first one. Not flushed.
  // REQUIRES: n >= 1.
  Result<uint64_t> Allocate(uint64_t n);
  // Drops the refcount of n clusters at byte offset by one. Not flushed.
  // Failure: Corruption if one is already 0.
  Status Free(uint64_t offset, uint64_t n);
  // Sets the refcount of one cluster (repair). Creates the block if needed.
  Status Set(uint64_t index, uint64_t value);

  uint64_t table_offset() const { return table_offset_; }
  uint32_t table_clusters() const { return table_clusters_; }
  // Refcount block offsets from the table (0 = none).
  const std::vector<uint64_t>& table() const { return table_; }
  uint64_t entries_per_block() const { return epb_; }
  // Number of clusters the current table can describe.
  uint64_t covered_clusters() const { return table_.size() * epb_; }
  // Counts new refcount blocks and table moves (callers that track where
  // metadata lives rescan table() when it changes).
  uint64_t structure_changes() const { return structure_changes_; }

 private:
  Refcounts(BlockIO* io, uint32_t cluster_bits, uint32_t order, std::string ctx);
  Result<std::vector<std::byte>*> Block(uint64_t b);
  uint64_t ReadEntry(const std::vector<std::byte>& blk, uint64_t i) const;
  void WriteEntry(std::vector<std::byte>& blk, uint64_t i, uint64_t v) const;
  // Byte range [first, last) of entry i in its block.
  void EntryBytes(uint64_t i, uint64_t* first, uint64_t* last) const;
  // Sets entries [start, start+n) to value (all inside covered blocks).
  Status SetRange(uint64_t start, uint64_t n, uint64_t value);
  Result<uint64_t> FindFreeRun(uint64_t n);
  Status NewBlock(uint64_t b);
  Status GrowTable(uint64_t b);

  BlockIO* io_;
  uint32_t cluster_bits_;
  uint32_t order_;
  uint64_t cs_;
  uint64_t epb_;  // entries per block
  uint64_t max_value_;
  std::string ctx_;
  uint64_t table_offset_ = 0;
  uint32_t table_clusters_ = 0;
  std::vector<uint64_t> table_;
  std::map<uint64_t, std::vector<std::byte>> blocks_;  // cache by block index
  uint64_t free_hint_ = 0;
  uint64_t structure_changes_ = 0;  // no free cluster below this index
};

// The one Refcounts of a file that several writers in this process share:
// the data path (Volume) and the bitmaps (Image) of an image with internal
// bitmaps. Every use of rc holds mu; rc is set once, before sharing.
struct SharedRefcounts {
  std::mutex mu;
  std::optional<Refcounts> rc;
};

}  // namespace cbt::qcow2
