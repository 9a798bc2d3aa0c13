// Image: create/open/commit/in-place paths, judged by QEMU's own tools.
#include "qcow2/image.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "common/mem_io.h"
#include "qcow2/format.h"
#include "qcow2/test_util.h"

namespace cbt::qcow2 {
namespace {

using testing::NewFile;
using testing::OpenFile;
using testing::Sh;
using testing::Spec;
using testing::TempDir;
using testing::VectorSource;

nlohmann::json QemuInfo(const std::string& path) {
  auto r = Sh("qemu-img info --output=json " + path);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  return nlohmann::json::parse(r.out, nullptr, false);
}

int QemuCheck(const std::string& path, std::string* out = nullptr) {
  auto r = Sh("qemu-img check " + path);
  if (out) *out = r.out;
  return r.exit_code;
}

std::unique_ptr<Image> CreateAt(const std::string& path, uint64_t size, uint32_t cs = 65536,
                                std::string data_file = "") {
  auto img = Image::Create(NewFile(path), CreateOptions{size, cs, data_file});
  EXPECT_TRUE(img.ok()) << img.status().ToString();
  return img.ok() ? std::move(img).value() : nullptr;
}

TEST(ImageTest, CreatedContainerPassesQemuCheck) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  for (uint32_t cs : {512u, 4096u, 65536u, 2u << 20}) {
    std::string p = d / ("c" + std::to_string(cs));
    ASSERT_NE(CreateAt(p, 64 << 20, cs), nullptr);
    std::string out;
    EXPECT_EQ(QemuCheck(p, &out), 0) << out;
    auto j = QemuInfo(p);
    EXPECT_EQ(j["virtual-size"], 64 << 20);
    EXPECT_EQ(j["cluster-size"], cs);
  }
}

TEST(ImageTest, VirtualSizeIsRoundedUpTo512) {
  TempDir d;
  auto img = CreateAt(d / "c", 1000);
  ASSERT_NE(img, nullptr);
  EXPECT_EQ(img->virtual_size(), 1024u);
}

TEST(ImageTest, AddedBitmapsShowInQemuInfo) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "c";
  auto img = CreateAt(p, 64 << 20);
  ASSERT_NE(img, nullptr);
  auto specs = img->CurrentSpecs();
  specs.push_back(Spec("b0", 16, true, "", nullptr));
  specs.push_back(Spec("b1", 20, false, "", nullptr));
  ASSERT_OK(img->Commit(specs));
  img.reset();
  std::string out;
  EXPECT_EQ(QemuCheck(p, &out), 0) << out;
  auto j = QemuInfo(p);
  auto bm = j["format-specific"]["data"]["bitmaps"];
  ASSERT_EQ(bm.size(), 2u);
  EXPECT_EQ(bm[0]["name"], "b0");
  EXPECT_EQ(bm[0]["granularity"], 65536);
  EXPECT_EQ(bm[0]["flags"], nlohmann::json::array({"auto"}));
  EXPECT_EQ(bm[1]["name"], "b1");
  EXPECT_EQ(bm[1]["granularity"], 1 << 20);
  EXPECT_EQ(bm[1]["flags"], nlohmann::json::array());
}

TEST(ImageTest, DataWrittenByUsIsSeenByQemuNbd) {
  CBT_REQUIRE_QEMU();
  if (!testing::HaveTool("qemu-nbd") || !testing::HaveTool("nbdinfo"))
    GTEST_SKIP() << "qemu-nbd/nbdinfo missing";
  TempDir d;
  std::string p = d / "c";
  auto img = CreateAt(p, 64 << 20);
  ASSERT_NE(img, nullptr);
  VectorSource src(std::vector<std::byte>(65536), 65536);
  src.SetBit(0);
  src.SetBit(16);    // 1 MiB
  src.SetBit(1023);  // last granule (63.9375 MiB)
  ASSERT_OK(img->Commit({Spec("b0", 16, true, "", &src)}));
  img.reset();
  EXPECT_EQ(QemuCheck(p), 0);
  auto r = Sh("nbdinfo --map=qemu:dirty-bitmap:b0 -- [ qemu-nbd -r -f qcow2 -B b0 " + p + " ]");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("0       65536    1  dirty"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("1048576       65536    1  dirty"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("67043328       65536    1  dirty"), std::string::npos) << r.out;
}

TEST(ImageTest, QemuWrittenBitsAreReadBack) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "q.qcow2";
  for (uint32_t cs : {512u, 65536u, 2u << 20}) {
    std::filesystem::remove(p);
    ASSERT_EQ(
        Sh("qemu-img create -q -f qcow2 -o cluster_size=" + std::to_string(cs) + " " + p + " 100M")
            .exit_code,
        0);
    ASSERT_EQ(Sh("qemu-img bitmap --add -g 65536 " + p + " b0").exit_code, 0);
    ASSERT_EQ(Sh("qemu-img bitmap --add -g 512 " + p + " fine").exit_code, 0);
    auto w = Sh("qemu-io -f qcow2 -c 'write 0 1' -c 'write 1M 64k' -c 'write 99M 4k' " + p);
    ASSERT_EQ(w.exit_code, 0) << w.out;
    auto img = Image::Open(OpenFile(p, false));
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    EXPECT_EQ(testing::SetBits(**img, "b0"), (std::vector<uint64_t>{0, 16, 1584}));
    auto fine = testing::SetBits(**img, "fine");
    ASSERT_EQ(fine.size(), 1u + 128 + 8);
    EXPECT_EQ(fine[0], 0u);
    EXPECT_EQ(fine[1], 2048u);
  }
}

TEST(ImageTest, QemuBitmapCommandsWorkOnOurFiles) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "c";
  auto img = CreateAt(p, 64 << 20);
  ASSERT_OK(img->Commit({Spec("b0", 16, true, "", nullptr)}));
  img.reset();
  EXPECT_EQ(Sh("qemu-img bitmap --add " + p + " q1").exit_code, 0);
  EXPECT_EQ(Sh("qemu-img bitmap --disable " + p + " b0").exit_code, 0);
  EXPECT_EQ(Sh("qemu-img bitmap --merge q1 " + p + " b0").exit_code, 0);
  EXPECT_EQ(QemuCheck(p), 0);
  img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
  ASSERT_EQ(img->Bitmaps().size(), 2u);
  EXPECT_FALSE(img->Find("b0")->enabled);
  auto specs = img->CurrentSpecs();
  specs.erase(specs.begin());
  ASSERT_OK(img->Commit(specs));
  img.reset();
  EXPECT_EQ(QemuCheck(p), 0);
  EXPECT_EQ(Sh("qemu-img bitmap --remove " + p + " q1").exit_code, 0);
  std::string out;
  EXPECT_EQ(QemuCheck(p, &out), 0) << out;
  img = std::move(Image::Open(OpenFile(p, false))).value();
  EXPECT_TRUE(img->Bitmaps().empty());
  EXPECT_FALSE(img->header().autoclear & kAutoclearBitmaps);
}

TEST(ImageTest, RemovingLastBitmapDropsExtensionAndBit) {
  TempDir d;
  auto img = CreateAt(d / "c", 1 << 20);
  ASSERT_OK(img->Commit({Spec("b0", 16, true, "", nullptr)}));
  EXPECT_TRUE(img->header().autoclear & kAutoclearBitmaps);
  ASSERT_OK(img->Commit({}));
  EXPECT_FALSE(img->header().bitmaps.has_value());
  EXPECT_FALSE(img->header().autoclear & kAutoclearBitmaps);
}

TEST(ImageTest, CommitRejectsBadInput) {
  TempDir d;
  auto img = CreateAt(d / "c", 1 << 20);
  EXPECT_TRUE(img->Commit({Spec("", 16)}).IsInvalidArgument());
  EXPECT_TRUE(img->Commit({Spec(std::string(1024, 'x'), 16)}).IsInvalidArgument());
  EXPECT_TRUE(img->Commit({Spec(std::string("a\0b", 3), 16)}).IsInvalidArgument());
  EXPECT_TRUE(img->Commit({Spec("a", 16), Spec("a", 16)}).IsInvalidArgument());
  EXPECT_TRUE(img->Commit({Spec("a", 8)}).IsInvalidArgument());
  EXPECT_TRUE(img->Commit({Spec("a", 32)}).IsInvalidArgument());
  EXPECT_TRUE(img->Commit({Spec("a", 16, true, "nope")}).IsNotFound());
  EXPECT_TRUE(img->Bitmaps().empty());
}

TEST(ImageTest, FormatCornersPassQemu) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "c";
  // 16 TiB, 100 bitmaps, a 1023-byte name, granularity 4 KiB .. 2 GiB.
  auto img = CreateAt(p, 16ull << 40);
  ASSERT_NE(img, nullptr);
  std::vector<BitmapSpec> specs;
  for (int i = 0; i < 98; ++i)
    specs.push_back(Spec("b" + std::to_string(i), 16u + (i % 16), i % 2 == 0));
  specs.push_back(Spec(std::string(1023, 'n'), 31, true));
  specs.push_back(Spec("g4k", 12, true));
  ASSERT_OK(img->Commit(specs));
  img.reset();
  std::string out;
  EXPECT_EQ(QemuCheck(p, &out), 0) << out;
  auto j = QemuInfo(p);
  EXPECT_EQ(j["format-specific"]["data"]["bitmaps"].size(), 100u);
  // 512-byte granularity on a size that is not a multiple of it.
  std::string p2 = d / "c2";
  img = CreateAt(p2, 100 * 1000 * 1000 + 7, 512);
  ASSERT_OK(img->Commit({Spec("f", 9, true)}));
  img.reset();
  EXPECT_EQ(QemuCheck(p2, &out), 0) << out;
  EXPECT_EQ(Sh("qemu-img bitmap --clear " + p2 + " f").exit_code, 0);
}

TEST(ImageTest, InPlaceWriteOfOneSlotOn16TiBCostsOneClusterPlusMetadata) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "c";
  auto img = CreateAt(p, 16ull << 40);
  ASSERT_OK(img->Commit({Spec("b0", 16, true)}));
  const std::string names[] = {"b0"};
  ASSERT_OK(img->SetInUse(names, true));
  VectorSource src(std::vector<std::byte>(512 * 65536), 65536);
  src.SetBit(5ull * 8 * 65536 + 3);  // slot 5
  auto n = img->WriteSlots("b0", std::vector<uint64_t>{5}, src);
  ASSERT_TRUE(n.ok()) << n.status().ToString();
  EXPECT_EQ(*n, 65536u + 2 + 8);  // data + refcount entry + table entry
  // The second write to the same slot is in place: exactly one cluster.
  n = img->WriteSlots("b0", std::vector<uint64_t>{5}, src);
  EXPECT_EQ(*n, 65536u);
  ASSERT_OK(img->io()->flush());
  ASSERT_OK(img->SetInUse(names, false));
  img.reset();
  std::string out;
  EXPECT_EQ(QemuCheck(p, &out), 0) << out;
  auto again = Image::Open(OpenFile(p, false));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(testing::SetBits(**again, "b0"), (std::vector<uint64_t>{5ull * 8 * 65536 + 3}));
}

TEST(ImageTest, PreallocatedBitmapNeverAllocatesOnWrite) {
  TempDir d;
  auto img = CreateAt(d / "c", 1ull << 40);
  ASSERT_OK(img->Commit({Spec("b0", 16, true)}));
  ASSERT_OK(img->Preallocate("b0"));
  EXPECT_EQ(img->Find("b0")->data_clusters, img->Find("b0")->table_size);
  VectorSource src(std::vector<std::byte>(32 * 65536), 65536);
  src.SetBit(7);
  auto n = img->WriteSlots("b0", std::vector<uint64_t>{0}, src);
  EXPECT_EQ(*n, 65536u);
}

TEST(ImageTest, InconsistentBitmapIsRefusedExceptRemoval) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "q.qcow2";
  ASSERT_EQ(Sh("qemu-img create -q -f qcow2 " + p + " 64M").exit_code, 0);
  ASSERT_EQ(Sh("qemu-img bitmap --add " + p + " b0").exit_code, 0);
  ASSERT_EQ(Sh("qemu-img bitmap --add " + p + " b1").exit_code, 0);
  ASSERT_EQ(Sh("qemu-io -f qcow2 -c abort " + p).exit_code != 0, true);
  auto img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
  auto info = img->Find("b0");
  EXPECT_FALSE(info->consistent);
  EXPECT_TRUE(info->in_use);
  EXPECT_TRUE(
      img->ReadBitmap("b0", [](uint64_t, auto) { return Status::OK(); }).IsInvalidArgument());
  auto specs = img->CurrentSpecs();
  specs[0].enabled = false;
  EXPECT_TRUE(img->Commit(specs).IsInvalidArgument());
  // Kept unchanged while the other is removed: allowed, bytes kept.
  specs = img->CurrentSpecs();
  specs.pop_back();
  ASSERT_OK(img->Commit(specs));
  EXPECT_FALSE(img->Find("b0")->consistent);
  ASSERT_OK(img->Commit({}));
  img.reset();
  std::string out;
  EXPECT_EQ(QemuCheck(p, &out), 0) << out;
}

TEST(ImageTest, QemuLayoutHeaderIsRewrittenSafelyOnce) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "q.qcow2";
  ASSERT_EQ(Sh("qemu-img create -q -f qcow2 " + p + " 64M").exit_code, 0);
  ASSERT_EQ(Sh("qemu-img bitmap --add " + p + " b0").exit_code, 0);
  auto img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
  EXPECT_GT(img->header().bitmaps_ext_offset, 112u);  // after QEMU's feature table
  auto specs = img->CurrentSpecs();
  specs.push_back(Spec("b1", 16, true));
  ASSERT_OK(img->Commit(specs));
  uint64_t before = img->bytes_written();
  specs.pop_back();
  ASSERT_OK(img->Commit(specs));  // now a sector-0 switch
  EXPECT_LT(img->bytes_written() - before, 3u * 65536);
  img.reset();
  img = std::move(Image::Open(OpenFile(p, false))).value();
  EXPECT_EQ(img->header().bitmaps_ext_offset, 112u);
  EXPECT_NE(img->header().FindExtension(kExtFeatureTable), nullptr);
  std::string out;
  EXPECT_EQ(QemuCheck(p, &out), 0) << out;
}

TEST(ImageTest, PrivateExtensionSurvivesQemuRewrite) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "c";
  auto img = CreateAt(p, 64 << 20);
  std::vector<std::byte> rec(16, std::byte{0xab});
  ASSERT_OK(img->SetExtension(0xcb7c0001, rec));
  ASSERT_OK(img->Commit({Spec("b0", 16, true)}));
  img.reset();
  ASSERT_EQ(Sh("qemu-img bitmap --add " + p + " q").exit_code, 0);
  img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
  ASSERT_NE(img->GetExtension(0xcb7c0001), nullptr);
  EXPECT_EQ(*img->GetExtension(0xcb7c0001), rec);
  EXPECT_TRUE(img->SetExtension(kExtBitmaps, rec).IsInvalidArgument());
  ASSERT_OK(img->RemoveExtension(0xcb7c0001));
  EXPECT_EQ(img->GetExtension(0xcb7c0001), nullptr);
  img.reset();
  EXPECT_EQ(QemuCheck(p), 0);
}

TEST(ImageTest, ExternalDataFileContainerServesRawDataIntact) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string raw = d / "disk.raw";
  ASSERT_EQ(Sh("qemu-img create -q -f raw " + raw + " 8M").exit_code, 0);
  ASSERT_EQ(Sh("qemu-io -f raw -c 'write -P 0x5a 1M 64k' " + raw).exit_code, 0);
  std::string md5 = Sh("md5sum < " + raw).out;
  std::string p = d / "c";
  auto img = CreateAt(p, 8 << 20, 65536, raw);
  ASSERT_NE(img, nullptr);
  ASSERT_OK(img->Commit({Spec("b0", 16, true)}));
  img.reset();
  EXPECT_EQ(Sh("md5sum < " + raw).out, md5);
  std::string out;
  EXPECT_EQ(QemuCheck(p, &out), 0) << out;
  auto r = Sh("qemu-io -r -f qcow2 -c 'read -P 0x5a 1M 64k' -c 'read -P 0 0 1M' " + p);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
  auto j = QemuInfo(p);
  EXPECT_EQ(j["format-specific"]["data"]["data-file"], raw);
  EXPECT_EQ(j["format-specific"]["data"]["data-file-raw"], true);
  EXPECT_EQ(Sh("md5sum < " + raw).out, md5);
}

TEST(ImageTest, CreateRefusesRelativeDataFileAndBadClusterSize) {
  auto io = std::make_shared<MemBlockIO>();
  EXPECT_TRUE(
      Image::Create(io, CreateOptions{1 << 20, 65536, "rel.raw"}).status().IsInvalidArgument());
  EXPECT_TRUE(Image::Create(io, CreateOptions{1 << 20, 1000, ""}).status().IsInvalidArgument());
  EXPECT_TRUE(Image::Create(io, CreateOptions{1 << 20, 256, ""}).status().IsInvalidArgument());
}

TEST(ImageTest, ReadOnlyImageRefusesWrites) {
  TempDir d;
  CreateAt(d / "c", 1 << 20).reset();
  auto img = std::move(Image::Open(OpenFile(d / "c", false))).value();
  EXPECT_FALSE(img->Commit({Spec("b", 16)}).ok());
}

}  // namespace
}  // namespace cbt::qcow2
