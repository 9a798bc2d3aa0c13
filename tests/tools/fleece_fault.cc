// fleece_fault.so: TEST ONLY, an LD_PRELOAD library that makes writes to
// unlinked temporary files (opened with O_TMPFILE: the filter's fleece
// store, engine/fleece.h) fail, for test-filter-backup-store-errors.sh.
//
//   CBT_FAULT_ERRNO=N     pwrite/pwrite64 on such a descriptor fail with errno
//                         N (unset or 0: no fault)
//   CBT_FAULT_WHILE=PATH  optional: only while PATH exists (the test turns
//                         the fault on and off)
//
// open/open64/openat/openat64 (and the fortified __open_2 variants) with
// O_TMPFILE remember the descriptor; close forgets it. Nothing else is
// touched: the disk, the container and sockets never fail. Nothing here is
// linked into cbt itself.
// Fortified inline open() would clash with the definitions below.
#undef _FORTIFY_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>

namespace {

constexpr int kMaxFd = 65536;
std::atomic<bool> tmp_fd[kMaxFd];

template <typename Fn>
Fn Next(const char* name) {
  return reinterpret_cast<Fn>(dlsym(RTLD_NEXT, name));
}

int Remember(int fd, int flags) {
  if (fd >= 0 && fd < kMaxFd) tmp_fd[fd].store((flags & O_TMPFILE) == O_TMPFILE);
  return fd;
}

// errno to fail with for a write to fd, or 0.
int FaultFor(int fd) {
  if (fd < 0 || fd >= kMaxFd || !tmp_fd[fd].load()) return 0;
  const char* e = std::getenv("CBT_FAULT_ERRNO");
  if (!e || !*e) return 0;
  const int n = std::atoi(e);
  if (n <= 0) return 0;
  if (const char* p = std::getenv("CBT_FAULT_WHILE"); p && *p && access(p, F_OK) != 0) return 0;
  return n;
}

mode_t ModeArg(int flags, va_list ap) {
  return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? static_cast<mode_t>(va_arg(ap, int))
                                                              : 0;
}

}  // namespace

// The project builds with hidden visibility: these must be seen.
#pragma GCC visibility push(default)
extern "C" {

int open(const char* path, int flags, ...) {
  static auto real = Next<int (*)(const char*, int, ...)>("open");
  va_list ap;
  va_start(ap, flags);
  const mode_t mode = ModeArg(flags, ap);
  va_end(ap);
  return Remember(real(path, flags, mode), flags);
}

int open64(const char* path, int flags, ...) {
  static auto real = Next<int (*)(const char*, int, ...)>("open64");
  va_list ap;
  va_start(ap, flags);
  const mode_t mode = ModeArg(flags, ap);
  va_end(ap);
  return Remember(real(path, flags, mode), flags);
}

int openat(int dirfd, const char* path, int flags, ...) {
  static auto real = Next<int (*)(int, const char*, int, ...)>("openat");
  va_list ap;
  va_start(ap, flags);
  const mode_t mode = ModeArg(flags, ap);
  va_end(ap);
  return Remember(real(dirfd, path, flags, mode), flags);
}

int openat64(int dirfd, const char* path, int flags, ...) {
  static auto real = Next<int (*)(int, const char*, int, ...)>("openat64");
  va_list ap;
  va_start(ap, flags);
  const mode_t mode = ModeArg(flags, ap);
  va_end(ap);
  return Remember(real(dirfd, path, flags, mode), flags);
}

int __open_2(const char* path, int flags) {
  static auto real = Next<int (*)(const char*, int)>("__open_2");
  return Remember(real(path, flags), flags);
}

int __open64_2(const char* path, int flags) {
  static auto real = Next<int (*)(const char*, int)>("__open64_2");
  return Remember(real(path, flags), flags);
}

int close(int fd) {
  static auto real = Next<int (*)(int)>("close");
  if (fd >= 0 && fd < kMaxFd) tmp_fd[fd].store(false);
  return real(fd);
}

ssize_t pwrite(int fd, const void* buf, size_t n, off_t off) {
  static auto real = Next<ssize_t (*)(int, const void*, size_t, off_t)>("pwrite");
  if (int e = FaultFor(fd)) {
    errno = e;
    return -1;
  }
  return real(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void* buf, size_t n, off64_t off) {
  static auto real = Next<ssize_t (*)(int, const void*, size_t, off64_t)>("pwrite64");
  if (int e = FaultFor(fd)) {
    errno = e;
    return -1;
  }
  return real(fd, buf, n, off);
}

}  // extern "C"
#pragma GCC visibility pop
