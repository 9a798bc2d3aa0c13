// The filter's shared state and the helpers of every callback, for the
// filter's translation units (cbt_filter.cc: the live export and the
// lifecycle; backup_export.cc: the point-in-time export). nbdkit only.
#pragma once

#include <nbdkit-filter.h>

#include <atomic>
#include <cerrno>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "engine/backup.h"
#include "engine/scheduler.h"
#include "engine/tracker.h"
#include "server/control_handler.h"
#include "server/control_socket.h"

namespace cbt::plugin {

// Filter state. opts and persist are written during config
// (single-threaded); tracker in get_ready. The attach state is written in
// .prepare under attach_mu; `tracking` is also read without it.
struct State {
  cbt::TrackerOptions opts;
  // No cbt-file= over cbt's qcow2 plugin: the bitmaps live in the image.
  bool internal_bitmaps = false;
  // The plugin's file= parameters (absolute) and whether it has dir=: what
  // names the disk for its identity (SetDiskIdentitySource).
  std::vector<std::string> disk_files;
  bool disk_dir = false;
  cbt::PersistTriggers persist;  // cbt-persist-interval/-threshold/-idle; 0 = off
  std::unique_ptr<cbt::Tracker> tracker;
  std::unique_ptr<cbt::PersistScheduler> scheduler;

  std::mutex attach_mu;
  bool have_export = false;  // export_name is the tracked export
  std::string export_name;   // canonical name, as the plugin sees it
  bool attached_ro = false;  // AttachReadOnly done (a read-only client came first)
  std::string fatal;         // attach failed: the server is shutting down
  // Attached for writing: flush, finalize and cleanup persist.
  std::atomic<bool> tracking{false};

  // cbt-control=PATH (absolute; empty: no control socket). The server and
  // its handler exist from .after_fork to .cleanup.
  std::string control_path;
  std::unique_ptr<cbt::control::TrackerHandler> control_handler;
  // How long an edit waits for the changes in flight (cbt-drain-timeout).
  unsigned drain_timeout_ms = 5000;
  std::unique_ptr<cbt::control::ControlServer> control;

  // The backup export (docs/backup.md): its name, cbt-fleece-* options and
  // the sessions (from get_ready to cleanup).
  std::string backup_export = "backup";
  cbt::BackupOptions backup_opts;
  std::unique_ptr<cbt::BackupManager> backup;
};
extern State* state;  // cbt-durability defaults to power: see docs/crash-safety.md

// Reports a failed engine call to nbdkit: one error line, errno into *err.
inline int Fail(const Status& s, int* err) {
  nbdkit_error("cbt: %s", s.message().c_str());
  *err = s.err() ? s.err() : EIO;
  return -1;
}

// Runs f, turning any escaping exception into an nbdkit error: exceptions
// must never unwind through nbdkit's C frames.
template <class F>
int Guard(int* err, F&& f) noexcept {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    nbdkit_error("cbt: out of memory");
    *err = ENOMEM;
  } catch (const std::exception& e) {
    nbdkit_error("cbt: internal error: %s", e.what());
    *err = EIO;
  } catch (...) {
    nbdkit_error("cbt: internal error");
    *err = EIO;
  }
  return -1;
}

}  // namespace cbt::plugin
