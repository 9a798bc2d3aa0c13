// nbdkit-qcow2-plugin.so: serves a qcow2 image read-write through
// qcow2::Volume (docs/qcow2-plugin.md). A thin adapter: parameters, the one
// process-wide image, errno mapping.
//
// nbdkit tells a plugin about -r only per connection (.open(readonly)), so
// the image is opened read-only in .get_ready (every error that does not
// depend on writing shows at start-up) and reopened writable, once, by the
// first connection that may write. The file keeps one descriptor (and its
// QEMU-compatible lock, upgraded to the writer's) for the whole run.
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "common/posix_file.h"
#include "plugin/qcow2_share.h"
#include "plugin/qcow2_storage.h"
#include "qcow2/format.h"
#include "qcow2/image.h"
#include "qcow2/lock.h"
#include "qcow2/volume.h"

#ifndef CBT_VERSION
#define CBT_VERSION "unknown"
#endif

namespace {

using cbt::Status;
using cbt::qcow2::Volume;
using cbt::qcow2::VolumeOptions;

struct Config {
  std::string file;
  VolumeOptions opts;
};
Config config;

std::shared_ptr<cbt::PosixFile> file;   // the image, for the whole run (and its lock)
std::shared_ptr<cbt::BlockIO> storage;  // what every read and write goes through
bool file_writable = false;             // opened O_RDWR
std::shared_ptr<Volume> volume;         // replaced once when a writer comes
std::mutex upgrade_mu;                  // guards the replacement
Status rw_refusal;                      // why the image cannot be written
cbt::plugin::Qcow2Share share;          // for the cbt filter (internal bitmaps)
bool share_ready = false;
std::atomic<bool> bitmaps_claimed{false};

std::shared_ptr<Volume> Current() {
  return std::atomic_load(&volume);
}

int Fail(const Status& s) {
  nbdkit_error("%s", s.message().c_str());
  int e = s.err() ? s.err() : EIO;
  nbdkit_set_error(e);
  return -1;
}

template <class F>
int Guard(F&& f) noexcept {
  try {
    return f();
  } catch (const std::exception& e) {
    nbdkit_error("qcow2: %s", e.what());
  } catch (...) {
    nbdkit_error("qcow2: unknown exception");
  }
  nbdkit_set_error(EIO);
  return -1;
}

int qcow2_config(const char* key, const char* value) {
  std::string k = key;
  if (k == "file") {
    char* p = nbdkit_realpath(value);
    if (!p) return -1;
    config.file = p;
    free(p);
  } else if (k == "cache-size") {
    int64_t n = nbdkit_parse_size(value);
    if (n < 0) return -1;
    config.opts.cache_bytes = static_cast<uint64_t>(n);
  } else if (k == "backing") {
    if (std::string(value) == cbt::qcow2::kRefuseBacking) {
      config.opts.backing = value;
    } else {
      char* p = nbdkit_realpath(value);
      if (!p) return -1;
      config.opts.backing = p;
      free(p);
    }
  } else if (k == "backing-format") {
    std::string v = value;
    if (v != "raw" && v != "qcow2") {
      nbdkit_error("backing-format must be raw or qcow2, not '%s'", value);
      return -1;
    }
    config.opts.backing_format = v;
  } else if (k == "discard") {
    std::string v = value;
    if (v != "unmap" && v != "ignore") {
      nbdkit_error("discard must be unmap or ignore, not '%s'", value);
      return -1;
    }
    config.opts.discard = v == "unmap";
  } else {
    nbdkit_error("unknown parameter '%s' (see nbdkit %s --help)", key, "qcow2");
    return -1;
  }
  return 0;
}

int qcow2_config_complete() {
  if (config.file.empty()) {
    nbdkit_error("file=IMAGE is required");
    return -1;
  }
  return 0;
}

// Before the first change: bitmaps stored in the image that nobody here
// records would silently miss it. Mark every enabled one in use (QEMU then
// treats it as inconsistent; `cbt recover` or a new bitmap repairs that).
Status GuardStoredBitmaps() {
  if (bitmaps_claimed.load()) return Status::OK();  // the cbt filter records them
  if (!(Current()->header().autoclear & cbt::qcow2::kAutoclearBitmaps) ||
      !Current()->header().bitmaps)
    return Status::OK();
  cbt::qcow2::OpenOptions o;
  o.writable = true;
  o.refcounts = share.refcounts;
  auto image = cbt::qcow2::Image::Open(storage, o);
  if (!image.ok()) return image.status().WithContext("bitmaps of " + config.file);
  std::vector<std::string> names;
  for (const auto& b : (*image)->Bitmaps())
    if (b.enabled && !b.in_use) names.push_back(b.name);
  if (names.empty()) return Status::OK();
  CBT_RETURN_IF_ERROR((*image)->SetInUse(names, true));
  CBT_RETURN_IF_ERROR(storage->flush());
  nbdkit_debug(
      "qcow2: %zu enabled bitmap(s) marked in use: nothing records this session's "
      "changes in them",
      names.size());
  return Status::OK();
}

int qcow2_get_ready() {
  auto f = cbt::PosixFile::Open(config.file, cbt::PosixFile::Mode::kReadWrite);
  file_writable = f.ok();
  if (!f.ok()) f = cbt::PosixFile::Open(config.file, cbt::PosixFile::Mode::kReadOnly);
  if (!f.ok()) return Fail(f.status());
  file = std::move(*f);
  if (Status s = cbt::qcow2::LockImage(file->fd(), config.file, cbt::qcow2::LockMode::kReadOnly);
      !s.ok())
    return Fail(s);
  auto io = cbt::plugin::Qcow2ImageStorage(file, file_writable);
  if (!io.ok()) return Fail(io.status());
  storage = std::move(*io);
  VolumeOptions ro = config.opts;
  ro.writable = false;
  auto v = Volume::Open(storage, config.file, ro);
  if (!v.ok()) return Fail(v.status());
  std::atomic_store(&volume, std::shared_ptr<Volume>(std::move(*v)));
  share.path = config.file;
  share.io = storage;
  if (file_writable) {
    const auto& h = Current()->header();
    auto rc = cbt::qcow2::Refcounts::Load(storage.get(), h.cluster_bits, h.refcount_order,
                                          h.refcount_table_offset, h.refcount_table_clusters,
                                          config.file);
    if (!rc.ok()) return Fail(rc.status());
    share.refcounts = std::make_shared<cbt::qcow2::SharedRefcounts>();
    share.refcounts->rc.emplace(std::move(*rc));
  }
  share.claim_bitmaps = [] { bitmaps_claimed.store(true); };
  share_ready = true;
  // nbdkit tells a plugin about -r only per connection: say now what a
  // writing client will get.
  const auto& hd = Current()->header();
  std::string ro_reason;
  if (!file_writable) ro_reason = "the file is not writable here";
  if (hd.incompatible & cbt::qcow2::kIncompatCorrupt) ro_reason = "it is marked corrupt";
  if (hd.incompatible & cbt::qcow2::kIncompatDirty)
    ro_reason = "its refcounts may be stale (dirty bit; qemu-img check -r all repairs it)";
  if (hd.nb_snapshots > 0) ro_reason = "it has internal snapshots";
  if (!ro_reason.empty())
    fprintf(stderr, "nbdkit: qcow2: warning: %s is served read-only: %s\n", config.file.c_str(),
            ro_reason.c_str());
  if (!Current()->backing_description().empty())
    nbdkit_debug("qcow2: backing %s", Current()->backing_description().c_str());
  return 0;
}

// Makes the image writable (once). Failure: the reason a writer is refused.
Status Upgrade() {
  std::lock_guard lk(upgrade_mu);
  if (Current()->writable()) return Status::OK();
  if (!rw_refusal.ok()) return rw_refusal;
  auto refuse = [&](const Status& s) {
    rw_refusal = s.WithContext(config.file + " cannot be written");
    return rw_refusal;
  };
  if (!file_writable)
    return refuse(Status::IOError("the file is not writable here; serve it with -r", EROFS));
  // Our own descriptor holds the reader's lock bytes: take the writer's.
  if (Status s = cbt::qcow2::LockImage(file->fd(), config.file, cbt::qcow2::LockMode::kReadWrite);
      !s.ok())
    return s;
  VolumeOptions rw = config.opts;
  rw.writable = true;
  rw.refcounts = share.refcounts;
  auto v = Volume::Open(storage, config.file, rw);
  if (!v.ok()) {
    (void)cbt::qcow2::UnlockImage(file->fd(), config.file);
    (void)cbt::qcow2::LockImage(file->fd(), config.file, cbt::qcow2::LockMode::kReadOnly);
    return refuse(v.status());
  }
  (*v)->SetBeforeFirstWrite(GuardStoredBitmaps);
  std::atomic_store(&volume, std::shared_ptr<Volume>(std::move(*v)));
  return Status::OK();
}

// Per connection: whether this client may write.
struct Handle {
  bool writable = false;
};

// A refusal that leaves reading safe: the image is served read-only.
bool ReadOnlyWillDo(const Status& s) {
  return s.IsNotSupported() || s.IsCorruption() || s.err() == EROFS;
}

void* qcow2_open(int readonly) {
  auto* h = new (std::nothrow) Handle;
  if (!h) {
    nbdkit_error("qcow2: out of memory");
    return nullptr;
  }
  if (!readonly) {
    Status s = Upgrade();
    if (s.ok()) {
      h->writable = true;
    } else if (ReadOnlyWillDo(s)) {
      nbdkit_debug("qcow2: serving this client read-only: %s", s.message().c_str());
    } else {
      Fail(s);
      delete h;
      return nullptr;
    }
  }
  return h;
}

void qcow2_close(void* h) {
  delete static_cast<Handle*>(h);
}

int64_t qcow2_get_size(void*) {
  return static_cast<int64_t>(Current()->size());
}

int qcow2_block_size(void*, uint32_t* minimum, uint32_t* preferred, uint32_t* maximum) {
  *minimum = 1;
  *preferred = static_cast<uint32_t>(std::max<uint64_t>(4096, Current()->cluster_size()));
  *maximum = 0xffffffff;
  return 0;
}

int qcow2_can_write(void* h) {
  return static_cast<Handle*>(h)->writable ? 1 : 0;
}
int qcow2_can_flush(void*) {
  return 1;
}
int qcow2_can_trim(void*) {
  return config.opts.discard ? 1 : 0;
}
int qcow2_can_zero(void*) {
  return 1;
}
int qcow2_can_fast_zero(void*) {
  return 1;
}
int qcow2_can_fua(void*) {
  return NBDKIT_FUA_EMULATE;
}
int qcow2_can_multi_conn(void*) {
  return 1;
}
int qcow2_can_extents(void*) {
  return 1;
}
int qcow2_thread_model() {
  return NBDKIT_THREAD_MODEL_PARALLEL;
}

int qcow2_pread(void*, void* buf, uint32_t count, uint64_t offset, uint32_t) {
  return Guard([&] {
    Status s = Current()->Read({static_cast<std::byte*>(buf), count}, offset);
    return s.ok() ? 0 : Fail(s);
  });
}

int qcow2_pwrite(void*, const void* buf, uint32_t count, uint64_t offset, uint32_t) {
  return Guard([&] {
    Status s = Current()->Write({static_cast<const std::byte*>(buf), count}, offset);
    return s.ok() ? 0 : Fail(s);
  });
}

int qcow2_zero(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  return Guard([&] {
    Status s =
        Current()->Zero(offset, count, flags & NBDKIT_FLAG_MAY_TRIM, flags & NBDKIT_FLAG_FAST_ZERO);
    if (s.IsNotSupported() && (flags & NBDKIT_FLAG_FAST_ZERO)) {
      nbdkit_set_error(ENOTSUP);  // expected, not worth an error message
      return -1;
    }
    return s.ok() ? 0 : Fail(s);
  });
}

int qcow2_trim(void*, uint32_t count, uint64_t offset, uint32_t) {
  return Guard([&] {
    Status s = Current()->Trim(offset, count);
    return s.ok() ? 0 : Fail(s);
  });
}

int qcow2_flush(void*, uint32_t) {
  return Guard([&] {
    Status s = Current()->Flush();
    return s.ok() ? 0 : Fail(s);
  });
}

int qcow2_extents(void*, uint32_t count, uint64_t offset, uint32_t, nbdkit_extents* out) {
  return Guard([&] {
    std::vector<cbt::qcow2::Extent> ext;
    Status s = Current()->Extents(offset, count, &ext);
    if (!s.ok()) return Fail(s);
    for (const auto& e : ext)
      if (nbdkit_add_extent(out, e.offset, e.length, e.flags) == -1) return -1;
    return 0;
  });
}

void qcow2_cleanup() {
  auto v = Current();
  if (v && v->writable())
    if (Status s = v->Flush(); !s.ok()) nbdkit_error("%s", s.message().c_str());
  std::atomic_store(&volume, std::shared_ptr<Volume>());
  storage.reset();
  file.reset();
}

nbdkit_plugin plugin = [] {
  nbdkit_plugin p{};
  p.name = "qcow2";
  p.longname = "cbt qcow2 plugin (read-write)";
  p.version = CBT_VERSION;
  p.description = "Serves a qcow2 image read-write";
  p.config = qcow2_config;
  p.config_complete = qcow2_config_complete;
  p.config_help =
      "file=IMAGE               (required) the qcow2 image\n"
      "cache-size=SIZE          L2 cache (default: the whole image, at most 32M)\n"
      "backing=PATH|refuse      use PATH as the backing file, or refuse images with one\n"
      "backing-format=raw|qcow2 format of backing= (default: as the image records)\n"
      "discard=unmap|ignore     trim frees clusters (default unmap) or does nothing";
  p.magic_config_key = "file";
  p.get_ready = qcow2_get_ready;
  p.cleanup = qcow2_cleanup;
  p.open = qcow2_open;
  p.close = qcow2_close;
  p.get_size = qcow2_get_size;
  p.block_size = qcow2_block_size;
  p.can_write = qcow2_can_write;
  p.can_flush = qcow2_can_flush;
  p.can_trim = qcow2_can_trim;
  p.can_zero = qcow2_can_zero;
  p.can_fast_zero = qcow2_can_fast_zero;
  p.can_fua = qcow2_can_fua;
  p.can_multi_conn = qcow2_can_multi_conn;
  p.can_extents = qcow2_can_extents;
  p.thread_model = qcow2_thread_model;
  p.pread = qcow2_pread;
  p.pwrite = qcow2_pwrite;
  p.zero = qcow2_zero;
  p.trim = qcow2_trim;
  p.flush = qcow2_flush;
  p.extents = qcow2_extents;
  p.errno_is_preserved = 0;
  return p;
}();

}  // namespace

extern "C" __attribute__((visibility("default"))) const cbt::plugin::Qcow2Share* cbt_qcow2_share(
    uint64_t layout) {
  if (layout != cbt::plugin::Qcow2ShareLayout() || !share_ready) return nullptr;
  return &share;
}

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
NBDKIT_REGISTER_PLUGIN(plugin)
