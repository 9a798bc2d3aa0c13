// Shared by the test preloads (crash_after_writes.so, pause_at_read.so):
// whether a descriptor is the file an environment variable names.
#pragma once

#include <sys/stat.h>

#include <cstdlib>

namespace cbt::testing {

// True when fd is open on the file $ENV names (same device and inode);
// false when ENV is unset or empty, or either cannot be inspected.
inline bool FdIsFileIn(int fd, const char* env) {
  const char* path = std::getenv(env);
  if (path == nullptr || *path == '\0') return false;
  struct stat a, b;
  if (fstat(fd, &a) != 0 || stat(path, &b) != 0) return false;
  return a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

}  // namespace cbt::testing
