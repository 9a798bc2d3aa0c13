// The filter's point-in-time export (docs/backup.md): the read-only view of
// the disk at a backup session's start (engine/backup.h), served as the
// export named by cbt-backup-export= (default "backup") beside the live one,
// and the live export's copy-before-write. nbdkit adapter only.
#pragma once

#include <nbdkit-filter.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "engine/fleece.h"

namespace cbt::plugin {

struct Disk;

// A connection's handle: its export, the disk tracking it (from .prepare)
// and, for the backup export, the view of the session open when it
// connected.
struct Handle {
  const char* name = nullptr;  // canonical export name (interned)
  Disk* disk = nullptr;        // live: the tracked disk; view: the disk it shows
  bool backup = false;
  std::shared_ptr<Fleece> view;
  uint64_t session = 0;
};

extern const char* const kBackupHelp;

// cbt-backup-export=, cbt-fleece-dir=, cbt-fleece-max=, cbt-fleece-error=:
// 1 handled, 0 not a backup parameter, -1 refused (nbdkit_error said why).
int BackupConfig(const char* key, const char* value);
// Once disk d's tracker exists (get_ready for the one container, the first
// connection per export): checks cbt-fleece-dir (default: the container's
// directory), makes its session manager and names its view: the
// cbt-backup-export name, or NAME/EXPORT per export. -1 with nbdkit_error.
int BackupAttach(Disk& d);
// For a point-in-time view's export name: the live export it shows (per
// export: NAME/EXPORT -> EXPORT). nullopt: not a view.
std::optional<std::string> BackupViewOf(const char* exportname);

// While a session is open, the list of exports gains the backup export.
int BackupListExports(nbdkit_next_list_exports* next, nbdkit_backend* nxdata, int readonly,
                      nbdkit_exports* exports);
// A backup connection (h.disk: the disk it shows, null if untracked) needs
// an open session; it keeps that session's view.
int BackupPrepare(nbdkit_next* next, Handle& h);
int BackupPread(nbdkit_next* next, Handle& h, void* buf, uint32_t count, uint64_t offset, int* err);
int BackupExtents(nbdkit_next* next, Handle& h, uint32_t count, uint64_t offset, uint32_t flags,
                  nbdkit_extents* extents, int* err);

// The live path: after Tracker::BeginChange, before forwarding a change of
// [offset, offset + count): preserves its old data for the open session.
int CopyBeforeWrite(nbdkit_next* next, Disk& d, uint32_t count, uint64_t offset, int* err);

}  // namespace cbt::plugin
