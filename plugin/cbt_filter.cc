// nbdkit-cbt-filter: changed block tracking. Thin adapter: parses cbt-*
// parameters, hands every write, zero and trim to the engine's Tracker before
// forwarding it, and persists on flush, disconnect and shutdown. All format
// and consistency logic lives in engine/ and qcow2/ (see engine/tracker.h).
//
// Lifecycle (nbdkit 1.32, see docs/filter.md):
//   config/config_complete  parse and check parameters (before fork)
//   get_ready               open, lock and validate the container (errors
//                           still reach the terminal; nothing forked yet;
//                           nothing written: -r is not known yet); checks
//                           the cbt-control path. With a per-export
//                           template (cbt-file=...%e...) nothing is opened
//                           yet (filter_disks.h)
//   after_fork              start the control socket (cbt-control=PATH,
//                           docs/control.md): its threads must not be
//                           started before the fork
//   open/prepare            per connection. The first one to an export
//                           attaches its disk's tracker (size known only
//                           here, per export): read-only for a read-only
//                           export, for writing otherwise; starts the
//                           persister. One container: another export name
//                           is refused, and an attach error fails the
//                           connection and shuts the server down with a
//                           non-zero exit status. Per export: the export's
//                           container is opened here; an error fails that
//                           connection only.
//   pwrite/zero/trim        the connection's disk: Tracker::BeginChange, then
//                           next->...; the Change lives until the plugin
//                           answered (edits drain it)
//   flush                   Tracker::Persist of its disk, then next->flush
//   finalize                Tracker::Persist of its disk (client disconnect;
//                           also runs on SIGTERM, unlike .close)
//   cleanup                 stop the control socket (joins its threads,
//                           unlinks it), then per disk: stop the persister,
//                           final persist, close
// Nothing is done in static destructors: they also run in the pre-fork
// parent, which must never touch the container.
#include <dlfcn.h>
#include <nbdkit-filter.h>
#include <spdlog/spdlog.h>
#include <strings.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <utility>

#include "engine/scheduler.h"
#include "engine/tracker.h"
#include "plugin/backup_export.h"
#include "plugin/filter_disks.h"
#include "plugin/filter_state.h"
#include "plugin/filter_storage.h"
#include "plugin/internal_bitmaps.h"
#include "plugin/nbdkit_log.h"
#include "server/control_handler.h"
#include "server/control_socket.h"
#include "server/listen_sockets.h"

#ifndef CBT_VERSION
#define CBT_VERSION "unknown"
#endif

namespace {

using cbt::Status;
using cbt::plugin::Fail;
using cbt::plugin::Guard;
using cbt::plugin::Handle;
using cbt::plugin::State;
using cbt::plugin::state;

void cbt_load() noexcept {
  // noexcept: an exception here (spdlog's sink, an allocation) would end
  // nbdkit through std::terminate; report it instead. state stays null and
  // config refuses to go on.
  try {
    state = new State;
    state->opts.storage = &cbt::plugin::FilterStorage();
    cbt::plugin::InstallNbdkitLogger();
    // Which filter this is, in nbdkit -v's log (its --version is nbdkit's).
    nbdkit_debug("cbt filter %s (changed block tracking)", CBT_VERSION);
  } catch (const std::exception& e) {
    nbdkit_error("cbt: cannot load: %s", e.what());
    delete state;
    state = nullptr;
  }
}

void cbt_unload() noexcept {
  delete state;
  state = nullptr;
}

// nbdkit_parse_bool's words, without its error message (ours names the
// parameter): 1 true, 0 false, -1 neither.
int ParseBool(const char* v) {
  for (const char* t : {"1", "true", "t", "yes", "y", "on"})
    if (strcasecmp(v, t) == 0) return 1;
  for (const char* f : {"0", "false", "f", "no", "n", "off"})
    if (strcasecmp(v, f) == 0) return 0;
  return -1;
}

// A size (nbdkit_parse_size syntax: a number with an optional k/M/G...
// suffix). Errors name the parameter and what it allows.
int64_t ParseSize(const char* key, const char* value, const char* allowed) {
  int64_t r = -1;
  if (*value >= '0' && *value <= '9') r = nbdkit_parse_size(value);
  if (r == -1) nbdkit_error("%s=%s: must be a size: %s", key, value, allowed);
  return r;
}

int cbt_config(nbdkit_next_config* next, nbdkit_backend* nxdata, const char* key,
               const char* value) noexcept {
  if (!state) {
    nbdkit_error("cbt: out of memory");
    return -1;
  }
  int err = 0;
  return Guard(&err, [&]() -> int {
    cbt::TrackerOptions& o = state->opts;
    if (strcmp(key, "cbt-file") == 0) {
      if (!*value) {
        nbdkit_error("cbt-file=: the path must not be empty (cbt-file=PATH, the qcow2 container)");
        return -1;
      }
      if (cbt::IsTemplate(value)) {
        if (Status s = cbt::CheckTemplate(value); !s.ok()) {
          nbdkit_error("cbt-file=%s: %s", value, s.message().c_str());
          return -1;
        }
        state->per_export = true;
      }
      char* p = nbdkit_absolute_path(value);
      if (!p) return -1;
      o.container_path = p;
      free(p);
    } else if (strcmp(key, "cbt-bitmap") == 0) {
      if (!*value) {
        nbdkit_error("cbt-bitmap: the name must not be empty");
        return -1;
      }
      o.bitmaps.emplace_back(value);
    } else if (strcmp(key, "cbt-create") == 0) {
      int b = ParseBool(value);
      if (b == -1) {
        nbdkit_error("cbt-create=%s: must be true or false (also yes/no, on/off, 1/0)", value);
        return -1;
      }
      o.create = b;
    } else if (strcmp(key, "cbt-autoload") == 0) {
      int b = ParseBool(value);
      if (b == -1) {
        nbdkit_error("cbt-autoload=%s: must be true or false (also yes/no, on/off, 1/0)", value);
        return -1;
      }
      o.autoload = b;
    } else if (strcmp(key, "cbt-granularity") == 0) {
      int64_t g = ParseSize(key, value, "a power of two from 512 to 2G, e.g. 64K");
      if (g == -1) return -1;
      if (g < 512 || g > (int64_t{1} << 31) || !std::has_single_bit(static_cast<uint64_t>(g))) {
        nbdkit_error("cbt-granularity=%s: must be a power of two from 512 to 2G", value);
        return -1;
      }
      o.granularity = static_cast<uint64_t>(g);
    } else if (strcmp(key, "cbt-cluster-size") == 0) {
      int64_t c = ParseSize(key, value, "a power of two from 512 to 2M, e.g. 64K");
      if (c == -1) return -1;
      if (c < 512 || c > (2 << 20) || !std::has_single_bit(static_cast<uint64_t>(c))) {
        nbdkit_error("cbt-cluster-size=%s: must be a power of two from 512 to 2M", value);
        return -1;
      }
      o.cluster_size = static_cast<uint32_t>(c);
    } else if (strcmp(key, "cbt-persist-interval") == 0) {
      unsigned sec = 0;
      if (!*value || nbdkit_parse_unsigned("cbt-persist-interval", value, &sec) == -1) {
        nbdkit_error("cbt-persist-interval=%s: must be a number of seconds (0 = off)", value);
        return -1;
      }
      state->persist.interval = std::chrono::seconds(sec);
    } else if (strcmp(key, "cbt-persist-threshold") == 0) {
      int64_t n = ParseSize(key, value, "bytes of pending bitmap data, e.g. 64K (0 = off)");
      if (n == -1) return -1;
      state->persist.threshold_bytes = static_cast<uint64_t>(n);
    } else if (strcmp(key, "cbt-persist-idle") == 0) {
      unsigned ms = 0;
      if (!*value || nbdkit_parse_unsigned("cbt-persist-idle", value, &ms) == -1) {
        nbdkit_error("cbt-persist-idle=%s: must be a number of milliseconds (0 = off)", value);
        return -1;
      }
      state->persist.idle = std::chrono::milliseconds(ms);
    } else if (strcmp(key, "cbt-drain-timeout") == 0) {
      if (!*value ||
          nbdkit_parse_unsigned("cbt-drain-timeout", value, &state->drain_timeout_ms) == -1 ||
          state->drain_timeout_ms == 0 || state->drain_timeout_ms > 600000) {
        nbdkit_error("cbt-drain-timeout=%s: must be milliseconds from 1 to 600000", value);
        return -1;
      }
    } else if (strcmp(key, "cbt-control") == 0) {
      if (!*value) {
        nbdkit_error("cbt-control=: the path must not be empty (cbt-control=PATH, a unix socket)");
        return -1;
      }
      if (!state->control_path.empty()) {
        nbdkit_error("cbt-control=%s: given twice (one control socket per server)", value);
        return -1;
      }
      char* p = nbdkit_absolute_path(value);  // nbdkit changes to / when it forks
      if (!p) return -1;
      state->control_path = p;
      free(p);
    } else if (strcmp(key, "cbt-durability") == 0) {
      if (strcmp(value, "none") == 0) {
        o.durability = cbt::Durability::kNone;
      } else if (strcmp(value, "process") == 0) {
        o.durability = cbt::Durability::kProcess;
      } else if (strcmp(value, "power") == 0) {
        o.durability = cbt::Durability::kPower;
      } else {
        nbdkit_error("cbt-durability=%s: must be none, process or power", value);
        return -1;
      }
    } else if (strcmp(key, "cbt-trust-disk") == 0) {
      int b = ParseBool(value);
      if (b == -1) {
        nbdkit_error("cbt-trust-disk=%s: must be true or false (also yes/no, on/off, 1/0)", value);
        return -1;
      }
      o.trust_disk = b;
    } else if (int b = cbt::plugin::BackupConfig(key, value); b != 0) {
      return b == 1 ? 0 : -1;
    } else {
      // The plugin's parameters pass on unchanged; file= and dir= also tell
      // which disk this is (its identity: engine/disk_identity.h).
      if (strcmp(key, "file") == 0 && *value) {
        char* p = nbdkit_absolute_path(value);  // nbdkit changes to / when it forks
        if (!p) return -1;
        state->disk_files.emplace_back(p);
        free(p);
      } else if (strcmp(key, "dir") == 0 && *value) {
        char* p = nbdkit_absolute_path(value);
        if (!p) return -1;
        state->disk_dir = p;
        free(p);
      }
      return next(nxdata, key, value);
    }
    return 0;
  });
}

// The disk this filter tracks, as far as the plugin's parameters name it:
// one file= is a file whose identity the tracker checks at attach and
// records at a clean stop. dir= with a per-export template: each export's
// file DIR/EXPORT (filter_disks.cc); with one container the export is known
// only after the container was opened, so it is not kept.
void SetDiskIdentitySource() {
  cbt::TrackerOptions& o = state->opts;
  if (!state->disk_dir.empty()) {
    o.no_identity_reason = state->per_export
                               ? "set per export"
                               : "dir= with one container (a per-export cbt-file=...%e... "
                                 "template keeps one identity per export)";
  } else if (state->disk_files.size() == 1) {
    o.disk_identity = [path = state->disk_files[0]] { return cbt::FileIdentity(path); };
  } else if (state->disk_files.size() > 1) {
    o.no_identity_reason = "the plugin has several file= parameters";
  } else {
    o.no_identity_reason = "the plugin names no file= (memory, nbd, ...)";
  }
}

int cbt_config_complete(nbdkit_next_config_complete* next, nbdkit_backend* nxdata) noexcept {
  if (state->opts.container_path.empty()) {
    if (!cbt::plugin::Qcow2PluginLoaded()) {
      nbdkit_error(
          "cbt-file=PATH is required: the qcow2 file that holds the bitmaps (over cbt's qcow2 "
          "plugin it may be left out: the bitmaps then live inside the image)");
      return -1;
    }
    state->internal_bitmaps = true;
  }
  if (state->opts.bitmaps.empty()) {
    nbdkit_error("cbt-bitmap=NAME is required (repeat it for several bitmaps)");
    return -1;
  }
  SetDiskIdentitySource();
  return next(nxdata);
}

int cbt_get_ready(int /*thread_model*/) noexcept {
  int err = 0;
  return Guard(&err, [&]() -> int {
    // Check the control socket's path first: creating it waits for
    // .after_fork, but what can be seen now is refused now.
    if (!state->control_path.empty()) {
      if (Status s = cbt::control::CheckSocketPath(state->control_path); !s.ok()) {
        nbdkit_error("cbt-control=%s: %s", state->control_path.c_str(), s.message().c_str());
        return -1;
      }
    }
    if (state->internal_bitmaps) {
      if (Status s = cbt::plugin::UseInternalBitmaps(&state->opts); !s.ok()) {
        nbdkit_error("cbt: %s", s.message().c_str());
        return -1;
      }
    }
    return cbt::plugin::DisksGetReady();
  });
}

// The control socket's threads start here, in the process that serves (a
// thread started before the fork would not survive it). nbdkit calls the
// plugin's .after_fork itself.
int cbt_after_fork(nbdkit_backend* /*backend*/) noexcept {
  int err = 0;
  return Guard(&err, [&]() -> int { return cbt::plugin::StartControl(); });
}

void* cbt_open(nbdkit_next_open* next, nbdkit_context* ctx, int readonly, const char* exportname,
               int /*is_tls*/) noexcept {
  int err = 0;
  void* h = nullptr;
  Guard(&err, [&]() -> int {
    auto handle = std::make_unique<Handle>();
    if (auto live = cbt::plugin::BackupViewOf(exportname)) {
      // The view reads the tracked export, read-only.
      handle->backup = true;
      if (next(ctx, 1, live->c_str()) == -1) return -1;
      handle->disk = cbt::plugin::FindDisk(*live);
    } else if (next(ctx, readonly, exportname) == -1) {
      return -1;
    }
    // The export name (canonical: nbdkit resolved "" to the plugin's
    // default export), for .prepare. Interned: lives until .close.
    handle->name = nbdkit_strdup_intern(exportname);
    if (!handle->name) return -1;
    h = handle.release();
    return 0;
  });
  return h;
}

void cbt_close(void* handle) noexcept {
  delete static_cast<Handle*>(handle);
}

int cbt_list_exports(nbdkit_next_list_exports* next, nbdkit_backend* nxdata, int readonly,
                     int /*is_tls*/, nbdkit_exports* exports) noexcept {
  int err = 0;
  return Guard(&err,
               [&] { return cbt::plugin::BackupListExports(next, nxdata, readonly, exports); });
}

int cbt_can_write(nbdkit_next* next, void* handle) noexcept {
  if (static_cast<Handle*>(handle)->backup) return 0;
  return next->can_write(next);
}

int cbt_can_extents(nbdkit_next* next, void* handle) noexcept {
  // The view always answers (as data where the plugin cannot say).
  if (static_cast<Handle*>(handle)->backup) return 1;
  return next->can_extents(next);
}

int cbt_pread(nbdkit_next* next, void* handle, void* buf, uint32_t count, uint64_t offset,
              uint32_t flags, int* err) noexcept {
  return Guard(err, [&]() -> int {
    auto* h = static_cast<Handle*>(handle);
    if (h->backup) return cbt::plugin::BackupPread(next, *h, buf, count, offset, err);
    return next->pread(next, buf, count, offset, flags, err);
  });
}

int cbt_extents(nbdkit_next* next, void* handle, uint32_t count, uint64_t offset, uint32_t flags,
                nbdkit_extents* extents, int* err) noexcept {
  return Guard(err, [&]() -> int {
    auto* h = static_cast<Handle*>(handle);
    if (h->backup) return cbt::plugin::BackupExtents(next, *h, count, offset, flags, extents, err);
    return next->extents(next, count, offset, flags, extents, err);
  });
}

// The first connection to an export attaches its disk (filter_disks.h).
int cbt_prepare(nbdkit_next* next, void* handle, int readonly_export) noexcept {
  int err = 0;
  return Guard(&err, [&]() -> int {
    auto* h = static_cast<Handle*>(handle);
    if (h->backup) return cbt::plugin::BackupPrepare(next, *h);
    h->disk = cbt::plugin::AttachExport(next, h->name, readonly_export);
    return h->disk ? 0 : -1;
  });
}

void cbt_cleanup(nbdkit_backend* /*backend*/) noexcept {
  if (!state) return;
  int err = 0;
  Guard(&err, [&]() -> int {
    cbt::plugin::CloseDisks();
    return 0;
  });
}

int cbt_finalize(nbdkit_next* next, void* handle) noexcept {
  int err = 0;
  return Guard(&err, [&]() -> int {
    // Client disconnect: persist its disk (all its connections share one tracker).
    cbt::plugin::Disk* d = static_cast<Handle*>(handle)->disk;
    if (d && d->tracking.load() && !static_cast<Handle*>(handle)->backup)
      if (Status s = d->tracker->Persist(); !s.ok()) return Fail(s, &err);
    return next->finalize(next);
  });
}

// Only a connection that attached (or found) the tracker for writing can
// write; nbdkit refuses writes on read-only ones before they get here.
int NotTracking(int* err) {
  nbdkit_error("cbt: write refused: tracking is attached read-only");
  *err = EROFS;
  return -1;
}

int cbt_pwrite(nbdkit_next* next, void* handle, const void* buf, uint32_t count, uint64_t offset,
               uint32_t flags, int* err) noexcept {
  return Guard(err, [&]() -> int {
    cbt::plugin::Disk* d = static_cast<Handle*>(handle)->disk;
    if (!d || !d->tracking.load()) return NotTracking(err);
    auto change = d->tracker->BeginChange(offset, count);
    if (!change.ok()) return Fail(change.status(), err);
    if (cbt::plugin::CopyBeforeWrite(next, *d, count, offset, err) == -1) return -1;
    return next->pwrite(next, buf, count, offset, flags, err);  // `change` ends after the answer
  });
}

int cbt_zero(nbdkit_next* next, void* handle, uint32_t count, uint64_t offset, uint32_t flags,
             int* err) noexcept {
  return Guard(err, [&]() -> int {
    cbt::plugin::Disk* d = static_cast<Handle*>(handle)->disk;
    if (!d || !d->tracking.load()) return NotTracking(err);
    auto change = d->tracker->BeginChange(offset, count);
    if (!change.ok()) return Fail(change.status(), err);
    if (cbt::plugin::CopyBeforeWrite(next, *d, count, offset, err) == -1) return -1;
    return next->zero(next, count, offset, flags, err);  // `change` ends after the answer
  });
}

int cbt_trim(nbdkit_next* next, void* handle, uint32_t count, uint64_t offset, uint32_t flags,
             int* err) noexcept {
  return Guard(err, [&]() -> int {
    cbt::plugin::Disk* d = static_cast<Handle*>(handle)->disk;
    if (!d || !d->tracking.load()) return NotTracking(err);
    auto change = d->tracker->BeginChange(offset, count);
    if (!change.ok()) return Fail(change.status(), err);
    if (cbt::plugin::CopyBeforeWrite(next, *d, count, offset, err) == -1) return -1;
    return next->trim(next, count, offset, flags, err);  // `change` ends after the answer
  });
}

int cbt_flush(nbdkit_next* next, void* handle, uint32_t flags, int* err) noexcept {
  return Guard(err, [&]() -> int {
    // Bitmap first, then data: a crash in between leaves bits for data that
    // may not be durable (a superset), never the reverse.
    cbt::plugin::Disk* d = static_cast<Handle*>(handle)->disk;
    if (d && d->tracking.load() && !static_cast<Handle*>(handle)->backup)
      if (Status s = d->tracker->Persist(); !s.ok()) return Fail(s, err);
    return next->flush(next, flags, err);
  });
}

// can_multi_conn is not overridden: one tracker serves every connection and
// a flush on any of them persists all bitmaps, so the plugin's answer holds.

nbdkit_filter filter = [] {
  nbdkit_filter f{};
  f.name = "cbt";
  // nbdkit prints a filter's _version (always nbdkit's own: nbdkit refuses a
  // filter built against another version) in --version, so the project's
  // version is in the long name, shown by `nbdkit --filter=cbt PLUGIN --help`.
  f.longname = "nbdkit changed block tracking filter, cbt " CBT_VERSION;
  f.load = cbt_load;
  f.unload = cbt_unload;
  f.config = cbt_config;
  f.config_complete = cbt_config_complete;
  static const std::string help =
      std::string(
          "cbt-file=PATH            (required) qcow2 container holding the bitmaps;\n"
          "                         with %e (the export name): one per export\n"
          "cbt-bitmap=NAME          (required, repeatable) bitmap that records changes\n"
          "cbt-create=BOOL          create a missing container or bitmap (default false)\n"
          "cbt-autoload=BOOL        false: only the cbt-bitmap= bitmaps record; the\n"
          "                         other enabled ones are set aside as inconsistent\n"
          "cbt-granularity=SIZE     granularity of created bitmaps (default 64K)\n"
          "cbt-cluster-size=SIZE    cluster size of a created container (default 64K)\n"
          "cbt-persist-interval=SEC persist every SEC seconds while changes are pending\n"
          "cbt-persist-threshold=SIZE\n"
          "                         persist once SIZE bytes of bitmap data are pending\n"
          "                         (changed bitmap clusters x cluster size), e.g. 64K\n"
          "cbt-persist-idle=MS      persist when changes are pending and none came for MS\n"
          "                         milliseconds (interval, threshold, idle: 0 = off,\n"
          "                         the default)\n"
          "cbt-durability=MODE      power (default: survive power loss), process\n"
          "                         (survive kill -9) or none (QEMU's semantics)\n"
          "cbt-control=PATH         serve the control protocol on unix socket PATH\n"
          "                         (mode 0600; see docs/control.md)\n"
          "cbt-drain-timeout=MS     how long an online edit waits for writes in flight\n"
          "                         (default 5000; then the edit fails, Busy)\n"
          "cbt-trust-disk=BOOL      accept a disk changed while no tracker ran (the\n"
          "                         change was tracked elsewhere; default false)\n") +
      cbt::plugin::kBackupHelp;
  f.config_help = help.c_str();
  f.get_ready = cbt_get_ready;
  f.after_fork = cbt_after_fork;
  f.open = cbt_open;
  f.close = cbt_close;
  f.list_exports = cbt_list_exports;
  f.can_write = cbt_can_write;
  f.can_extents = cbt_can_extents;
  f.pread = cbt_pread;
  f.extents = cbt_extents;
  f.prepare = cbt_prepare;
  f.cleanup = cbt_cleanup;
  f.finalize = cbt_finalize;
  f.pwrite = cbt_pwrite;
  f.zero = cbt_zero;
  f.trim = cbt_trim;
  f.flush = cbt_flush;
  return f;
}();

}  // namespace

cbt::plugin::State* cbt::plugin::state;

NBDKIT_REGISTER_FILTER(filter)
