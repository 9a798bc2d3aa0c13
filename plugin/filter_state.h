// The filter's shared state and the helpers of every callback, for the
// filter's translation units (cbt_filter.cc: the live export and the
// lifecycle; backup_export.cc: the point-in-time export). nbdkit only.
#pragma once

#include <nbdkit-filter.h>

#include <atomic>
#include <cerrno>
#include <map>
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

// One tracked disk: an export and the container of its bitmaps. Created in
// get_ready (one container for the server's one export) or, with a
// per-export cbt-file template (%e), by the first connection to its export.
// Never destroyed before .cleanup, so connections keep a plain pointer.
// The attach fields are written under State::attach_mu; `tracking` is also
// read without it.
struct Disk {
  cbt::TrackerOptions opts;  // container_path: this disk's container
  std::unique_ptr<cbt::Tracker> tracker;
  std::unique_ptr<cbt::PersistScheduler> scheduler;
  bool have_export = false;  // `name` is the tracked export
  std::string name;          // canonical export name, as the plugin sees it
  bool attached_ro = false;  // AttachReadOnly done (a read-only client came first)
  // Attached for writing: flush, finalize and cleanup persist.
  std::atomic<bool> tracking{false};
  // The backup export's session manager (from attach to cleanup) and the
  // NBD name of this disk's point-in-time view.
  std::unique_ptr<cbt::BackupManager> backup;
  std::string backup_export;
  // Its control commands (cbt-control=PATH), routed by export name.
  std::unique_ptr<cbt::control::TrackerHandler> control_handler;
};

// Filter state. opts and persist are written during config
// (single-threaded); the first disk in get_ready. The disk table is written
// in .prepare under attach_mu.
struct State {
  // Every disk's options; with per_export, container_path is the template.
  cbt::TrackerOptions opts;
  // cbt-file= holds %e: one container per export (docs/filter.md).
  bool per_export = false;
  // No cbt-file= over cbt's qcow2 plugin: the bitmaps live in the image.
  bool internal_bitmaps = false;
  // The plugin's file= parameters and its dir= (absolute): what names the
  // disk for its identity (SetDiskIdentitySource; per export: dir/EXPORT).
  std::vector<std::string> disk_files;
  std::string disk_dir;
  cbt::PersistTriggers persist;  // cbt-persist-interval/-threshold/-idle; 0 = off

  std::mutex attach_mu;
  // Not per_export: the one disk, prepared in get_ready, attached by the
  // first connection. per_export: every disk a connection attached, by name.
  std::unique_ptr<Disk> single;
  std::map<std::string, std::unique_ptr<Disk>> disks;
  std::string fatal;  // the single disk failed to attach: shutting down
  // per_export: why the last connection to an export not tracked was
  // refused, by name (cleared when one attaches; at most kMaxRefused names,
  // a client may try any), for the control socket's answer.
  static constexpr size_t kMaxRefused = 256;
  std::map<std::string, std::string> refused;
  std::string last_refused;  // the name refused last (in `refused` if kept)

  // cbt-control=PATH (absolute; empty: no control socket). The server and
  // its router exist from .after_fork to .cleanup.
  std::string control_path;
  // How long an edit waits for the changes in flight (cbt-drain-timeout).
  unsigned drain_timeout_ms = 5000;
  std::unique_ptr<cbt::control::Handler> control_router;
  std::unique_ptr<cbt::control::ControlServer> control;

  // The backup export (docs/backup.md): its name and cbt-fleece-* options.
  std::string backup_export = "backup";
  cbt::BackupOptions backup_opts;
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
