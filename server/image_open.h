// Opening a qcow2 file for the cbt tool: the file, QEMU's OFD locks
// (qcow2/lock.h) and the qcow2::Image, kept together so that the locks live
// exactly as long as the image (they belong to the file description).
#pragma once

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
  kWrite,    // refused (Corruption) unless qcow2::CheckBeforeWrite passes
  kRecover,  // kWrite, and a stale bitmaps extension is adopted (recover)
  kRepair,   // writable without the check (check --repair)
};

// Opens `path`. Failure: the PosixFile or Image::Open error (NotFound,
// Corruption, NotSupported, IOError), Busy if another program holds a
// conflicting lock, Corruption from qcow2::CheckBeforeWrite.
Result<OpenedImage> OpenImage(const std::string& path, Access access);
inline Result<OpenedImage> OpenImage(const std::string& path, bool writable) {
  return OpenImage(path, writable ? Access::kWrite : Access::kReadOnly);
}

// True when a and b name the same file (same device and inode).
bool SameFile(const std::string& a, const std::string& b);

}  // namespace cbt::cli
