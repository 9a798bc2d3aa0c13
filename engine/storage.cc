#include "engine/storage.h"

#include <unistd.h>

#include "common/posix_file.h"
#include "qcow2/lock.h"

namespace cbt {

namespace {

class Posix final : public Storage {
 public:
  Result<std::shared_ptr<BlockIO>> Open(const std::string& path, Mode mode) override {
    const PosixFile::Mode pm = mode == Mode::kReadOnly    ? PosixFile::Mode::kReadOnly
                               : mode == Mode::kReadWrite ? PosixFile::Mode::kReadWrite
                                                          : PosixFile::Mode::kCreateExclusive;
    CBT_ASSIGN_OR_RETURN(std::unique_ptr<PosixFile> f, PosixFile::Open(path, pm));
    // QEMU's locks: refuse a file another writer (qemu-nbd, another nbdkit)
    // holds, and make QEMU tools refuse ours while we serve.
    CBT_RETURN_IF_ERROR(qcow2::LockImage(
        f->fd(), path,
        mode == Mode::kReadOnly ? qcow2::LockMode::kReadOnly : qcow2::LockMode::kReadWrite));
    return std::shared_ptr<BlockIO>(std::move(f));
  }

  Status CheckCreatable(const std::string& path) override {
    const size_t slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : path.substr(0, slash + 1);
    if (::access(dir.c_str(), W_OK | X_OK) != 0)
      return Status::FromErrno(errno, "cannot create it in " + dir);
    return Status::OK();
  }

  void Remove(const std::string& path) override { ::unlink(path.c_str()); }
};

}  // namespace

Storage& PosixStorage() {
  static Posix posix;
  return posix;
}

}  // namespace cbt
