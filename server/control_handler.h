// TrackerHandler: the control protocol's Handler (control_protocol.h) over a
// live Tracker, for the filter's cbt-control=PATH (docs/control.md). No
// nbdkit. What exists today (issue 9, first step):
//
//   query-bitmaps  per enabled bitmap: name, granularity, recording and
//                  persistent (always true), in-use (may be set on disk now),
//                  dirty-bytes (in memory); plus "attached"
//   query-stats    the TrackerStats counters; plus "attached"
//   persist        Tracker::Persist; its error's class as the protocol maps it
//
// Every other command: NotSupported, "not implemented yet (issue 9)".
//
// Until the tracker is attached for writing (no writable client yet, or only
// read-only ones), the bitmaps are not loaded at their disk's size: the
// queries report "attached": false and no bitmaps, and persist does nothing.
//
// Threading: Handle() runs on the control server's threads (one at a time)
// while the data path runs. It reads the tracker only once `attached` is
// true (set after Attach returned; the bitmap set is fixed from then on),
// reads the bitmaps' lock-free counters, and takes only the tracker's
// store lock (stats, in-use, persist) for as long as the tracker holds it.
#pragma once

#include <atomic>

#include "engine/tracker.h"
#include "server/control_protocol.h"

namespace cbt::control {

class TrackerHandler : public Handler {
 public:
  // Neither is owned; both must outlive the handler (and the server using
  // it). `attached`: true once tracker.Attach(size) succeeded.
  TrackerHandler(Tracker& tracker, const std::atomic<bool>& attached)
      : tracker_(tracker), attached_(attached) {}

  Result<nlohmann::json> Handle(const Request& request) override;

 private:
  nlohmann::json QueryBitmaps() const;
  nlohmann::json QueryStats() const;

  Tracker& tracker_;
  const std::atomic<bool>& attached_;
};

}  // namespace cbt::control
