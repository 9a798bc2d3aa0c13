// nbdkit-volatile-filter: TEST ONLY. Simulates a disk whose cache is lost in
// a power cut, for the crash torture (tests/crash/torture.py --power-cut).
//
// Every write, zero and trim is forwarded at once (so reads stay correct),
// but first its old and new contents are appended to a journal:
//   "CBTJDATA", then records [u64 offset][u64 length][old bytes][new bytes]
// (little endian). A flush forwards the flush and empties the journal. After
// nbdkit is killed, powercut_replay undoes every journaled write and applies
// an arbitrary subset of them again, reordered and torn at 512-byte sectors:
// what a power cut may leave of writes no flush covered.
// Requests are serialised under one mutex (fine for a test).
#include <fcntl.h>
#include <nbdkit-filter.h>
#include <string.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace {

std::string journal_path;
int journal_fd = -1;
std::mutex mu;  // guards journal_fd and the order of forwarded changes
constexpr char kMagic[8] = {'C', 'B', 'T', 'J', 'D', 'A', 'T', 'A'};

bool WriteAll(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n) {
    ssize_t r = write(journal_fd, c, n);
    if (r < 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

void Le64(unsigned char* b, uint64_t v) {
  for (int i = 0; i < 8; ++i, v >>= 8) b[i] = static_cast<unsigned char>(v);
}

int vol_config(nbdkit_next_config* next, nbdkit_backend* nx, const char* key,
               const char* value) noexcept {
  if (strcmp(key, "volatile-journal") == 0) {
    char* p = nbdkit_absolute_path(value);
    if (!p) return -1;
    journal_path = p;
    free(p);
    return 0;
  }
  return next(nx, key, value);
}

int vol_get_ready(int) noexcept {
  if (journal_path.empty()) {
    nbdkit_error("volatile-journal=PATH is required");
    return -1;
  }
  journal_fd =
      open(journal_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
  if (journal_fd < 0 || !WriteAll(kMagic, sizeof(kMagic))) {
    nbdkit_error("volatile-journal: %s: %m", journal_path.c_str());
    return -1;
  }
  return 0;
}

// Journals [off, off+count) with its new contents (nullptr: zeros).
int Journal(nbdkit_next* next, uint32_t count, uint64_t off, const void* buf, int* err) {
  std::vector<char> old(count);
  if (next->pread(next, old.data(), count, off, 0, err) == -1) return -1;
  unsigned char hdr[16];
  Le64(hdr, off);
  Le64(hdr + 8, count);
  std::vector<char> zeros;
  if (!buf) {
    zeros.assign(count, 0);
    buf = zeros.data();
  }
  if (!WriteAll(hdr, sizeof(hdr)) || !WriteAll(old.data(), count) || !WriteAll(buf, count)) {
    *err = errno;
    nbdkit_error("volatile-journal: write: %m");
    return -1;
  }
  return 0;
}

int vol_pwrite(nbdkit_next* next, void*, const void* buf, uint32_t count, uint64_t off,
               uint32_t flags, int* err) noexcept {
  std::lock_guard lock(mu);
  if (Journal(next, count, off, buf, err) == -1) return -1;
  return next->pwrite(next, buf, count, off, flags, err);
}

int vol_zero(nbdkit_next* next, void*, uint32_t count, uint64_t off, uint32_t flags,
             int* err) noexcept {
  std::lock_guard lock(mu);
  if (Journal(next, count, off, nullptr, err) == -1) return -1;
  return next->zero(next, count, off, flags, err);
}

int vol_trim(nbdkit_next* next, void*, uint32_t count, uint64_t off, uint32_t flags,
             int* err) noexcept {
  std::lock_guard lock(mu);
  if (Journal(next, count, off, nullptr, err) == -1) return -1;
  return next->trim(next, count, off, flags, err);
}

int vol_flush(nbdkit_next* next, void*, uint32_t flags, int* err) noexcept {
  std::lock_guard lock(mu);
  if (next->flush(next, flags, err) == -1) return -1;
  if (ftruncate(journal_fd, sizeof(kMagic)) != 0) {
    *err = errno;
    return -1;
  }
  return 0;
}

nbdkit_filter filter = [] {
  nbdkit_filter f{};
  f.name = "volatile";
  f.longname = "TEST ONLY: journal unflushed writes for simulated power cuts";
  f.config = vol_config;
  f.config_help = "volatile-journal=PATH  (required) journal of unflushed writes";
  f.get_ready = vol_get_ready;
  f.pwrite = vol_pwrite;
  f.zero = vol_zero;
  f.trim = vol_trim;
  f.flush = vol_flush;
  return f;
}();

}  // namespace

NBDKIT_REGISTER_FILTER(filter)
