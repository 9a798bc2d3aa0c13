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

// Opens `path` read-only or writable. force_share (REQUIRES !writable):
// like qemu-img -U, take only the shared read lock, so that a file a
// running server holds for writing can be looked at (what it shows may be
// behind the server's memory). Failure: the PosixFile or Image::Open error
// (NotFound, Corruption, NotSupported, IOError), Busy if another program
// holds a conflicting lock.
Result<OpenedImage> OpenImage(const std::string& path, bool writable, bool force_share = false);

// True when a and b name the same file (same device and inode).
bool SameFile(const std::string& a, const std::string& b);

// Runs `commit` (one Image::Commit on img). Image::Commit also fails when
// the new set is already in place and only freeing the old clusters failed
// (they leak): the change then happened and must not be reported as a
// failure, so that error is logged as a warning and OK returned. Any other
// failure is returned (the file holds the old set).
Status CommitChange(qcow2::Image& img, const std::function<Status()>& commit);

}  // namespace cbt::cli
