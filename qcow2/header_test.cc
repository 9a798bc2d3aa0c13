// Header: round trips, unknown extensions, feature refusal, torn switches.
#include "qcow2/header.h"

#include <gtest/gtest.h>

#include <cctype>
#include <cstring>

#include "common/endian.h"
#include "common/mem_io.h"
#include "qcow2/format.h"
#include "qcow2/image.h"
#include "qcow2/test_util.h"

namespace cbt::qcow2 {
namespace {

using testing::Spec;

Header Sample() {
  Header h;
  h.cluster_bits = 16;
  h.size = 1 << 30;
  h.refcount_table_offset = 65536;
  h.refcount_table_clusters = 1;
  h.l1_table_offset = 3 * 65536;
  h.l1_size = 2;
  h.header_tail.assign(8, std::byte{0});
  return h;
}

TEST(HeaderTest, RoundTripKeepsEveryField) {
  Header h = Sample();
  h.bitmaps = BitmapsExtension{3, 0, 96, 5 * 65536};
  h.autoclear = kAutoclearBitmaps;
  h.backing_file = "base.qcow2";
  h.SetExtension(kExtBackingFormat, {std::byte{'q'}});
  auto bytes = SerializeHeader(h);
  ASSERT_TRUE(bytes.ok());
  auto back = ParseHeader(*bytes, "t");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_EQ(back->bitmaps, h.bitmaps);
  EXPECT_EQ(back->bitmaps_ext_offset, 112u);
  EXPECT_EQ(back->backing_file, "base.qcow2");
  EXPECT_EQ(back->extensions, h.extensions);
  EXPECT_EQ(back->size, h.size);
}

TEST(HeaderTest, UnknownExtensionSurvivesRewrite) {
  Header h = Sample();
  std::vector<std::byte> odd = {std::byte{1}, std::byte{2}, std::byte{3}};
  h.SetExtension(0x12345678, odd);
  auto bytes = SerializeHeader(h);
  auto back = ParseHeader(*bytes, "t");
  ASSERT_TRUE(back.ok());
  auto again = SerializeHeader(*back);
  EXPECT_EQ(*again, *bytes);
  ASSERT_NE(back->FindExtension(0x12345678), nullptr);
  EXPECT_EQ(back->FindExtension(0x12345678)->data, odd);
}

TEST(HeaderTest, UnknownHeaderTailIsKept) {
  Header h = Sample();
  h.header_length = 120;
  h.header_tail.assign(16, std::byte{0});
  h.header_tail[9] = std::byte{0x77};
  auto back = ParseHeader(*SerializeHeader(h), "t");
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->header_tail, h.header_tail);
}

TEST(HeaderTest, UnknownIncompatibleFeatureIsRefusedByName) {
  Header h = Sample();
  h.incompatible = 1ull << 9;
  std::vector<std::byte> ft(48);
  ft[0] = std::byte{0};
  ft[1] = std::byte{9};
  std::memcpy(ft.data() + 2, "frobnication", 12);
  h.SetExtension(kExtFeatureTable, ft);
  auto back = ParseHeader(*SerializeHeader(h), "disk.cbt");
  ASSERT_TRUE(back.ok());
  Status s = CheckFeatures(*back, false, "disk.cbt");
  EXPECT_TRUE(s.IsNotSupported());
  EXPECT_NE(s.message().find("frobnication"), std::string::npos) << s.message();
  h.incompatible = kIncompatCorrupt;
  back = ParseHeader(*SerializeHeader(h), "disk.cbt");
  EXPECT_TRUE(CheckFeatures(*back, false, "disk.cbt").ok());
  s = CheckFeatures(*back, true, "disk.cbt");
  EXPECT_TRUE(s.IsCorruption());
  EXPECT_NE(s.message().find("corrupt"), std::string::npos);
}

TEST(HeaderTest, BadHeadersGiveCleanErrors) {
  auto good = *SerializeHeader(Sample());
  EXPECT_TRUE(ParseHeader(std::span(good).first(50), "t").status().IsCorruption());
  auto bad = good;
  bad[0] = std::byte{0};
  EXPECT_NE(ParseHeader(bad, "t").status().message().find("magic"), std::string::npos);
  bad = good;
  StoreBE32(bad.data() + 20, 30);  // cluster_bits
  EXPECT_TRUE(ParseHeader(bad, "t").status().IsNotSupported());
  bad = good;
  StoreBE32(bad.data() + 112, 0x1234);
  StoreBE32(bad.data() + 116, 0xffffff);  // extension too large
  EXPECT_TRUE(ParseHeader(bad, "t").status().IsCorruption());
  bad = good;
  StoreBE64(bad.data() + 48, 1000);  // refcount table misaligned
  EXPECT_TRUE(ParseHeader(bad, "t").status().IsCorruption());
}

TEST(HeaderTest, ExtensionsThatDoNotFitAreRefused) {
  Header h = Sample();
  h.cluster_bits = 9;
  h.SetExtension(0x1, std::vector<std::byte>(400));
  EXPECT_TRUE(SerializeHeader(h).status().IsInvalidArgument());
}

// Records every write so a test can reason about torn writes.
class LoggingIO final : public BlockIO {
 public:
  struct Op {
    bool flush;
    uint64_t offset;
    std::vector<std::byte> data;
  };
  explicit LoggingIO(std::shared_ptr<BlockIO> io) : io_(std::move(io)) {}
  Status pread(std::span<std::byte> out, uint64_t off) override { return io_->pread(out, off); }
  Status pwrite(std::span<const std::byte> in, uint64_t off) override {
    ops.push_back(Op{false, off, {in.begin(), in.end()}});
    return io_->pwrite(in, off);
  }
  Status flush() override {
    ops.push_back(Op{true, 0, {}});
    return io_->flush();
  }
  Result<uint64_t> size() override { return io_->size(); }
  Status resize(uint64_t n) override { return io_->resize(n); }
  const char* name() const override { return "log"; }
  std::vector<Op> ops;

 private:
  std::shared_ptr<BlockIO> io_;
};

TEST(HeaderTest, TornHeaderNeverLeavesBitWithoutDirectory) {
  auto mem = std::make_shared<MemBlockIO>();
  ASSERT_TRUE(Image::Create(mem, CreateOptions{64 << 20, 65536, ""}).ok());
  auto log = std::make_shared<LoggingIO>(mem);
  auto img = std::move(Image::Open(log, {.writable = true})).value();
  ASSERT_OK(img->Commit({Spec("a", 16), Spec("b", 20)}));
  ASSERT_OK(img->Commit({Spec("a", 16, true, "a")}));
  // Every write into cluster 0 is one sector at offset 0 (atomic), and it
  // comes after a flush that follows every write of new metadata.
  bool flushed_since_meta = true;
  int header_writes = 0;
  for (const auto& op : log->ops) {
    if (op.flush) {
      flushed_since_meta = true;
      continue;
    }
    if (op.offset < 65536) {
      ++header_writes;
      EXPECT_EQ(op.offset, 0u);
      EXPECT_LE(op.data.size(), 512u);
      EXPECT_TRUE(flushed_since_meta);
    } else {
      flushed_since_meta = false;
    }
  }
  EXPECT_EQ(header_writes, 2);
}

TEST(HeaderTest, ForeignLayoutSwitchNeverClearsTheBitmapsBit) {
  // A header whose bitmaps extension is not first (QEMU's layout).
  auto mem = std::make_shared<MemBlockIO>();
  ASSERT_TRUE(Image::Create(mem, CreateOptions{64 << 20, 65536, ""}).ok());
  {
    auto img = std::move(Image::Open(mem, {.writable = true})).value();
    ASSERT_OK(img->Commit({Spec("a", 16)}));
  }
  auto bytes = mem->contents();
  auto h = *ParseHeader(std::span(bytes).first(65536), "t");
  // Rebuild with a 600-byte unknown extension before the bitmaps one.
  std::vector<std::byte> area(65536 - 112);
  uint64_t off = 0;
  StoreBE32(area.data(), 0x77777777);
  StoreBE32(area.data() + 4, 600);
  off = 608;
  StoreBE32(area.data() + off, kExtBitmaps);
  StoreBE32(area.data() + off + 4, 24);
  StoreBE32(area.data() + off + 8, h.bitmaps->nb_bitmaps);
  StoreBE64(area.data() + off + 16, h.bitmaps->directory_size);
  StoreBE64(area.data() + off + 24, h.bitmaps->directory_offset);
  ASSERT_OK(mem->pwrite(area, 112));
  auto log = std::make_shared<LoggingIO>(mem);
  auto img = std::move(Image::Open(log, {.writable = true})).value();
  EXPECT_EQ(img->header().bitmaps_ext_offset, 112u + 608);
  ASSERT_OK(img->Commit({Spec("a", 16, true, "a"), Spec("b", 16)}));
  // No write into the header ever clears autoclear bit 0 (QEMU's dance
  // does, and a crash there loses every bitmap), and header sector 0 is
  // only ever written whole.
  int sector0_writes = 0;
  for (const auto& op : log->ops) {
    if (op.flush || op.offset >= 512) continue;
    EXPECT_EQ(op.offset, 0u);
    ASSERT_GE(op.data.size(), 512u);
    EXPECT_TRUE(LoadBE64(op.data.data() + kOffAutoclear) & kAutoclearBitmaps);
    ++sector0_writes;
  }
  EXPECT_GE(sector0_writes, 2);  // through an intermediate header
  auto reopened = std::move(Image::Open(mem)).value();
  EXPECT_EQ(reopened->Bitmaps().size(), 2u);
  EXPECT_EQ(reopened->header().bitmaps_ext_offset, 112u);
  ASSERT_NE(reopened->header().FindExtension(0x77777777), nullptr);
}

// QEMU's qcow2_do_open rule: l1_size >= size_to_l1(size), which must fit an
// int. Message fragment expected from both QEMU and us per case.
TEST(HeaderTest, L1SizeMustCoverTheVirtualSize) {
  Header h = Sample();  // 1 GiB, 64 KiB clusters: 2 L2 tables' worth
  h.l1_size = 1;
  auto st = ParseHeader(*SerializeHeader(h), "t").status();
  EXPECT_TRUE(st.IsCorruption());
  EXPECT_NE(st.message().find("L1 table is too small"), std::string::npos) << st.ToString();
  h.l1_size = 2;
  EXPECT_TRUE(ParseHeader(*SerializeHeader(h), "t").ok());
  h.incompatible = kIncompatExtendedL2;  // 16-byte L2 entries: 4 needed
  EXPECT_TRUE(ParseHeader(*SerializeHeader(h), "t").status().IsCorruption());
  h.l1_size = 4;
  EXPECT_TRUE(ParseHeader(*SerializeHeader(h), "t").ok());
  h = Sample();
  h.size = 0;
  h.l1_size = 0;
  EXPECT_TRUE(ParseHeader(*SerializeHeader(h), "t").ok());
  h.l1_table_offset = uint64_t{1} << 63;  // table end past INT64_MAX
  EXPECT_TRUE(ParseHeader(*SerializeHeader(h), "t").status().IsCorruption());
}

TEST(HeaderTest, L1SizeRulesAgreeWithQemu) {
  CBT_REQUIRE_QEMU();
  using testing::Sh;
  testing::TempDir d;
  struct Case {
    uint32_t cluster_size;
    uint64_t size;  // patched into the header
    uint32_t l1_size;
    const char* qemu_says;  // nullptr: opens
  } cases[] = {
      {65536, 1 << 20, 0, "L1 table is too small"},  // fuzz finding
      {65536, 1 << 20, 1, nullptr},
      {65536, (uint64_t{1} << 29) + 512, 1, "L1 table is too small"},
      {512, uint64_t{1} << 46, 1, "Image is too big"},
      {512, (uint64_t{1} << 46) - (1 << 15), 1, "L1 table is too small"},
  };
  int n = 0;
  for (const Case& c : cases) {
    std::string p = d / ("c" + std::to_string(n++));
    ASSERT_EQ(Sh("qemu-img create -q -f qcow2 -o cluster_size=" + std::to_string(c.cluster_size) +
                 " " + p + " 1M")
                  .exit_code,
              0);
    {
      auto f = testing::OpenFile(p, true);
      std::byte b[8];
      StoreBE64(b, c.size);
      ASSERT_OK(f->pwrite(b, 24));
      StoreBE32(b, c.l1_size);
      ASSERT_OK(f->pwrite(std::span(b).first(4), 36));
    }
    auto q = Sh("qemu-img info " + p);
    auto img = Image::Open(testing::OpenFile(p, false));
    if (!c.qemu_says) {
      EXPECT_EQ(q.exit_code, 0) << q.out;
      EXPECT_TRUE(img.ok()) << img.status().ToString();
      continue;
    }
    EXPECT_NE(q.exit_code, 0);
    EXPECT_NE(q.out.find(c.qemu_says), std::string::npos) << q.out;
    ASSERT_FALSE(img.ok()) << p;
    EXPECT_TRUE(img.status().IsCorruption());
    std::string msg = img.status().message();
    std::string want = c.qemu_says;
    want[0] = static_cast<char>(std::tolower(want[0]));  // "image is too big"
    EXPECT_TRUE(msg.find(c.qemu_says) != std::string::npos || msg.find(want) != std::string::npos)
        << msg;
  }
}

}  // namespace
}  // namespace cbt::qcow2
