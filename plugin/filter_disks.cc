// The filter's disks: see filter_disks.h.
#include "plugin/filter_disks.h"

#include <dlfcn.h>
#include <nbdkit-filter.h>

#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <nlohmann/json.hpp>
#include <utility>

#include "common/export_template.h"
#include "engine/disk_identity.h"
#include "plugin/backup_export.h"
#include "server/control_handler.h"
#include "server/control_socket.h"
#include "server/listen_sockets.h"

namespace cbt::plugin {

namespace {

// nbdkit 1.32 has no way for a filter to set the exit status, and exits 0
// after nbdkit_shutdown(). This makes the process exit with EXIT_FAILURE
// once nbdkit's main has cleaned up (socket, temp dirs): an atexit handler,
// kept alive past nbdkit's dlclose of the filter by RTLD_NODELETE.
void ExitFailureAtExit() noexcept {
  static std::once_flag once;
  std::call_once(once, [] {
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&ExitFailureAtExit), &info) && info.dli_fname)
      dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
    atexit([] {
      fflush(nullptr);
      _exit(EXIT_FAILURE);
    });
  });
}

// A failure after the fork that makes the whole server useless (the first
// client's export cannot be tracked by the one container): tell that
// client, stop serving, exit non-zero. A --run command sees its connection
// fail instead of hanging. REQUIRES attach_mu.
void FatalAtConnect(const std::string& msg) noexcept {
  state->fatal = msg;
  nbdkit_error("cbt: %s; shutting down", msg.c_str());
  ExitFailureAtExit();
  nbdkit_shutdown();
}

// The control commands of disk d (cbt-control=PATH), if the server has a
// control socket. REQUIRES attach_mu (or before the fork).
void MakeHandler(Disk& d) {
  if (state->control_path.empty()) return;
  d.control_handler = std::make_unique<control::TrackerHandler>(
      *d.tracker, d.tracking, std::chrono::milliseconds(state->drain_timeout_ms));
  d.control_handler->SetBackup({d.backup.get(), d.backup_export, [path = state->control_path] {
                                  return control::ListeningUnixSockets({path});
                                }});
}

// The hint of the router's refusals (the socket's path is the caller's).
constexpr char kListExports[] =
    "list the tracked exports with query-exports (cbt exports --socket SOCKET)";

// The router's two functions (under attach_mu; the handlers live until
// CloseDisks, which stops the control server first).
Result<control::Handler*> Resolve(const std::optional<std::string>& name) {
  std::lock_guard lock(state->attach_mu);
  if (!state->per_export) {
    Disk& d = *state->single;
    if (name && d.have_export && *name != d.name)
      return Status::NotFound("export '" + *name + "' is not tracked here: this server tracks '" +
                              d.name + "' only");
    return d.control_handler.get();
  }
  if (name) {
    auto it = state->disks.find(*name);
    if (it != state->disks.end()) return it->second->control_handler.get();
    if (auto r = state->refused.find(*name); r != state->refused.end())
      return Status::NotFound("export '" + *name +
                              "' is not tracked: its last connection was refused: " + r->second +
                              "; " + kListExports);
    return Status::NotFound("export '" + *name +
                            "' is not tracked: no client has connected to it since the server "
                            "started; " +
                            kListExports);
  }
  if (state->disks.size() == 1) return state->disks.begin()->second->control_handler.get();
  if (state->disks.empty()) {
    if (auto r = state->refused.find(state->last_refused); r != state->refused.end())
      return Status::NotFound("no export is tracked yet: the last connection (to export '" +
                              r->first + "') was refused: " + r->second);
    return Status::NotFound("no export is tracked yet: no client has connected");
  }
  return Status::InvalidArgument("this server tracks " + std::to_string(state->disks.size()) +
                                 " exports: name one with \"export\" (cbt --export NAME); " +
                                 kListExports);
}

nlohmann::json DiskJson(const Disk& d) {
  return {{"name", d.name},
          {"container", d.opts.container_path},
          {"attached", d.tracking.load()},
          {"read-only", d.attached_ro && !d.tracking.load()},
          {"disk-size", d.have_export ? d.tracker->disk_size() : 0}};
}

nlohmann::json List() {
  std::lock_guard lock(state->attach_mu);
  nlohmann::json out = nlohmann::json::array();
  if (!state->per_export) {
    if (state->single->have_export) out.push_back(DiskJson(*state->single));
  } else {
    for (const auto& [name, d] : state->disks) out.push_back(DiskJson(*d));
  }
  return out;
}

// Why export `name` cannot be tracked, for its connection, and kept for
// the control socket (per export; REQUIRES attach_mu).
Disk* Refuse(const char* name, const Status& s) {
  nbdkit_error("cbt: export \"%s\" refused: %s", name, s.message().c_str());
  if (state->refused.size() >= State::kMaxRefused && !state->refused.count(name))
    state->refused.erase(state->refused.begin());
  state->refused[name] = s.message();
  state->last_refused = name;
  return nullptr;
}

}  // namespace

int DisksGetReady() {
  if (state->per_export) return 0;  // each export's container opens at its first connection
  auto d = std::make_unique<Disk>();
  d->opts = state->opts;
  // Open, lock and validate the container before nbdkit forks, so errors
  // reach the terminal and no --run command starts. The OFD locks stay
  // with the server: the forked child shares the open file description.
  auto t = Tracker::Prepare(d->opts);
  if (!t.ok()) {
    nbdkit_error("cbt: %s", t.status().message().c_str());
    return -1;
  }
  d->tracker = std::move(t).value();
  state->single = std::move(d);
  return BackupAttach(*state->single);
}

int StartControl() {
  if (state->control_path.empty()) return 0;
  if (!state->per_export) MakeHandler(*state->single);
  state->control_router = std::make_unique<control::ExportRouter>(Resolve, List);
  control::ServerOptions opt;
  opt.path = state->control_path;
  state->control = std::make_unique<control::ControlServer>(std::move(opt), *state->control_router);
  if (Status s = state->control->Start(); !s.ok()) {
    nbdkit_error("cbt-control=%s: %s", state->control_path.c_str(), s.message().c_str());
    state->control.reset();  // Stop(): closes what Start() opened
    return -1;
  }
  return 0;
}

Disk* FindDisk(std::string_view name) {
  std::lock_guard lock(state->attach_mu);
  if (!state->per_export)
    return state->single && state->single->have_export && state->single->name == name
               ? state->single.get()
               : nullptr;
  auto it = state->disks.find(std::string(name));
  return it == state->disks.end() ? nullptr : it->second.get();
}

Disk* AttachExport(nbdkit_next* next, const char* name, bool readonly_export) {
  std::lock_guard lock(state->attach_mu);
  Disk* d = nullptr;
  std::unique_ptr<Disk> fresh;  // per export: a disk not tracked yet
  if (!state->per_export) {
    if (!state->fatal.empty()) {
      nbdkit_error("cbt: not serving: %s", state->fatal.c_str());
      return nullptr;
    }
    d = state->single.get();
    if (d->have_export && d->name != name) {
      nbdkit_error(
          "cbt: export \"%s\" refused: this server tracks the changes of export \"%s\" "
          "only (cbt-file=%s holds the bitmaps of one disk); connect to \"%s\", serve "
          "\"%s\" from another nbdkit with its own cbt-file, or give every export its own "
          "container with a cbt-file=...%%e... template",
          name, d->name.c_str(), d->opts.container_path.c_str(), d->name.c_str(), name);
      return nullptr;
    }
  } else if (auto it = state->disks.find(name); it != state->disks.end()) {
    d = it->second.get();
  } else {
    Result<std::string> path = ContainerFor(state->opts.container_path, name);
    if (!path.ok()) return Refuse(name, path.status());
    fresh = std::make_unique<Disk>();
    fresh->opts = state->opts;
    fresh->opts.container_path = *path;
    if (!state->disk_dir.empty() && state->disk_files.empty()) {
      // file dir= serves the file DIR/EXPORT: that names the disk.
      fresh->opts.disk_identity = [f = state->disk_dir + "/" + name] { return FileIdentity(f); };
      fresh->opts.no_identity_reason.clear();
    }
    auto t = Tracker::Prepare(fresh->opts);
    if (!t.ok()) return Refuse(name, t.status());
    fresh->tracker = std::move(t).value();
    d = fresh.get();
  }
  int64_t size = next->get_size(next);
  if (size == -1) return nullptr;  // the plugin said why
  const auto usize = static_cast<uint64_t>(size);
  // A zero-sized disk cannot change either (and qcow2 has no bitmaps for it).
  const bool readonly = readonly_export || usize == 0;
  Tracker& t = *d->tracker;
  if (d->tracking.load() || (d->attached_ro && readonly)) {
    if (usize != t.disk_size()) {
      nbdkit_error("cbt: export \"%s\" now has %" PRIu64 " bytes; tracking started with %" PRIu64
                   " (the size must not change)",
                   name, usize, t.disk_size());
      return nullptr;
    }
    return d;
  }
  Status s = readonly ? t.AttachReadOnly(usize) : t.Attach(usize);
  if (!s.ok()) {
    if (state->per_export) return Refuse(name, s);
    FatalAtConnect(s.message());
    return nullptr;
  }
  d->have_export = true;
  d->name = name;
  if (fresh) {
    if (BackupAttach(*fresh) == -1) return nullptr;
    MakeHandler(*fresh);
    state->disks.emplace(name, std::move(fresh));
    state->refused.erase(name);
  }
  if (readonly) {
    d->attached_ro = true;
    return d;
  }
  d->tracking.store(true);
  if (state->persist.any()) {
    d->scheduler = std::make_unique<PersistScheduler>(t, state->persist);
    d->scheduler->Start();
  }
  return d;
}

void CloseDisks() {
  // First: no control client may reach a tracker once it closes.
  if (state->control) state->control->Stop();
  state->control.reset();
  state->control_router.reset();
  auto close = [](Disk& d) {
    d.control_handler.reset();
    if (d.scheduler) d.scheduler->Stop();
    if (d.backup) d.backup->Shutdown();
    if (d.tracker && d.tracking.load()) {
      // Clean shutdown (P3): persist and clear in_use.
      Status s = d.tracker->Close();
      if (!s.ok())
        nbdkit_error("cbt: export \"%s\": final persist failed: %s", d.name.c_str(),
                     s.message().c_str());
    }
    d.backup.reset();
    d.tracker.reset();  // not attached for writing: nothing to write
  };
  std::lock_guard lock(state->attach_mu);
  if (state->single) close(*state->single);
  for (auto& [name, d] : state->disks) close(*d);
}

}  // namespace cbt::plugin
