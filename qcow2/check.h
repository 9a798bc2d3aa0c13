// qcow2 consistency check: refcounts against references, like qemu-img check.
//
// Counts every reference the image makes (header, refcount table and blocks,
// L1/L2 tables and data clusters, snapshot tables and their L1/L2 trees,
// the crypto header, the bitmap directory, bitmap tables and bitmap data
// clusters) and compares with the stored refcounts. refcount < references:
// corruption (a cluster may be handed out twice); refcount > references: a
// leak (harmless). As qemu-img check (QEMU 7.2) does: a reference region
// that runs one cluster or more past the end of the file is corruption;
// metadata (L1/L2 tables, refcount blocks) in a last cluster the file holds
// only in part is read zero padded; a reference count that reaches the
// refcount width's maximum is an overflow (corruption); only clusters inside
// the file are compared, so a refcount for a cluster past the end of the
// file is not reported. The work is bounded by the file size, not by what
// the refcount table could describe, and at most kMaxCheckMessages messages
// are kept (the rest are counted).
// Repair (`cbt check --repair`) first drops the bitmaps that cannot be
// trusted, then frees leaks (repair.h), then counts again: the report then
// describes the repaired file, as `qemu-img check -r all` does after
// "Double checking the fixed image now".
//
// A bitmap cannot be trusted when one of its clusters (the directory
// cluster(s) holding its entry, its table, its data) is referenced more than
// once (shared with other metadata, another bitmap, or itself), has refcount
// 0 while referenced, or lies wholly past the end of the file. A shared
// bitmap cluster is corruption even when its refcount covers every
// reference (bitmap clusters are never shared; qemu-img check -r all
// raises the refcount, which hides the overlap).
//
// Threading: not thread-safe; runs on one Image.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "qcow2/image.h"

namespace cbt::qcow2 {

// Messages kept in a CheckReport; further findings are counted only.
inline constexpr size_t kMaxCheckMessages = 100;

// A bitmap whose on-disk metadata cannot be trusted, and why ("its data
// cluster 0x50000 is also used by bitmap 'b' table").
struct UntrustedBitmap {
  std::string name;
  std::string reason;
};

struct CheckReport {
  // What the file holds when Check returns (after a repair: a fresh count
  // of the repaired file).
  uint64_t corruptions = 0;
  uint64_t leaks = 0;
  uint64_t allocated_clusters = 0;  // clusters with a non-zero refcount
  std::vector<UntrustedBitmap> untrusted_bitmaps;
  // What a repair did: corruption findings that dropping bitmaps resolved,
  // leaked clusters freed (those the drop left included), bitmaps dropped.
  uint64_t corruptions_fixed = 0;
  uint64_t leaks_fixed = 0;
  std::vector<std::string> dropped_bitmaps;
  // One line per finding or repair, the first kMaxCheckMessages of them,
  // then "... N more" when messages_dropped is N > 0.
  std::vector<std::string> messages;
  uint64_t messages_dropped = 0;

  // qemu-img check's exit status: 0 clean, 2 corruption, 3 leaks only.
  // (1, "cannot open", is the caller's: Image::Open failed.)
  int ExitCode() const { return corruptions ? 2 : (leaks ? 3 : 0); }
};

// Checks an open image. repair REQUIRES image.writable(); everything it
// changes is flushed. leaks_only (qemu-img check -r leaks): the repair
// frees leaked clusters only and drops no bitmap. Failure: IOError while
// reading/writing, also for metadata at offsets QEMU cannot read (past
// kQemuMaxOffset: qemu-img check fails there too); Corruption only when
// the structure cannot be walked at all.
Result<CheckReport> Check(Image& image, bool repair, bool leaks_only = false);

// QEMU's largest request offset (BDRV_MAX_LENGTH: INT64_MAX aligned down
// to 1 GiB); QEMU fails any read reaching past it with EIO.
inline constexpr uint64_t kQemuMaxOffset = 0x7fffffffc0000000ull;

// For every writer, before its first write (P4): refuses an image whose
// metadata overlaps or whose refcounts are lower than its references
// (corruptions in Check's sense), since the next allocation could hand out
// a cluster that holds live bits, a table or the refcount table itself.
// Leaks are harmless and accepted. Failure: Corruption naming the first
// finding and 'cbt check --repair'; IOError.
Status CheckBeforeWrite(Image& image);

}  // namespace cbt::qcow2
