// The data path of `cbt backup`: which ranges to copy, read over NBD with
// several requests in flight (libnbd), stored into a qcow2 layer
// (qcow2/layer_writer.h). No control socket here (cli_backup.cc).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "bitmap/dirty_bitmap.h"
#include "common/status.h"
#include "qcow2/layer_writer.h"

namespace cbt::cli {

struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;
};

// Rounds every range out to `align` (clipped to disk_size), sorts and
// merges them. The result is what a layer of that cluster size must store.
std::vector<ByteRange> AlignRanges(std::vector<ByteRange> ranges, uint64_t align,
                                   uint64_t disk_size);

// The dirty extents of a bitmap as ranges to copy; dirty_bytes gets their
// total.
std::vector<ByteRange> DirtyRanges(const std::vector<Extent>& extents, uint64_t& dirty_bytes);

struct CopyOptions {
  unsigned in_flight = 8;                      // NBD reads in flight
  uint64_t request_bytes = uint64_t{4} << 20;  // largest read (a multiple of the cluster)
  // Called from the copying thread after each stored request: bytes so far.
  std::function<void(uint64_t done)> progress;
};

// Connects to uri (writable when the server allows) and disconnects: the
// filter attaches its tracker at a first writable connection.
Status TouchExport(const std::string& uri);

// The allocated (not hole, not zero) extents of the export at uri, from
// base:allocation: what a full backup copies. Failure: the NBD error.
Result<std::vector<ByteRange>> AllocatedRanges(const std::string& uri, uint64_t disk_size);

// Reads every range (cluster-aligned: AlignRanges) from uri and stores it
// in w; a range reading as zeros becomes zero clusters. Checks that the
// export has disk_size bytes. Failure: the NBD or store error.
Status CopyRanges(const std::string& uri, uint64_t disk_size, const std::vector<ByteRange>& ranges,
                  qcow2::LayerWriter& w, const CopyOptions& o);

}  // namespace cbt::cli
