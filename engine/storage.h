// Storage: how the engine reaches its container files, and the seam where
// tests put their own devices (LevelDB's Env). Production code uses
// PosixStorage(); tests inject memory devices that simulate crashes
// (testing/), and the power-cut torture a volatile cache, without any
// test-only switch in the engine.
//
// Threading: implementations may be called from several threads.
#pragma once

#include <memory>
#include <string>

#include "common/block_io.h"
#include "common/status.h"

namespace cbt {

class Storage {
 public:
  enum class Mode {
    kReadOnly,   // existing file, QEMU's shared read lock
    kReadWrite,  // existing file, QEMU's write lock
    kCreate,     // new file (must not exist), write lock
  };
  virtual ~Storage() = default;

  // Opens path in mode; the locks live as long as the returned device.
  // Failure: NotFound (no file), AlreadyExists (kCreate over a file), the
  // errno of a refused open (EACCES, EROFS, EPERM), Busy (another program
  // holds a conflicting lock), IOError.
  virtual Result<std::shared_ptr<BlockIO>> Open(const std::string& path, Mode mode) = 0;
  // Whether kCreate could make path now (its directory is writable), for
  // errors found before nbdkit forks. Failure: the errno, naming the dir
  // (the caller names the path).
  virtual Status CheckCreatable(const std::string& path) = 0;
  // Removes a file this process created (a create that failed half way).
  virtual void Remove(const std::string& path) = 0;
};

// Files with QEMU's OFD locks (qcow2/lock.h). Never fails to exist.
Storage& PosixStorage();

}  // namespace cbt
