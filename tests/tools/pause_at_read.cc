// pause_at_read.so: TEST ONLY, an LD_PRELOAD library that holds its process
// at its first read of one file until the test lets it go, so that a test
// can change the file at a known point while a program reads it (the
// offline `cbt backup`, which must notice).
//
//   CBT_PAUSE_FILE=PATH   the file to watch (same device and inode, so
//                         relative paths and renames do not matter)
//   CBT_PAUSE_READY=PATH  created when the first pread of PATH is reached
//   CBT_PAUSE_GO=PATH     that read goes on once this file exists (polled
//                         every 10 ms, at most 60 s)
//
// Only the first pread/pread64 on the watched file waits; nothing else is
// changed. Nothing here is linked into cbt itself.
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <ctime>

#include "preload_watch.h"

namespace {

using PreadFn = ssize_t (*)(int, void*, size_t, off_t);

std::atomic<bool> paused{false};

bool Watched(int fd) {
  return cbt::testing::FdIsFileIn(fd, "CBT_PAUSE_FILE");
}

void MaybePause(int fd) {
  if (paused.load() || !Watched(fd) || paused.exchange(true)) return;
  if (const char* ready = std::getenv("CBT_PAUSE_READY"); ready && *ready) {
    int r = open(ready, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (r >= 0) close(r);
  }
  const char* go = std::getenv("CBT_PAUSE_GO");
  if (!go || !*go) return;
  const timespec tick{0, 10'000'000};
  struct stat st;
  for (int i = 0; i < 6000 && stat(go, &st) != 0; ++i) nanosleep(&tick, nullptr);
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) ssize_t pread(int fd, void* buf, size_t n, off_t off) {
  static PreadFn real = reinterpret_cast<PreadFn>(dlsym(RTLD_NEXT, "pread"));
  MaybePause(fd);
  return real(fd, buf, n, off);
}

__attribute__((visibility("default"))) ssize_t pread64(int fd, void* buf, size_t n, off_t off) {
  static PreadFn real = reinterpret_cast<PreadFn>(dlsym(RTLD_NEXT, "pread64"));
  MaybePause(fd);
  return real(fd, buf, n, off);
}

}  // extern "C"
