// Online edits of a live tracker (Tracker::Edit): atomic with respect to
// changes running on other threads, bounded drain, copy-on-write refusals,
// and the shadow/in_use protocol on the new set.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include "engine/storage.h"
#include "engine/tracker.h"
#include "qcow2/image.h"
#include "tests/tools/worker_failures.h"

namespace cbt {
namespace {

using namespace std::chrono_literals;
constexpr uint64_t KiB = 1024, MiB = KiB * KiB, GiB = MiB * KiB;

class TrackerEditTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cbt-tracker-edit-XXXXXX";
    dir_ = mkdtemp(tmpl);
    opts_.container_path = dir_ + "/disk.cbt";
    opts_.bitmaps = {"b0"};
    opts_.create = true;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string dir_;
  TrackerOptions opts_;
};

Status Checkpoint(Tracker& t, const std::string& freeze, const std::string& next) {
  return t.Edit([&](BitmapEditSet& s) { return s.Checkpoint(freeze, next); }, 10s);
}

// Writers tag each change with its own granule; checkpoints run meanwhile.
// Every change that completed before a checkpoint started is in the frozen
// bitmap; every change that started after it returned is in the new one;
// none is in neither. Runs in every durability mode.
void CheckpointsUnderLoad(Tracker& t) {
  // Writers run until every checkpoint returned and then kTail changes more
  // each, so some changes surely run wholly after the last checkpoint (on a
  // loaded machine fixed-length writers could finish before the first).
  constexpr int kWriters = 4, kTail = 200, kMaxPerWriter = 200000, kCheckpoints = 6;
  constexpr uint64_t kGranule = 64 * KiB;
  const uint64_t granules = t.disk_size() / kGranule;
  using Clock = std::chrono::steady_clock;
  struct Op {
    Clock::time_point start, end;
  };
  std::vector<std::vector<Op>> ops(kWriters);
  struct Cp {
    Clock::time_point start, end;
  };
  std::vector<Cp> cps(kCheckpoints);
  testing::WorkerFailures failures;
  std::atomic<bool> checkpoints_done{false};
  std::atomic<int> started{0};
  std::vector<std::thread> writers;
  // Writer w's change i marks granule (i * kWriters + w) mod granules: a
  // granule may be changed again later, which only adds bits elsewhere.
  auto offset = [&](int w, size_t i) {
    return (static_cast<uint64_t>(i) * kWriters + static_cast<uint64_t>(w)) % granules * kGranule;
  };
  for (int w = 0; w < kWriters; ++w) {
    writers.emplace_back([&, w] {
      int tail = 0;
      for (size_t i = 0; i < kMaxPerWriter && tail < kTail; ++i) {
        if (i == 0) started.fetch_add(1);
        if (checkpoints_done.load()) ++tail;
        Op op;
        op.start = Clock::now();
        {
          auto c = t.BeginChange(offset(w, i), 4096);
          if (!failures.Check(c.ok(), [&] { return "BeginChange: " + c.status().ToString(); }))
            break;
          std::this_thread::yield();  // "forwarding"
        }
        op.end = Clock::now();
        ops[w].push_back(op);
      }
    });
  }
  while (started.load() < kWriters) std::this_thread::sleep_for(1ms);
  Status cp_status;
  for (int k = 0; k < kCheckpoints && cp_status.ok(); ++k) {
    std::this_thread::sleep_for(2ms);
    cps[k].start = Clock::now();
    cp_status = Checkpoint(t, "b" + std::to_string(k), "b" + std::to_string(k + 1));
    cps[k].end = Clock::now();
  }
  checkpoints_done.store(true);
  for (auto& th : writers) th.join();
  ASSERT_TRUE(cp_status.ok()) << cp_status.ToString();
  failures.Report();
  // Which bitmap must hold a change: the epoch it ran in.
  int before = 0, after = 0, straddle = 0;
  for (int w = 0; w < kWriters; ++w) {
    for (size_t i = 0; i < ops[w].size(); ++i) {
      const uint64_t off = offset(w, i);
      const Op& op = ops[w][i];
      int first = -1, last = -1;  // epochs that may hold it
      for (int k = 0; k <= kCheckpoints; ++k) {
        const bool starts_after_prev = k == 0 || op.start > cps[k - 1].end;
        const bool ends_before_next = k == kCheckpoints || op.end < cps[k].start;
        if (k == 0 || op.end >= cps[k - 1].start) last = k;  // could be as late as k
        if (first < 0 && (k == kCheckpoints || op.start <= cps[k].end)) first = k;
        if (starts_after_prev && ends_before_next) {
          first = last = k;
          break;
        }
      }
      bool in_any = false;
      for (int k = first; k <= last; ++k)
        in_any = in_any || t.Bitmap("b" + std::to_string(k))->Test(off);
      if (first == last) {
        EXPECT_TRUE(t.Bitmap("b" + std::to_string(first))->Test(off))
            << "change " << i << "/" << w << " ran wholly in epoch " << first << " but b" << first
            << " lacks it";
        (first == 0 ? before : after)++;
      } else {
        ++straddle;
      }
      EXPECT_TRUE(in_any) << "change " << i << "/" << w << " is in no bitmap of epochs " << first
                          << ".." << last;
    }
  }
  std::printf(
      "%d changes in the first epoch, %d wholly in later ones, %d straddling a checkpoint\n",
      before, after, straddle);
  EXPECT_GT(after, 0);
  // Frozen ones stop recording; only the last records.
  for (int k = 0; k < kCheckpoints; ++k) {
    const LiveBitmap* b = t.Snapshot()->Find("b" + std::to_string(k));
    ASSERT_NE(b, nullptr);
    EXPECT_FALSE(b->recording);
  }
}

TEST_F(TrackerEditTest, CheckpointsUnderLoadPower) {
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  CheckpointsUnderLoad(**t);
  EXPECT_EQ((*t)->stats().edits, 6u);
}

TEST_F(TrackerEditTest, CheckpointsUnderLoadNone) {
  opts_.durability = Durability::kNone;
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  CheckpointsUnderLoad(**t);
}

TEST_F(TrackerEditTest, DrainIsBoundedAndAFailedDrainChangesNothing) {
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  std::atomic<bool> release{false};
  std::atomic<bool> holding{false};
  std::thread slow([&] {
    auto c = (*t)->BeginChange(0, 4096);  // a change the plugin does not answer
    ASSERT_TRUE(c.ok());
    holding.store(true);
    while (!release.load()) std::this_thread::sleep_for(1ms);
  });
  while (!holding.load()) std::this_thread::sleep_for(1ms);
  Status s = (*t)->Edit([](BitmapEditSet& e) { return e.Checkpoint("b0", "b1"); }, 50ms);
  EXPECT_TRUE(s.IsBusy()) << s.ToString();
  EXPECT_NE(s.message().find("1 change(s) still in flight"), std::string::npos) << s.message();
  EXPECT_EQ((*t)->Snapshot()->all.size(), 1u);
  // The gate is open again: other changes go through while the slow one
  // is still held.
  ASSERT_TRUE((*t)->BeginChange(1 * MiB, 1).ok());
  release.store(true);
  slow.join();
  ASSERT_TRUE(Checkpoint(**t, "b0", "b1").ok());
  EXPECT_EQ((*t)->Snapshot()->all.size(), 2u);
}

TEST_F(TrackerEditTest, ClearedBitmapRecordsAgainAndPersistsExactly) {
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_TRUE((*t)->BeginChange(0, 1).ok());
  ASSERT_TRUE((*t)->Persist().ok());  // granule 0 durable: the shadow has it
  ASSERT_TRUE((*t)->Edit([](BitmapEditSet& e) { return e.Clear("b0"); }, 1s).ok());
  EXPECT_EQ((*t)->Bitmap("b0")->DirtyBytes(), 0u);
  // The shadow was replaced with the cleared content: the same granule is
  // marked again (not skipped as "covered on disk"), in_use set again.
  ASSERT_TRUE((*t)->BeginChange(0, 1).ok());
  EXPECT_TRUE((*t)->Bitmap("b0")->Test(0));
  EXPECT_TRUE((*t)->InUseOnDisk());
  ASSERT_TRUE((*t)->Close().ok());
  auto again = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(again.ok()) << again.status().ToString();
  EXPECT_EQ((*again)->Bitmap("b0")->DirtyBytes(), 64 * KiB);
}

TEST_F(TrackerEditTest, TransientBitmapsNeverTouchTheContainer) {
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_TRUE((*t)->Edit(
                      [](BitmapEditSet& e) {
                        Status s = e.SetRecording("b0", false);
                        return s.ok() ? e.Add("t", std::nullopt, /*persistent=*/false, false) : s;
                      },
                      1s)
                  .ok());
  const uint64_t sets = (*t)->stats().in_use_sets;
  ASSERT_TRUE((*t)->BeginChange(5 * MiB, 1).ok());
  EXPECT_TRUE((*t)->Bitmap("t")->Test(5 * MiB));
  EXPECT_FALSE((*t)->Bitmap("b0")->Test(5 * MiB));
  EXPECT_EQ((*t)->stats().in_use_sets, sets);  // nothing recording is stored
  EXPECT_FALSE((*t)->InUseOnDisk());
  ASSERT_TRUE((*t)->Close().ok());
  auto f = PosixStorage().Open(opts_.container_path, Storage::Mode::kReadOnly);
  ASSERT_TRUE(f.ok());
  auto img = qcow2::Image::Open(std::move(f).value());
  ASSERT_TRUE(img.ok()) << img.status().ToString();
  const auto stored = (*img)->Bitmaps();
  ASSERT_EQ(stored.size(), 1u);  // t was never stored
  EXPECT_EQ(stored[0].name, "b0");
  EXPECT_FALSE(stored[0].enabled);
  EXPECT_FALSE(stored[0].in_use);
  EXPECT_EQ(stored[0].data_clusters, 0u);
}

TEST_F(TrackerEditTest, ARestartNamingAFrozenBitmapRecordsInTheNewOne) {
  {
    auto t = Tracker::Open(opts_, 1 * GiB);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    ASSERT_TRUE(Checkpoint(**t, "b0", "b1").ok());
    ASSERT_TRUE((*t)->Close().ok());
  }
  auto t = Tracker::Open(opts_, 1 * GiB);  // still cbt-bitmap=b0
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_TRUE((*t)->BeginChange(0, 1).ok());
  EXPECT_TRUE((*t)->Bitmap("b1")->Test(0));
  EXPECT_FALSE((*t)->Bitmap("b0")->Test(0));
  ASSERT_TRUE((*t)->Edit([](BitmapEditSet& e) { return e.SetRecording("b1", false); }, 1s).ok());
  ASSERT_TRUE((*t)->Close().ok());
  (*t).reset();  // releases the container's locks
  // Now nothing records: naming b0 is refused rather than tracking nothing.
  auto none = Tracker::Open(opts_, 1 * GiB);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.status().message().find("no other bitmap records"), std::string::npos)
      << none.status().message();
}

// cbt-autoload=false sets b1 aside (disabled, in use) at open: from then on
// it is as inconsistent as one found so, also in this session: queries say
// so, only a remove applies, and an edit of the set keeps its flag.
TEST_F(TrackerEditTest, ASetAsideBitmapIsInconsistentAndEditsKeepItInUse) {
  opts_.bitmaps = {"b0", "b1"};
  {
    auto t = Tracker::Open(opts_, 1 * GiB);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    ASSERT_TRUE((*t)->Close().ok());
  }
  opts_.bitmaps = {"b0"};
  opts_.autoload = false;
  auto t = Tracker::Open(opts_, 1 * GiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_TRUE((*t)->BeginChange(0, 1).ok());
  auto find = [&](const std::string& name) {
    for (const BitmapStatus& b : (*t)->QueryBitmaps())
      if (b.name == name) return b;
    ADD_FAILURE() << name << " not listed";
    return BitmapStatus{};
  };
  BitmapStatus b1 = find("b1");
  EXPECT_FALSE(b1.consistent);
  EXPECT_TRUE(b1.in_use);
  EXPECT_FALSE(b1.recording);
  EXPECT_FALSE(b1.dirty_bytes.has_value());
  EXPECT_EQ((*t)->Bitmap("b1"), nullptr);
  Status enable = (*t)->Edit([](BitmapEditSet& e) { return e.SetRecording("b1", true); }, 1s);
  EXPECT_FALSE(enable.ok());
  EXPECT_NE(enable.message().find("inconsistent"), std::string::npos) << enable.message();
  ASSERT_TRUE(Checkpoint(**t, "b0", "b2").ok());
  ASSERT_TRUE((*t)->Close().ok());
  (*t).reset();  // releases the container's locks
  auto file = PosixStorage().Open(opts_.container_path, Storage::Mode::kReadOnly);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  auto img = qcow2::Image::Open(std::move(file).value());
  ASSERT_TRUE(img.ok()) << img.status().ToString();
  auto info = (*img)->Find("b1");
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->in_use);
  EXPECT_FALSE(info->enabled);
}

}  // namespace
}  // namespace cbt
