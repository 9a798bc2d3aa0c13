// TrackerHandler: the control protocol's Handler (control_protocol.h) over a
// live Tracker, for the filter's cbt-control=PATH (docs/control.md). No
// nbdkit. Every command of the protocol:
//
//   query-bitmaps, query-bitmap-extents, query-stats   from memory, no lock
//                  held across I/O (Tracker::Snapshot / QueryBitmaps)
//   persist        Tracker::Persist
//   bitmap-*, checkpoint, transaction   one Tracker::Edit each: the
//                  actions run in order on one working set and are stored
//                  with one directory switch: all or nothing
//   backup-begin, backup-end, query-backup, backup-set-endpoint
//                  the BackupManager (engine/backup.h), when the filter
//                  gave one; otherwise NotSupported
//
// Until the tracker is attached for writing (no writable client yet, or only
// read-only ones), the bitmaps are not loaded at their disk's size: the
// queries report "attached": false and no bitmaps, persist does nothing, and
// edits are refused (Busy).
//
// Threading: Handle() runs on the control server's threads (one at a time)
// while the data path runs.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "engine/backup.h"
#include "engine/tracker.h"
#include "server/control_protocol.h"

namespace cbt::control {

// The filter's backup export, for the backup commands' replies.
struct BackupExport {
  BackupManager* manager = nullptr;  // not owned; null: no backup commands
  std::string export_name;           // the point-in-time export's NBD name
  // Where nbdkit listens (unix sockets), if it can be found out.
  std::function<std::vector<std::string>()> sockets;
};

class TrackerHandler : public Handler {
 public:
  // Neither is owned; both must outlive the handler (and the server using
  // it). `attached`: true once tracker.Attach(size) succeeded.
  // drain_timeout: how long an edit waits for the changes in flight.
  TrackerHandler(Tracker& tracker, const std::atomic<bool>& attached,
                 std::chrono::milliseconds drain_timeout = std::chrono::milliseconds(5000))
      : tracker_(tracker), attached_(attached), drain_timeout_(drain_timeout) {}
  void SetBackup(BackupExport b) { backup_ = std::move(b); }

  Result<nlohmann::json> Handle(const Request& request) override;

 private:
  nlohmann::json QueryBitmaps() const;
  nlohmann::json QueryStats() const;
  Result<nlohmann::json> QueryExtents(const ExtentsArgs& a) const;
  Result<nlohmann::json> HandleBackup(const Request& request);
  nlohmann::json BackupJson(const BackupStatus& st) const;

  Tracker& tracker_;
  const std::atomic<bool>& attached_;
  const std::chrono::milliseconds drain_timeout_;
  BackupExport backup_;
};

// The server's handler when it tracks several exports (or may): query-exports
// answers from `list`; every other request goes to the handler `resolve`
// finds for its "export" (nullopt: the request named none), or fails with
// resolve's error (NotFound, InvalidArgument).
class ExportRouter : public Handler {
 public:
  using Resolve = std::function<Result<Handler*>(const std::optional<std::string>& export_name)>;
  using List = std::function<nlohmann::json()>;  // the "exports" array
  ExportRouter(Resolve resolve, List list) : resolve_(std::move(resolve)), list_(std::move(list)) {}
  Result<nlohmann::json> Handle(const Request& request) override;

 private:
  Resolve resolve_;
  List list_;
};

}  // namespace cbt::control
