// qcow2 repair for `cbt check --repair` (called by Check, see check.h).
//
// 1. Bitmaps that cannot be trusted (CheckReport::untrusted_bitmaps) are
//    dropped by a Commit of the remaining set (crash safe: a crash leaves
//    the old set or the new one, plus leaks), but only when the file counted
//    without them (and without the old directory, which the Commit
//    replaces) has no corruption: otherwise the refcounts cannot be trusted
//    to allocate the new directory, and nothing is dropped. The dropped
//    bitmaps' clusters are not freed by the Commit (they may be shared or
//    have refcount 0); before it, those with refcount 0 get refcount 1 so
//    that the Commit's allocation cannot hand them out while the old
//    directory still points at them, and get 0 back after it.
// 2. Leaks are freed (refcount lowered to the reference count), including
//    the clusters the drop left unreferenced.
// 3. The file is counted again; the report describes it, with what the
//    repair did (corruptions_fixed, leaks_fixed, dropped_bitmaps, messages).
// Nothing else is "fixed": corruption that is not a bitmap's stays.
//
// Threading: not thread-safe; runs on one Image.
#pragma once

#include "common/status.h"
#include "qcow2/check.h"
#include "qcow2/image.h"

namespace cbt::qcow2::check_internal {

// first: the report of a count and comparison of img as it is now.
// leaks_only: step 2 only. REQUIRES: img.writable(). Failure: IOError (the
// file then holds the old or the new bitmap set, plus maybe leaks).
Result<CheckReport> Repair(Image& img, CheckReport first, bool leaks_only = false);

}  // namespace cbt::qcow2::check_internal
