// Opening a qcow2 file for the cbt tool: the file, QEMU's OFD locks
// (qcow2/lock.h) and the qcow2::Image, kept together so that the locks live
// exactly as long as the image (they belong to the file description).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "common/posix_file.h"
#include "common/status.h"
#include "qcow2/image.h"

namespace cbt::cli {

struct OpenedImage {
  std::string path;  // as the user gave it
  std::shared_ptr<PosixFile> file;
  std::unique_ptr<qcow2::Image> image;
};

enum class Access {
  kReadOnly,
  // like qemu-img -U: only the shared read lock, so that a file a running
  // server holds for writing can be looked at (what it shows may be behind
  // the server's memory)
  kForceShare,
  kWrite,    // refused (Corruption) unless qcow2::CheckBeforeWrite passes
  kRecover,  // kWrite, and a stale bitmaps extension is adopted (recover)
  kRepair,   // writable without the check (check --repair)
};

// Opens `path`. Failure: the PosixFile or Image::Open error (NotFound,
// Corruption, NotSupported, IOError), Busy if another program holds a
// conflicting lock, Corruption from qcow2::CheckBeforeWrite.
Result<OpenedImage> OpenImage(const std::string& path, Access access);
inline Result<OpenedImage> OpenImage(const std::string& path, bool writable,
                                     bool force_share = false) {
  return OpenImage(path, writable      ? Access::kWrite
                         : force_share ? Access::kForceShare
                                       : Access::kReadOnly);
}

// A Busy open of a container (a running server holds it) with the way
// around it: "...; stop it first, or ask the running filter: cbt
// <command> (its cbt-control= socket)", `command` naming --socket CTL.
// Other errors as they are.
Status WithSocketHint(const Status& s, const std::string& command);

// True when a and b name the same file (same device and inode).
bool SameFile(const std::string& a, const std::string& b);

// Runs `commit` (one Image::Commit on img). Image::Commit also fails when
// the new set is already in place and only freeing the old clusters failed
// (they leak): the change then happened and must not be reported as a
// failure, so that error is logged as a warning and OK returned. Any other
// failure is returned (the file holds the old set).
Status CommitChange(qcow2::Image& img, const std::function<Status()>& commit);

}  // namespace cbt::cli
