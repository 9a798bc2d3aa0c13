// qcow2 repair: drop untrusted bitmaps, free leaks. See repair.h.
#include "qcow2/repair.h"

#include <set>

#include "qcow2/check_count.h"
#include "qcow2/format.h"

namespace cbt::qcow2::check_internal {

namespace {

// Removes the bitmaps marked in `drop` (see repair.h, step 1).
Status DropBitmaps(Image& img, const std::vector<bool>& drop) {
  const uint64_t cs = img.cluster_size();
  Refcounts& rc = img.refcounts();
  // Every cluster the old set alone references: dropped tables and data,
  // the old directory.
  std::set<uint64_t> old;
  const auto& entries = img.dir_entries();
  for (size_t i = 0; i < entries.size(); ++i) {
    if (!drop[i]) continue;
    const uint64_t tbytes = uint64_t{entries[i].table_size} * 8;
    for (uint64_t o = entries[i].table_offset; o < entries[i].table_offset + tbytes; o += cs)
      old.insert(o / cs);
    for (uint64_t t : img.table(i))
      if (t & kTableEntryOffsetMask) old.insert((t & kTableEntryOffsetMask) / cs);
  }
  if (const auto& ext = img.header().bitmaps)
    for (uint64_t o = ext->directory_offset; o < ext->directory_offset + ext->directory_size;
         o += cs)
      old.insert(o / cs);
  std::vector<uint64_t> guarded;
  for (uint64_t c : old) {
    // Only where a refcount block exists: a new block would be allocated,
    // maybe at c itself. (Handing out c here needs a new block too; one
    // placed at c would then show as shared with the bitmap.)
    const uint64_t b = c / rc.entries_per_block();
    if (b >= rc.table().size() || rc.table()[b] == 0) continue;
    auto r = rc.Get(c);
    if (!r.ok() || *r != 0) continue;
    CBT_RETURN_IF_ERROR(rc.Set(c, 1));
    guarded.push_back(c);
  }
  if (!guarded.empty()) CBT_RETURN_IF_ERROR(img.io()->flush());

  std::vector<BitmapSpec> keep;
  std::vector<BitmapSpec> specs = img.CurrentSpecs();
  for (size_t i = 0; i < specs.size(); ++i)
    if (!drop[i]) keep.push_back(std::move(specs[i]));
  CBT_RETURN_IF_ERROR(img.Commit(keep, OldClusters::kLeave));

  for (uint64_t c : guarded) CBT_RETURN_IF_ERROR(rc.Set(c, 0));
  if (!guarded.empty()) CBT_RETURN_IF_ERROR(img.io()->flush());
  return Status::OK();
}

}  // namespace

Result<CheckReport> Repair(Image& img, CheckReport first, bool leaks_only) {
  std::vector<std::string> dropped;
  if (!leaks_only && !first.untrusted_bitmaps.empty()) {
    const auto& entries = img.dir_entries();
    std::vector<bool> drop(entries.size(), false);
    for (const UntrustedBitmap& u : first.untrusted_bitmaps)
      for (size_t i = 0; i < entries.size(); ++i)
        if (entries[i].name == u.name) drop[i] = true;
    // The file as the drop would leave it: must be free of corruption. (The
    // drop lines bypass the message cap: at most one per bitmap.)
    CheckReport after;
    CBT_ASSIGN_OR_RETURN(Counted c, CountReferences(img, {drop, true}, &after));
    CBT_RETURN_IF_ERROR(CompareRefcounts(img, c, false, &after));
    if (after.corruptions) {
      for (const UntrustedBitmap& u : first.untrusted_bitmaps)
        first.messages.push_back("Not dropping bitmap '" + u.name + "' (" + u.reason +
                                 "): without it the image still has " +
                                 std::to_string(after.corruptions) +
                                 " errors, so its refcounts cannot be trusted for allocating");
    } else {
      CBT_RETURN_IF_ERROR(DropBitmaps(img, drop));
      for (const UntrustedBitmap& u : first.untrusted_bitmaps) {
        first.messages.push_back("Dropped bitmap '" + u.name + "': " + u.reason);
        dropped.push_back(u.name);
      }
    }
  }
  // Leaks, with the clusters the drop left unreferenced.
  CheckReport scratch;
  CBT_ASSIGN_OR_RETURN(Counted c, CountReferences(img, {}, &scratch));
  CBT_RETURN_IF_ERROR(CompareRefcounts(img, c, /*repair_leaks=*/true, &first));
  if (dropped.empty() && first.leaks_fixed == 0) return first;

  // Double check, as qemu-img check -r does: the report describes the
  // repaired file.
  CheckReport fin;
  CBT_ASSIGN_OR_RETURN(c, CountReferences(img, {}, &fin));
  CBT_RETURN_IF_ERROR(CompareRefcounts(img, c, false, &fin));
  fin.leaks_fixed = first.leaks_fixed;
  fin.corruptions_fixed =
      first.corruptions > fin.corruptions ? first.corruptions - fin.corruptions : 0;
  fin.dropped_bitmaps = std::move(dropped);
  std::vector<std::string> msgs = std::move(first.messages);
  uint64_t more = first.messages_dropped;
  if (!fin.messages.empty() || fin.messages_dropped) {
    msgs.push_back("Remaining after the repair:");
    msgs.insert(msgs.end(), fin.messages.begin(), fin.messages.end());
    more += fin.messages_dropped;
  }
  fin.messages = std::move(msgs);
  fin.messages_dropped = more;
  return fin;
}

}  // namespace cbt::qcow2::check_internal
