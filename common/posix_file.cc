#include "common/posix_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <string>

namespace cbt {

Result<std::unique_ptr<PosixFile>> PosixFile::Open(const std::string& path, Mode mode) {
  int flags = O_CLOEXEC;
  switch (mode) {
    case Mode::kReadOnly:
      flags |= O_RDONLY;
      break;
    case Mode::kReadWrite:
      flags |= O_RDWR;
      break;
    case Mode::kCreateExclusive:
      flags |= O_RDWR | O_CREAT | O_EXCL;
      break;
  }
  int fd = ::open(path.c_str(), flags, 0644);
  if (fd < 0) {
    int e = errno;
    std::string ctx = "open " + path;
    if (e == ENOENT) return Status::NotFound(ctx + ": no such file", e);
    if (e == EEXIST) return Status::AlreadyExists(ctx + ": file exists", e);
    return Status::FromErrno(e, ctx);
  }
  struct stat st;
  if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
    ::close(fd);
    return Status::InvalidArgument("open " + path + ": is a directory", EISDIR);
  }
  return std::unique_ptr<PosixFile>(new PosixFile(fd, path, mode != Mode::kReadOnly));
}

Result<std::unique_ptr<PosixFile>> PosixFile::CreateTemporary(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
    // The file system has no O_TMPFILE: a named file, unlinked at once.
    std::string templ = dir + "/.cbt-tmp-XXXXXX";
    fd = ::mkostemp(templ.data(), O_CLOEXEC);
    if (fd >= 0) ::unlink(templ.c_str());
  }
  if (fd < 0) return Status::FromErrno(errno, "create a temporary file in " + dir);
  return std::unique_ptr<PosixFile>(new PosixFile(fd, dir + "/(temporary)", true));
}

PosixFile::~PosixFile() {
  if (fd_ >= 0) ::close(fd_);
}

Status PosixFile::pread(std::span<std::byte> out, uint64_t offset) {
  size_t done = 0;
  while (done < out.size()) {
    ssize_t r =
        ::pread(fd_, out.data() + done, out.size() - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "read " + path_);
    }
    if (r == 0)
      return Status::OutOfRange("read " + path_ + ": unexpected end of file at offset " +
                                std::to_string(offset + done));
    done += static_cast<size_t>(r);
  }
  return Status::OK();
}

Status PosixFile::pwrite(std::span<const std::byte> in, uint64_t offset) {
  size_t done = 0;
  while (done < in.size()) {
    ssize_t r =
        ::pwrite(fd_, in.data() + done, in.size() - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return Status::FromErrno(errno, "write " + path_);
    }
    done += static_cast<size_t>(r);
  }
  return Status::OK();
}

Status PosixFile::flush() {
  if (::fdatasync(fd_) != 0) return Status::FromErrno(errno, "fdatasync " + path_);
  return Status::OK();
}

Result<uint64_t> PosixFile::size() {
  struct stat st;
  if (::fstat(fd_, &st) != 0) return Status::FromErrno(errno, "stat " + path_);
  return static_cast<uint64_t>(st.st_size);
}

Status PosixFile::resize(uint64_t new_size) {
  if (::ftruncate(fd_, static_cast<off_t>(new_size)) != 0)
    return Status::FromErrno(errno, "truncate " + path_);
  return Status::OK();
}

Status PosixFile::punch_hole(uint64_t offset, uint64_t len) {
  if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                  static_cast<off_t>(len)) != 0) {
    if (errno == EOPNOTSUPP || errno == ENOSYS)
      return Status::NotSupported(path_ + ": file system cannot punch holes");
    return Status::FromErrno(errno, "punch a hole in " + path_);
  }
  return Status::OK();
}

Result<uint64_t> PosixFile::allocated_bytes() {
  struct stat st;
  if (::fstat(fd_, &st) != 0) return Status::FromErrno(errno, "stat " + path_);
  return static_cast<uint64_t>(st.st_blocks) * 512;
}

Result<BlockIO::Run> PosixFile::probe_run(uint64_t offset, uint64_t max_len) {
  const auto off = static_cast<off_t>(offset);
  off_t data = ::lseek(fd_, off, SEEK_DATA);
  if (data < 0) {
    if (errno == ENXIO) return Run{true, max_len};  // at or past the last data
    return Run{false, max_len};                     // no SEEK_DATA here: say data
  }
  if (data > off) return Run{true, std::min<uint64_t>(max_len, static_cast<uint64_t>(data - off))};
  off_t hole = ::lseek(fd_, off, SEEK_HOLE);
  if (hole <= off) return Run{false, max_len};
  return Run{false, std::min<uint64_t>(max_len, static_cast<uint64_t>(hole - off))};
}

}  // namespace cbt
