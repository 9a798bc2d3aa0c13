// Bitmap directory/tables: QEMU's validation rules, bad files give clean
// errors (never a crash), and QEMU agrees about what is broken.
#include "qcow2/bitmap_dir.h"

#include <gtest/gtest.h>

#include <random>

#include "common/endian.h"
#include "common/mem_io.h"
#include "qcow2/image.h"
#include "qcow2/test_util.h"

namespace cbt::qcow2 {
namespace {

using testing::Sh;
using testing::Spec;
using testing::TempDir;

// A container with two bitmaps; returns its bytes.
std::vector<std::byte> TwoBitmapFile(uint64_t* dir_off) {
  auto mem = std::make_shared<MemBlockIO>();
  auto img = std::move(Image::Create(mem, CreateOptions{64 << 20, 65536, ""})).value();
  testing::VectorSource src(std::vector<std::byte>(65536), 65536);
  src.SetBit(3);
  EXPECT_OK(img->Commit({Spec("b0", 16, true, "", &src), Spec("b1", 20)}));
  *dir_off = img->header().bitmaps->directory_offset;
  return mem->contents();
}

Status OpenBytes(std::vector<std::byte> bytes) {
  return Image::Open(std::make_shared<MemBlockIO>(std::move(bytes))).status();
}

TEST(BitmapDirTest, TableSizeFollowsQemuFormula) {
  EXPECT_EQ(ExpectedTableSize(64 << 20, 16, 16), 1u);
  EXPECT_EQ(ExpectedTableSize(16ull << 40, 16, 16), 512u);
  EXPECT_EQ(ExpectedTableSize((64 << 20) + 512, 16, 16), 1u);
  EXPECT_EQ(ExpectedTableSize(2ull << 40, 9, 9), 1u << 20);
  EXPECT_TRUE(ValidateBitmapSize(2ull << 40, 9, 16).ok());
  EXPECT_TRUE(ValidateBitmapSize((2ull << 40) + 512, 9, 16).IsInvalidArgument());
}

TEST(BitmapDirTest, TableSizeIsDefinedForAnyInput) {
  // Shifts of 64 or more (granularity_bits is a u8 on disk) divide to 1.
  EXPECT_EQ(ExpectedTableSize(UINT64_MAX, 64, 9), 1u);
  EXPECT_EQ(ExpectedTableSize(1, 255, 255), 1u);
  EXPECT_EQ(ExpectedTableSize(0, 200, 200), 0u);
  EXPECT_EQ(ExpectedTableSize(UINT64_MAX, 0, 0), uint64_t{1} << 61);
  EXPECT_EQ(ExpectedTableSize(UINT64_MAX, 63, 63), 1u);
  EXPECT_EQ(ExpectedTableSize(uint64_t{1} << 40, 31, 9), 1u);  // 512 bits: 64 B
}

TEST(BitmapDirTest, DirectoryRoundTrips) {
  std::vector<BitmapDirEntry> e(2);
  e[0].name = "x";
  e[0].table_offset = 65536;
  e[0].table_size = 1;
  e[1].name = std::string(1023, 'n');
  e[1].table_offset = 2 * 65536;
  e[1].table_size = 1;
  e[1].flags = kBitmapFlagAuto;
  auto bytes = SerializeDirectory(e);
  EXPECT_EQ(bytes.size(), 32u + 1048u);
  auto back = ParseDirectory(bytes, 2, "t");
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(*back, e);
  EXPECT_TRUE(ParseDirectory(bytes, 1, "t").status().IsCorruption());
  EXPECT_TRUE(ParseDirectory(bytes, 3, "t").status().IsCorruption());
  EXPECT_TRUE(ValidateDirectory(*back, Geometry{16, 64 << 20}, "t").ok());
}

TEST(BitmapDirTest, EntryRulesMatchQemu) {
  Geometry g{16, 64 << 20};
  BitmapDirEntry ok;
  ok.name = "b";
  ok.table_offset = 65536;
  ok.table_size = 1;
  EXPECT_TRUE(ValidateDirEntry(ok, g, 0, "t").ok());
  auto bad = [&](auto mutate) {
    BitmapDirEntry e = ok;
    mutate(e);
    return ValidateDirEntry(e, g, 2, "disk.cbt");
  };
  Status s = bad([](auto& e) { e.table_offset = 0x1234; });
  EXPECT_EQ(s.message(),
            "disk.cbt: bitmap directory entry 2 'b': table offset 0x1234 not cluster aligned");
  EXPECT_TRUE(bad([](auto& e) { e.flags = 4; }).IsCorruption());  // extra_data_compatible
  EXPECT_TRUE(bad([](auto& e) { e.type = 2; }).IsCorruption());
  EXPECT_TRUE(bad([](auto& e) { e.granularity_bits = 8; }).IsCorruption());
  EXPECT_TRUE(bad([](auto& e) { e.granularity_bits = 32; }).IsCorruption());
  EXPECT_TRUE(bad([](auto& e) { e.table_size = 2; }).IsCorruption());
  EXPECT_TRUE(bad([](auto& e) { e.extra_data.resize(8); }).IsCorruption());
  EXPECT_TRUE(bad([](auto& e) { e.name.clear(); }).IsCorruption());
  // in_use: the size is not checked (QEMU loads it as inconsistent).
  EXPECT_TRUE(bad([](auto& e) { e.table_size = 2, e.flags = kBitmapFlagInUse; }).ok());
}

TEST(BitmapDirTest, TableEntryRulesMatchQemu) {
  for (uint64_t e : {0x50002ull, 0x50001ull, 0x50200ull, 0x0100000000050000ull, 0x2ull})
    EXPECT_TRUE(ValidateTableEntry(e, 16, 0, "t").IsCorruption()) << std::hex << e;
  for (uint64_t e : {0x0ull, 0x1ull, 0x50000ull})
    EXPECT_TRUE(ValidateTableEntry(e, 16, 0, "t").ok()) << std::hex << e;
}

TEST(BitmapDirTest, BadFilesGiveCleanErrors) {
  uint64_t dir = 0;
  auto good = TwoBitmapFile(&dir);
  ASSERT_TRUE(OpenBytes(good).ok());
  // Truncated at many lengths: Corruption (or NotSupported), never a crash.
  // (Data clusters are read on demand, so cut only through metadata.)
  for (uint64_t n = 0; n < dir + 64; n += (n < 1024 ? 7 : 4099)) {
    Status s = OpenBytes(std::vector<std::byte>(good.begin(), good.begin() + n));
    EXPECT_FALSE(s.ok()) << n;
    EXPECT_TRUE(s.IsCorruption()) << n << ": " << s.ToString();
  }
  auto tamper = [&](uint64_t off, uint64_t v, int width) {
    auto b = good;
    if (width == 8) StoreBE64(b.data() + off, v);
    if (width == 4) StoreBE32(b.data() + off, v);
    if (width == 1) b[off] = std::byte(v);
    return OpenBytes(std::move(b));
  };
  EXPECT_TRUE(tamper(0, 0, 4).IsCorruption());                    // magic
  EXPECT_TRUE(tamper(112 + 8, 3, 4).IsCorruption());              // nb_bitmaps
  EXPECT_TRUE(tamper(112 + 12, 1, 4).IsCorruption());             // reserved
  EXPECT_TRUE(tamper(112 + 24, dir + 8, 8).IsCorruption());       // dir offset
  EXPECT_TRUE(tamper(112 + 16, 8, 8).IsCorruption());             // dir size
  EXPECT_TRUE(tamper(dir, 0x1234, 8).IsCorruption());             // table offset
  EXPECT_TRUE(tamper(dir + 12, 4, 4).IsCorruption());             // flags bit 2
  EXPECT_TRUE(tamper(dir + 17, 40, 1).IsCorruption());            // granularity
  EXPECT_TRUE(tamper(dir + 32 + 24 + 1, '0', 1).IsCorruption());  // "b1" -> "b0"
  uint64_t table = LoadBE64(good.data() + dir);
  Status s = tamper(table, 0x50002, 8);
  EXPECT_TRUE(s.IsCorruption());
  EXPECT_NE(s.message().find("bitmap 'b0'"), std::string::npos) << s.message();
}

TEST(BitmapDirTest, QemuAgreesOurRefusalsAreBroken) {
  CBT_REQUIRE_QEMU();
  uint64_t dir = 0;
  auto good = TwoBitmapFile(&dir);
  TempDir d;
  auto write = [&](const std::vector<std::byte>& b) {
    auto f = testing::NewFile(d / "x");
    EXPECT_OK(f->pwrite(b, 0));
    return d / "x";
  };
  auto b = good;
  b[dir + 32 + 24 + 1] = std::byte{'0'};  // duplicate name
  std::string p = write(b);
  EXPECT_NE(Sh("qemu-img info " + p).exit_code, 0);
  std::filesystem::remove(p);
  b = good;
  StoreBE32(b.data() + dir + 12, 6);
  p = write(b);
  EXPECT_NE(Sh("qemu-img info " + p).exit_code, 0);
}

TEST(BitmapDirTest, RandomCorruptionNeverCrashes) {
  uint64_t dir = 0;
  auto good = TwoBitmapFile(&dir);
  std::mt19937_64 rng(42);
  for (int i = 0; i < 3000; ++i) {
    auto b = good;
    int flips = 1 + rng() % 4;
    for (int k = 0; k < flips; ++k) {
      uint64_t region = rng() % 3;
      uint64_t off = region == 0 ? rng() % 256 : region == 1 ? dir + rng() % 72 : rng() % b.size();
      b[off] = std::byte(rng());
    }
    (void)OpenBytes(std::move(b));
  }
}

}  // namespace
}  // namespace cbt::qcow2
