// QEMU-compatible OFD locks. See lock.h.
#include "qcow2/lock.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <vector>

namespace cbt::qcow2 {

namespace {

constexpr int kPermBase = 100;
constexpr int kSharedBase = 200;
constexpr int kPermWrite = 1;
constexpr int kPermResize = 3;
const char* const kPermNames[] = {"consistent read", "write", "write unchanged", "resize"};

struct flock Range(short type, off_t start, off_t len) {
  struct flock fl = {};
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = len;
  fl.l_pid = 0;  // required for OFD locks
  return fl;
}

// Returns true if another open file description holds a lock on byte.
Result<bool> Held(int fd, off_t byte, const std::string& path) {
  struct flock fl = Range(F_WRLCK, byte, 1);
  if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return Status::FromErrno(errno, "lock test " + path);
  return fl.l_type != F_UNLCK;
}

}  // namespace

Status LockImage(int fd, const std::string& path, LockMode mode) {
  const bool rw = mode == LockMode::kReadWrite;
  std::vector<int> perms = {0};
  if (rw) perms = {0, kPermWrite, kPermResize};
  std::vector<int> unshared = {kPermWrite, kPermResize};
  if (mode == LockMode::kForceShare) unshared.clear();
  // Someone refusing to share a permission we want?
  for (int p : perms) {
    CBT_ASSIGN_OR_RETURN(bool held, Held(fd, kSharedBase + p, path));
    if (held)
      return Status::Busy(path + ": another process (QEMU or cbt) holds it and does not share \"" +
                          kPermNames[p] + "\" access; stop it first");
  }
  // Someone holding a permission we refuse to share?
  for (int p : unshared) {
    CBT_ASSIGN_OR_RETURN(bool held, Held(fd, kPermBase + p, path));
    if (held)
      return Status::Busy(path + ": another process (QEMU or cbt) has it open for " +
                          kPermNames[p] + "; stop it first");
  }
  std::vector<int> bytes;
  bytes.reserve(perms.size() + unshared.size());
  for (int p : perms) bytes.push_back(kPermBase + p);
  for (int p : unshared) bytes.push_back(kSharedBase + p);
  for (int b : bytes) {
    struct flock fl = Range(F_RDLCK, b, 1);
    if (fcntl(fd, F_OFD_SETLK, &fl) != 0) {
      int e = errno;
      if (e == EAGAIN || e == EACCES)
        return Status::Busy(path + ": locked by another process (QEMU or cbt)", e);
      return Status::FromErrno(e, "lock " + path);
    }
  }
  return Status::OK();
}

Status UnlockImage(int fd, const std::string& path) {
  struct flock fl = Range(F_UNLCK, kPermBase, 200);
  if (fcntl(fd, F_OFD_SETLK, &fl) != 0) return Status::FromErrno(errno, "unlock " + path);
  return Status::OK();
}

}  // namespace cbt::qcow2
