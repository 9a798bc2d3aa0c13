// Tracker: the engine behind the nbdkit filter. It owns the enabled bitmaps
// (in memory), the qcow2 container that stores them, and the protocol that
// keeps the two consistent (design promises P1-P4):
//
//  P1  BeforeChange() marks every touched granule in every enabled bitmap
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
// Threading: BeforeChange may run on many threads at once; it is lock-free
// while in_use is known durable. Persist and the in_use gate serialise on
// store_mu_ (the qcow2 Image is single-threaded). Never call BeforeChange
// while holding store_mu_.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bitmap/dirty_bitmap.h"
#include "common/status.h"
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
};

struct TrackerStats {
  uint64_t persists = 0;            // Persist() calls that wrote something
  uint64_t bytes_written = 0;       // container bytes written by persists
  uint64_t in_use_sets = 0;         // times the P2 gate wrote in_use
  uint64_t intent_writes = 0;       // crash-safety record writes (process/power)
  uint64_t recovered_granules = 0;  // granules crash recovery added at open
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
  bool attached_for_writing() const { return attached_rw_; }
  ~Tracker();

  // Call before forwarding a write, zero or trim of [offset, offset+length).
  // OK: the change is recorded in memory and in_use is durable on disk.
  // Failure: the change must not be forwarded; the error carries the errno
  // of the failed container write (bits stay marked in memory).
  Status BeforeChange(uint64_t offset, uint64_t length);

  // Writes changed bitmap clusters, flushes, clears in_use (P3). On failure
  // the changes stay pending and a later Persist retries; the first error is
  // returned. A no-op when nothing changed since the last persist.
  Status Persist();

  // Final Persist; the container is closed afterwards (further calls fail).
  Status Close();

  uint64_t disk_size() const { return disk_size_; }
  const std::vector<std::string>& enabled_bitmaps() const { return names_; }
  const DirtyBitmap& bitmap(size_t i) const { return *bitmaps_[i]; }
  bool HasPendingChanges() const;
  // Bitmap data a Persist would write now: changed chunks x chunk bytes,
  // over the persistent bitmaps (the persist triggers' measure of change).
  uint64_t PendingBytes() const;
  // Monotonic count of changes that marked something new in memory (not
  // those already covered): a persist trigger's sign of activity.
  uint64_t ChangeCount() const { return change_count_.load(std::memory_order_relaxed); }
  TrackerStats stats() const;
  // True while in_use may be set on disk for the enabled bitmaps: set by the
  // P2 gate, not yet cleared durably by a persist. Takes store_mu_, so it
  // waits for a persist under way (never call it on the data path).
  bool InUseOnDisk() const;

 private:
  class WriteGate;
  explicit Tracker(const TrackerOptions& opts) : opts_(opts) {}
  Storage& storage() const { return opts_.storage ? *opts_.storage : PosixStorage(); }
  Status OpenContainer();
  Status LoadContainerState();
  Status CheckBitmaps() const;
  Status EnsureInUse();
  Status EnsureRecorded(uint64_t first_region, uint64_t last_region);
  Status ClearInUseLocked();
  bool RecordRecoverable() const;
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
  bool attached_rw_ = false;

  // Guards image_, in_use_on_disk_ and stats_. Held across container I/O,
  // never across BeforeChange's marking.
  mutable std::mutex store_mu_;
  std::unique_ptr<qcow2::Image> image_;
  bool in_use_on_disk_ = false;  // may be set on disk (not yet cleared durably)
  bool armed_ = false;           // this session's record written (ArmLocked)
  TrackerStats stats_;

  // Fixed after Open: the enabled bitmaps, in directory order.
  std::vector<std::string> names_;
  std::vector<std::unique_ptr<DirtyBitmap>> bitmaps_;
  // Per enabled bitmap, the bits known to be on disk and flushed (as loaded,
  // then updated after each persist's flush with exactly what it wrote).
  // A change whose granules are all set here is already covered on disk and
  // needs neither marking nor in_use. Only grows, like bitmaps_ (the filter
  // never clears bits), so a reader never sees a bit vanish.
  std::vector<std::unique_ptr<DirtyBitmap>> durable_;

  // process/power: the write-intent map (null in mode none), and the record
  // found at open, if vouched for (null otherwise).
  std::unique_ptr<IntentMap> intents_;
  std::unique_ptr<IntentMap> found_record_;

  // True while in_use is durable on disk: BeforeChange may forward at once.
  std::atomic<bool> in_use_durable_{false};
  // Marks under way (between the first and last bitmap's Mark). Persist waits
  // for zero after dropping in_use_durable_, so no mark is half done when it
  // decides whether in_use can be cleared.
  std::atomic<int64_t> marks_in_progress_{0};
  std::atomic<uint64_t> change_count_{0};
};

}  // namespace cbt
