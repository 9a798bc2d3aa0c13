// crash_after_writes.so: TEST ONLY, an LD_PRELOAD library that kills its
// process (SIGKILL, as kill -9) at an exact point of its I/O to one file, for
// the crash torture (tests/crash/torture.py) to crash nbdkit in the middle of
// the filter's recovery at open.
//
//   CBT_CRASH_FILE=PATH      the file to watch (the container)
//   CBT_CRASH_AT_STEP=N      die instead of performing the Nth step (1-based)
//   CBT_CRASH_LOG=PATH       optional: append one line per step, "pwrite OFF
//                            LEN" or "sync", before it is performed
//
// A step is a pwrite/pwrite64/write or fsync/fdatasync on a descriptor open
// on PATH (same device and inode, so renames and relative paths do not
// matter). Steps 1..N-1 are performed, step N is not: the file holds exactly
// what the page cache would after a kill -9 at that point. No other process
// and no other file is affected. Nothing here is linked into cbt itself.
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "preload_watch.h"

namespace {

using PwriteFn = ssize_t (*)(int, const void*, size_t, off_t);
using WriteFn = ssize_t (*)(int, const void*, size_t);
using SyncFn = int (*)(int);

std::atomic<unsigned long> steps{0};

template <typename Fn>
Fn Next(const char* name) {
  return reinterpret_cast<Fn>(dlsym(RTLD_NEXT, name));
}

bool Watched(int fd) {
  return cbt::testing::FdIsFileIn(fd, "CBT_CRASH_FILE");
}

// Counts a step on fd; kills the process when it is the chosen one.
void Step(int fd, const char* what, unsigned long long off, unsigned long long len) {
  if (!Watched(fd)) return;
  unsigned long n = steps.fetch_add(1) + 1;
  if (const char* log = std::getenv("CBT_CRASH_LOG"); log && *log) {
    char line[96];
    int k = std::snprintf(line, sizeof(line), "%lu %s %llu %llu\n", n, what, off, len);
    int lfd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (lfd >= 0) {
      static WriteFn real_write = Next<WriteFn>("write");
      (void)!real_write(lfd, line, static_cast<size_t>(k));
      close(lfd);
    }
  }
  const char* at = std::getenv("CBT_CRASH_AT_STEP");
  if (at && std::strtoul(at, nullptr, 10) == n) kill(getpid(), SIGKILL);
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) ssize_t pwrite(int fd, const void* buf, size_t n,
                                                      off_t off) {
  static PwriteFn real = Next<PwriteFn>("pwrite");
  Step(fd, "pwrite", static_cast<unsigned long long>(off), n);
  return real(fd, buf, n, off);
}

__attribute__((visibility("default"))) ssize_t pwrite64(int fd, const void* buf, size_t n,
                                                        off_t off) {
  static PwriteFn real = Next<PwriteFn>("pwrite64");
  Step(fd, "pwrite", static_cast<unsigned long long>(off), n);
  return real(fd, buf, n, off);
}

__attribute__((visibility("default"))) ssize_t write(int fd, const void* buf, size_t n) {
  static WriteFn real = Next<WriteFn>("write");
  Step(fd, "write", 0, n);
  return real(fd, buf, n);
}

__attribute__((visibility("default"))) int fsync(int fd) {
  static SyncFn real = Next<SyncFn>("fsync");
  Step(fd, "sync", 0, 0);
  return real(fd);
}

__attribute__((visibility("default"))) int fdatasync(int fd) {
  static SyncFn real = Next<SyncFn>("fdatasync");
  Step(fd, "sync", 0, 0);
  return real(fd);
}

}  // extern "C"
