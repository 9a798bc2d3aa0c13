// Locks: QEMU refuses files we hold, and we refuse files QEMU holds.
#include "qcow2/lock.h"

#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <thread>

#include "qcow2/test_util.h"

namespace cbt::qcow2 {
namespace {

using testing::Sh;
using testing::TempDir;

TEST(LockTest, QemuRefusesFileWeHoldForWriting) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  std::string p = d / "q.qcow2";
  ASSERT_EQ(Sh("qemu-img create -q -f qcow2 " + p + " 1M").exit_code, 0);
  auto f = PosixFile::Open(p, PosixFile::Mode::kReadWrite);
  ASSERT_TRUE(f.ok());
  ASSERT_OK(LockImage((*f)->fd(), p, LockMode::kReadWrite));
  auto r = Sh("qemu-img info " + p);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.out.find("lock"), std::string::npos) << r.out;
  // A second writer of ours (another open file description) is refused too.
  auto g = PosixFile::Open(p, PosixFile::Mode::kReadWrite);
  Status s = LockImage((*g)->fd(), p, LockMode::kReadOnly);
  EXPECT_TRUE(s.IsBusy()) << s.ToString();
  EXPECT_NE(s.message().find(p), std::string::npos);
  ASSERT_OK(UnlockImage((*f)->fd(), p));
  EXPECT_EQ(Sh("qemu-img info " + p).exit_code, 0);
}

TEST(LockTest, ReadersShare) {
  TempDir d;
  std::string p = d / "f";
  ASSERT_EQ(Sh("truncate -s 1M " + p).exit_code, 0);
  auto a = PosixFile::Open(p, PosixFile::Mode::kReadOnly);
  auto b = PosixFile::Open(p, PosixFile::Mode::kReadOnly);
  ASSERT_OK(LockImage((*a)->fd(), p, LockMode::kReadOnly));
  ASSERT_OK(LockImage((*b)->fd(), p, LockMode::kReadOnly));
  auto c = PosixFile::Open(p, PosixFile::Mode::kReadWrite);
  EXPECT_TRUE(LockImage((*c)->fd(), p, LockMode::kReadWrite).IsBusy());
}

TEST(LockTest, WeRefuseFileQemuNbdHolds) {
  CBT_REQUIRE_QEMU();
  if (!testing::HaveTool("qemu-nbd")) GTEST_SKIP() << "qemu-nbd missing";
  TempDir d;
  std::string p = d / "q.qcow2";
  ASSERT_EQ(Sh("qemu-img create -q -f qcow2 " + p + " 1M").exit_code, 0);
  std::string sock = d / "s.sock", pid = d / "pid";
  ASSERT_EQ(Sh("qemu-nbd -t -f qcow2 -k " + sock + " --pid-file=" + pid + " --fork " + p).exit_code,
            0);
  // Whatever happens below, never leave the daemon running.
  struct KillOnExit {
    std::string pidfile;
    ~KillOnExit() { Sh("test -s " + pidfile + " && kill $(cat " + pidfile + ") 2>/dev/null"); }
  } guard{pid};
  auto f = PosixFile::Open(p, PosixFile::Mode::kReadOnly);
  Status s = LockImage((*f)->fd(), p, LockMode::kReadOnly);
  EXPECT_TRUE(s.IsBusy()) << s.ToString();
  Sh("kill $(cat " + pid + ")");
  // Up to 15 s: on a loaded 2-core machine qemu-nbd can take over 2 s to exit
  // (a 2 s bound made this test fail once).
  for (int i = 0; i < 750 && Sh("kill -0 $(cat " + pid + ")").exit_code == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_OK(LockImage((*f)->fd(), p, LockMode::kReadOnly));
}

}  // namespace
}  // namespace cbt::qcow2
