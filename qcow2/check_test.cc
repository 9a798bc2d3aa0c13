// Check: exit codes and leak repair, cross-checked with qemu-img check.
#include "qcow2/check.h"

#include <gtest/gtest.h>

#include "qcow2/test_util.h"

namespace cbt::qcow2 {
namespace {

using testing::NewFile;
using testing::OpenFile;
using testing::Sh;
using testing::Spec;
using testing::TempDir;

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
  img = std::move(Image::Open(OpenFile(p, true), {.writable = true})).value();
  EXPECT_TRUE(img->stale_bitmaps_extension());
  auto rep = Check(*img, false);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->ExitCode(), 3);
  EXPECT_EQ(rep->leaks, 2u);  // directory + table
  rep = Check(*img, true);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->leaks_fixed, 2u);
  EXPECT_EQ(rep->ExitCode(), 0);
  img.reset();
  auto q = Sh("qemu-img check " + p);
  EXPECT_EQ(q.exit_code, 0) << q.out;
}

TEST(CheckTest, DoubleReferenceIsCorruption) {
  TempDir d;
  std::string p = d / "c";
  auto img = std::move(Image::Create(NewFile(p), CreateOptions{64 << 20, 65536, ""})).value();
  ASSERT_OK(img->Commit({Spec("b0", 16)}));
  // Lower the refcount of the directory cluster to 0: referenced but free.
  ASSERT_OK(img->refcounts().Set(img->header().bitmaps->directory_offset / 65536, 0));
  auto rep = Check(*img, true);
  ASSERT_TRUE(rep.ok());
  EXPECT_EQ(rep->ExitCode(), 2);
  EXPECT_EQ(rep->corruptions, 1u);
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

}  // namespace
}  // namespace cbt::qcow2
