// qcow2 consistency check: refcounts against references, like qemu-img check.
//
// Counts every reference the image makes (header, refcount table and blocks,
// L1/L2 tables and data clusters, snapshot tables and their L1/L2 trees,
// the crypto header, the bitmap directory, bitmap tables and bitmap data
// clusters) and compares with the stored refcounts. refcount < references:
// corruption (a cluster may be handed out twice); refcount > references: a
// leak (harmless). References past the end of the file are corruption.
// Repair fixes leaks only (lowers refcounts to the reference count), as
// `qemu-img check -r leaks` does.
//
// Threading: not thread-safe; runs on one Image.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "qcow2/image.h"

namespace cbt::qcow2 {

struct CheckReport {
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t leaks_fixed = 0;
  uint64_t allocated_clusters = 0;    // clusters with a non-zero refcount
  std::vector<std::string> messages;  // one line per finding or repair

  // qemu-img check's exit status: 0 clean, 2 corruption, 3 leaks only.
  // (1, "cannot open", is the caller's: Image::Open failed.)
  int ExitCode() const { return corruptions ? 2 : (leaks > leaks_fixed ? 3 : 0); }
};

// Checks an open image. repair_leaks REQUIRES image.writable(); the repaired
// refcounts are flushed. Failure: IOError while reading/writing; Corruption
// only when the structure cannot be walked at all.
Result<CheckReport> Check(Image& image, bool repair_leaks);

}  // namespace cbt::qcow2
