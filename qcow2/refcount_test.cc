// Refcounts: every refcount width, block and table growth, judged by qemu-img.
#include "qcow2/refcount.h"

#include <gtest/gtest.h>

#include "qcow2/test_util.h"

namespace cbt::qcow2 {
namespace {

using testing::NewFile;
using testing::OpenFile;
using testing::Sh;
using testing::Spec;
using testing::TempDir;
using testing::VectorSource;

// A source with every slot dirty.
class FullSource final : public BitmapDataSource {
 public:
  bool SlotIsZero(uint64_t) const override { return false; }
  void FillSlot(uint64_t, std::span<std::byte> out) const override {
    std::fill(out.begin(), out.end(), std::byte{0x55});
  }
};

TEST(RefcountTest, EveryRefcountWidthAllocatesAndFrees) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  for (int bits : {1, 2, 4, 8, 16, 32, 64}) {
    std::string p = d / ("r" + std::to_string(bits));
    ASSERT_EQ(Sh("qemu-img create -q -f qcow2 -o cluster_size=4096,refcount_bits=" +
                 std::to_string(bits) + " " + p + " 256M")
                  .exit_code,
              0);
    auto img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
    FullSource src;
    ASSERT_OK(img->Commit({Spec("a", 9, true, "", &src), Spec("b", 12, true, "", &src)}));
    auto specs = img->CurrentSpecs();
    specs.erase(specs.begin());
    ASSERT_OK(img->Commit(specs));
    img.reset();
    auto r = Sh("qemu-img check " + p);
    EXPECT_EQ(r.exit_code, 0) << "refcount_bits=" << bits << "\n" << r.out;
    r = Sh("qemu-img bitmap --remove " + p + " b && qemu-img check " + p);
    EXPECT_EQ(r.exit_code, 0) << r.out;
  }
}

TEST(RefcountTest, BlocksAndTableGrowWhenTheFileDoes) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "c";
  // 512-byte clusters: one refcount block covers 256 clusters (128 KiB) and
  // the one-cluster table 64 blocks (8 MiB): a 1 GiB bitmap at 512 B
  // granularity (256 KiB of data) forces new blocks; several force growth.
  auto img = std::move(Image::Create(NewFile(p), CreateOptions{1ull << 30, 512, ""})).value();
  uint32_t table_clusters = img->refcounts().table_clusters();
  FullSource src;
  std::vector<BitmapSpec> specs;
  for (int i = 0; i < 40; ++i) specs.push_back(Spec("b" + std::to_string(i), 9, true, "", &src));
  ASSERT_OK(img->Commit(specs));
  EXPECT_GT(img->refcounts().table_clusters(), table_clusters);
  img.reset();
  auto r = Sh("qemu-img check " + p);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
  EXPECT_EQ(img->Bitmaps().size(), 40u);
  ASSERT_OK(img->Commit({}));
  img.reset();
  r = Sh("qemu-img check " + p);
  EXPECT_EQ(r.exit_code, 0) << r.out;
}

TEST(RefcountTest, FreedClustersAreReusedFirstFit) {
  TempDir d;
  auto img = std::move(Image::Create(NewFile(d / "c"), CreateOptions{64 << 20, 65536, ""})).value();
  ASSERT_OK(img->Commit({Spec("a", 16)}));
  uint64_t dir1 = img->header().bitmaps->directory_offset;
  ASSERT_OK(img->Commit({}));
  ASSERT_OK(img->Commit({Spec("a", 16)}));
  EXPECT_LE(img->header().bitmaps->directory_offset, dir1 + 65536);
  EXPECT_EQ(*img->refcounts().Get(0), 1u);
  EXPECT_TRUE(img->refcounts().Free(10ull << 30, 1).IsCorruption());
}

}  // namespace
}  // namespace cbt::qcow2
