// Tracker: online edits of the bitmap set and the queries (tracker.h).
//
// An edit, step by step:
//   1. Pause: new changes wait at the ChangeGate; the changes in flight are
//      drained (bounded: Busy, nothing changed).
//   2. The operations run on a BitmapEditSet seeded with the live bitmaps.
//      Copy on write: a changed bitmap is a new object; the live ones are
//      untouched, so a refused operation changes nothing. The new set is
//      swapped in and changes go on. No I/O happens in 1-2: writes wait for
//      the drain and some memory work, never for a flush.
//   3. Under store_mu_, if the container's set changed: every changed chunk
//      of the stored bitmaps is written in place (as a persist would)...
//   4. ...and the new set goes in with one Image::Commit: new data to fresh
//      clusters, one flush (which also covers step 3), one header switch,
//      flushed. The new directory keeps in_use set on the bitmaps that go
//      on recording (if it was set) and clear on the others, whose data is
//      exact by then. Only then does the edit return.
// Every change is wholly before the swap (marked in the old set, forwarded
// and answered: drained) or wholly after it (marked in the new set).
//
// Between the swap and the commit the container still holds the old set,
// with in_use set if changes are pending. A change after the swap that
// needs the durability gate (in_use or a record write) waits for the commit
// (WaitStored: in_use goes on the new set's bitmaps); one that does not is
// covered by the old set's in_use and the crash-safety record: a crash
// before the switch recovers its region into the old set's bitmaps (or, in
// mode none, refuses them), never loses it. A persist in that window
// writes the old set's bitmaps and leaves in_use set. A crash before the
// switch leaves the old set, after it the new one; never a mix.
//
// If the store fails, the edit is rolled back: changes waiting for it fail,
// the old set becomes current again with every change marked since the
// swap merged into its recording bitmaps.
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

// What an edit swaps in and then stores.
struct Tracker::PreparedEdit {
  std::shared_ptr<const BitmapSet> before, next;
  std::unique_ptr<BitmapEditSet> edit;  // its Specs() point into it
  bool store = false;                   // the container's set changes
};

Status Tracker::Quiesce(const std::function<void()>& fn, std::chrono::milliseconds drain_timeout) {
  if (!attached_rw_.load()) return Status::Busy("no writable client yet: nothing to pause");
  std::lock_guard one(edit_mu_);
  CBT_RETURN_IF_ERROR(gate_changes_.Pause(drain_timeout));
  fn();
  gate_changes_.Resume();
  return Status::OK();
}

Status Tracker::Edit(const EditOps& ops, std::chrono::milliseconds drain_timeout,
                     const std::function<void()>& while_paused) {
  if (opts_.readonly)
    return Status::InvalidArgument(
        "the bitmaps of a read-only server (cbt-readonly) cannot be edited");
  if (serving_read_only())
    return Status::InvalidArgument(
        "this server serves the disk read-only (nbdkit -r or cbt serve -r, or a disk it cannot "
        "write), so its bitmaps cannot be changed over it: stop it and change them offline "
        "with 'cbt bitmap " +
            opts_.container_path + " NAME ...'",
        EROFS);
  if (!attached_rw_.load())
    return Status::Busy(
        "the bitmaps are loaded when the first writable client connects; no edits before that");
  std::lock_guard one(edit_mu_);
  if (!image_) return Status::IOError("cbt: container already closed", ESHUTDOWN);

  // 1-2. Drain, apply, swap: the only time writes wait (no I/O in it).
  const auto t0 = std::chrono::steady_clock::now();
  CBT_RETURN_IF_ERROR(gate_changes_.Pause(drain_timeout));
  PreparedEdit p;
  Status s = PrepareEdit(ops, p);
  if (s.ok()) {
    Publish(p.next);
    if (while_paused) while_paused();
  }
  gate_changes_.Resume();
  const auto us = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0)
          .count());
  {
    std::lock_guard lock(stats_mu_);
    stats_.longest_drain_us = std::max(stats_.longest_drain_us, us);
  }
  if (!s.ok()) return s;

  // 3-4. Store, while changes go on.
  std::unique_lock lock(store_mu_);
  if (p.store) {
    // in_use as it is now: set when changes are pending (the next change
    // then needs no flush), and only on what goes on recording.
    const bool in_use = in_use_on_disk_.load();
    std::vector<qcow2::BitmapSpec> specs = p.edit->Specs();
    for (qcow2::BitmapSpec& spec : specs)
      for (const EditEntry& e : p.edit->entries())
        if (e.name == spec.name && e.consistent) spec.in_use = in_use && e.recording;
    s = image_ ? StoreEditLocked(specs)
               : Status::IOError("cbt: container already closed", ESHUTDOWN);
    if (!s.ok()) {
      abandoned_generation_ = p.next->generation;
      committed_cv_.notify_all();
      lock.unlock();
      RollBack(p);
      return s;
    }
    const bool now_in_use = in_use && !p.next->in_use_names.empty();
    in_use_on_disk_.store(now_in_use);
    in_use_durable_.store(now_in_use);
  }
  stored_set_ = p.next;
  committed_cv_.notify_all();
  std::lock_guard st(stats_mu_);
  ++stats_.edits;
  return Status::OK();
}

// The store failed: the container still holds `before`. Changes since the
// swap may be marked only in the new set's bitmaps; they go into every
// recording bitmap of `before` (a superset), which becomes current again.
void Tracker::RollBack(const PreparedEdit& p) {
  // Unbounded on purpose: the changes in flight finish (those waiting for
  // the store were failed just now); the set must not stay half there.
  while (!gate_changes_.Pause(std::chrono::milliseconds(60000)).ok())
    spdlog::warn("rolling back a failed edit: still waiting for changes in flight");
  std::vector<LiveBitmap> all = p.before->all;
  for (size_t i : p.next->recording) {
    const LiveBitmap& n = p.next->all[i];
    for (size_t j : p.before->recording)
      if (all[j].bits != n.bits) all[j].bits->Merge(*n.bits);
  }
  std::shared_ptr<const BitmapSet> back = BitmapSet::Make(std::move(all), p.next->generation + 1);
  Publish(back);
  {
    std::lock_guard lock(store_mu_);
    stored_set_ = back;
    committed_cv_.notify_all();
  }
  gate_changes_.Resume();
}

// Under the drained gate: the operations on a copy-on-write working set,
// and the new set to swap in. Touches no container I/O.
Status Tracker::PrepareEdit(const EditOps& ops, PreparedEdit& p) {
  p.before = Snapshot();
  std::vector<EditEntry> entries;
  for (const LiveBitmap& b : p.before->all) {
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
  p.edit = std::make_unique<BitmapEditSet>(*image_, disk_size_, std::move(entries),
                                           BitmapEditSet::Where::kOnline);
  CBT_RETURN_IF_ERROR(ops(*p.edit));
  p.store = p.edit->stored_set_changed();

  // The new set. A kept recording bitmap keeps its shadow (still exact). A
  // bitmap with new bits, or newly recording, starts with an empty one:
  // nothing of it counts as durable until a persist has written it. New
  // bits are written whole by the commit; what is marked from now on is
  // pending for the next persist.
  std::vector<LiveBitmap> all;
  for (const EditEntry& e : p.edit->entries()) {
    LiveBitmap lb;
    lb.name = e.name;
    lb.granularity_bits = e.granularity_bits;
    lb.recording = e.recording;
    lb.persistent = e.persistent;
    lb.consistent = e.consistent;
    lb.bits = e.data;
    if (e.consistent && e.persistent && e.new_content) (void)lb.bits->TakeChangedChunks();
    if (e.consistent && e.persistent && e.recording) {
      for (const LiveBitmap& o : p.before->all)
        if (!e.new_content && o.bits == e.data && o.durable) lb.durable = o.durable;
      if (!lb.durable) {
        CBT_ASSIGN_OR_RETURN(std::unique_ptr<DirtyBitmap> empty,
                             DirtyBitmap::Create(lb.bits->disk_size(), lb.bits->granularity(),
                                                 lb.bits->chunk_bytes()));
        lb.durable = std::move(empty);
      }
    }
    all.push_back(std::move(lb));
  }
  p.next = BitmapSet::Make(std::move(all), p.before->generation + 1);
  return Status::OK();
}

}  // namespace cbt
