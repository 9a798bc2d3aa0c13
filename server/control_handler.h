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

#include "engine/tracker.h"
#include "server/control_protocol.h"

namespace cbt::control {

class TrackerHandler : public Handler {
 public:
  // Neither is owned; both must outlive the handler (and the server using
  // it). `attached`: true once tracker.Attach(size) succeeded.
  // drain_timeout: how long an edit waits for the changes in flight.
  TrackerHandler(Tracker& tracker, const std::atomic<bool>& attached,
                 std::chrono::milliseconds drain_timeout = std::chrono::milliseconds(5000))
      : tracker_(tracker), attached_(attached), drain_timeout_(drain_timeout) {}

  Result<nlohmann::json> Handle(const Request& request) override;

 private:
  nlohmann::json QueryBitmaps() const;
  nlohmann::json QueryStats() const;
  Result<nlohmann::json> QueryExtents(const ExtentsArgs& a) const;

  Tracker& tracker_;
  const std::atomic<bool>& attached_;
  const std::chrono::milliseconds drain_timeout_;
};

}  // namespace cbt::control
