// Fleece: copy-before-write behind a backup session's point-in-time view.
//
// From the moment a session starts (atomically with a checkpoint: the
// tracker's drain), the disk as it was is served read-only beside the live
// disk, which keeps taking writes. The first change to a block not yet
// preserved first copies the block's old data into the store (a sparse,
// unlinked temporary file: block i at offset i * block_size), then is
// forwarded. The view reads preserved blocks from the store and the others
// from the disk. QEMU's copy-before-write + snapshot-access, in one object.
//
// Per block (block_size bytes, the copy unit), one state:
//   kOld      the disk still holds the point-in-time data
//   kCopying  a writer is copying it (others wait for it)
//   kStored   preserved in the store
//   kZero     preserved: it read as zeros (nothing stored)
// kStored and kZero are final. The interlock (the race QEMU once had):
//  - a writer claims the kOld blocks of its range, copies them, marks them,
//    then waits until no block of its range is being copied by another
//    writer and no view read that reads the disk overlaps the range; only
//    then is the change forwarded;
//  - a view read registers its range (a "frozen read") under the lock when
//    any of its blocks is not yet preserved, reads those from the disk and
//    the preserved ones from the store, and unregisters.
// So a view read never sees data written after the session started, and
// never a torn block. Preserved blocks need no lock: they never change.
//
// Errors (a failed or full store) follow the session's policy:
//  kBreakBackup  the change goes on; the session is broken: every view read
//                from then on fails, naming why (also one already under way
//                when it broke). The default: the disk's writes matter more
//                than one backup run, which the next run repeats.
//  kFailWrite    the change fails with the store's errno; the view stays
//                valid (QEMU's default, break-guest-write).
// Either way no change goes unrecorded: the bitmaps are the tracker's.
//
// Cost when every block of a change is preserved and no view read is under
// way: a few atomic loads, no lock.
//
// Threading: BeforeChange from any number of writer threads, Read/Extents
// from any number of view threads, at once. End: REQUIRES no BeforeChange
// running or to come (the caller drains writers first: BackupManager).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/block_io.h"
#include "common/status.h"

namespace cbt {

enum class FleeceErrorPolicy { kBreakBackup, kFailWrite };

struct FleeceOptions {
  uint64_t disk_size = 0;
  uint32_t block_size = 65536;  // the copy unit: power of two, 4 KiB .. 16 MiB
  uint64_t max_bytes = 0;       // store limit (bytes of preserved data); 0: none
  FleeceErrorPolicy on_error = FleeceErrorPolicy::kBreakBackup;
};

struct FleeceStats {
  uint64_t copied_blocks = 0;  // preserved (stored + zero)
  uint64_t zero_blocks = 0;    // of those, read as zeros: nothing stored
  uint64_t stored_bytes = 0;   // data in the store
  uint64_t view_reads = 0;     // Read + Extents calls
  uint64_t write_waits = 0;    // changes that waited for a copy or a view read
};

// One extent of the view, as base:allocation reports it.
struct ViewExtent {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool hole = false;  // not allocated
  bool zero = false;  // reads as zeros
};

// Reads [offset, offset + out.size()) of the disk as it is now.
using DiskRead = std::function<Status(uint64_t offset, std::span<std::byte> out)>;
// Appends the disk's extents over [offset, offset + length), contiguous from
// offset; may end early (never past offset + length).
using DiskExtents =
    std::function<Status(uint64_t offset, uint64_t length, std::vector<ViewExtent>& out)>;

class Fleece {
 public:
  // store: empty, writable, private to this session (its pwrite may fail:
  // that is the policy's business). InvalidArgument for bad options.
  static Result<std::unique_ptr<Fleece>> Create(std::shared_ptr<BlockIO> store,
                                                const FleeceOptions& opts);
  ~Fleece();

  // Before forwarding a write, zero or trim of [offset, offset + length).
  // OK: forward it (preserved, or the session is broken or ended).
  // Failure (kFailWrite only): do not forward; the view is unchanged.
  Status BeforeChange(uint64_t offset, uint64_t length, const DiskRead& read_old);

  // Reads the view. Failure: the session ended or broke (IOError, EIO,
  // naming why), or a read of the disk or the store failed.
  Status Read(uint64_t offset, std::span<std::byte> out, const DiskRead& read_disk);
  // The view's extents over [offset, offset + length): preserved blocks are
  // data (zero: not a hole, for blocks that read as zeros), the others as
  // the disk reports them. Contiguous from offset; never empty for a
  // length > 0 unless an error is returned.
  Status Extents(uint64_t offset, uint64_t length, const DiskExtents& disk,
                 std::vector<ViewExtent>& out);

  // Breaks the session (later view reads fail with `why`); idempotent, the
  // first reason stays.
  void Break(const std::string& why);
  // Ends the session: view reads fail from now on; waits for those under
  // way; closes the store (its space goes back to the file system).
  void End();

  std::optional<std::string> broken() const;
  bool ended() const { return ended_.load(); }
  FleeceStats stats() const;
  const FleeceOptions& options() const { return opts_; }

 private:
  enum State : uint8_t { kOld = 0, kCopying = 1, kStored = 2, kZero = 3 };
  struct FrozenRead {
    uint64_t first, last;  // blocks
  };
  Fleece(std::shared_ptr<BlockIO> store, const FleeceOptions& opts);
  uint64_t blocks() const { return (opts_.disk_size + opts_.block_size - 1) / opts_.block_size; }
  uint64_t BlockBytes(uint64_t b) const;
  State Get(uint64_t b) const { return static_cast<State>(state_[b].load()); }
  bool AllPreserved(uint64_t first, uint64_t last) const;
  bool FrozenOverlapLocked(uint64_t first, uint64_t last) const;
  // Copies the claimed blocks [first, last] (contiguous) into the store and
  // marks them; on failure marks what failed per the policy.
  Status CopyRun(uint64_t first, uint64_t last, const DiskRead& read_old);
  Status BrokenStatusLocked() const;
  // Registers a view read of [first, last]; nullopt when it must fail.
  Status BeginView(uint64_t first, uint64_t last, std::list<FrozenRead>::iterator& reg,
                   bool& frozen, std::vector<State>& states);
  Status EndView(std::list<FrozenRead>::iterator reg, bool frozen, Status s);

  const FleeceOptions opts_;
  std::shared_ptr<BlockIO> store_;  // reset by End (under mu_, no view reads)
  std::unique_ptr<std::atomic<uint8_t>[]> state_;

  mutable std::mutex mu_;
  std::condition_variable cv_;            // a copy finished, a view read ended
  std::list<FrozenRead> frozen_;          // under mu_
  std::atomic<int64_t> frozen_count_{0};  // frozen_.size(), for the fast path
  int64_t views_ = 0;                     // view reads under way (under mu_)
  uint64_t reserved_bytes_ = 0;           // store bytes claimed (under mu_)
  std::optional<std::string> broken_;     // under mu_
  std::atomic<bool> broken_flag_{false};
  std::atomic<bool> ended_{false};
  FleeceStats stats_;  // under mu_
};

// An unlinked temporary file in dir for a fleece store (O_TMPFILE, else
// mkstemp + unlink): nothing is left behind, even after kill -9.
Result<std::shared_ptr<BlockIO>> CreateFleeceFile(const std::string& dir);

}  // namespace cbt
