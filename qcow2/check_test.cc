// Check: exit codes and leak repair, cross-checked with qemu-img check.
#include "qcow2/check.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cctype>
#include <cstdio>
#include <map>
#include <memory>

#include "common/endian.h"
#include "qcow2/check_count.h"
#include "qcow2/format.h"
#include "qcow2/test_util.h"

namespace cbt::qcow2 {
namespace {

using testing::HaveTool;
using testing::NewFile;
using testing::OpenFile;
using testing::SetBits;
using testing::Sh;
using testing::Spec;
using testing::TempDir;
using testing::VectorSource;

// Writes bytes as a new file at path.
void WriteFile(const std::string& path, const std::vector<std::byte>& bytes) {
  auto f = NewFile(path);
  ASSERT_NE(f, nullptr);
  ASSERT_OK(f->pwrite(bytes, 0));
  ASSERT_OK(f->flush());
}

// A number qemu-img check prints before `what` ("8 errors were found"), 0
// when the line is absent.
uint64_t QemuCount(const std::string& out, const std::string& what) {
  // Plain search: std::regex trips a GCC 12 -Wmaybe-uninitialized false
  // positive in the sanitizer build.
  size_t at = out.find(" " + what);
  if (at == std::string::npos) return 0;
  size_t start = at;
  while (start > 0 && std::isdigit(static_cast<unsigned char>(out[start - 1]))) --start;
  return start == at ? 0 : std::stoull(out.substr(start, at - start));
}

// A v3 header (header_length 112) into the first bytes of f.
void PutHeader(std::vector<std::byte>& f, uint32_t cluster_bits, uint64_t size, uint32_t l1_size,
               uint64_t l1_off, uint64_t rt_off, uint32_t rt_clusters, uint32_t refcount_order) {
  StoreBE32(f.data(), kMagic);
  StoreBE32(f.data() + 4, 3);
  StoreBE32(f.data() + 20, cluster_bits);
  StoreBE64(f.data() + 24, size);
  StoreBE32(f.data() + 36, l1_size);
  StoreBE64(f.data() + 40, l1_off);
  StoreBE64(f.data() + 48, rt_off);
  StoreBE32(f.data() + 56, rt_clusters);
  StoreBE32(f.data() + 96, refcount_order);
  StoreBE32(f.data() + 100, kOurHeaderLength);
}

TEST(CheckTest, FreshContainerIsClean) {
  TempDir d;
  auto img = std::move(Image::Create(NewFile(d / "c"), CreateOptions{64 << 20, 65536, ""})).value();
  ASSERT_OK(img->Commit({Spec("b0", 16)}));
  auto rep = Check(*img, false);
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->ExitCode(), 0);
  EXPECT_EQ(rep->corruptions, 0u);
}

TEST(CheckTest, LeakFromStaleExtensionIsFoundAndRepaired) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "c";
  auto img = std::move(Image::Create(NewFile(p), CreateOptions{64 << 20, 65536, ""})).value();
  ASSERT_OK(img->Commit({Spec("b0", 16)}));
  img.reset();
  // An old program clears autoclear bit 0: the bitmap's clusters now leak.
  ASSERT_EQ(Sh("printf '\\000' | dd of=" + p + " bs=1 seek=95 conv=notrunc status=none").exit_code,
            0);
  EXPECT_EQ(Sh("qemu-img check " + p).exit_code, 3);
  // Read-only, the bitmaps are hidden as QEMU hides them: their clusters leak.
  img = std::move(Image::Open(OpenFile(p, false))).value();
  EXPECT_TRUE(img->stale_bitmaps_extension());
  auto rep = Check(*img, false);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->ExitCode(), 3);
  EXPECT_EQ(rep->leaks, 2u);  // directory + table
  img.reset();
  // A writer (a repair freeing those "leaks" would destroy the bitmaps) is
  // refused with the way to keep them.
  auto w = Image::Open(OpenFile(p, true), {.writable = true});
  ASSERT_FALSE(w.ok());
  EXPECT_TRUE(w.status().IsCorruption());
  EXPECT_NE(w.status().message().find("cbt recover"), std::string::npos) << w.status().message();
  // Adopted for recovery, the bitmap is there, in use (untrusted), and
  // nothing leaks.
  img = std::move(Image::Open(OpenFile(p, true), {.writable = true, .adopt_stale_bitmaps = true}))
            .value();
  ASSERT_EQ(img->Bitmaps().size(), 1u);
  EXPECT_FALSE(img->Bitmaps()[0].consistent);
  rep = Check(*img, false);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->ExitCode(), 0);
}

TEST(CheckTest, DirectoryWithRefcountZeroIsCorruptionAndRepairDropsItsBitmap) {
  TempDir d;
  std::string p = d / "c";
  auto img = std::move(Image::Create(NewFile(p), CreateOptions{64 << 20, 65536, ""})).value();
  ASSERT_OK(img->Commit({Spec("b0", 16)}));
  // Lower the refcount of the directory cluster to 0: referenced but free.
  ASSERT_OK(img->refcounts().Set(img->header().bitmaps->directory_offset / 65536, 0));
  auto rep = Check(*img, false);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->ExitCode(), 2);
  EXPECT_EQ(rep->corruptions, 1u);
  ASSERT_EQ(rep->untrusted_bitmaps.size(), 1u);
  EXPECT_NE(rep->untrusted_bitmaps[0].reason.find("directory cluster"), std::string::npos);
  rep = Check(*img, true);
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->ExitCode(), 0);
  EXPECT_EQ(rep->dropped_bitmaps, std::vector<std::string>{"b0"});
  EXPECT_EQ(rep->corruptions_fixed, 1u);
  EXPECT_TRUE(img->Bitmaps().empty());
  img.reset();
  if (HaveTool("qemu-img")) {
    auto q = Sh("qemu-img check " + p);
    EXPECT_EQ(q.exit_code, 0) << q.out;
  }
}

// --- Repair: untrusted bitmaps are dropped, the others kept intact. ---

// A 64 MiB container with bitmaps a, b, c (64 KiB granularity), each with
// its own bits set (one data cluster each).
void MakeThreeBitmaps(const std::string& p) {
  auto img = std::move(Image::Create(NewFile(p), CreateOptions{64 << 20, 65536, ""})).value();
  std::vector<std::unique_ptr<VectorSource>> src;
  for (int i = 0; i < 3; ++i) {
    src.push_back(std::make_unique<VectorSource>(std::vector<std::byte>(128), 65536));
    for (uint64_t bit : {uint64_t(i), uint64_t(100 + 7 * i), uint64_t(1000 - i)})
      src.back()->SetBit(bit);
  }
  ASSERT_OK(
      img->Commit({Spec("a", 16, true, "", src[0].get()), Spec("b", 16, true, "", src[1].get()),
                   Spec("c", 16, false, "", src[2].get())}));
}

std::map<std::string, std::vector<uint64_t>> AllBits(const std::string& p) {
  std::map<std::string, std::vector<uint64_t>> out;
  auto img = Image::Open(OpenFile(p, false));
  EXPECT_TRUE(img.ok()) << img.status().ToString();
  if (!img.ok()) return out;
  for (const BitmapInfo& b : (*img)->Bitmaps()) {
    Status s = (*img)->ReadBitmap(
        b.name, [](uint64_t, std::span<const std::byte>) { return Status::OK(); });
    if (s.ok()) out[b.name] = SetBits(**img, b.name);  // else: unreadable (past EOF)
  }
  return out;
}

// Writes a big-endian u64 at off.
void Poke64(const std::string& p, uint64_t off, uint64_t v) {
  std::byte b[8];
  StoreBE64(b, v);
  auto f = OpenFile(p, true);
  ASSERT_NE(f, nullptr);
  ASSERT_OK(f->pwrite(b, off));
  ASSERT_OK(f->flush());
}

struct Layout {
  uint64_t table[3];
  uint64_t data[3];
  uint64_t l1;
};
Layout GetLayout(const std::string& p) {
  auto img = std::move(Image::Open(OpenFile(p, false))).value();
  Layout l{};
  for (size_t i = 0; i < 3; ++i) {
    l.table[i] = img->dir_entries()[i].table_offset;
    l.data[i] = img->table(i)[0] & kTableEntryOffsetMask;
  }
  l.l1 = img->header().l1_table_offset;
  return l;
}

// Runs Check(repair) on p; expects `dropped` dropped, a clean result, the
// other bitmaps' bits unchanged, and qemu-img check/info to agree.
void ExpectRepairDrops(const std::string& p, const std::vector<std::string>& dropped) {
  auto before = AllBits(p);
  {
    auto img = std::move(Image::Open(OpenFile(p, false))).value();
    auto rep = Check(*img, false);
    ASSERT_TRUE(rep.ok()) << rep.status().ToString();
    EXPECT_EQ(rep->ExitCode(), 2);
    std::vector<std::string> untrusted;
    for (const auto& u : rep->untrusted_bitmaps) untrusted.push_back(u.name);
    EXPECT_EQ(untrusted, dropped);
  }
  auto img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
  auto rep = Check(*img, true);
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->ExitCode(), 0) << ::testing::PrintToString(rep->messages);
  EXPECT_EQ(rep->dropped_bitmaps, dropped);
  EXPECT_GE(rep->corruptions_fixed, 1u);
  EXPECT_TRUE(rep->untrusted_bitmaps.empty());
  for (const std::string& n : dropped) {
    bool said = false;
    for (const auto& m : rep->messages) said |= m.rfind("Dropped bitmap '" + n + "': its ", 0) == 0;
    EXPECT_TRUE(said) << n;
  }
  img.reset();
  auto after = AllBits(p);
  for (const std::string& n : dropped) before.erase(n);
  EXPECT_EQ(after, before);
  // A second repair has nothing to do.
  img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
  rep = Check(*img, true);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->ExitCode(), 0);
  EXPECT_EQ(rep->leaks_fixed + rep->corruptions_fixed, 0u);
  img.reset();
  if (!HaveTool("qemu-img")) return;
  auto q = Sh("qemu-img check " + p);
  EXPECT_EQ(q.exit_code, 0) << q.out;
  EXPECT_EQ(Sh("qemu-img info " + p).exit_code, 0);
}

TEST(CheckRepairTest, DataClusterOnAnotherBitmapsTableDropsBoth) {
  // Which of the two was written last is unknown: a's bits may be b's
  // table, or b's table a's (zeroed) bits. Both go; c stays.
  TempDir d;
  std::string p = d / "c";
  MakeThreeBitmaps(p);
  Layout l = GetLayout(p);
  Poke64(p, l.table[0], l.table[1]);
  if (HaveTool("qemu-img")) {
    EXPECT_EQ(Sh("qemu-img check " + p).exit_code, 2);
  }
  ExpectRepairDrops(p, {"a", "b"});
}

TEST(CheckRepairTest, DataClusterOnOtherMetadataDropsOnlyThatBitmap) {
  TempDir d;
  std::string p = d / "c";
  MakeThreeBitmaps(p);
  Layout l = GetLayout(p);
  Poke64(p, l.table[0], l.l1);  // a's data cluster is the L1 table
  ExpectRepairDrops(p, {"a"});
}

TEST(CheckRepairTest, DataClusterWithRefcountZeroDropsOnlyThatBitmap) {
  TempDir d;
  std::string p = d / "c";
  MakeThreeBitmaps(p);
  Layout l = GetLayout(p);
  {
    auto img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
    ASSERT_OK(img->refcounts().Set(l.data[1] / 65536, 0));
    ASSERT_OK(img->io()->flush());
  }
  ExpectRepairDrops(p, {"b"});
}

TEST(CheckRepairTest, DataClusterPastTheEndDropsOnlyThatBitmap) {
  TempDir d;
  std::string p = d / "c";
  MakeThreeBitmaps(p);
  Layout l = GetLayout(p);
  Poke64(p, l.table[2], uint64_t{1} << 40);
  ExpectRepairDrops(p, {"c"});
}

TEST(CheckRepairTest, SharedClusterWhoseRefcountCoversBothIsStillCorruption) {
  // What qemu-img check -r all leaves: it raises the refcount to 2, and
  // then calls the file clean although a and b still share a cluster.
  TempDir d;
  std::string p = d / "c";
  MakeThreeBitmaps(p);
  Layout l = GetLayout(p);
  Poke64(p, l.table[0], l.table[1]);
  {
    auto img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
    ASSERT_OK(img->refcounts().Set(l.table[1] / 65536, 2));
    ASSERT_OK(img->refcounts().Set(l.data[0] / 65536, 0));
    ASSERT_OK(img->io()->flush());
  }
  if (HaveTool("qemu-img")) {
    EXPECT_EQ(Sh("qemu-img check " + p).exit_code, 0);
  }
  ExpectRepairDrops(p, {"a", "b"});
}

TEST(CheckRepairTest, OtherCorruptionIsReportedAndNothingIsDropped) {
  TempDir d;
  std::string p = d / "c";
  MakeThreeBitmaps(p);
  Layout l = GetLayout(p);
  auto img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
  ASSERT_OK(img->refcounts().Set(l.data[0] / 65536, 0));  // a's: attributable
  ASSERT_OK(img->refcounts().Set(l.l1 / 65536, 0));       // the image's: not
  ASSERT_OK(img->io()->flush());
  img.reset();
  std::vector<std::byte> before;
  {
    auto f = OpenFile(p, false);
    before.resize(f->size().value());
    ASSERT_OK(f->pread(before, 0));
  }
  img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
  auto rep = Check(*img, true);
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->ExitCode(), 2);
  EXPECT_EQ(rep->corruptions, 2u);
  EXPECT_TRUE(rep->dropped_bitmaps.empty());
  ASSERT_EQ(rep->untrusted_bitmaps.size(), 1u);
  EXPECT_EQ(rep->untrusted_bitmaps[0].name, "a");
  bool said = false;
  for (const auto& m : rep->messages) said |= m.rfind("Not dropping bitmap 'a'", 0) == 0;
  EXPECT_TRUE(said);
  EXPECT_EQ(img->Bitmaps().size(), 3u);
  img.reset();
  std::vector<std::byte> after(before.size());
  auto f = OpenFile(p, false);
  EXPECT_EQ(f->size().value(), before.size());
  ASSERT_OK(f->pread(after, 0));
  EXPECT_TRUE(after == before) << "a refused repair changed the file";
}

TEST(CheckTest, AgreesWithQemuOnQemuImages) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "q.qcow2";
  ASSERT_EQ(Sh("qemu-img create -q -f qcow2 " + p + " 64M").exit_code, 0);
  ASSERT_EQ(Sh("qemu-img bitmap --add " + p + " b0").exit_code, 0);
  ASSERT_EQ(Sh("qemu-io -f qcow2 -c 'write 0 1M' -c 'write -c 4M 64k' " + p).exit_code, 0);
  ASSERT_EQ(Sh("qemu-img snapshot -c s1 " + p).exit_code, 0);
  ASSERT_EQ(Sh("qemu-io -f qcow2 -c 'write 8M 64k' " + p).exit_code, 0);
  auto img = std::move(Image::Open(OpenFile(p, false))).value();
  auto rep = Check(*img, false);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->ExitCode(), 0) << (rep->messages.empty() ? "" : rep->messages[0]);
}

// Fuzz finding commit-partial-l2: 4 KiB clusters, 64-bit refcounts, the L2
// table in a last cluster the file holds 29 bytes of; its entries are
// compressed (with the copied flag) and point far past the end of the file.
// qemu-img check reads the partial cluster zero padded and finds 8 errors.
std::vector<std::byte> PartialL2Image() {
  std::vector<std::byte> f(0x4000 + 29, std::byte{0});
  std::fill(f.begin() + 0x35d1, f.end(), std::byte{0xcd});
  PutHeader(f, 12, 1 << 20, 1, 0x3000, 0x1000, 1, 6);
  StoreBE64(f.data() + 0x1000, 0x2000);                                 // refcount table
  for (int c = 0; c < 6; ++c) StoreBE64(f.data() + 0x2000 + 8 * c, 1);  // clusters 0..5
  StoreBE64(f.data() + 0x3000, kOflagCopied | 0x4000);                  // L1 -> L2
  return f;
}

TEST(CheckTest, L2TableInPartialLastClusterIsReadZeroPadded) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "partial-l2.qcow2";
  WriteFile(p, PartialL2Image());
  auto q = Sh("qemu-img check " + p);
  ASSERT_EQ(q.exit_code, 2) << q.out;
  auto img = Image::Open(OpenFile(p, false));
  ASSERT_TRUE(img.ok()) << img.status().ToString();
  auto rep = Check(**img, false);
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  EXPECT_EQ(rep->ExitCode(), q.exit_code);
  EXPECT_EQ(rep->corruptions, QemuCount(q.out, "errors were found"));
  // Cluster 5 has refcount 1 but lies past the end of the file: qemu-img
  // does not compare it, and neither do we.
  EXPECT_EQ(rep->leaks, QemuCount(q.out, "leaked clusters"));
  EXPECT_EQ(rep->leaks, 0u);
}

// A BlockIO that counts what passes through it: the measure of work for
// bounds that must not depend on the machine's speed or load.
class CountingIO final : public BlockIO {
 public:
  explicit CountingIO(std::shared_ptr<BlockIO> inner) : inner_(std::move(inner)) {}
  Status pread(std::span<std::byte> out, uint64_t offset) override {
    reads.fetch_add(1);
    bytes_read.fetch_add(out.size());
    return inner_->pread(out, offset);
  }
  Status pwrite(std::span<const std::byte> in, uint64_t offset) override {
    writes.fetch_add(1);
    return inner_->pwrite(in, offset);
  }
  Status flush() override { return inner_->flush(); }
  Result<uint64_t> size() override { return inner_->size(); }
  Status resize(uint64_t new_size) override { return inner_->resize(new_size); }
  const char* name() const override { return inner_->name(); }

  std::atomic<uint64_t> reads{0}, bytes_read{0}, writes{0};

 private:
  std::shared_ptr<BlockIO> inner_;
};

// Fuzz finding check-refcount-amplification: a 1 MiB file with 512-byte
// clusters and 1-bit refcounts whose 65536 refcount table entries all name
// the last cluster, a block of all ones. The table could describe 2^28
// clusters; only the file's 2048 are compared.
std::vector<std::byte> AmplificationImage() {
  std::vector<std::byte> f(1 << 20, std::byte{0});
  PutHeader(f, 9, 0, 0, 0, 0x200, 0x400, 0);
  for (uint64_t i = 0; i < 0x400 * 512 / 8; ++i) StoreBE64(f.data() + 0x200 + 8 * i, 0xffe00);
  std::fill(f.begin() + 0xffe00, f.end(), std::byte{0xff});
  return f;
}

TEST(CheckTest, WorkIsBoundedByTheFileNotTheRefcountTable) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "amplification.qcow2";
  WriteFile(p, AmplificationImage());
  auto q = Sh("qemu-img check " + p);
  ASSERT_EQ(q.exit_code, 2);
  auto counting = std::make_shared<CountingIO>(OpenFile(p, false));
  auto img = Image::Open(counting);
  ASSERT_TRUE(img.ok()) << img.status().ToString();
  auto rep = Check(**img, false);
  ASSERT_TRUE(rep.ok()) << rep.status().ToString();
  // The work is bounded by the file, not by what the refcount table could
  // describe (2^28 clusters). Counted, not timed, so that the bound holds on
  // any machine, at any load, in the sanitizer builds:
  //  - the comparison runs over the file's 2048 clusters (+1), not 2^28;
  //  - open + check read at most twice the file (the 512 KiB table once,
  //    the one refcount block once), in at most one call per cluster.
  const uint64_t file_bytes = 1 << 20, file_clusters = file_bytes / 512;
  CheckReport scratch;
  auto counted = check_internal::CountReferences(**img, {}, &scratch);
  ASSERT_TRUE(counted.ok()) << counted.status().ToString();
  EXPECT_LE(counted->clusters, file_clusters + 1);
  std::printf("open + check read %llu bytes in %llu calls; %llu clusters compared (file: %llu)\n",
              static_cast<unsigned long long>(counting->bytes_read.load()),
              static_cast<unsigned long long>(counting->reads.load()),
              static_cast<unsigned long long>(counted->clusters),
              static_cast<unsigned long long>(file_clusters));
  EXPECT_LE(counting->bytes_read.load(), 2 * file_bytes);
  EXPECT_LE(counting->reads.load(), file_clusters);
  EXPECT_EQ(counting->writes.load(), 0u);  // check without repair writes nothing
  EXPECT_EQ(rep->ExitCode(), 2);
  // 65535 refcount overflows (the block is referenced 65536 times, 1-bit
  // refcounts hold 1) and 1022 leaks, as qemu-img says.
  EXPECT_EQ(rep->leaks, QemuCount(q.out, "leaked clusters were found"));
  EXPECT_EQ(rep->leaks, 1022u);
  EXPECT_EQ(rep->corruptions, QemuCount(q.out, "errors were found"));
  EXPECT_EQ(rep->corruptions, 65535u);
  // Messages are capped; the rest are counted.
  ASSERT_EQ(rep->messages.size(), kMaxCheckMessages + 1);
  EXPECT_EQ(rep->messages_dropped, 65535u + 1022u - kMaxCheckMessages);
  EXPECT_EQ(rep->messages.back(), "... " + std::to_string(rep->messages_dropped) + " more");
}

TEST(CheckTest, RefcountPastEndOfFileIsNotReportedLikeQemu) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "q.qcow2";
  ASSERT_EQ(Sh("qemu-img create -q -f qcow2 " + p + " 64M").exit_code, 0);
  {
    auto img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
    // Cluster 20 is far past the end of the (4-cluster) file.
    ASSERT_OK(img->refcounts().Set(20, 1));
    ASSERT_OK(img->io()->flush());
  }
  auto q = Sh("qemu-img check " + p);
  EXPECT_EQ(q.exit_code, 0) << q.out;
  auto img = std::move(Image::Open(OpenFile(p, false))).value();
  auto rep = Check(*img, false);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->ExitCode(), q.exit_code);
  EXPECT_EQ(rep->leaks, 0u);
}

}  // namespace
}  // namespace cbt::qcow2
