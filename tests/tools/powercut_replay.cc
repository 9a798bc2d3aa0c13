// powercut_replay JOURNAL SEED [TARGET]: TEST ONLY. Applies to TARGET (default:
// JOURNAL without ".journal") what a power cut may leave of the writes in a
// volatile journal (see testing/volatile_io.h, tests/tools/volatile_filter.cc):
//   CBTJCONT (container): the writes never reached TARGET; each is kept or
//     dropped at random, the kept ones applied in random order, a quarter of
//     them torn (only some of their 512-byte sectors).
//   CBTJDATA (disk): the writes did reach TARGET; all are undone (newest
//     first), then a random subset is applied again the same way.
// Prints what it did; removes the journal. Exit 1 on I/O errors.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

struct Rec {
  uint64_t off;
  std::vector<char> old_data, new_data;
};

uint64_t Le64(const char* b) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b[i]);
  return v;
}

bool PwriteAll(int fd, const char* p, size_t n, uint64_t off) {
  while (n) {
    ssize_t r = pwrite(fd, p, n, static_cast<off_t>(off));
    if (r < 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
    off += static_cast<uint64_t>(r);
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: powercut_replay JOURNAL SEED [TARGET]\n");
    return 2;
  }
  std::string jpath = argv[1];
  std::string target = argc > 3 ? argv[3] : jpath.substr(0, jpath.rfind(".journal"));
  std::mt19937_64 rng(std::stoull(argv[2]));
  FILE* f = fopen(jpath.c_str(), "rb");
  if (!f) {
    printf("powercut_replay: %s: no journal, nothing to do\n", jpath.c_str());
    return 0;
  }
  std::vector<char> j;
  char buf[65536];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) j.insert(j.end(), buf, buf + n);
  fclose(f);
  if (j.size() < 8) return 0;
  bool data = memcmp(j.data(), "CBTJDATA", 8) == 0;
  if (!data && memcmp(j.data(), "CBTJCONT", 8) != 0) {
    fprintf(stderr, "powercut_replay: %s: bad magic\n", jpath.c_str());
    return 1;
  }
  std::vector<Rec> recs;
  size_t pos = 8;
  while (pos + 16 <= j.size()) {  // a torn last record (killed mid-append) is dropped
    uint64_t off = Le64(&j[pos]), len = Le64(&j[pos + 8]);
    size_t need = 16 + len * (data ? 2 : 1);
    if (pos + need > j.size()) break;
    Rec r{off, {}, {}};
    const char* p = &j[pos + 16];
    if (data) {
      r.old_data.assign(p, p + len);
      p += len;
    }
    r.new_data.assign(p, p + len);
    recs.push_back(std::move(r));
    pos += need;
  }
  int fd = open(target.c_str(), O_WRONLY);
  if (fd < 0) {
    perror(target.c_str());
    return 1;
  }
  if (data)  // the disk got every write: undo them, newest first
    for (auto it = recs.rbegin(); it != recs.rend(); ++it)
      if (!PwriteAll(fd, it->old_data.data(), it->old_data.size(), it->off)) return 1;
  std::vector<size_t> order(recs.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  size_t kept = 0, torn = 0;
  for (size_t i : order) {
    if (rng() % 2) continue;  // lost
    const Rec& r = recs[i];
    ++kept;
    bool tear = rng() % 4 == 0;
    torn += tear;
    // Sector-aligned pieces of the write; a torn write keeps only some.
    const uint64_t start = r.off, end = r.off + r.new_data.size();
    for (uint64_t p = start; p < end;) {
      uint64_t next = std::min(end, (p / 512 + 1) * 512);
      if (!(tear && rng() % 2) && !PwriteAll(fd, r.new_data.data() + (p - start), next - p, p))
        return 1;
      p = next;
    }
  }
  fsync(fd);
  close(fd);
  unlink(jpath.c_str());
  printf("powercut_replay: %s: %zu unflushed writes, %zu kept (%zu torn), %zu lost\n",
         target.c_str(), recs.size(), kept, torn, recs.size() - kept);
  return 0;
}
