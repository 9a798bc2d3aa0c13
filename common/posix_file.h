// PosixFile: BlockIO over a file descriptor (pread/pwrite/fdatasync).
#pragma once

#include <memory>
#include <string>

#include "common/block_io.h"

namespace cbt {

class PosixFile final : public BlockIO {
 public:
  enum class Mode {
    kReadOnly,
    kReadWrite,        // must exist
    kCreateExclusive,  // must not exist; created 0644
  };

  // Opens path. Failure: IOError/NotFound/AlreadyExists with the errno and
  // the path in the message.
  static Result<std::unique_ptr<PosixFile>> Open(const std::string& path, Mode mode);
  // A new, already unlinked file in dir (O_TMPFILE, else mkstemp + unlink),
  // mode 0600: it disappears with its last descriptor, even after kill -9.
  // name() is "dir/(temporary)". Failure: the errno, naming dir.
  static Result<std::unique_ptr<PosixFile>> CreateTemporary(const std::string& dir);
  ~PosixFile() override;
  PosixFile(const PosixFile&) = delete;
  PosixFile& operator=(const PosixFile&) = delete;

  Status pread(std::span<std::byte> out, uint64_t offset) override;
  Status pwrite(std::span<const std::byte> in, uint64_t offset) override;
  Status flush() override;  // fdatasync
  Result<uint64_t> size() override;
  Status resize(uint64_t new_size) override;
  const char* name() const override { return path_.c_str(); }
  Status punch_hole(uint64_t offset, uint64_t len) override;          // fallocate
  Result<Run> probe_run(uint64_t offset, uint64_t max_len) override;  // SEEK_DATA/HOLE
  Result<uint64_t> allocated_bytes() override;                        // st_blocks

  int fd() const { return fd_; }
  bool writable() const { return writable_; }
  const std::string& path() const { return path_; }

 private:
  PosixFile(int fd, std::string path, bool writable)
      : fd_(fd), path_(std::move(path)), writable_(writable) {}
  int fd_;
  std::string path_;
  bool writable_;
};

}  // namespace cbt
