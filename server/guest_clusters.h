// qemu-img check's cluster figures (`total-clusters`, `allocated-clusters`):
// guest clusters, counted from the active L1/L2 tables as QEMU 7.2 counts
// them (block/qcow2-refcount.c, check_refcounts_l2 with CHECK_FRAG_INFO):
// an L2 entry that is normal, zero with an allocation, or compressed is one
// allocated cluster, also when the data lives in an external data file (a
// cbt container with --data-file maps every cluster). A bitmaps-only
// container has none. Host clusters that hold metadata are not counted.
#pragma once

#include <cstdint>

#include "common/status.h"
#include "qcow2/image.h"

namespace cbt::cli {

struct GuestClusters {
  uint64_t total = 0;      // the virtual disk in clusters, rounded up
  uint64_t allocated = 0;  // mapped by the active L2 tables
};

// Reads the active L1 table and its L2 tables. Tables past the end of the
// file read as zeros, as in QEMU; misaligned L2 offsets are skipped (check
// reports them). Failure: IOError.
Result<GuestClusters> CountGuestClusters(qcow2::Image& img);

}  // namespace cbt::cli
