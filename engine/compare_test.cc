// CompareInto: the exact set of differing granules, judged against a plain
// single-threaded reference, at the edges (first/last byte, chunk and
// granule boundaries, a partial last granule, a backup shorter than the
// disk), over real holes (a sparse file) and qcow2 layers (unallocated,
// zero and data clusters, a backing chain), and with read errors.
#include "engine/compare.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <random>
#include <vector>

#include "common/mem_io.h"
#include "common/posix_file.h"
#include "qcow2/layer_writer.h"
#include "qcow2/volume.h"

namespace cbt {
namespace {

constexpr uint64_t KiB = 1024;
constexpr uint64_t MiB = 1024 * KiB;

std::vector<std::byte> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

std::shared_ptr<MemBlockIO> Mem(const std::vector<std::byte>& v) {
  return std::make_shared<MemBlockIO>(v);
}

// The granules that differ, by a plain loop (bytes past b's end are zeros).
std::vector<uint64_t> Reference(const std::vector<std::byte>& a, const std::vector<std::byte>& b,
                                uint64_t g) {
  std::vector<uint64_t> out;
  for (uint64_t i = 0; i * g < a.size(); ++i) {
    for (uint64_t p = i * g; p < std::min<uint64_t>(a.size(), (i + 1) * g); ++p) {
      const std::byte bb = p < b.size() ? b[p] : std::byte{0};
      if (a[p] != bb) {
        out.push_back(i);
        break;
      }
    }
  }
  return out;
}

std::vector<uint64_t> Dirty(const DirtyBitmap& bm) {
  std::vector<uint64_t> out;
  for (uint64_t i = 0; i < bm.granule_count(); ++i)
    if (bm.Test(i * bm.granularity())) out.push_back(i);
  return out;
}

// Compares a and b (raw, in memory) and returns the dirty granules.
std::vector<uint64_t> Diff(const std::vector<std::byte>& a, const std::vector<std::byte>& b,
                           uint64_t g, CompareOptions o = {}) {
  auto disk = RawCompareInput(Mem(a), a.size());
  auto backup = RawCompareInput(Mem(b), b.size());
  auto bm = DirtyBitmap::Create(a.size(), g);
  EXPECT_TRUE(bm.ok());
  auto st = CompareInto(*disk, *backup, **bm, o);
  EXPECT_TRUE(st.ok()) << st.status().ToString();
  if (st.ok()) {
    EXPECT_EQ(st->bytes_compared, a.size());
  }
  return Dirty(**bm);
}

CompareOptions Small(unsigned workers = 3) {
  CompareOptions o;
  o.chunk_bytes = 64 * KiB;
  o.workers = workers;
  return o;
}

TEST(CompareTest, IdenticalIsClean) {
  auto a = Random(3 * MiB + 12345, 1);
  EXPECT_TRUE(Diff(a, a, 64 * KiB).empty());
  EXPECT_TRUE(Diff(a, a, 512, Small()).empty());
}

TEST(CompareTest, FirstAndLastByteOfAPartialLastGranule) {
  // Size: not a multiple of the chunk (64 KiB) nor of the granularity (4 KiB).
  const uint64_t size = 5 * 64 * KiB + 3 * 4 * KiB + 777;
  auto a = Random(size, 2);
  auto b = a;
  b[0] ^= std::byte{1};
  b[size - 1] ^= std::byte{0x80};
  const uint64_t last = (size - 1) / (4 * KiB);
  EXPECT_EQ(Diff(a, b, 4 * KiB, Small()), (std::vector<uint64_t>{0, last}));
  EXPECT_EQ(Diff(a, b, 4 * KiB, Small()), Reference(a, b, 4 * KiB));
}

TEST(CompareTest, BothSidesOfAChunkBoundary) {
  auto a = Random(4 * 64 * KiB, 3);
  auto b = a;
  b[64 * KiB - 1] ^= std::byte{1};  // last byte of chunk 0
  b[2 * 64 * KiB] ^= std::byte{1};  // first byte of chunk 2
  EXPECT_EQ(Diff(a, b, 512, Small()),
            (std::vector<uint64_t>{64 * KiB / 512 - 1, 2 * 64 * KiB / 512}));
}

TEST(CompareTest, RandomChangesMatchTheReferenceForEveryShape) {
  const uint64_t size = 2 * MiB + 64 * KiB + 4608;  // a multiple of 512 only
  auto a = Random(size, 4);
  auto b = a;
  std::mt19937 rng(5);
  for (int i = 0; i < 300; ++i) b[rng() % size] ^= std::byte{0x10};
  for (uint64_t g : {uint64_t{512}, 4 * KiB, 64 * KiB, 256 * KiB, 2 * MiB, 4 * MiB})
    for (unsigned w : {1u, 2u, 7u}) {
      SCOPED_TRACE("granularity " + std::to_string(g) + " workers " + std::to_string(w));
      // Granules larger than a chunk (256 KiB .. 4 MiB over 64 KiB chunks)
      // are compared piece by piece.
      EXPECT_EQ(Diff(a, b, g, Small(w)), Reference(a, b, g));
      EXPECT_EQ(Diff(a, b, g), Reference(a, b, g));
    }
}

TEST(CompareTest, ShorterBackupReadsAsZeros) {
  const uint64_t g = 64 * KiB;
  std::vector<std::byte> a(8 * g), b(3 * g + 100);
  a[5 * g + 7] = std::byte{9};    // past the backup, not zero: differs
  a[3 * g + 200] = std::byte{1};  // in the granule the backup ends in
  // granules 4, 6, 7: zeros on the disk, past the backup: clean
  EXPECT_EQ(Diff(a, b, g, Small()), (std::vector<uint64_t>{3, 5}));
  EXPECT_EQ(Diff(a, b, g, Small()), Reference(a, b, g));
  // An empty backup: every non-zero granule differs.
  EXPECT_EQ(Diff(a, {}, g, Small()), (std::vector<uint64_t>{3, 5}));
}

TEST(CompareTest, HolesEqualZerosInASparseFile) {
  const std::string dir = ::testing::TempDir();
  auto f = PosixFile::CreateTemporary(dir);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  std::shared_ptr<PosixFile> sparse = std::move(*f);
  const uint64_t size = 4 * MiB + 4096;
  ASSERT_TRUE(sparse->resize(size).ok());  // all hole
  std::vector<std::byte> one(4096, std::byte{7});
  ASSERT_TRUE(sparse->pwrite(one, 2 * MiB).ok());  // one data block
  std::vector<std::byte> zeros(size);              // the same content, all data
  std::memset(zeros.data() + 2 * MiB, 7, 4096);
  auto disk = RawCompareInput(Mem(zeros), size);
  auto backup = RawCompareInput(sparse, size);
  auto bm = DirtyBitmap::Create(size, 64 * KiB);
  ASSERT_TRUE(CompareInto(*disk, *backup, **bm, Small()).ok());
  EXPECT_TRUE(Dirty(**bm).empty());
  zeros[size - 1] = std::byte{1};  // the last byte differs from the hole
  auto disk2 = RawCompareInput(Mem(zeros), size);
  ASSERT_TRUE(CompareInto(*disk2, *backup, **bm, Small()).ok());
  EXPECT_EQ(Dirty(**bm), (std::vector<uint64_t>{size / (64 * KiB)}));
}

// A qcow2 image in memory written by LayerWriter.
std::shared_ptr<MemBlockIO> Qcow2(uint64_t size, const std::string& backing,
                                  const std::function<void(qcow2::LayerWriter&)>& fill) {
  auto io = std::make_shared<MemBlockIO>();
  qcow2::LayerOptions lo;
  lo.virtual_size = size;
  lo.cluster_size = 65536;
  if (!backing.empty()) {
    lo.backing_file = backing;
    lo.backing_format = "qcow2";
  }
  auto w = qcow2::LayerWriter::Create(io, lo);
  EXPECT_TRUE(w.ok());
  fill(**w);
  EXPECT_TRUE((*w)->Finish().ok());
  return io;
}

TEST(CompareTest, Qcow2ChainUnallocatedZeroAndDataClusters) {
  const uint64_t c = 64 * KiB, size = 16 * c;
  auto data = Random(size, 6);
  // base: clusters 0..7 data; top: cluster 2 zero cluster, cluster 3 new data,
  // cluster 9 all-zero data (stored as a zero cluster), the rest unallocated.
  auto base = Qcow2(size, "", [&](qcow2::LayerWriter& w) {
    ASSERT_TRUE(w.WriteData(0, std::span(data).first(8 * c)).ok());
  });
  auto top_data = Random(c, 7);
  auto top = Qcow2(size, "base.qcow2", [&](qcow2::LayerWriter& w) {
    ASSERT_TRUE(w.WriteZeroes(2 * c, c).ok());
    ASSERT_TRUE(w.WriteData(3 * c, top_data).ok());
    std::vector<std::byte> z(c);
    ASSERT_TRUE(w.WriteData(9 * c, z).ok());
  });
  qcow2::VolumeOptions vo;
  vo.open_file = [&](const std::string&) -> Result<std::shared_ptr<BlockIO>> {
    return std::shared_ptr<BlockIO>(base);
  };
  auto vol = qcow2::Volume::Open(top, "top.qcow2", vo);
  ASSERT_TRUE(vol.ok()) << vol.status().ToString();
  auto backup = LayerCompareInput(std::shared_ptr<qcow2::Layer>(std::move(*vol)));

  // The disk as the chain reads: equal everywhere.
  std::vector<std::byte> disk = data;
  std::memset(disk.data() + 2 * c, 0, c);
  std::memcpy(disk.data() + 3 * c, top_data.data(), c);
  std::memset(disk.data() + 8 * c, 0, 8 * c);
  auto bm = DirtyBitmap::Create(size, c);
  auto in = RawCompareInput(Mem(disk), size);
  ASSERT_TRUE(CompareInto(*in, *backup, **bm, Small()).ok());
  EXPECT_TRUE(Dirty(**bm).empty());

  // Changes over each kind: zero cluster (2), data over base (3), base
  // showing through (5), unallocated everywhere (12), zero data (9).
  for (uint64_t i : {2, 3, 5, 12, 9}) disk[i * c + 100] ^= std::byte{1};
  auto in2 = RawCompareInput(Mem(disk), size);
  ASSERT_TRUE(CompareInto(*in2, *backup, **bm, Small()).ok());
  EXPECT_EQ(Dirty(**bm), (std::vector<uint64_t>{2, 3, 5, 9, 12}));
}

class FailingInput final : public CompareInput {
 public:
  FailingInput(uint64_t size, uint64_t bad) : size_(size), bad_(bad) {}
  uint64_t size() const override { return size_; }
  Status Read(std::span<std::byte> out, uint64_t offset) override {
    reads++;
    if (offset <= bad_ && bad_ < offset + out.size()) return Status::IOError("bad sector");
    std::memset(out.data(), 0, out.size());
    return Status::OK();
  }
  std::atomic<int> reads{0};

 private:
  uint64_t size_, bad_;
};

TEST(CompareTest, AReadErrorOfEitherSideFailsTheCompare) {
  const uint64_t size = 64 * 64 * KiB;
  auto good = RawCompareInput(Mem(std::vector<std::byte>(size)), size);
  FailingInput bad(size, 10 * 64 * KiB + 5);
  auto bm = DirtyBitmap::Create(size, 64 * KiB);
  auto r = CompareInto(*good, bad, **bm, Small());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("bad sector"), std::string::npos);
  auto r2 = CompareInto(bad, *good, **bm, Small());
  ASSERT_FALSE(r2.ok());
  EXPECT_LT(bad.reads.load(), 2 * 64);  // the workers stopped early
}

TEST(CompareTest, BadArgumentsAreRefused) {
  std::vector<std::byte> a(4096);
  auto in = RawCompareInput(Mem(a), a.size());
  auto small = DirtyBitmap::Create(2048, 512);
  EXPECT_TRUE(CompareInto(*in, *in, **small).status().IsInvalidArgument());
  auto bm = DirtyBitmap::Create(4096, 512);
  CompareOptions o;
  o.chunk_bytes = 3 * MiB;
  EXPECT_TRUE(CompareInto(*in, *in, **bm, o).status().IsInvalidArgument());
  o = {};
  o.workers = 0;
  EXPECT_TRUE(CompareInto(*in, *in, **bm, o).status().IsInvalidArgument());
}

TEST(CompareTest, ProgressEndsAtTheTotalAndEmptyDiskWorks) {
  const uint64_t size = 10 * 64 * KiB + 1;
  std::vector<std::byte> a(size);
  uint64_t last = 0, calls = 0;
  CompareOptions o = Small();
  o.progress = [&](uint64_t d) {
    EXPECT_GT(d, last);
    last = d;
    ++calls;
  };
  Diff(a, a, 64 * KiB, o);
  EXPECT_EQ(last, size);
  EXPECT_EQ(calls, 11u);
  EXPECT_TRUE(Diff({}, {}, 64 * KiB).empty());
}

}  // namespace
}  // namespace cbt
