#include "engine/tracker.h"

#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <barrier>
#include <filesystem>
#include <random>
#include <thread>

#include "common/posix_file.h"
#include "engine/bitmap_store.h"
#include "tests/tools/worker_failures.h"

namespace cbt {
namespace {

constexpr uint64_t KiB = 1024, MiB = KiB * KiB, GiB = MiB * KiB, TiB = GiB * KiB;

class TrackerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cbt-tracker-XXXXXX";
    dir_ = mkdtemp(tmpl);
    opts_.container_path = dir_ + "/disk.cbt";
    opts_.bitmaps = {"b0"};
    opts_.create = true;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Opens the container the way `qemu-img info -U` would: read-only, no locks.
  std::unique_ptr<qcow2::Image> Peek() {
    auto f = PosixFile::Open(opts_.container_path, PosixFile::Mode::kReadOnly);
    EXPECT_TRUE(f.ok()) << f.status().ToString();
    auto img = qcow2::Image::Open(std::shared_ptr<BlockIO>(std::move(f).value()));
    EXPECT_TRUE(img.ok()) << img.status().ToString();
    return std::move(img).value();
  }
  bool InUseOnDisk() { return Peek()->Find("b0")->in_use; }

  std::string dir_;
  TrackerOptions opts_;
};

TEST_F(TrackerTest, InUseDurableBeforeFirstChangeIsForwarded) {
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_FALSE(InUseOnDisk());
  ASSERT_TRUE((*t)->BeginChange(5 * MiB, 4096).ok());
  EXPECT_TRUE(InUseOnDisk());  // P2: set before BeforeChange returned
  EXPECT_EQ((*t)->stats().in_use_sets, 1u);
  ASSERT_TRUE((*t)->BeginChange(7 * MiB, 4096).ok());
  EXPECT_EQ((*t)->stats().in_use_sets, 1u);  // no second sync while set
}

TEST_F(TrackerTest, PersistStoresExactBitsAndClearsInUse) {
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->BeginChange(0, 1).ok());
  ASSERT_TRUE((*t)->BeginChange(100 * MiB + 1, 64 * KiB).ok());
  ASSERT_TRUE((*t)->Persist().ok());
  EXPECT_FALSE(InUseOnDisk());
  auto img = Peek();
  auto b = LoadBitmap(*img, "b0", 1 * GiB);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  EXPECT_EQ((*b)->Extents(0, 1 * GiB), (*(*t)->Bitmap("b0")).Extents(0, 1 * GiB));
  EXPECT_EQ((*b)->DirtyGranules(), 3u);
  // The next change to a clean granule sets in_use again.
  ASSERT_TRUE((*t)->BeginChange(500 * MiB, 1).ok());
  EXPECT_TRUE(InUseOnDisk());
  EXPECT_EQ((*t)->stats().in_use_sets, 2u);
}

TEST_F(TrackerTest, ChangesToGranulesDirtyOnDiskNeedNoInUse) {
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->BeginChange(3 * MiB, 100 * KiB).ok());
  ASSERT_TRUE((*t)->Persist().ok());
  EXPECT_FALSE(InUseOnDisk());
  // Inside the persisted granules: nothing to record, in_use stays clear.
  ASSERT_TRUE((*t)->BeginChange(3 * MiB + 5, 4096).ok());
  ASSERT_TRUE((*t)->BeginChange(3 * MiB + 64 * KiB, 64 * KiB).ok());
  EXPECT_FALSE(InUseOnDisk());
  EXPECT_EQ((*t)->stats().in_use_sets, 1u);
  // One granule further is a new change.
  ASSERT_TRUE((*t)->BeginChange(3 * MiB + 100 * KiB, 64 * KiB).ok());
  EXPECT_TRUE(InUseOnDisk());
  EXPECT_EQ((*t)->stats().in_use_sets, 2u);
}

TEST_F(TrackerTest, ReopenedBitmapCountsAsDurable) {
  {
    auto t = Tracker::Open(opts_, 1 * GiB);
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE((*t)->BeginChange(0, 1 * MiB).ok());
    ASSERT_TRUE((*t)->Close().ok());
  }
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(t.ok());
  ASSERT_TRUE((*t)->BeginChange(4096, 4096).ok());
  EXPECT_FALSE(InUseOnDisk());
  EXPECT_EQ((*t)->stats().in_use_sets, 0u);
}

TEST_F(TrackerTest, PersistAfterOneWriteOn16TiBWritesOneCluster) {
  auto t = Tracker::Open(opts_, 16 * TiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_TRUE((*t)->Persist().ok());  // nothing pending: nothing written
  EXPECT_EQ((*t)->stats().bytes_written, 0u);
  ASSERT_TRUE((*t)->BeginChange(9 * TiB, 4096).ok());
  ASSERT_TRUE((*t)->Persist().ok());
  TrackerStats s = (*t)->stats();
  std::printf("persist after one 4 KiB write on a 16 TiB disk: %llu bytes\n",
              static_cast<unsigned long long>(s.bytes_written));
  // One 64 KiB data cluster plus metadata (refcount entry, table entry).
  EXPECT_GE(s.bytes_written, 64 * KiB);
  EXPECT_LE(s.bytes_written, 64 * KiB + 4 * KiB);
}

TEST_F(TrackerTest, SizeMismatchIsRefused) {
  ASSERT_TRUE(Tracker::Open(opts_, 1 * GiB).ok());
  auto t = Tracker::Open(opts_, 2 * GiB);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("size mismatch"), std::string::npos);
}

TEST_F(TrackerTest, MissingBitmapWithoutCreateIsRefused) {
  ASSERT_TRUE(Tracker::Open(opts_, 1 * GiB).ok());
  opts_.create = false;
  opts_.bitmaps = {"b9"};
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_FALSE(t.ok());
  EXPECT_TRUE(t.status().IsNotFound());
}

TEST_F(TrackerTest, BitmapLeftInUseIsRefusedWithRecoveryHint) {
  opts_.durability = Durability::kNone;  // QEMU's semantics: no record to recover from
  {
    auto t = Tracker::Open(opts_, 1 * GiB);
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE((*t)->BeginChange(0, 1).ok());
    // Simulated crash: the tracker is dropped without Persist/Close.
  }
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_FALSE(t.ok());
  EXPECT_TRUE(t.status().IsCorruption());
  EXPECT_NE(t.status().message().find("--remove"), std::string::npos);
}

// ---- crash-proof modes (process, power) ----

TEST_F(TrackerTest, PowerModeRecordsTheRegionBeforeTheChange) {
  opts_.durability = Durability::kPower;
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_TRUE((*t)->BeginChange(300 * MiB, 4096).ok());
  auto img = Peek();
  ASSERT_TRUE(img->private_record_vouched());
  auto rec = IntentMap::Parse(*img->GetExtension(kIntentExtensionType));
  ASSERT_TRUE(rec.ok()) << rec.status().ToString();
  auto ranges = (*rec)->RecordedRanges();
  ASSERT_EQ(ranges.size(), 1u);
  EXPECT_LE(ranges[0].first, 300 * MiB);
  EXPECT_GT(ranges[0].first + ranges[0].second, 300 * MiB);
  // Same region again: no further record write.
  uint64_t writes = (*t)->stats().intent_writes;
  ASSERT_TRUE((*t)->BeginChange(300 * MiB + 8192, 4096).ok());
  EXPECT_EQ((*t)->stats().intent_writes, writes);
}

TEST_F(TrackerTest, CrashInPowerModeRecoversASuperset) {
  opts_.durability = Durability::kPower;
  {
    auto t = Tracker::Open(opts_, 1 * GiB);
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE((*t)->BeginChange(0, 1).ok());
    ASSERT_TRUE((*t)->Persist().ok());
    ASSERT_TRUE((*t)->BeginChange(200 * MiB + 5, 3 * MiB).ok());
    ASSERT_TRUE((*t)->BeginChange(900 * MiB, 4096).ok());
    // Crash: the tracker goes away without persisting.
  }
  EXPECT_TRUE(InUseOnDisk());
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_GT((*t)->stats().recovered_granules, 0u);
  EXPECT_FALSE(InUseOnDisk());
  const DirtyBitmap& b = (*(*t)->Bitmap("b0"));
  EXPECT_TRUE(b.IsDirty(0, 1));
  EXPECT_TRUE(b.IsDirty(200 * MiB + 5, 3 * MiB));
  EXPECT_TRUE(b.IsDirty(900 * MiB, 4096));
  // What QEMU reads matches what we hold.
  auto disk = LoadBitmap(*Peek(), "b0", 1 * GiB);
  ASSERT_TRUE(disk.ok());
  EXPECT_EQ((*disk)->Extents(0, 1 * GiB), b.Extents(0, 1 * GiB));
}

TEST_F(TrackerTest, ProcessModeRecordFromAnotherBootIsRefused) {
  opts_.durability = Durability::kProcess;
  {
    auto t = Tracker::Open(opts_, 1 * GiB);
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE((*t)->BeginChange(0, 1).ok());
  }
  {  // Pretend the machine rebooted: another boot id in the record.
    auto f = PosixFile::Open(opts_.container_path, PosixFile::Mode::kReadWrite);
    auto img = qcow2::Image::Open(std::shared_ptr<BlockIO>(std::move(f).value()), {true});
    ASSERT_TRUE(img.ok());
    std::vector<std::byte> rec = *(*img)->GetExtension(kIntentExtensionType);
    rec[24] ^= std::byte{0xff};
    ASSERT_TRUE((*img)->RewriteExtensionInPlace(kIntentExtensionType, rec).ok());
  }
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("restarted"), std::string::npos) << t.status().message();
}

TEST_F(TrackerTest, ProcessModeSameBootRecovers) {
  opts_.durability = Durability::kProcess;
  {
    auto t = Tracker::Open(opts_, 1 * GiB);
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE((*t)->BeginChange(500 * MiB, 1).ok());
  }
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_TRUE((*(*t)->Bitmap("b0")).Test(500 * MiB));
}

TEST_F(TrackerTest, ModeNoneDropsTheRecordSoACrashIsRefused) {
  opts_.durability = Durability::kPower;
  ASSERT_TRUE(Tracker::Open(opts_, 1 * GiB).ok());
  opts_.durability = Durability::kNone;
  {
    auto t = Tracker::Open(opts_, 1 * GiB);
    ASSERT_TRUE(t.ok());
    EXPECT_EQ(Peek()->GetExtension(kIntentExtensionType), nullptr);
    ASSERT_TRUE((*t)->BeginChange(0, 1).ok());
  }
  opts_.durability = Durability::kPower;
  EXPECT_FALSE(Tracker::Open(opts_, 1 * GiB).ok());
}

TEST_F(TrackerTest, QemuWritingTheFileInvalidatesTheRecord) {
  if (system("qemu-img --version >/dev/null 2>&1") != 0) GTEST_SKIP() << "qemu-img not installed";
  opts_.durability = Durability::kPower;
  {
    auto t = Tracker::Open(opts_, 1 * GiB);
    ASSERT_TRUE(t.ok());
    ASSERT_TRUE((*t)->BeginChange(0, 1).ok());
  }
  // QEMU opens read-write (adds a bitmap): it clears unknown autoclear bits.
  std::string cmd = "qemu-img bitmap --add " + opts_.container_path + " other";
  ASSERT_EQ(system(cmd.c_str()), 0);
  EXPECT_FALSE(Peek()->private_record_vouched());
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_FALSE(t.ok());
  EXPECT_TRUE(t.status().IsCorruption());
}

// The in_use clearing argument of tracker.cc under fire: writers call
// BeforeChange while a persister persists in a loop. Whenever in_use is
// clear on disk after a Persist, every change whose BeforeChange had returned
// (and so may have been forwarded) must be in the stored bitmap.
//
// Checks in the threads go through WorkerFailures (tests/tools/
// worker_failures.h): a writer whose check fails leaves the barrier, so the
// others finish and the main thread reports the failure, instead of all of
// them waiting for it forever. fail_writer/fail_op inject such a failure (an
// out-of-range change) to prove it.
struct RaceResult {
  int checks_with_clear = 0;
};
template <typename PeekFn>
RaceResult RunClearedInUseRace(Tracker& tr, uint64_t size, PeekFn peek, testing::WorkerFailures& wf,
                               int fail_writer = -1, int fail_op = -1) {
  constexpr int kWriters = 3, kOps = 9000;
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> ops(kWriters);
  std::vector<std::atomic<size_t>> done(kWriters);
  for (int w = 0; w < kWriters; ++w) {
    std::mt19937_64 rng(w + 1);
    for (int i = 0; i < kOps; ++i) ops[w].emplace_back((rng() % (size / 4096)) * 4096, 4096);
  }
  if (fail_writer >= 0) ops[fail_writer][fail_op] = {size, 4096};  // past the end: an error
  std::atomic<bool> stop{false};
  std::atomic<int> rounds{0};
  RaceResult res;
  // Every 500 ops all writers pause together for two persist rounds, so some
  // persists are certain to find no change racing in and clear in_use.
  std::barrier sync(kWriters);
  std::thread persister([&] {
    for (; !stop.load() && !wf.stop(); rounds.fetch_add(1)) {
      Status st = tr.Persist();
      if (!wf.Check(st.ok(), [&] { return "Persist: " + st.ToString(); })) return;
      // Changes completed by now either were stored by that Persist, or set
      // in_use again through the gate (this thread is the only persister).
      std::vector<size_t> snap(kWriters);
      for (int w = 0; w < kWriters; ++w) snap[w] = done[w].load();
      auto img = peek();
      if (img->Find("b0")->in_use) continue;
      ++res.checks_with_clear;
      auto disk = LoadBitmap(*img, "b0", size);
      if (!wf.Check(disk.ok(), [&] { return "LoadBitmap: " + disk.status().ToString(); })) return;
      for (int w = 0; w < kWriters; ++w)
        for (size_t i = 0; i < snap[w]; ++i)
          if (!wf.Check((*disk)->Test(ops[w][i].first), [&] {
                return "in_use clear but writer " + std::to_string(w) + " op " + std::to_string(i) +
                       " is not stored";
              }))
            return;
    }
  });
  std::vector<std::thread> writers;
  for (int w = 0; w < kWriters; ++w)
    writers.emplace_back([&, w] {
      for (int i = 0; i < kOps; ++i) {
        Status st = tr.BeginChange(ops[w][i].first, ops[w][i].second).status();
        // After a failure (here or in another thread) leave the barrier, so
        // that no writer waits for this one; the test then ends early.
        if (!wf.Check(st.ok(),
                      [&] {
                        return "BeforeChange (writer " + std::to_string(w) + " op " +
                               std::to_string(i) + "): " + st.ToString();
                      }) ||
            wf.stop()) {
          sync.arrive_and_drop();
          return;
        }
        done[w].store(i + 1);
        if ((i + 1) % 500 == 0) {
          sync.arrive_and_wait();
          int r = rounds.load();
          for (int k = 0; k < 100000 && rounds.load() < r + 2; ++k) std::this_thread::yield();
          sync.arrive_and_wait();
        }
      }
    });
  for (auto& th : writers) th.join();
  stop = true;
  persister.join();
  return res;
}

TEST_F(TrackerTest, ClearedInUseNeverHidesACompletedChange) {
  const uint64_t size = 4 * GiB;
  auto t = Tracker::Open(opts_, size);
  ASSERT_TRUE(t.ok());
  testing::WorkerFailures wf;
  RaceResult r = RunClearedInUseRace(
      **t, size, [this] { return Peek(); }, wf);
  wf.Report();
  ASSERT_TRUE((*t)->Close().ok());
  EXPECT_FALSE(InUseOnDisk());
  std::printf("persists that found in_use clear and were checked: %d\n", r.checks_with_clear);
  EXPECT_GE(r.checks_with_clear, 9000 / 500);
}

// A writer failing between two barriers is reported by the main thread and
// the others finish (with ASSERT_* in the writer this test hung until ctest's
// timeout killed it).
TEST_F(TrackerTest, AFailingWriterIsReportedNotAHang) {
  const uint64_t size = 4 * GiB;
  auto t = Tracker::Open(opts_, size);
  ASSERT_TRUE(t.ok());
  testing::WorkerFailures wf;
  RunClearedInUseRace(
      **t, size, [this] { return Peek(); }, wf, /*fail_writer=*/1,
      /*fail_op=*/700);
  EXPECT_EQ(wf.count(), 1u);
  EXPECT_NONFATAL_FAILURE(wf.Report(), "BeforeChange (writer 1 op 700)");
  EXPECT_TRUE((*t)->Close().ok());
}

}  // namespace
}  // namespace cbt
