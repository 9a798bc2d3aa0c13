// Compare: recompute a dirty bitmap from content, by comparing a disk with
// its last backup (`cbt recover --compare`, docs/cli.md).
//
// Both sides are read in large chunks (default 4 MiB), chunk by chunk in
// ascending order, by a small pool of worker threads: each worker takes the
// next chunk, reads it from both sides and compares it granule by granule
// (memcmp); a granule whose bytes differ anywhere is marked. So several
// reads are in flight on each side, the access pattern of each file stays
// sequential (the kernel's read-ahead works), and the comparing is spread
// over the cores. No nbdkit, no qcow2 knowledge: the sides are
// CompareInputs (a raw BlockIO, or any qcow2::Layer such as a Volume with
// its backing chain).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>

#include "bitmap/dirty_bitmap.h"
#include "common/block_io.h"
#include "common/status.h"

namespace cbt::qcow2 {
class Layer;
}

namespace cbt {

// One side of a comparison. Read may be called from several threads at
// once.
class CompareInput {
 public:
  virtual ~CompareInput() = default;
  virtual uint64_t size() const = 0;
  // Fills out with the bytes at offset; bytes past size() read as zeros.
  virtual Status Read(std::span<std::byte> out, uint64_t offset) = 0;
};

// A raw image: the first `size` bytes of io, as they are (holes read as
// zeros).
std::unique_ptr<CompareInput> RawCompareInput(std::shared_ptr<BlockIO> io, uint64_t size);
// A qcow2 image (with its backing chain) or any other layer.
std::unique_ptr<CompareInput> LayerCompareInput(std::shared_ptr<qcow2::Layer> layer);

struct CompareOptions {
  uint64_t chunk_bytes = uint64_t{4} << 20;  // power of two, 64 KiB .. 256 MiB
  unsigned workers = 4;                      // 1 .. 64; memory: 2 chunks each
  // Called with the bytes compared so far (ascending, ends with the total),
  // by one thread at a time, from the workers.
  std::function<void(uint64_t done)> progress;
};

struct CompareStats {
  uint64_t bytes_compared = 0;  // disk bytes compared (= the disk's size)
};

// Marks in `out` every granule (out's granularity) of [0, disk.size()) in
// which disk and backup differ; marks nothing else and clears nothing (give
// it an empty bitmap for the exact set). Past backup.size() the backup reads
// as zeros: a granule there differs unless the disk reads as zeros in it.
// Bytes of the backup past disk.size() are not looked at. On failure the
// bitmap may hold part of the result.
// Failure: InvalidArgument (disk larger than out's disk, bad options), the
// first read error of either side (the other workers stop).
Result<CompareStats> CompareInto(CompareInput& disk, CompareInput& backup, DirtyBitmap& out,
                                 const CompareOptions& opts = {});

}  // namespace cbt
