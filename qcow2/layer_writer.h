// LayerWriter: writes one new qcow2 v3 image (a backup layer) in one pass.
//
// Incremental backups store the dirty extents of a disk as a qcow2 layer
// whose backing file is the previous backup, so that
// `qemu-img convert -O raw last.qcow2 out.raw` restores the disk.
//
// Layout (see docs/format.md, "Backup layers"): cluster 0 holds the header,
// data clusters are appended from cluster 1 on in the order they are
// allocated, and Finish() appends the L2 tables, the L1 table, the refcount
// blocks and the refcount table, then writes the header last. Every used
// cluster has refcount 1 (refcount_order 4); the file has no holes between
// used clusters, so there are no leaks.
//
// The L2 map is kept in memory, one lazily allocated L2 table per L1 entry
// that has at least one written or zeroed cluster: a 1 TiB disk with a few
// written clusters costs a few L2 tables.
//
// Crash behaviour: nothing valid is on disk until Finish() has written the
// header (the last write); a half-written file has no qcow2 magic. The
// caller writes to a temporary name and renames after Finish().
//
// Threading: WriteData() and WriteZeroes() may be called from several threads
// at once (one mutex guards the map and allocation; the data pwrite happens
// outside it). Finish() must not race with them: it refuses while writes are
// in flight. After a failed data write the writer refuses everything and
// Finish() returns that failure.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "common/block_io.h"
#include "common/status.h"
#include "qcow2/header.h"

namespace cbt::qcow2 {

struct LayerOptions {
  uint64_t virtual_size = 0;      // bytes; header stores it rounded up to 512 like Image::Create
  uint32_t cluster_size = 65536;  // power of two, 512 B .. 2 MiB
  // Stored as-is in the header (a relative path is kept relative); empty: none.
  std::string backing_file;
  // "qcow2" or "raw": stored as the backing-format header extension; required
  // iff backing_file is set.
  std::string backing_format;
};

class LayerWriter {
 public:
  // Starts a new image in io, which must be empty (size 0). Nothing valid is
  // on disk until Finish().
  // Failure: InvalidArgument (bad cluster size, virtual size whose L1 table
  // would exceed QEMU's 32 MiB, backing file without format or the reverse,
  // unknown format, backing name longer than 1023 bytes or not fitting into
  // cluster 0, non-empty io), IOError from io->size().
  static Result<std::unique_ptr<LayerWriter>> Create(std::shared_ptr<BlockIO> io,
                                                     const LayerOptions& opts);

  LayerWriter(const LayerWriter&) = delete;
  LayerWriter& operator=(const LayerWriter&) = delete;
  ~LayerWriter();

  // Stores [offset, offset + data.size()). offset is cluster-aligned;
  // data.size() is a multiple of the cluster size, except that the last piece
  // may end at virtual_size (the tail is padded with zeros). Calls may come in
  // any order, but each cluster at most once (InvalidArgument otherwise, also
  // for misalignment or past the end; a refused call changes nothing).
  // All-zero clusters are recorded as zero clusters (L2 zero flag, no data
  // cluster); others are appended as data clusters. An empty span is a no-op.
  // Thread-safe.
  // Failure: InvalidArgument as above or after Finish(); IOError from the
  // data write (the writer is then failed).
  Status WriteData(uint64_t offset, std::span<const std::byte> data);
  // [offset, offset+length) reads as zeros, hiding the backing file (zero
  // clusters). Same alignment and once-only rules as WriteData. Thread-safe.
  Status WriteZeroes(uint64_t offset, uint64_t length);
  // Writes the L2 tables, L1 table, refcount blocks and refcount table
  // (refcount order 4, 16-bit) and finally the header in cluster 0, flushing
  // before and after the header write. Afterwards the image is complete and
  // `qemu-img check` reports no errors and no leaks. Clusters never written
  // read through to the backing file. Call once, with no write in flight.
  // Failure: InvalidArgument (called twice, writes in flight), the status of
  // an earlier failed data write, NotSupported (refcount table over QEMU's
  // 8 MiB limit), IOError.
  Status Finish();

  uint64_t data_clusters() const;  // data clusters stored so far
  uint64_t zero_clusters() const;

  uint64_t cluster_size() const { return cs_; }
  // The virtual size as stored in the header (rounded up to 512).
  uint64_t virtual_size() const { return size_; }

 private:
  LayerWriter(std::shared_ptr<BlockIO> io, const LayerOptions& opts, uint32_t cluster_bits,
              uint64_t size, uint64_t l1_size, Header header);
  // Checks [offset, offset+length) and returns the guest cluster range
  // [*first, *first + *count).
  Status CheckRange(const char* op, uint64_t offset, uint64_t length, uint64_t* first,
                    uint64_t* count) const;
  // REQUIRES: mu_ held. The L2 entry slot of guest cluster g (creates the table).
  uint64_t* EntryLocked(uint64_t g);
  // REQUIRES: mu_ held. Whether every cluster in [first, first+count) is unwritten;
  // otherwise an InvalidArgument naming the first written one.
  Status CheckUnwrittenLocked(const char* op, uint64_t first, uint64_t count) const;
  Status StateLocked(const char* op) const;
  Status WriteMetadata();

  const std::shared_ptr<BlockIO> io_;
  const std::string ctx_;
  const uint32_t cluster_bits_;
  const uint64_t cs_;
  const uint64_t requested_size_;  // LayerOptions::virtual_size
  const uint64_t size_;            // rounded up to 512
  const uint64_t guest_clusters_;
  const uint64_t l2_entries_;
  const uint64_t l1_size_;
  Header header_;  // everything but the metadata offsets

  mutable std::mutex mu_;  // guards everything below
  // L1 index -> L2 table (l2_entries_ entries, 0 = unwritten).
  std::map<uint64_t, std::vector<uint64_t>> l2_;
  uint64_t next_cluster_ = 1;  // next free host cluster (0 is the header)
  uint64_t data_clusters_ = 0;
  uint64_t zero_clusters_ = 0;
  uint64_t in_flight_ = 0;
  bool finished_ = false;
  Status failed_;  // the first failed data write
};

}  // namespace cbt::qcow2
