// qcow2::Volume: data round trips against a shadow, concurrency (lost
// updates in one new cluster, trims racing writes), refusals. Every image
// ends with our check (no corruption, no leak after a flush) and, where
// qemu-img is here, qemu-img check and a byte compare with what QEMU reads.
#include "qcow2/volume.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>

#include "common/mem_io.h"
#include "qcow2/check.h"
#include "qcow2/image.h"
#include "qcow2/test_util.h"

namespace cbt::qcow2 {
namespace {

using Bytes = std::vector<std::byte>;
using testing::TempDir;

// An empty qcow2 v3 image of `size` bytes, in memory.
std::shared_ptr<MemBlockIO> NewImage(uint64_t size, uint32_t cluster_size) {
  auto io = std::make_shared<MemBlockIO>();
  CreateOptions co;
  co.virtual_size = size;
  co.cluster_size = cluster_size;
  auto img = Image::Create(io, co);
  EXPECT_TRUE(img.ok()) << img.status().ToString();
  return io;
}

VolumeOptions Writable() {
  VolumeOptions o;
  o.writable = true;
  return o;
}

std::unique_ptr<Volume> OpenRW(std::shared_ptr<BlockIO> io) {
  auto v = Volume::Open(std::move(io), "test.qcow2", Writable());
  EXPECT_TRUE(v.ok()) << v.status().ToString();
  return v.ok() ? std::move(*v) : nullptr;
}

Bytes Pattern(size_t n, uint32_t seed) {
  Bytes b(n);
  std::mt19937 r(seed);
  for (auto& x : b) x = std::byte(r() & 0xff);
  return b;
}

// No corruption, and `leaks` leaked clusters (0 after a completed flush).
void ExpectClean(const Bytes& bytes, uint64_t leaks = 0) {
  auto img = Image::Open(std::make_shared<MemBlockIO>(bytes));
  ASSERT_TRUE(img.ok()) << img.status().ToString();
  auto rep = Check(**img, false);
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->corruptions, 0u) << (rep->messages.empty() ? "" : rep->messages.front());
  EXPECT_EQ(rep->leaks, leaks) << (rep->messages.empty() ? "" : rep->messages.front());
}

Bytes ReadAll(Volume& v) {
  Bytes out(v.size());
  EXPECT_TRUE(v.Read(out, 0).ok());
  return out;
}

// qemu-img check passes on the image and qemu-img convert reads `shadow`.
void ExpectQemuReads(const Bytes& image, const Bytes& shadow) {
  TempDir dir;
  std::string out;
  ASSERT_EQ(testing::QemuCheckBytes(image, dir, &out), 0) << out;
  auto r = testing::Sh("qemu-img convert -f qcow2 -O raw " + (dir / "check.qcow2") + " " +
                       (dir / "out.raw"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  FILE* f = std::fopen((dir / "out.raw").c_str(), "rb");
  ASSERT_TRUE(f);
  Bytes q(shadow.size());
  ASSERT_EQ(std::fread(q.data(), 1, q.size(), f), q.size());
  std::fclose(f);
  EXPECT_TRUE(q == shadow) << "QEMU reads something else";
}

class VolumeRoundTrip : public ::testing::TestWithParam<uint32_t> {};

// Random writes, zeroes (both kinds) and trims of random sizes, mirrored on
// a shadow; flushed, reopened and compared; then judged by QEMU.
TEST_P(VolumeRoundTrip, RandomOpsMatchShadow) {
  const uint32_t cs = GetParam();
  const uint64_t size = 8u << 20;
  auto io = NewImage(size, cs);
  Bytes shadow(size);
  {
    auto v = OpenRW(io);
    ASSERT_TRUE(v);
    std::mt19937_64 r(cs);
    for (int i = 0; i < 300; ++i) {
      uint64_t len = 1 + r() % std::min<uint64_t>(3 * cs + 5000, size / 8);
      uint64_t off = r() % (size - len);
      switch (r() % 6) {
        case 0:
        case 1:
        case 2: {
          Bytes d = Pattern(len, static_cast<uint32_t>(i));
          ASSERT_TRUE(v->Write(d, off).ok());
          std::memcpy(shadow.data() + off, d.data(), len);
          break;
        }
        case 3:
        case 4:
          ASSERT_TRUE(v->Zero(off, len, r() % 2, false).ok());
          std::memset(shadow.data() + off, 0, len);
          break;
        case 5: {
          ASSERT_TRUE(v->Trim(off, len).ok());
          // Whole clusters read zero after a trim (no backing file).
          uint64_t a = (off + cs - 1) / cs * cs, b = (off + len) / cs * cs;
          if (a < b) std::memset(shadow.data() + a, 0, b - a);
          break;
        }
      }
      if (i % 50 == 49) {
        ASSERT_TRUE(v->Flush().ok());
      }
      if (i % 37 == 0) {
        ASSERT_EQ(ReadAll(*v), shadow) << "op " << i;
      }
    }
    ASSERT_TRUE(v->Flush().ok());
    ASSERT_EQ(ReadAll(*v), shadow);
  }
  ExpectClean(io->contents());
  auto again = OpenRW(io);
  ASSERT_TRUE(again);
  EXPECT_EQ(ReadAll(*again), shadow);

  if (!testing::HaveTool("qemu-img")) {
    GTEST_SKIP() << "qemu-img not installed";
  }
  ExpectQemuReads(io->contents(), shadow);
}

INSTANTIATE_TEST_SUITE_P(ClusterSizes, VolumeRoundTrip, ::testing::Values(512u, 65536u, 2u << 20));

// Many threads write disjoint pieces of the same fresh clusters at once:
// each piece needs the cluster allocated (and the rest copied); none may be
// lost. Then discards of other clusters race writes to their neighbours.
TEST(VolumeConcurrency, PartialWritesIntoOneNewClusterAndTrimsRacingWrites) {
  const uint32_t cs = 65536;
  const uint64_t size = 64u << 20;
  auto io = NewImage(size, cs);
  auto v = OpenRW(io);
  ASSERT_TRUE(v);
  constexpr int kThreads = 8;
  constexpr uint64_t kPiece = cs / kThreads;
  constexpr int kClusters = 64;
  std::atomic<int> errors{0};
  {
    std::vector<std::thread> ts;
    for (int t = 0; t < kThreads; ++t)
      ts.emplace_back([&, t] {
        for (int c = 0; c < kClusters; ++c) {
          Bytes d(kPiece, std::byte(t + 1 + c));
          if (!v->Write(d, uint64_t(c) * cs + t * kPiece).ok()) ++errors;
        }
      });
    for (auto& t : ts) t.join();
  }
  ASSERT_EQ(errors, 0);
  Bytes all = ReadAll(*v);
  for (int c = 0; c < kClusters; ++c)
    for (int t = 0; t < kThreads; ++t)
      ASSERT_EQ(all[c * cs + t * kPiece], std::byte(t + 1 + c))
          << "cluster " << c << " piece " << t << " lost";
  // Even clusters are trimmed and rewritten while odd ones are written;
  // a flusher runs all the time (frees happen behind it).
  std::atomic<bool> stop{false};
  std::thread flusher([&] {
    while (!stop)
      if (!v->Flush().ok()) ++errors;
  });
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&, t] {
      for (int round = 0; round < 20; ++round)
        for (int c = t % 2; c < kClusters; c += 2) {
          uint64_t off = uint64_t(c) * cs;
          if (c % 2 == 0) {
            if (!v->Trim(off, cs).ok()) ++errors;
            Bytes d(cs, std::byte(0x80 + round));
            if (t == 0 && !v->Write(d, off).ok()) ++errors;
          } else {
            Bytes d(4096, std::byte(0x40 + t));
            if (!v->Write(d, off + t * 4096).ok()) ++errors;
          }
        }
    });
  for (auto& t : ts) t.join();
  stop = true;
  flusher.join();
  ASSERT_EQ(errors, 0);
  ASSERT_TRUE(v->Flush().ok());
  all = ReadAll(*v);
  for (int c = 1; c < kClusters; c += 2)
    for (int t = 1; t < 4; t += 2)
      ASSERT_EQ(all[c * cs + t * 4096], std::byte(0x40 + t)) << "odd cluster " << c << " lost";
  v.reset();
  ExpectClean(io->contents());
}

class VolumeTinyCache : public ::testing::TestWithParam<uint32_t> {};

// An L2 cache of two tables over an image of many: every request may load a
// table (mu_ released) and evict another. Threads own chunks of 3.5
// clusters (neighbours share a cluster, each its own bytes) and read,
// write, zero and trim in them, mirrored; others probe extents and flush.
TEST_P(VolumeTinyCache, ThreadsAcrossManyTablesMatchMirror) {
  const uint32_t cs = GetParam();
  const uint64_t tables = 24;
  const uint64_t size = tables * (cs / 8) * cs;  // 24 L2 tables
  auto io = NewImage(size, cs);
  VolumeOptions o = Writable();
  o.cache_bytes = 2 * cs;
  auto opened = Volume::Open(io, "test.qcow2", o);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  auto v = std::move(*opened);
  constexpr int kThreads = 4;
  const uint64_t chunk = 3 * cs + cs / 2;
  const uint64_t chunks = size / chunk;
  Bytes mirror(size);  // each byte written by its chunk's owner only
  std::atomic<int> errors{0};
  std::atomic<bool> stop{false};
  std::mutex msg_mu;
  std::string first_error;
  auto fail = [&](const std::string& what, const Status& s) {
    std::lock_guard l(msg_mu);
    if (errors++ == 0) first_error = what + ": " + s.ToString();
  };
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([&, t] {
      std::mt19937_64 r(cs * 100 + t);
      for (int i = 0; i < 600 && !errors; ++i) {
        // A chunk of ours, far apart from the last: another table.
        uint64_t c = (r() % (chunks / kThreads)) * kThreads + t;
        uint64_t base = c * chunk;
        uint64_t a = r() % chunk, b = r() % chunk;
        if (a > b) std::swap(a, b);
        uint64_t off = base + a, len = b - a + 1;
        Status s;
        switch (r() % 7) {
          case 0:
          case 1:
          case 2: {
            Bytes d = Pattern(len, static_cast<uint32_t>(r()));
            s = v->Write(d, off);
            std::memcpy(mirror.data() + off, d.data(), len);
            break;
          }
          case 3:
            s = v->Zero(off, len, r() % 2, false);
            std::memset(mirror.data() + off, 0, len);
            break;
          case 4: {
            s = v->Trim(off, len);
            uint64_t x = (off + cs - 1) / cs * cs, y = (off + len) / cs * cs;
            if (x < y) std::memset(mirror.data() + x, 0, y - x);
            break;
          }
          default: {
            Bytes got(chunk);
            s = v->Read(got, base);
            if (s.ok() && std::memcmp(got.data() + a, mirror.data() + off, len) != 0)
              fail("thread " + std::to_string(t) + " read at " + std::to_string(off),
                   Status::Corruption("differs from the mirror"));
            break;
          }
        }
        if (!s.ok()) fail("thread " + std::to_string(t) + " op " + std::to_string(i), s);
      }
    });
  std::thread prober([&] {
    std::mt19937_64 r(cs);
    while (!stop && !errors) {
      uint64_t off = r() % size, len = 1 + r() % std::min<uint64_t>(size - off, 8 * chunk);
      std::vector<Extent> ex;
      Status s = v->Extents(off, len, &ex);
      uint64_t at = off;
      for (const Extent& e : ex) {
        if (e.offset != at) s = Status::Corruption("extents not contiguous");
        at = e.offset + e.length;
      }
      if (s.ok() && at != off + len) s = Status::Corruption("extents do not cover the range");
      if (!s.ok()) fail("extents", s);
    }
  });
  std::thread flusher([&] {
    while (!stop && !errors) {
      Status s = v->Flush();
      if (!s.ok()) fail("flush", s);
    }
  });
  for (auto& t : ts) t.join();
  stop = true;
  prober.join();
  flusher.join();
  ASSERT_EQ(errors, 0) << first_error;
  ASSERT_TRUE(v->Flush().ok());
  ASSERT_TRUE(ReadAll(*v) == mirror) << "content differs from the mirror";
  v.reset();
  ExpectClean(io->contents());
  auto again = Volume::Open(io, "test.qcow2", o);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(ReadAll(**again) == mirror) << "reopened content differs";
  again->reset();
  if (!testing::HaveTool("qemu-img")) {
    GTEST_SKIP() << "qemu-img not installed";
  }
  ExpectQemuReads(io->contents(), mirror);
}

// The same cache: in rounds, every thread writes its quarter of the first
// cluster of each table (freshly trimmed between rounds), in its own
// order: writers wait for each other's allocation while tables come and go.
TEST_P(VolumeTinyCache, ThreadsSharingNewClustersAcrossTables) {
  const uint32_t cs = GetParam();
  const uint64_t tables = 24, per_table = (cs / 8) * cs;
  const uint64_t size = tables * per_table;
  auto io = NewImage(size, cs);
  VolumeOptions o = Writable();
  o.cache_bytes = 2 * cs;
  auto opened = Volume::Open(io, "test.qcow2", o);
  ASSERT_TRUE(opened.ok()) << opened.status().ToString();
  auto v = std::move(*opened);
  constexpr int kThreads = 4;
  const uint64_t part = cs / kThreads;
  Bytes mirror(size);
  std::atomic<int> errors{0};
  std::barrier sync(kThreads);
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t)
    ts.emplace_back([&, t] {
      std::mt19937_64 r(t);
      std::vector<uint64_t> order(tables);
      for (uint64_t k = 0; k < tables; ++k) order[k] = k;
      for (int round = 0; round < 16; ++round) {
        std::shuffle(order.begin(), order.end(), r);
        for (uint64_t k : order) {
          uint64_t off = k * per_table + t * part;
          Bytes d(part, std::byte(1 + t + 16 * round));
          if (!v->Write(d, off).ok()) ++errors;
          std::memcpy(mirror.data() + off, d.data(), part);
          Bytes got(part);
          if (!v->Read(got, off).ok() || got != d) ++errors;
        }
        sync.arrive_and_wait();
        if (t == 0 && round < 15) {
          for (uint64_t k = 0; k < tables; ++k) {
            if (!v->Trim(k * per_table, cs).ok()) ++errors;
            std::memset(mirror.data() + k * per_table, 0, cs);
          }
          if (!v->Flush().ok()) ++errors;
        }
        sync.arrive_and_wait();
      }
    });
  // A flusher cleans tables, a reader loads others: tables get evicted
  // while writers wait.
  std::atomic<bool> stop{false};
  std::thread flusher([&] {
    while (!stop)
      if (!v->Flush().ok()) ++errors;
  });
  std::thread reader([&] {
    std::mt19937_64 r(cs);
    Bytes got(cs);
    while (!stop)
      if (!v->Read(got, r() % tables * per_table + cs).ok()) ++errors;
  });
  for (auto& t : ts) t.join();
  stop = true;
  flusher.join();
  reader.join();
  ASSERT_EQ(errors, 0);
  ASSERT_TRUE(v->Flush().ok());
  ASSERT_TRUE(ReadAll(*v) == mirror) << "a write was lost";
  v.reset();
  ExpectClean(io->contents());
  if (!testing::HaveTool("qemu-img")) {
    GTEST_SKIP() << "qemu-img not installed";
  }
  ExpectQemuReads(io->contents(), mirror);
}

INSTANTIATE_TEST_SUITE_P(ClusterSizes, VolumeTinyCache, ::testing::Values(512u, 4096u));

TEST(Volume, ReadOnlyRefusesChangesWithEROFS) {
  auto io = NewImage(1 << 20, 65536);
  auto v = Volume::Open(io, "x", {});
  ASSERT_TRUE(v.ok());
  Bytes d(512);
  Status s = (*v)->Write(d, 0);
  EXPECT_EQ(s.err(), EROFS) << s.ToString();
  EXPECT_EQ((*v)->Zero(0, 512, false, false).err(), EROFS);
}

TEST(Volume, FastZeroRefusedWithoutChangingWhenDataWouldBeWritten) {
  auto io = NewImage(1 << 20, 65536);
  auto v = OpenRW(io);
  ASSERT_TRUE(v);
  Bytes d = Pattern(65536, 7);
  ASSERT_TRUE(v->Write(d, 0).ok());
  // Part of an allocated cluster: would need data writes.
  Status s = v->Zero(100, 1000, false, true);
  EXPECT_TRUE(s.IsNotSupported()) << s.ToString();
  EXPECT_EQ(ReadAll(*v), [&] {
    Bytes b(1 << 20);
    std::memcpy(b.data(), d.data(), d.size());
    return b;
  }());
  // Whole clusters and parts of clusters that already read zero: fast.
  EXPECT_TRUE(v->Zero(0, 65536, false, true).ok());
  EXPECT_TRUE(v->Zero(70000, 1000, false, true).ok());
  EXPECT_EQ(ReadAll(*v), Bytes(1 << 20));
}

TEST(Volume, WriteToMetadataIsRefusedAndMarksCorrupt) {
  auto io = NewImage(1 << 20, 65536);
  {
    auto v = OpenRW(io);
    ASSERT_TRUE(v);
    ASSERT_TRUE(v->Write(Pattern(512, 1), 0).ok());
    ASSERT_TRUE(v->Flush().ok());
  }
  // Point guest cluster 0's L2 entry at the L1 table.
  Bytes b = io->contents();
  auto hdr = ParseHeader(b, "x");
  ASSERT_TRUE(hdr.ok());
  uint64_t l1 = hdr->l1_table_offset;
  uint64_t l2 = 0;
  for (int i = 0; i < 8; ++i) l2 = l2 << 8 | uint64_t(b[l1 + i]);
  l2 &= 0x00fffffffffffe00ull;
  const uint64_t bad = 0x8000000000000000ull | l1;  // the L1 table's cluster, copied
  for (int i = 0; i < 8; ++i) b[l2 + i] = std::byte(bad >> (56 - 8 * i));
  auto io2 = std::make_shared<MemBlockIO>(b);
  auto v = OpenRW(io2);
  ASSERT_TRUE(v);
  Status s = v->Write(Pattern(512, 2), 0);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  auto h2 = ParseHeader(io2->contents(), "x");
  ASSERT_TRUE(h2.ok());
  EXPECT_TRUE(h2->incompatible & 2) << "corrupt bit not set";
  EXPECT_FALSE(Volume::Open(io2, "x", Writable()).ok());
}

}  // namespace
}  // namespace cbt::qcow2

namespace cbt::qcow2 {
namespace {

// A refcount table naming one block twice (a fuzzer found that the first
// allocation then scanned billions of "used" clusters): refused for
// writing, still readable.
TEST(Volume, RefcountTableNamingOneBlockTwiceIsRefusedForWriting) {
  auto io = NewImage(1 << 20, 65536);
  Bytes b = io->contents();
  auto hdr = ParseHeader(b, "x");
  ASSERT_TRUE(hdr.ok());
  const uint64_t rt = hdr->refcount_table_offset;
  for (int i = 0; i < 8; ++i) b[rt + 8 + i] = b[rt + i];
  auto io2 = std::make_shared<MemBlockIO>(b);
  auto rw = Volume::Open(io2, "x", Writable());
  ASSERT_FALSE(rw.ok());
  EXPECT_TRUE(rw.status().IsCorruption()) << rw.status().ToString();
  EXPECT_NE(rw.status().message().find("two refcount table entries"), std::string::npos);
  auto ro = Volume::Open(io2, "x", {});
  ASSERT_TRUE(ro.ok()) << ro.status().ToString();
  EXPECT_EQ(ReadAll(**ro), Bytes(1 << 20));
}

}  // namespace
}  // namespace cbt::qcow2
