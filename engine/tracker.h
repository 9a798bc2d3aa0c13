// Tracker: the engine behind the nbdkit filter. It owns the enabled bitmaps
// (in memory), the qcow2 container that stores them, and the protocol that
// keeps the two consistent (design promises P1-P4):
//
//  P1  BeginChange() marks every touched granule in every enabled bitmap
//      before the caller forwards the change. A change that only touches
//      granules already dirty on disk (flushed) passes straight through:
//      it needs no mark and no in_use (the steady state costs nothing).
//  P2  Before the first change after open, and after every persist that
//      cleared it, in_use is set on every enabled bitmap and made durable
//      (one flush shared by all writers waiting at that moment).
//  P3  Persist() writes only the bitmap clusters that changed, flushes them,
//      then clears in_use durably, unless changes raced in meanwhile.
//  P4  Open() refuses an enabled bitmap left in_use by a crash, a size
//      mismatch, or a corrupt container, with a message saying what to do,
//      unless cbt's own crash-safety record covers it (process/power modes):
//      then it recovers a superset and carries on (see intent_map.h).
//
// Online edits (Edit: the control socket's bitmap commands, checkpoints):
// the bitmaps are an immutable BitmapSet (bitmap_set.h) swapped whole. An
// edit pauses new changes and drains those in flight (ChangeGate: every
// change is counted from BeginChange until its Change is destroyed, after
// forwarding), persists, builds the new set copy-on-write (BitmapEditSet),
// stores it with one directory switch, swaps it in and lets changes go on.
// So every change is wholly before or wholly after an edit, in memory and
// on disk, and a crash leaves the old set or the new one.
//
// Threading: BeginChange may run on many threads at once; it is lock-free
// while in_use is known durable and no edit is draining. Persist, the in_use
// gate and edits serialise on store_mu_ (the qcow2 Image is single-threaded;
// container I/O, fsync included, happens under it). Queries (QueryBitmaps,
// stats, Snapshot) never take store_mu_: they do not wait for I/O. Never
// call BeginChange while holding store_mu_, nor Edit while holding a Change
// (it would wait for itself).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "bitmap/dirty_bitmap.h"
#include "common/status.h"
#include "engine/bitmap_edit.h"
#include "engine/bitmap_set.h"
#include "engine/change_gate.h"
#include "engine/disk_identity.h"
#include "engine/intent_map.h"
#include "engine/storage.h"
#include "qcow2/image.h"

namespace cbt {

enum class Durability { kNone, kProcess, kPower };

struct TrackerOptions {
  std::string container_path;        // the qcow2 holding the bitmaps
  std::vector<std::string> bitmaps;  // must exist and record (or be created)
  bool create = false;               // create a missing container / bitmaps
  uint64_t granularity = 65536;      // for bitmaps we create
  uint32_t cluster_size = 65536;     // for a container we create
  Durability durability = Durability::kPower;
  bool readonly = false;  // never write the container
  // Where container files live; null: PosixStorage(). Not owned; must
  // outlive the tracker (tests inject crash-simulating devices here).
  Storage* storage = nullptr;
  // Internal bitmaps (the container is the served qcow2 image itself): the
  // allocator its data path uses, shared by every image opened here.
  // Null: the container is ours alone.
  std::shared_ptr<qcow2::SharedRefcounts> shared_refcounts = nullptr;
  // The container is the served image (internal bitmaps): only changes how
  // messages name it, and no disk identity is kept (QEMU's autoclear rule
  // covers a qcow2 image written by others).
  bool internal = false;
  // false (cbt-autoload=false): only `bitmaps` record. Every other enabled
  // bitmap is, at the writable Attach (before any change), disabled and
  // marked in use in one commit: it keeps its bits, but nobody (QEMU, cbt,
  // a crash-safety record) may take it for a record of the changes made
  // from now on. true: every enabled bitmap records (QEMU's auto flag).
  bool autoload = true;
  // The disk's identity now (engine/disk_identity.h): checked against the
  // container's record for every enabled bitmap at attach, before the
  // first change, and recorded at a clean stop (Close). Null: the
  // container's data-file link names the disk, if it has one. NotSupported
  // (or no source at all): it cannot be known; said once in the log, and
  // outside changes go undetected as before.
  std::function<Result<DiskIdentity>()> disk_identity;
  // Why disk_identity is null, for that log line ("the memory plugin ...").
  std::string no_identity_reason;
  // cbt-trust-disk=true: a disk whose identity changed is accepted (the
  // change was tracked elsewhere) and re-recorded at the next clean stop.
  bool trust_disk = false;
};

// What query-bitmaps reports about one bitmap.
struct BitmapStatus {
  std::string name;
  uint64_t granularity = 0;
  bool recording = false;
  bool persistent = true;
  bool consistent = true;
  bool in_use = false;                  // the flag may be set on disk now
  std::optional<uint64_t> dirty_bytes;  // from memory; none when inconsistent
};

struct TrackerStats {
  uint64_t persists = 0;            // Persist() calls that wrote something
  uint64_t bytes_written = 0;       // container bytes written by persists
  uint64_t in_use_sets = 0;         // times the P2 gate wrote in_use
  uint64_t intent_writes = 0;       // crash-safety record writes (process/power)
  uint64_t recovered_granules = 0;  // granules crash recovery added at open
  uint64_t edits = 0;               // online edits applied (Edit)
  uint64_t longest_drain_us = 0;    // longest pause of new changes by an edit
};

class Tracker {
 public:
  // Opens the container (creating it, sized disk_size, if allowed), takes
  // its locks, checks its size against disk_size, creates missing requested
  // bitmaps, and loads every enabled bitmap. Disabled bitmaps stay untouched.
  // Failure (nothing on disk changed): NotFound (container or bitmap missing
  // without create), InvalidArgument (size mismatch, disabled requested
  // bitmap, bad options), Corruption (bad container, inconsistent bitmap),
  // Busy (someone else holds the container), IOError.
  static Result<std::unique_ptr<Tracker>> Open(const TrackerOptions& opts, uint64_t disk_size);

  // The same in two steps, for nbdkit, which learns the disk size (and
  // whether the export is read-only) only when the first client connects.
  // Prepare opens, locks and validates an existing container (or checks that
  // one may be created), writes nothing and starts no threads. A container
  // the process may not write (mode 0444, read-only file system) is opened
  // read-only; only a read-only Attach can use it. Attach(size) does the
  // rest. Errors as for Open.
  static Result<std::unique_ptr<Tracker>> Prepare(const TrackerOptions& opts);
  Status Attach(uint64_t disk_size);
  // For a read-only export (nbdkit -r): checks the size of an existing
  // container and nothing else. Nothing is created, recovered or written,
  // ever; the container stays as found. A later Attach(size) (a writable
  // client) may follow and does the rest.
  Status AttachReadOnly(uint64_t disk_size);
  // False until an Attach(size) succeeded: Persist and Close write nothing.
  bool attached_for_writing() const { return attached_rw_.load(); }
  // True once an AttachReadOnly succeeded (a read-only export: nbdkit -r,
  // or a disk the plugin cannot write) and while no Attach(size) followed.
  bool serving_read_only() const { return attached_ro_.load() && !attached_rw_.load(); }
  ~Tracker();

  // A change in flight: from BeginChange until destroyed, which the caller
  // does once the change has been forwarded and answered. Edits wait for
  // every live Change (bounded) and block new ones meanwhile.
  class [[nodiscard]] Change {
   public:
    Change(Change&& o) noexcept : gate_(o.gate_) { o.gate_ = nullptr; }
    Change& operator=(Change&&) = delete;
    ~Change() {
      if (gate_) gate_->Leave();
    }

   private:
    friend class Tracker;
    explicit Change(ChangeGate* g) : gate_(g) {}
    ChangeGate* gate_;
  };

  // Call before forwarding a write, zero or trim of [offset, offset+length);
  // keep the Change until the change has been answered.
  // OK: the change is recorded in memory, in every recording bitmap, and
  // in_use (with the crash-safety record) is durable on disk.
  // Failure: the change must not be forwarded; the error carries the errno
  // of the failed container write (bits stay marked in memory).
  Result<Change> BeginChange(uint64_t offset, uint64_t length);

  // Applies `ops` to a working copy of the bitmap set (BitmapEditSet,
  // online) and makes the result current atomically with respect to
  // changes: drains the changes in flight (up to drain_timeout: then Busy,
  // nothing changed), swaps the new set in, lets changes go on, then stores
  // it (changed clusters in place, one directory switch) and returns once
  // that is durable. Writes wait only for the drain and the swap, never for
  // I/O. A failure of `ops` changes nothing; a failed store rolls the swap
  // back (the old set, with every change since merged into its recording
  // bitmaps). Busy also before a writable Attach. REQUIRES: the calling
  // thread holds no Change; not concurrent with Close.
  // while_paused, if given, runs after the swap and before changes go on
  // (only if `ops` succeeded): what must begin atomically with the edit,
  // such as a backup session's copy-before-write (engine/backup.h). It
  // must not block on I/O, and runs even if the store fails later.
  using EditOps = std::function<Status(BitmapEditSet&)>;
  Status Edit(const EditOps& ops, std::chrono::milliseconds drain_timeout,
              const std::function<void()>& while_paused = {});
  // Runs fn while new changes wait and none is in flight (the drain of an
  // edit, without one). Busy when the drain times out (fn did not run) or
  // before a writable Attach. Same REQUIREMENTS as Edit.
  Status Quiesce(const std::function<void()>& fn, std::chrono::milliseconds drain_timeout);

  // The current set (empty before Attach(size)); valid as long as held.
  std::shared_ptr<const BitmapSet> Snapshot() const;
  // The current set's bitmaps as query-bitmaps reports them.
  std::vector<BitmapStatus> QueryBitmaps() const;
  // A bitmap of the current set; null if absent or not loaded.
  std::shared_ptr<const DirtyBitmap> Bitmap(const std::string& name) const;

  // Writes changed bitmap clusters, flushes, clears in_use (P3). On failure
  // the changes stay pending and a later Persist retries; the first error is
  // returned. A no-op when nothing changed since the last persist.
  Status Persist();

  // Final Persist; the container is closed afterwards (further calls fail).
  Status Close();

  uint64_t disk_size() const { return disk_size_; }
  const std::string& container_path() const { return opts_.container_path; }
  // 0 until a container is open.
  uint64_t cluster_size() const { return cluster_size_.load(); }
  bool HasPendingChanges() const;
  // Bitmap data a Persist would write now: changed chunks x chunk bytes,
  // over the persistent bitmaps (the persist triggers' measure of change).
  uint64_t PendingBytes() const;
  // Monotonic count of changes that marked something new in memory (not
  // those already covered): a persist trigger's sign of activity.
  uint64_t ChangeCount() const { return change_count_.load(std::memory_order_relaxed); }
  // Changes between BeginChange and the end of their Change right now.
  int64_t ChangesInFlight() const { return gate_changes_.in_flight(); }
  TrackerStats stats() const;
  // True while in_use may be set on disk for the recording bitmaps: set by
  // the P2 gate, not yet cleared by a persist. Lock-free.
  bool InUseOnDisk() const { return in_use_on_disk_.load(); }

 private:
  // How messages name the container: "cbt-file=PATH", or the image holding
  // internal bitmaps; Label() is the short form.
  std::string Where() const;
  std::string Label() const;
  class WriteGate;
  void AddStat(uint64_t TrackerStats::*field, uint64_t n = 1);
  explicit Tracker(const TrackerOptions& opts) : opts_(opts) {}
  Storage& storage() const { return opts_.storage ? *opts_.storage : PosixStorage(); }
  Status OpenContainer();
  Status LoadContainerState();
  Status SetAsideUnnamed();
  Status CheckBitmaps() const;
  Status EnsureInUse(const BitmapSet& set);
  Status WaitStored(std::unique_lock<std::mutex>& lock, const BitmapSet& set);
  struct PreparedEdit;
  void RollBack(const PreparedEdit& p);
  Status EnsureRecorded(const BitmapSet& set, uint64_t first_region, uint64_t last_region);
  Status ClearInUseLocked();
  Status PersistLocked();
  struct SlotWrites;
  Status WriteChangedLocked(SlotWrites& w);
  void RestoreLocked(const SlotWrites& w);
  void ApplyDurableLocked(const SlotWrites& w);
  Status StoreEditLocked(std::vector<qcow2::BitmapSpec>& specs);
  Status PrepareEdit(const EditOps& ops, PreparedEdit& out);
  void Publish(std::shared_ptr<const BitmapSet> set);
  bool RecordRecoverable() const;
  // Disk identity (disk_identity.h): the check at attach, and the record
  // written at a clean stop (under store_mu_).
  std::function<Result<DiskIdentity>()> IdentitySource() const;
  Status CheckDiskIdentity();
  Status RecordIdentityLocked();
  Status DisarmIdentity();
  Status Recover();
  Status ArmRecord();
  Status ArmLocked();

  const TrackerOptions opts_;
  uint64_t disk_size_ = 0;  // set by Attach

  // Open path. Every container write goes through gate_, which refuses them
  // until Attach(size): Prepare and AttachReadOnly cannot write by
  // construction. container_readonly_: opened read-only because the process
  // may not write the file. reopen_writable_: the writable open wanted to
  // write (qcow2 clears unknown autoclear bits), so Prepare validated a
  // read-only open and Attach(size) opens it for writing.
  std::shared_ptr<WriteGate> gate_;
  bool container_readonly_ = false;
  bool reopen_writable_ = false;
  std::atomic<bool> attached_rw_{false};
  std::atomic<bool> attached_ro_{false};

  // Guards image_, armed_ and the container I/O; held across fsync, never
  // across BeginChange's marking and never by queries.
  mutable std::mutex store_mu_;
  std::unique_ptr<qcow2::Image> image_;
  std::atomic<uint64_t> cluster_size_{0};
  // May be set on disk (not yet cleared). Written under store_mu_.
  std::atomic<bool> in_use_on_disk_{false};
  bool armed_ = false;  // this session's record written (ArmLocked)
  // ArmLocked done (the identity record removed): read by BeginChange
  // without the lock; set under store_mu_.
  std::atomic<bool> armed_once_{false};
  // The identity record found at open (empty if none or not vouched), and
  // whether the attach check ran (once: a read-only attach, then a
  // writable one).
  IdentityRecord found_identity_;
  bool identity_checked_ = false;
  mutable std::mutex stats_mu_;  // guards stats_ (never held across I/O)
  TrackerStats stats_;

  // The bitmaps. set_ owns the current version (swapped under set_mu_
  // while the gate is drained); live_ is the same pointer for the data
  // path, read without a lock inside the gate. stored_set_ is the version
  // the container holds (under store_mu_): between an edit's swap and its
  // commit it is the one before, and committed_cv_ wakes writers waiting
  // for the commit (a change needing the gate waits until its set is
  // stored: in_use is set on the set's own bitmaps).
  mutable std::mutex set_mu_;
  std::shared_ptr<const BitmapSet> set_;
  std::atomic<const BitmapSet*> live_{nullptr};
  std::shared_ptr<const BitmapSet> stored_set_;
  std::condition_variable committed_cv_;
  uint64_t abandoned_generation_ = 0;  // an edit whose commit failed
  ChangeGate gate_changes_;
  std::mutex edit_mu_;  // one edit at a time

  // process/power: the write-intent map (null in mode none), and the record
  // found at open, if vouched for (null otherwise).
  std::unique_ptr<IntentMap> intents_;
  std::unique_ptr<IntentMap> found_record_;

  // True while in_use is durable on disk: BeginChange may forward at once.
  std::atomic<bool> in_use_durable_{false};
  // Marks under way (between the first and last bitmap's Mark). Persist waits
  // for zero after dropping in_use_durable_, so no mark is half done when it
  // decides whether in_use can be cleared.
  std::atomic<int64_t> marks_in_progress_{0};
  std::atomic<uint64_t> change_count_{0};
};

}  // namespace cbt
