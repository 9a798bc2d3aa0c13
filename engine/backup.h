// BackupManager: the backup session of a live tracker (docs/backup.md).
//
// A session starts atomically with a checkpoint: within one Tracker::Edit,
// `freeze` stops recording and `new` starts (or, for a first full backup,
// `new` is added), and the session's Fleece is installed while changes are
// drained. So every change is wholly before the session (in the view and
// in the frozen bitmap) or wholly after it (copied before it is forwarded,
// in the new bitmap). One session at a time; it lives in memory only: a
// restart ends it (the bitmaps are the tracker's and lose nothing).
//
// The data path: BeforeChange, called by the filter after
// Tracker::BeginChange and before forwarding, while the Change is held. The
// session pointer it reads is swapped only while changes are drained
// (Tracker::Edit's while_paused, Tracker::Quiesce), so it needs no lock and
// no reference count.
//
// Threading: Begin/End/Query/SetEndpoint from the control thread (one at a
// time, serialised by mu_ anyway); BeforeChange from writer threads;
// Current from view connections.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "engine/fleece.h"
#include "engine/tracker.h"

namespace cbt {

struct BackupOptions {
  std::string dir;  // where the fleece store goes (an unlinked file)
  uint64_t max_bytes = 0;
  FleeceErrorPolicy on_error = FleeceErrorPolicy::kBreakBackup;
  // Makes a session's store; null: CreateFleeceFile(dir). Tests inject
  // devices that fail here.
  std::function<Result<std::shared_ptr<BlockIO>>()> make_store;
};

struct BackupBeginRequest {
  std::string new_name;
  std::optional<std::string> freeze;
  std::optional<uint64_t> granularity;  // for new_name without freeze
};

// What `cbt backup begin` started for a session (backup-set-endpoint).
struct BackupEndpoint {
  uint64_t pid = 0;
  std::string uri, socket, carrier, context;
};

struct BackupStatus {
  bool active = false;
  uint64_t id = 0;
  std::string frozen;  // empty: no bitmap frozen (a full backup)
  std::string new_name;
  uint64_t disk_size = 0;
  uint32_t block_size = 0;
  std::optional<std::string> broken;
  FleeceStats stats;
  std::optional<BackupEndpoint> endpoint;
};

class BackupManager {
 public:
  // tracker must outlive the manager.
  BackupManager(Tracker& tracker, BackupOptions opts);
  ~BackupManager();

  // Starts a session. Failure: Busy (a session is open; the drain timed
  // out; no writable client yet), the edit's error (unknown or disabled
  // freeze, a name taken; nothing changed), IOError creating the store.
  Result<BackupStatus> Begin(const BackupBeginRequest& r, std::chrono::milliseconds drain);
  // Ends the open session (id, if given, must match) and frees its store.
  // Its status, as it was at the end. Failure: NotFound (none open or
  // another id), Busy (drain timed out; the session stays open).
  Result<BackupStatus> End(std::optional<uint64_t> id, std::chrono::milliseconds drain);
  BackupStatus Query() const;
  Status SetEndpoint(uint64_t id, BackupEndpoint e);

  // Writer path: REQUIRES the caller holds a Tracker::Change for the range.
  Status BeforeChange(uint64_t offset, uint64_t length, const DiskRead& read_old) {
    Fleece* f = live_.load(std::memory_order_acquire);
    return f ? f->BeforeChange(offset, length, read_old) : Status::OK();
  }
  // The open session's view, or null; id receives its id.
  std::shared_ptr<Fleece> Current(uint64_t* id = nullptr) const;
  // At shutdown, once no writer can come: ends the session without a drain.
  void Shutdown();

 private:
  BackupStatus StatusLocked() const;
  uint32_t BlockSize() const;

  Tracker& tracker_;
  const BackupOptions opts_;
  mutable std::mutex mu_;  // the fields below
  std::shared_ptr<Fleece> session_;
  uint64_t id_ = 0, last_id_ = 0;
  std::string frozen_, new_name_;
  std::optional<BackupEndpoint> endpoint_;
  std::atomic<Fleece*> live_{nullptr};
};

}  // namespace cbt
