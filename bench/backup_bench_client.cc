// libnbd client for the backup benchmarks (bench/backup_*_bench.sh, figures
// in docs/perf.md). Not part of the product.
//
//   backup_bench_client count URI CONTEXT [EXPECT_BYTES]
//     Block status over the whole export for metadata context CONTEXT (e.g.
//     qemu:dirty-bitmap:b0), requests of up to 4 GiB - 64 KiB, one at a time,
//     as nbdinfo --map does. Counts the bytes whose flags have bit 0 set
//     (dirty). Prints one JSON line. Exit 1 when EXPECT_BYTES is given and
//     differs: a wrong answer is an error, not a figure.
//
//   backup_bench_client copy SRC_URI CONTEXT DST_URI [JOBS] [CLUSTER]
//     The baseline backup client: the dirty ranges of CONTEXT on SRC (block
//     status as above), rounded out to CLUSTER (default 65536) and merged,
//     cut into pieces of at most 4 MiB; JOBS threads (default 8), each with
//     its own connection to SRC and to DST, read a piece from SRC and write
//     it to DST (NBD_CMD_WRITE_ZEROES without NO_HOLE when it reads as
//     zeros, so qcow2 stores a zero cluster that hides the backing file).
//     Then DST is flushed. Prints one JSON line (seconds include the extent
//     queries).
#include <libnbd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

[[noreturn]] void Die(const char* what) {
  std::fprintf(stderr, "backup_bench_client: %s: %s\n", what, nbd_get_error());
  std::exit(2);
}

nbd_handle* Connect(const char* uri, const char* context) {
  nbd_handle* h = nbd_create();
  if (!h) Die("nbd_create");
  if (context && nbd_add_meta_context(h, context) == -1) Die("nbd_add_meta_context");
  if (nbd_connect_uri(h, uri) == -1) Die(uri);
  if (context && nbd_can_meta_context(h, context) != 1) {
    std::fprintf(stderr, "backup_bench_client: %s does not offer %s\n", uri, context);
    std::exit(2);
  }
  return h;
}

struct Walk {
  const char* context;
  uint64_t pos = 0;           // next offset the replies continue from
  uint64_t dirty = 0;         // bytes with bit 0 set
  uint64_t extents = 0;       // descriptors received
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // dirty [off, end), merged
  bool keep_ranges = false;
};

int OnExtents(void* user, const char* metacontext, uint64_t offset, uint32_t* entries,
              size_t nr, int* /*error*/) {
  auto* w = static_cast<Walk*>(user);
  if (std::strcmp(metacontext, w->context) != 0) return 0;
  uint64_t off = offset;
  for (size_t i = 0; i + 1 < nr; i += 2) {
    const uint64_t len = entries[i];
    const uint32_t flags = entries[i + 1];
    w->extents++;
    if (flags & 1) {
      w->dirty += len;
      if (w->keep_ranges) {
        if (!w->ranges.empty() && w->ranges.back().second == off)
          w->ranges.back().second = off + len;
        else
          w->ranges.emplace_back(off, off + len);
      }
    }
    off += len;
  }
  w->pos = off;
  return 0;
}

// Walks the whole export; returns the number of block status requests.
uint64_t WalkAll(nbd_handle* h, Walk& w) {
  const int64_t size = nbd_get_size(h);
  if (size < 0) Die("nbd_get_size");
  const uint64_t max_req = (uint64_t{1} << 32) - 65536;
  uint64_t requests = 0;
  w.pos = 0;
  while (w.pos < static_cast<uint64_t>(size)) {
    const uint64_t start = w.pos;
    const uint64_t count = std::min<uint64_t>(max_req, size - start);
    if (nbd_block_status(h, count, start, nbd_extent_callback{OnExtents, &w, nullptr}, 0) == -1)
      Die("nbd_block_status");
    requests++;
    if (w.pos <= start) {
      std::fprintf(stderr, "backup_bench_client: no progress at offset %" PRIu64 "\n", start);
      std::exit(2);
    }
  }
  if (w.pos != static_cast<uint64_t>(size)) {
    std::fprintf(stderr, "backup_bench_client: extents end at %" PRIu64 ", past the size %" PRId64 "\n",
                 w.pos, size);
    std::exit(2);
  }
  return requests;
}

double Since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int Count(int argc, char** argv) {
  if (argc < 4) return 3;
  const char* uri = argv[2];
  Walk w;
  w.context = argv[3];
  const auto t0 = std::chrono::steady_clock::now();
  nbd_handle* h = Connect(uri, w.context);
  const uint64_t requests = WalkAll(h, w);
  const double secs = Since(t0);
  nbd_shutdown(h, 0);
  nbd_close(h);
  std::printf("{\"seconds\": %.6f, \"dirty-bytes\": %" PRIu64 ", \"extents\": %" PRIu64
              ", \"requests\": %" PRIu64 "}\n",
              secs, w.dirty, w.extents, requests);
  if (argc > 4) {
    const uint64_t expect = std::strtoull(argv[4], nullptr, 10);
    if (expect != w.dirty) {
      std::fprintf(stderr, "backup_bench_client: WRONG: %" PRIu64 " dirty bytes, expected %" PRIu64 "\n",
                   w.dirty, expect);
      return 1;
    }
  }
  return 0;
}

int Copy(int argc, char** argv) {
  if (argc < 5) return 3;
  const char* src = argv[2];
  const char* dst = argv[4];
  const unsigned jobs = argc > 5 ? static_cast<unsigned>(std::atoi(argv[5])) : 8;
  const uint64_t cluster = argc > 6 ? std::strtoull(argv[6], nullptr, 10) : 65536;
  const uint64_t piece = uint64_t{4} << 20;
  if (jobs < 1 || jobs > 64 || cluster == 0 || (cluster & (cluster - 1))) return 3;

  const auto t0 = std::chrono::steady_clock::now();
  Walk w;
  w.context = argv[3];
  w.keep_ranges = true;
  nbd_handle* h = Connect(src, w.context);
  const uint64_t size = static_cast<uint64_t>(nbd_get_size(h));
  WalkAll(h, w);
  nbd_shutdown(h, 0);
  nbd_close(h);
  const double extent_secs = Since(t0);

  // Round out to clusters, merge, cut into pieces.
  std::vector<std::pair<uint64_t, uint64_t>> pieces;
  uint64_t cur_b = 0, cur_e = 0;
  bool have = false;
  auto flush_range = [&](uint64_t b, uint64_t e) {
    for (uint64_t o = b; o < e; o += piece) pieces.emplace_back(o, std::min(e, o + piece) - o);
  };
  for (auto [b, e] : w.ranges) {
    b = b / cluster * cluster;
    e = std::min(size, (e + cluster - 1) / cluster * cluster);
    if (have && b <= cur_e) {
      cur_e = std::max(cur_e, e);
    } else {
      if (have) flush_range(cur_b, cur_e);
      cur_b = b, cur_e = e, have = true;
    }
  }
  if (have) flush_range(cur_b, cur_e);

  std::atomic<size_t> next{0};
  std::atomic<uint64_t> copied{0}, zeroed{0};
  std::vector<std::thread> threads;
  for (unsigned j = 0; j < jobs; j++) {
    threads.emplace_back([&] {
      nbd_handle* in = Connect(src, nullptr);
      nbd_handle* out = Connect(dst, nullptr);
      std::vector<char> buf(piece);
      for (size_t i; (i = next.fetch_add(1)) < pieces.size();) {
        const auto [off, len] = pieces[i];
        if (nbd_pread(in, buf.data(), len, off, 0) == -1) Die("nbd_pread");
        const bool zero = std::all_of(buf.data(), buf.data() + len, [](char c) { return c == 0; });
        if (zero) {
          if (nbd_zero(out, len, off, 0) == -1) Die("nbd_zero");
          zeroed += len;
        } else {
          if (nbd_pwrite(out, buf.data(), len, off, 0) == -1) Die("nbd_pwrite");
        }
        copied += len;
      }
      nbd_shutdown(in, 0);
      nbd_close(in);
      nbd_shutdown(out, 0);
      nbd_close(out);
    });
  }
  for (auto& t : threads) t.join();
  nbd_handle* f = Connect(dst, nullptr);
  if (nbd_flush(f, 0) == -1) Die("nbd_flush");
  nbd_shutdown(f, 0);
  nbd_close(f);
  const double secs = Since(t0);
  std::printf("{\"seconds\": %.6f, \"extent-seconds\": %.6f, \"dirty-bytes\": %" PRIu64
              ", \"bytes-copied\": %" PRIu64 ", \"bytes-zeroed\": %" PRIu64 ", \"extents\": %" PRIu64
              ", \"pieces\": %zu, \"jobs\": %u}\n",
              secs, extent_secs, w.dirty, copied.load(), zeroed.load(), w.extents, pieces.size(),
              jobs);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int rc = 3;
  if (argc >= 2 && std::strcmp(argv[1], "count") == 0) rc = Count(argc, argv);
  if (argc >= 2 && std::strcmp(argv[1], "copy") == 0) rc = Copy(argc, argv);
  if (rc == 3)
    std::fprintf(stderr,
                 "usage: backup_bench_client count URI CONTEXT [EXPECT_BYTES]\n"
                 "       backup_bench_client copy SRC_URI CONTEXT DST_URI [JOBS] [CLUSTER]\n");
  return rc;
}
