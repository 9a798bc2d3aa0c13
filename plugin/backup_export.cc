// The point-in-time export and copy-before-write (backup_export.h).
#include "plugin/backup_export.h"

#include <sys/stat.h>

#include <cinttypes>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string_view>
#include <vector>

#include "plugin/filter_state.h"

namespace cbt::plugin {

const char* const kBackupHelp =
    "cbt-backup-export=NAME   name of the point-in-time export of a backup\n"
    "                         session (default \"backup\"; docs/backup.md)\n"
    "cbt-fleece-dir=DIR       where copy-before-write keeps old data during a\n"
    "                         session (an unlinked file; default: the directory\n"
    "                         of cbt-file)\n"
    "cbt-fleece-max=SIZE      most old data kept per session (default 0: no limit)\n"
    "cbt-fleece-error=POLICY  when old data cannot be kept: break-backup (default:\n"
    "                         writes go on, the session's reads fail) or\n"
    "                         fail-write (the write fails, the view stays)";

namespace {

// Reads the disk as it is now through this connection's plugin.
DiskRead Reader(nbdkit_next* next) {
  return [next](uint64_t off, std::span<std::byte> out) -> Status {
    int e = 0;
    if (next->pread(next, out.data(), static_cast<uint32_t>(out.size()), off, 0, &e) == -1)
      return Status::IOError("reading the disk at " + std::to_string(off), e ? e : EIO);
    return Status::OK();
  };
}

}  // namespace

int BackupConfig(const char* key, const char* value) {
  if (strcmp(key, "cbt-backup-export") == 0) {
    if (strlen(value) > 4096) {
      nbdkit_error("cbt-backup-export: longer than 4096 bytes (the NBD limit)");
      return -1;
    }
    state->backup_export = value;
    return 1;
  }
  if (strcmp(key, "cbt-fleece-dir") == 0) {
    if (!*value) {
      nbdkit_error("cbt-fleece-dir=: the directory must not be empty");
      return -1;
    }
    char* p = nbdkit_absolute_path(value);
    if (!p) return -1;
    state->backup_opts.dir = p;
    free(p);
    return 1;
  }
  if (strcmp(key, "cbt-fleece-max") == 0) {
    int64_t n = -1;
    if (*value >= '0' && *value <= '9') n = nbdkit_parse_size(value);
    if (n == -1) {
      nbdkit_error("cbt-fleece-max=%s: must be a size, e.g. 10G (0 = no limit)", value);
      return -1;
    }
    state->backup_opts.max_bytes = static_cast<uint64_t>(n);
    return 1;
  }
  if (strcmp(key, "cbt-fleece-error") == 0) {
    if (strcmp(value, "break-backup") == 0)
      state->backup_opts.on_error = FleeceErrorPolicy::kBreakBackup;
    else if (strcmp(value, "fail-write") == 0)
      state->backup_opts.on_error = FleeceErrorPolicy::kFailWrite;
    else {
      nbdkit_error("cbt-fleece-error=%s: must be break-backup or fail-write", value);
      return -1;
    }
    return 1;
  }
  return 0;
}

int BackupAttach(Disk& d) {
  BackupOptions o = state->backup_opts;
  if (o.dir.empty()) o.dir = std::filesystem::path(d.opts.container_path).parent_path().string();
  struct stat st;
  if (stat(o.dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    nbdkit_error("cbt-fleece-dir=%s: not a directory (%s)", o.dir.c_str(),
                 errno ? strerror(errno) : "not a directory");
    return -1;
  }
  if (state->backup_export.empty()) {
    nbdkit_error("cbt-backup-export=: must not be empty (\"\" is the live export)");
    return -1;
  }
  d.backup_export = state->per_export ? state->backup_export + "/" + d.name : state->backup_export;
  d.backup = std::make_unique<BackupManager>(*d.tracker, o);
  return 0;
}

std::optional<std::string> BackupViewOf(const char* exportname) {
  if (!exportname) return std::nullopt;
  const std::string_view e(exportname), b(state->backup_export);
  if (!state->per_export) {
    if (e != b) return std::nullopt;
    std::lock_guard lock(state->attach_mu);
    return state->single->name;  // "" before a live connection: refused at prepare
  }
  if (e.size() <= b.size() + 1 || e.substr(0, b.size()) != b || e[b.size()] != '/')
    return std::nullopt;
  return std::string(e.substr(b.size() + 1));
}

int BackupListExports(nbdkit_next_list_exports* next, nbdkit_backend* nxdata, int readonly,
                      nbdkit_exports* exports) {
  if (next(nxdata, readonly, exports) == -1) return -1;
  // Listed only while a session is open: clients such as nbdinfo --list
  // open every export listed, and this one refuses connections otherwise.
  std::lock_guard lock(state->attach_mu);
  auto add = [&](const Disk& d) {
    if (!d.backup || !d.backup->Current()) return 0;
    return nbdkit_add_export(exports, d.backup_export.c_str(),
                             "point-in-time view of a backup session (cbt)");
  };
  if (state->single && add(*state->single) == -1) return -1;
  for (const auto& [name, d] : state->disks)
    if (add(*d) == -1) return -1;
  return 0;
}

int BackupPrepare(nbdkit_next* next, Handle& h) {
  if (!h.disk || !h.disk->tracking.load()) {
    nbdkit_error(
        "cbt: export \"%s\" refused: no backup session is open (the disk has no writable "
        "client yet)",
        h.name);
    return -1;
  }
  uint64_t id = 0;
  h.view = h.disk->backup->Current(&id);
  if (!h.view) {
    nbdkit_error(
        "cbt: export \"%s\" refused: no backup session is open; begin one with "
        "'cbt backup begin --socket CTL' (or backup-begin on cbt-control)",
        h.name);
    return -1;
  }
  h.session = id;
  if (next->get_size(next) == -1) return -1;
  return 0;
}

int BackupPread(nbdkit_next* next, Handle& h, void* buf, uint32_t count, uint64_t offset,
                int* err) {
  Status s =
      h.view->Read(offset, std::span<std::byte>(static_cast<std::byte*>(buf), count), Reader(next));
  if (!s.ok()) return Fail(s.WithContext("backup session " + std::to_string(h.session)), err);
  return 0;
}

int BackupExtents(nbdkit_next* next, Handle& h, uint32_t count, uint64_t offset, uint32_t flags,
                  nbdkit_extents* extents, int* err) {
  DiskExtents disk = [&](uint64_t off, uint64_t len, std::vector<ViewExtent>& out) -> Status {
    int e = 0;
    if (next->can_extents(next) != 1) return Status::OK();  // the caller says data
    nbdkit_extents* x = nbdkit_extents_new(off, off + len);
    if (!x) return Status::IOError("nbdkit_extents_new failed", ENOMEM);
    if (next->extents(next, static_cast<uint32_t>(len), off, flags & ~NBDKIT_FLAG_REQ_ONE, x, &e) ==
        -1) {
      nbdkit_extents_free(x);
      return Status::IOError("extents of the disk at " + std::to_string(off), e ? e : EIO);
    }
    for (size_t i = 0; i < nbdkit_extents_count(x); ++i) {
      nbdkit_extent ex = nbdkit_get_extent(x, i);
      out.push_back({ex.offset, ex.length, (ex.type & NBDKIT_EXTENT_HOLE) != 0,
                     (ex.type & NBDKIT_EXTENT_ZERO) != 0});
    }
    nbdkit_extents_free(x);
    return Status::OK();
  };
  std::vector<ViewExtent> out;
  Status s = h.view->Extents(offset, count, disk, out);
  if (!s.ok()) return Fail(s.WithContext("backup session " + std::to_string(h.session)), err);
  for (const ViewExtent& e : out) {
    const uint32_t type = (e.hole ? NBDKIT_EXTENT_HOLE : 0) | (e.zero ? NBDKIT_EXTENT_ZERO : 0);
    if (nbdkit_add_extent(extents, e.offset, e.length, type) == -1) {
      *err = errno ? errno : EIO;
      return -1;
    }
  }
  return 0;
}

int CopyBeforeWrite(nbdkit_next* next, Disk& d, uint32_t count, uint64_t offset, int* err) {
  if (!d.backup) return 0;
  Status s = d.backup->BeforeChange(offset, count, Reader(next));
  if (!s.ok()) return Fail(s, err);
  return 0;
}

}  // namespace cbt::plugin
