#include "server/image_open.h"

#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include "qcow2/check.h"
#include "qcow2/lock.h"

namespace cbt::cli {

Result<OpenedImage> OpenImage(const std::string& path, Access access) {
  const bool writable = access != Access::kReadOnly && access != Access::kForceShare;
  OpenedImage out;
  out.path = path;
  CBT_ASSIGN_OR_RETURN(
      std::unique_ptr<PosixFile> f,
      PosixFile::Open(path, writable ? PosixFile::Mode::kReadWrite : PosixFile::Mode::kReadOnly));
  out.file = std::move(f);
  // QEMU's locks before reading anything: a writer elsewhere could be
  // changing the file under us (qcow2/lock.h). Released when file closes.
  const qcow2::LockMode mode = writable                        ? qcow2::LockMode::kReadWrite
                               : access == Access::kForceShare ? qcow2::LockMode::kForceShare
                                                               : qcow2::LockMode::kReadOnly;
  CBT_RETURN_IF_ERROR(qcow2::LockImage(out.file->fd(), path, mode));
  spdlog::debug("opened {} {}", path,
                writable ? "read-write"
                         : (access == Access::kForceShare ? "read-only, shared" : "read-only"));
  qcow2::OpenOptions oo{.writable = writable, .adopt_stale_bitmaps = access == Access::kRecover};
  CBT_ASSIGN_OR_RETURN(out.image, qcow2::Image::Open(out.file, oo));
  if (access == Access::kWrite || access == Access::kRecover)
    CBT_RETURN_IF_ERROR(qcow2::CheckBeforeWrite(*out.image));
  return out;
}

Status CommitChange(qcow2::Image& img, const std::function<Status()>& commit) {
  const std::optional<qcow2::BitmapsExtension> before = img.header().bitmaps;
  Status s = commit();
  if (s.ok()) return s;
  // Every successful switch points the header at a new directory (or at
  // none); an unchanged one means the old set is still the file's truth.
  if (img.header().bitmaps == before) return s;
  spdlog::warn("{}; the change itself is done", s.message());
  return Status::OK();
}

Status WithSocketHint(const Status& s, const std::string& command) {
  if (!s.IsBusy()) return s;
  return Status::Busy(s.message() + ", or ask the running filter: cbt " + command +
                          " (CTL: its cbt-control= socket)",
                      s.err());
}

bool SameFile(const std::string& a, const std::string& b) {
  struct stat sa {
  }, sb{};
  if (::stat(a.c_str(), &sa) != 0 || ::stat(b.c_str(), &sb) != 0) return false;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

}  // namespace cbt::cli
