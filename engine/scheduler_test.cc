// PersistScheduler with a real Tracker over a container in a temp dir.
// No wall-clock assertions except generous upper bounds (Eventually: polled
// with a deadline). "Not yet" is checked after the scheduler has looked a
// few times (its poll counter), which a slow machine cannot make flaky.
#include "engine/scheduler.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <memory>
#include <thread>

#include "common/posix_file.h"
#include "engine/bitmap_store.h"
#include "engine/storage.h"

namespace cbt {
namespace {

using namespace std::chrono_literals;

constexpr uint64_t KiB = 1024, MiB = KiB * KiB;
// 512-byte granules and 512-byte clusters: one cluster of bitmap data (one
// "chunk", what PendingBytes counts) covers 512 * 8 granules = 2 MiB of disk.
constexpr uint64_t kDisk = 64 * MiB, kCluster = 512, kClusterSpan = 2 * MiB;

// Files whose writes and flushes fail with EIO while fail is set.
class FlakyIO final : public BlockIO {
 public:
  FlakyIO(std::shared_ptr<BlockIO> io, const std::atomic<bool>& fail)
      : io_(std::move(io)), fail_(fail) {}
  Status pread(std::span<std::byte> out, uint64_t offset) override {
    return io_->pread(out, offset);
  }
  Status pwrite(std::span<const std::byte> in, uint64_t offset) override {
    if (fail_.load()) return Status::IOError("flaky: injected write error", EIO);
    return io_->pwrite(in, offset);
  }
  Status flush() override {
    if (fail_.load()) return Status::IOError("flaky: injected flush error", EIO);
    return io_->flush();
  }
  Result<uint64_t> size() override { return io_->size(); }
  Status resize(uint64_t n) override { return io_->resize(n); }
  const char* name() const override { return io_->name(); }

 private:
  std::shared_ptr<BlockIO> io_;
  const std::atomic<bool>& fail_;
};

class FlakyStorage final : public Storage {
 public:
  std::atomic<bool> fail{false};
  Result<std::shared_ptr<BlockIO>> Open(const std::string& path, Mode mode) override {
    auto r = PosixStorage().Open(path, mode);
    if (!r.ok()) return r.status();
    return std::shared_ptr<BlockIO>(std::make_shared<FlakyIO>(std::move(r).value(), fail));
  }
  Status CheckCreatable(const std::string& path) override {
    return PosixStorage().CheckCreatable(path);
  }
  void Remove(const std::string& path) override { PosixStorage().Remove(path); }
};

// Polls cond every 10 ms until it holds or limit passes.
template <class F>
bool Eventually(F cond, std::chrono::seconds limit = 10s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(10ms);
  }
  return true;
}

// Waits until the scheduler has woken up and looked n more times.
bool WaitPolls(const PersistScheduler& s, uint64_t n) {
  const uint64_t from = s.stats().polls;
  return Eventually([&] { return s.stats().polls >= from + n; });
}

class SchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cbt-scheduler-XXXXXX";
    dir_ = mkdtemp(tmpl);
    opts_.container_path = dir_ + "/disk.cbt";
    opts_.bitmaps = {"b0"};
    opts_.create = true;
    opts_.granularity = 512;
    opts_.cluster_size = kCluster;
    opts_.storage = &storage_;
    auto t = Tracker::Open(opts_, kDisk);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tracker_ = std::move(t).value();
  }
  void TearDown() override {
    tracker_.reset();
    std::filesystem::remove_all(dir_);
  }

  // Nothing pending and in_use cleared on disk: a persist has stored it all.
  bool Persisted() const { return !tracker_->HasPendingChanges() && !tracker_->InUseOnDisk(); }

  // The file as a reader sees it equals the tracker's memory, in_use clear.
  // Call only once Persisted() (no persist under way).
  void ExpectOnDiskEqualsMemory() {
    auto f = PosixFile::Open(opts_.container_path, PosixFile::Mode::kReadOnly);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    auto img = qcow2::Image::Open(std::shared_ptr<BlockIO>(std::move(f).value()));
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    EXPECT_FALSE((*img)->Find("b0")->in_use);
    auto b = LoadBitmap(**img, "b0", kDisk);
    ASSERT_TRUE(b.ok()) << b.status().ToString();
    EXPECT_EQ((*b)->Extents(0, kDisk), tracker_->Bitmap("b0")->Extents(0, kDisk));
  }

  void Change(uint64_t offset, uint64_t length = 4096) {
    Status s = tracker_->BeginChange(offset, length).status();
    ASSERT_TRUE(s.ok()) << s.ToString();
  }

  std::string dir_;
  FlakyStorage storage_;
  TrackerOptions opts_;
  std::unique_ptr<Tracker> tracker_;
};

TEST_F(SchedulerTest, PollPeriodFollowsIdleWithinBounds) {
  Tracker& t = *tracker_;
  EXPECT_EQ(PersistScheduler(t, {.interval = 1000ms}).PollPeriod(), 0ms);
  EXPECT_EQ(PersistScheduler(t, {.threshold_bytes = 1}).PollPeriod(), 50ms);
  EXPECT_EQ(PersistScheduler(t, {.idle = 100ms}).PollPeriod(), 25ms);
  EXPECT_EQ(PersistScheduler(t, {.idle = 1ms}).PollPeriod(), 5ms);
  EXPECT_EQ(PersistScheduler(t, {.idle = 10000ms}).PollPeriod(), 50ms);
  EXPECT_FALSE(PersistTriggers{}.any());
}

TEST_F(SchedulerTest, ThresholdFiresOnceEnoughDistinctClustersChangedAndNotBefore) {
  PersistScheduler s(*tracker_, {.threshold_bytes = 4 * kCluster});
  s.Start();
  // Three clusters of bitmap data changed; many writes inside the first one
  // add nothing to the measure.
  Change(0);
  Change(1 * kClusterSpan);
  Change(2 * kClusterSpan);
  for (uint64_t off = 8 * KiB; off < kClusterSpan - 4096; off += 8 * KiB) Change(off);
  EXPECT_EQ(tracker_->PendingBytes(), 3 * kCluster);
  EXPECT_TRUE(tracker_->InUseOnDisk());
  ASSERT_TRUE(WaitPolls(s, 3));  // it has looked (after the writes) and declined
  EXPECT_TRUE(tracker_->HasPendingChanges());
  EXPECT_TRUE(tracker_->InUseOnDisk());
  EXPECT_EQ(s.stats().threshold_persists, 0u);

  Change(3 * kClusterSpan + 100 * 512);  // the fourth cluster
  ASSERT_TRUE(Eventually([&] { return Persisted(); })) << "threshold persist within 10 s";
  PersistSchedulerStats st = s.stats();
  EXPECT_EQ(st.threshold_persists, 1u);
  EXPECT_EQ(st.failures, 0u);
  EXPECT_EQ(st.idle_persists + st.interval_persists, 0u);
  ExpectOnDiskEqualsMemory();
}

TEST_F(SchedulerTest, IdleFiresAfterTheQuietPeriod) {
  PersistScheduler s(*tracker_, {.idle = 200ms});
  s.Start();
  Change(0);
  Change(5 * MiB, 64 * KiB);
  ASSERT_TRUE(Eventually([&] { return Persisted(); })) << "idle persist within 10 s";
  PersistSchedulerStats st = s.stats();
  EXPECT_EQ(st.idle_persists, 1u);
  EXPECT_EQ(st.threshold_persists + st.interval_persists + st.failures, 0u);
  ExpectOnDiskEqualsMemory();
  // Quiet and nothing pending: it does not persist again.
  ASSERT_TRUE(WaitPolls(s, 20));  // >= 20 x 50 ms, several idle periods
  EXPECT_EQ(s.stats().idle_persists, 1u);
}

// Idle means no change for the whole period: a steady trickle of changes
// holds it off. (Fails only if this thread stalls for the whole 1.5 s.)
TEST_F(SchedulerTest, IdleWaitsWhileChangesKeepComing) {
  PersistScheduler s(*tracker_, {.idle = 1500ms});
  s.Start();
  const auto end = std::chrono::steady_clock::now() + 3s;
  for (uint64_t i = 0; std::chrono::steady_clock::now() < end; ++i) {
    Change((i * 4096) % kDisk);
    std::this_thread::sleep_for(2ms);
  }
  EXPECT_EQ(s.stats().idle_persists, 0u);
  EXPECT_TRUE(tracker_->HasPendingChanges());
  ASSERT_TRUE(Eventually([&] { return Persisted(); }))
      << "idle persist within 10 s of the last change";
  EXPECT_EQ(s.stats().idle_persists, 1u);
}

TEST_F(SchedulerTest, AllTriggersOffPersistsNothing) {
  PersistScheduler s(*tracker_, PersistTriggers{});
  s.Start();  // starts no thread
  for (uint64_t i = 0; i < 32; ++i) Change(i * kClusterSpan);
  std::this_thread::sleep_for(300ms);
  PersistSchedulerStats st = s.stats();
  EXPECT_EQ(st.polls, 0u);
  EXPECT_EQ(st.interval_persists + st.threshold_persists + st.idle_persists, 0u);
  EXPECT_EQ(tracker_->PendingBytes(), 32 * kCluster);
  EXPECT_TRUE(tracker_->InUseOnDisk());
  s.Stop();
}

TEST_F(SchedulerTest, IntervalStillPersists) {
  PersistScheduler s(*tracker_, {.interval = 100ms});
  s.Start();
  Change(7 * MiB);
  ASSERT_TRUE(Eventually([&] { return Persisted(); })) << "periodic persist within 10 s";
  PersistSchedulerStats st = s.stats();
  EXPECT_GE(st.interval_persists, 1u);
  EXPECT_EQ(st.threshold_persists + st.idle_persists + st.failures, 0u);
  ExpectOnDiskEqualsMemory();
}

// A persist that fails leaves the changes pending; the trigger retries after
// a back-off (not at every poll) and succeeds once the container works.
TEST_F(SchedulerTest, FailedPersistIsRetriedWithBackoff) {
  Change(0);  // in_use set while the container still works
  Change(9 * MiB);
  storage_.fail = true;
  PersistScheduler s(*tracker_, {.threshold_bytes = 1, .idle = 100ms});
  s.Start();
  ASSERT_TRUE(Eventually([&] { return s.stats().failures >= 1; })) << "first attempt within 10 s";
  ASSERT_TRUE(WaitPolls(s, 10));
  PersistSchedulerStats st = s.stats();
  // Retrying at every poll would have failed ~10 more times by now; the
  // back-off (1 s, 2 s, 4 s ...) allows a handful at most.
  EXPECT_LT(st.failures, 5u);
  EXPECT_TRUE(tracker_->HasPendingChanges());
  EXPECT_TRUE(tracker_->InUseOnDisk());

  storage_.fail = false;
  ASSERT_TRUE(Eventually([&] { return Persisted(); }, 60s)) << "retry within the back-off";
  st = s.stats();
  EXPECT_EQ(st.threshold_persists + st.idle_persists, st.failures + 1);
  ExpectOnDiskEqualsMemory();
}

}  // namespace
}  // namespace cbt
