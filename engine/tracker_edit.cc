// Tracker: online edits of the bitmap set and the queries (tracker.h).
//
// An edit, step by step (store_mu_ held from 2 to 5):
//   1. Pause: new changes wait at the ChangeGate; the changes in flight are
//      drained (bounded: Busy, nothing changed).
//   2. The operations run on a BitmapEditSet seeded with the live bitmaps.
//      Copy on write: a changed bitmap is a new object; the live ones are
//      untouched, so a refused operation changes nothing.
//   3. If the container's set changed: every changed chunk of the stored
//      bitmaps is written in place (as a persist would, not flushed yet)...
//   4. ...and the new set goes in with one Image::Commit: new data to fresh
//      clusters, one flush (which also covers step 3), one header switch,
//      flushed. The new directory keeps in_use set on the bitmaps that go
//      on recording (if it was set) and clear on the others, whose data is
//      exact by then. A crash before the switch leaves the old set, in the
//      state of any crash while serving (in_use set: recovered from the
//      crash-safety record, or refused in mode none); after it, the new
//      set. Never a mix.
//   5. The new BitmapSet is published, with a durable shadow for every
//      persistent recording bitmap, and changes go on. Under load in_use
//      is set throughout, so the first change after an edit needs no flush.
// Two flushes per edit (the commit's), whatever the load.
// No change is in flight between 1 and the end, so every change is wholly
// before the edit (marked in the old set, forwarded and answered) or wholly
// after it (marked in the new set).
#include <spdlog/spdlog.h>

#include <chrono>

#include "engine/bitmap_store.h"
#include "engine/tracker.h"

namespace cbt {

void Tracker::Publish(std::shared_ptr<const BitmapSet> set) {
  std::lock_guard lock(set_mu_);
  live_.store(set.get(), std::memory_order_release);
  set_ = std::move(set);
}

std::shared_ptr<const BitmapSet> Tracker::Snapshot() const {
  std::lock_guard lock(set_mu_);
  if (set_) return set_;
  static const std::shared_ptr<const BitmapSet> kEmpty = BitmapSet::Make({});
  return kEmpty;
}

std::shared_ptr<const DirtyBitmap> Tracker::Bitmap(const std::string& name) const {
  std::shared_ptr<const BitmapSet> set = Snapshot();
  const LiveBitmap* b = set->Find(name);
  if (!b || !b->bits) return nullptr;
  // Shares ownership with the set's own pointer.
  return b->bits;
}

std::vector<BitmapStatus> Tracker::QueryBitmaps() const {
  std::shared_ptr<const BitmapSet> set = Snapshot();
  const bool in_use = in_use_on_disk_.load();
  std::vector<BitmapStatus> out;
  for (const LiveBitmap& b : set->all) {
    BitmapStatus st;
    st.name = b.name;
    st.granularity = uint64_t{1} << b.granularity_bits;
    st.recording = b.recording;
    st.persistent = b.persistent;
    st.consistent = b.consistent;
    st.in_use = b.consistent ? (in_use && b.recording && b.persistent) : true;
    if (b.bits) st.dirty_bytes = b.bits->DirtyBytes();
    out.push_back(std::move(st));
  }
  return out;
}

Status Tracker::Edit(const EditOps& ops, std::chrono::milliseconds drain_timeout) {
  if (opts_.readonly)
    return Status::InvalidArgument(
        "the bitmaps of a read-only server (cbt-readonly) cannot be edited");
  if (!attached_rw_.load())
    return Status::Busy(
        "the bitmaps are loaded when the first writable client connects; no edits before that");
  std::lock_guard one(edit_mu_);
  const auto t0 = std::chrono::steady_clock::now();
  CBT_RETURN_IF_ERROR(gate_changes_.Pause(drain_timeout));
  Status s;
  {
    std::lock_guard lock(store_mu_);
    s = EditLocked(ops);
  }
  gate_changes_.Resume();
  const auto us = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0)
          .count());
  std::lock_guard lock(stats_mu_);
  if (s.ok()) ++stats_.edits;
  stats_.longest_drain_us = std::max(stats_.longest_drain_us, us);
  return s;
}

Status Tracker::EditLocked(const EditOps& ops) {
  if (!image_) return Status::IOError("cbt: container already closed", ESHUTDOWN);
  const std::shared_ptr<const BitmapSet> cur = set_;

  // 2. The operations, copy-on-write; nothing is written yet.
  std::vector<EditEntry> entries;
  for (const LiveBitmap& b : cur->all) {
    EditEntry e;
    e.name = b.name;
    e.granularity_bits = b.granularity_bits;
    e.recording = b.recording;
    e.persistent = b.persistent;
    e.consistent = b.consistent;
    if (b.persistent) e.stored = b.name;
    e.data = b.bits;
    entries.push_back(std::move(e));
  }
  BitmapEditSet edit(*image_, disk_size_, std::move(entries), BitmapEditSet::Where::kOnline);
  CBT_RETURN_IF_ERROR(ops(edit));

  // 3-4. The changed chunks in place and the new set in one directory
  // switch. in_use stays as it was for what keeps recording (set when
  // changes are pending, so the next change needs no flush), and is clear
  // on everything else: its data is exact once the switch is durable.
  const bool in_use = in_use_on_disk_.load();
  if (edit.stored_set_changed()) {
    std::vector<qcow2::BitmapSpec> specs = edit.Specs();
    for (qcow2::BitmapSpec& spec : specs)
      for (const EditEntry& e : edit.entries())
        if (e.name == spec.name && e.consistent) spec.in_use = in_use && e.recording;
    bool committed = false;
    CBT_RETURN_IF_ERROR(StoreEditLocked(specs, &committed));
  }

  // 5. The new set. Every stored bitmap is exact or in use on disk; every
  // recording persistent one gets a shadow equal to what is durable.
  std::vector<LiveBitmap> all;
  for (const EditEntry& e : edit.entries()) {
    LiveBitmap lb;
    lb.name = e.name;
    lb.granularity_bits = e.granularity_bits;
    lb.recording = e.recording;
    lb.persistent = e.persistent;
    lb.consistent = e.consistent;
    lb.bits = e.data;
    if (e.consistent && e.persistent && e.new_content) (void)lb.bits->TakeChangedChunks();
    if (e.consistent && e.persistent && e.recording) {
      for (const LiveBitmap& o : cur->all)
        if (!e.new_content && o.bits == e.data && o.durable) lb.durable = o.durable;
      if (!lb.durable) {
        CBT_ASSIGN_OR_RETURN(lb.durable, CopyOf(*lb.bits));
      }
    }
    all.push_back(std::move(lb));
  }
  std::shared_ptr<const BitmapSet> next = BitmapSet::Make(std::move(all));
  // in_use on disk now: set on the new set's recording bitmaps iff it was
  // set before (and there are any).
  const bool now_in_use = in_use && !next->in_use_names.empty();
  Publish(std::move(next));
  in_use_on_disk_.store(now_in_use);
  in_use_durable_.store(now_in_use);
  return Status::OK();
}

}  // namespace cbt
