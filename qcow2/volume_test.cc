// qcow2::Volume: data round trips against a shadow, concurrency (lost
// updates in one new cluster, trims racing writes), refusals. Every image
// ends with our check (no corruption, no leak after a flush) and, where
// qemu-img is here, qemu-img check and a byte compare with what QEMU reads.
#include "qcow2/volume.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
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
  TempDir dir;
  std::string out;
  ASSERT_EQ(testing::QemuCheckBytes(io->contents(), dir, &out), 0) << out;
  auto r = testing::Sh("qemu-img convert -f qcow2 -O raw " + (dir / "check.qcow2") + " " +
                       (dir / "out.raw"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  FILE* f = std::fopen((dir / "out.raw").c_str(), "rb");
  ASSERT_TRUE(f);
  Bytes q(size);
  ASSERT_EQ(std::fread(q.data(), 1, size, f), size);
  std::fclose(f);
  EXPECT_TRUE(q == shadow) << "QEMU reads something else";
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
