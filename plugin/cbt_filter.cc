// nbdkit-cbt-filter: changed block tracking. Thin adapter: parses cbt-*
// parameters, hands every write, zero and trim to the engine's Tracker before
// forwarding it, and persists on flush, disconnect and shutdown. All format
// and consistency logic lives in engine/ and qcow2/ (see engine/tracker.h).
//
// Lifecycle (nbdkit 1.32, see docs/filter.md):
//   config/config_complete  parse and check parameters (before fork)
//   get_ready               open, lock and validate the container (errors
//                           still reach the terminal; nothing forked yet)
//   after_fork              learn the disk size through a shared context,
//                           attach the tracker, start the periodic persister
//   pwrite/zero/trim        Tracker::BeforeChange, then next->...
//   flush                   Tracker::Persist, then next->flush
//   finalize                Tracker::Persist (client disconnect; also runs on
//                           SIGTERM, unlike .close)
//   cleanup                 stop the persister, final persist, close
// Nothing is done in static destructors: they also run in the pre-fork
// parent, which must never touch the container.
#include <nbdkit-filter.h>
#include <spdlog/spdlog.h>

#include <bit>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "engine/scheduler.h"
#include "engine/tracker.h"
#include "plugin/nbdkit_log.h"

namespace {

using cbt::Status;

// Filter state. Written during config (single-threaded) and after_fork;
// read-only afterwards except through the Tracker's own locking.
struct State {
  cbt::TrackerOptions opts;
  unsigned persist_interval = 0;  // seconds; 0 = off
  std::unique_ptr<cbt::Tracker> tracker;
  std::unique_ptr<cbt::PersistScheduler> scheduler;
};
State* state;  // cbt-durability defaults to power: see docs/crash-safety.md

// Reports a failed engine call to nbdkit: one error line, errno into *err.
int Fail(const Status& s, int* err) {
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

void cbt_load() noexcept {
  state = new (std::nothrow) State;
  cbt::plugin::InstallNbdkitLogger();
}

void cbt_unload() noexcept {
  delete state;
  state = nullptr;
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
      int b = nbdkit_parse_bool(value);
      if (b == -1) return -1;
      o.create = b;
    } else if (strcmp(key, "cbt-granularity") == 0) {
      int64_t g = nbdkit_parse_size(value);
      if (g == -1) return -1;
      if (g < 512 || g > (int64_t{1} << 31) || !std::has_single_bit(static_cast<uint64_t>(g))) {
        nbdkit_error("cbt-granularity=%s: must be a power of two from 512 to 2G", value);
        return -1;
      }
      o.granularity = static_cast<uint64_t>(g);
    } else if (strcmp(key, "cbt-cluster-size") == 0) {
      int64_t c = nbdkit_parse_size(value);
      if (c == -1) return -1;
      if (c < 512 || c > (2 << 20) || !std::has_single_bit(static_cast<uint64_t>(c))) {
        nbdkit_error("cbt-cluster-size=%s: must be a power of two from 512 to 2M", value);
        return -1;
      }
      o.cluster_size = static_cast<uint32_t>(c);
    } else if (strcmp(key, "cbt-persist-interval") == 0) {
      if (nbdkit_parse_unsigned("cbt-persist-interval", value, &state->persist_interval) == -1)
        return -1;
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
    } else {
      return next(nxdata, key, value);
    }
    return 0;
  });
}

int cbt_config_complete(nbdkit_next_config_complete* next, nbdkit_backend* nxdata) noexcept {
  if (state->opts.container_path.empty()) {
    nbdkit_error("cbt-file=PATH is required: the qcow2 file that holds the bitmaps");
    return -1;
  }
  if (state->opts.bitmaps.empty()) {
    nbdkit_error("cbt-bitmap=NAME is required (repeat it for several bitmaps)");
    return -1;
  }
  return next(nxdata);
}

int cbt_get_ready(int /*thread_model*/) noexcept {
  int err = 0;
  return Guard(&err, [&]() -> int {
    // Open, lock and validate the container before nbdkit forks, so errors
    // reach the terminal and no --run command starts. The OFD locks stay
    // with the server: the forked child shares the open file description.
    auto t = cbt::Tracker::Prepare(state->opts);
    if (!t.ok()) {
      nbdkit_error("cbt: %s", t.status().message().c_str());
      return -1;
    }
    state->tracker = std::move(t).value();
    return 0;
  });
}

int cbt_after_fork(nbdkit_backend* backend) noexcept {
  int err = 0;
  return Guard(&err, [&]() -> int {
    // A shared read-only context just to learn the disk size.
    nbdkit_next* n = nbdkit_next_context_open(backend, 1, "", 1);
    if (!n) {
      nbdkit_error("cbt: cannot open the underlying plugin to learn the disk size");
      return -1;
    }
    int64_t size = n->prepare(n) == -1 ? -1 : n->get_size(n);
    n->finalize(n);
    nbdkit_next_context_close(n);
    if (size < 0) {
      nbdkit_error("cbt: cannot get the disk size from the underlying plugin");
      return -1;
    }
    if (Status s = state->tracker->Attach(static_cast<uint64_t>(size)); !s.ok()) {
      nbdkit_error("cbt: %s", s.message().c_str());
      return -1;
    }
    if (state->persist_interval) {
      state->scheduler = std::make_unique<cbt::PersistScheduler>(
          *state->tracker, std::chrono::seconds(state->persist_interval));
      state->scheduler->Start();
    }
    return 0;
  });
}

void cbt_cleanup(nbdkit_backend* /*backend*/) noexcept {
  if (!state) return;
  int err = 0;
  Guard(&err, [&]() -> int {
    if (state->scheduler) state->scheduler->Stop();
    if (state->tracker) {
      // Clean shutdown (P3): persist and clear in_use.
      Status s = state->tracker->Close();
      if (!s.ok()) nbdkit_error("cbt: final persist failed: %s", s.message().c_str());
      state->tracker.reset();
    }
    return 0;
  });
}

int cbt_finalize(nbdkit_next* next, void* /*handle*/) noexcept {
  int err = 0;
  return Guard(&err, [&]() -> int {
    // Client disconnect: persist everything (all connections share one tracker).
    if (Status s = state->tracker->Persist(); !s.ok()) return Fail(s, &err);
    return next->finalize(next);
  });
}

int cbt_pwrite(nbdkit_next* next, void* /*handle*/, const void* buf, uint32_t count,
               uint64_t offset, uint32_t flags, int* err) noexcept {
  return Guard(err, [&]() -> int {
    if (Status s = state->tracker->BeforeChange(offset, count); !s.ok()) return Fail(s, err);
    return next->pwrite(next, buf, count, offset, flags, err);
  });
}

int cbt_zero(nbdkit_next* next, void* /*handle*/, uint32_t count, uint64_t offset, uint32_t flags,
             int* err) noexcept {
  return Guard(err, [&]() -> int {
    if (Status s = state->tracker->BeforeChange(offset, count); !s.ok()) return Fail(s, err);
    return next->zero(next, count, offset, flags, err);
  });
}

int cbt_trim(nbdkit_next* next, void* /*handle*/, uint32_t count, uint64_t offset, uint32_t flags,
             int* err) noexcept {
  return Guard(err, [&]() -> int {
    if (Status s = state->tracker->BeforeChange(offset, count); !s.ok()) return Fail(s, err);
    return next->trim(next, count, offset, flags, err);
  });
}

int cbt_flush(nbdkit_next* next, void* /*handle*/, uint32_t flags, int* err) noexcept {
  return Guard(err, [&]() -> int {
    // Bitmap first, then data: a crash in between leaves bits for data that
    // may not be durable (a superset), never the reverse.
    if (Status s = state->tracker->Persist(); !s.ok()) return Fail(s, err);
    return next->flush(next, flags, err);
  });
}

// can_multi_conn is not overridden: one tracker serves every connection and
// a flush on any of them persists all bitmaps, so the plugin's answer holds.

nbdkit_filter filter = [] {
  nbdkit_filter f{};
  f.name = "cbt";
  f.longname = "nbdkit changed block tracking filter";
  f.load = cbt_load;
  f.unload = cbt_unload;
  f.config = cbt_config;
  f.config_complete = cbt_config_complete;
  f.config_help =
      "cbt-file=PATH            (required) qcow2 container holding the bitmaps\n"
      "cbt-bitmap=NAME          (required, repeatable) bitmap that records changes\n"
      "cbt-create=BOOL          create a missing container or bitmap (default false)\n"
      "cbt-granularity=SIZE     granularity of created bitmaps (default 64K)\n"
      "cbt-cluster-size=SIZE    cluster size of a created container (default 64K)\n"
      "cbt-persist-interval=SEC persist every SEC seconds while changes are pending\n"
      "cbt-durability=MODE      power (default: survive power loss), process\n"
      "                         (survive kill -9) or none (QEMU's semantics)";
  f.get_ready = cbt_get_ready;
  f.after_fork = cbt_after_fork;
  f.cleanup = cbt_cleanup;
  f.finalize = cbt_finalize;
  f.pwrite = cbt_pwrite;
  f.zero = cbt_zero;
  f.trim = cbt_trim;
  f.flush = cbt_flush;
  return f;
}();

}  // namespace

NBDKIT_REGISTER_FILTER(filter)
