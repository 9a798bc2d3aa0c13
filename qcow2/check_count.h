// Internal to check.cc and repair.cc: one reference count of a qcow2 file,
// the comparison with its refcounts, and which bitmaps cannot be trusted.
//
// Threading: not thread-safe; runs on one Image.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/status.h"
#include "qcow2/check.h"
#include "qcow2/image.h"
#include "qcow2/util.h"

namespace cbt::qcow2::check_internal {

// What to leave out of a count: the references a bitmap drop removes
// (repair.cc counts the file as it will be after the drop).
struct CountOptions {
  std::vector<bool> skip_bitmap;  // by directory index; shorter = not skipped
  bool skip_directory = false;
};

// References per cluster, with qemu-img check's rules (see check.h), and
// for every cluster a bitmap uses (directory, tables, data) the list of
// everything that references it.
struct Counted {
  // One cluster a counted bitmap uses; role is "directory", "table", "data".
  struct Use {
    uint64_t cluster;
    const char* role;
  };
  struct Bitmap {
    size_t index;  // in Image::dir_entries()
    std::vector<Use> uses;
  };
  uint64_t file_size = 0;
  uint64_t clusters = 0;       // clusters to compare (file + at most one)
  std::vector<uint32_t> refs;  // by cluster
  std::vector<bool> watched;   // by cluster: used by a counted bitmap
  // For watched clusters: everything that references them, one per reference.
  std::unordered_map<uint64_t, std::vector<std::string>> owners;
  std::vector<Bitmap> bitmaps;  // the counted (not skipped) bitmaps
  uint64_t at(uint64_t c) const { return c < refs.size() ? refs[c] : 0; }
};

// Counts every reference. Findings (past the end of the file, overflow,
// malformed L1/L2 entries) go to rep. Failure: IOError.
Result<Counted> CountReferences(Image& img, const CountOptions& opts, CheckReport* rep);

// Compares counted references with the refcounts: refcount < references
// and a bitmap cluster referenced more than once are corruption, refcount >
// references a leak. repair_leaks: lowers leaked refcounts and notes only
// the repairs (the findings were noted by a previous comparison). Also
// fills rep->untrusted_bitmaps and rep->allocated_clusters. Failure: IOError.
Status CompareRefcounts(Image& img, const Counted& counted, bool repair_leaks, CheckReport* rep);

// Records one finding; past kMaxCheckMessages only counts it.
void Note(CheckReport* rep, std::string msg);
using internal::DivRoundUp;
using internal::Hex;

}  // namespace cbt::qcow2::check_internal
