// BackupManager over a real tracker: the session's lifecycle and refusals,
// and a session begun under load from several writer threads: the view and
// the two bitmaps agree on which writes were before the checkpoint.
#include "engine/backup.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include "tests/tools/worker_failures.h"

namespace cbt {
namespace {

using namespace std::chrono_literals;
constexpr uint64_t KiB = 1024, MiB = KiB * KiB;

class BackupTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kSize = 8 * MiB;
  void SetUp() override {
    char tmpl[] = "/tmp/cbt-backup-XXXXXX";
    dir_ = mkdtemp(tmpl);
    TrackerOptions o;
    o.container_path = dir_ + "/disk.cbt";
    o.bitmaps = {"b0"};
    o.create = true;
    auto t = Tracker::Open(o, kSize);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tracker_ = std::move(*t);
    disk_.assign(kSize, std::byte{0});
    BackupOptions bo;
    bo.dir = dir_;
    mgr_ = std::make_unique<BackupManager>(*tracker_, bo);
  }
  void TearDown() override {
    mgr_.reset();
    if (tracker_) {
      EXPECT_TRUE(tracker_->Close().ok());
    }
    std::filesystem::remove_all(dir_);
  }
  DiskRead Reader() {
    return [this](uint64_t off, std::span<std::byte> out) {
      std::lock_guard l(disk_mu_);
      std::memcpy(out.data(), disk_.data() + off, out.size());
      return Status::OK();
    };
  }
  // The filter's write path: mark, copy before write, forward.
  Status Write(uint64_t off, uint64_t value, uint64_t len = 64 * KiB) {
    auto change = tracker_->BeginChange(off, len);
    if (!change.ok()) return change.status();
    CBT_RETURN_IF_ERROR(mgr_->BeforeChange(off, len, Reader()));
    std::lock_guard l(disk_mu_);
    for (uint64_t i = 0; i < len; i += 8) std::memcpy(disk_.data() + off + i, &value, 8);
    return Status::OK();
  }
  bool Recording(const std::string& name) {
    for (const BitmapStatus& b : tracker_->QueryBitmaps())
      if (b.name == name) return b.recording;
    ADD_FAILURE() << "no bitmap " << name;
    return false;
  }

  std::string dir_;
  std::unique_ptr<Tracker> tracker_;
  std::unique_ptr<BackupManager> mgr_;
  std::mutex disk_mu_;
  std::vector<std::byte> disk_;
};

TEST_F(BackupTest, LifecycleAndRefusals) {
  ASSERT_TRUE(Write(0, 1).ok());
  BackupBeginRequest r{"b1", "b0", std::nullopt};
  auto st = mgr_->Begin(r, 5s);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_TRUE(st->active);
  EXPECT_EQ(st->frozen, "b0");
  EXPECT_EQ(st->new_name, "b1");
  EXPECT_EQ(st->disk_size, kSize);
  EXPECT_FALSE(Recording("b0"));
  EXPECT_TRUE(Recording("b1"));
  const uint64_t id = st->id;

  auto again = mgr_->Begin({"b2", "b1", std::nullopt}, 5s);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().kind(), Status::Kind::kBusy);
  EXPECT_TRUE(Recording("b1"));  // the refused begin changed nothing

  ASSERT_TRUE(Write(0, 2).ok());
  std::vector<std::byte> v(8);
  ASSERT_TRUE(mgr_->Current()->Read(0, v, Reader()).ok());
  uint64_t seen;
  std::memcpy(&seen, v.data(), 8);
  EXPECT_EQ(seen, 1u);

  EXPECT_EQ(mgr_->End(id + 1, 5s).status().kind(), Status::Kind::kNotFound);
  auto ended = mgr_->End(id, 5s);
  ASSERT_TRUE(ended.ok()) << ended.status().ToString();
  EXPECT_EQ(ended->stats.copied_blocks, 1u);
  EXPECT_FALSE(mgr_->Query().active);
  EXPECT_EQ(mgr_->Current(), nullptr);
  EXPECT_EQ(mgr_->End(std::nullopt, 5s).status().kind(), Status::Kind::kNotFound);

  // A full backup's session freezes nothing: it adds its bitmap.
  st = mgr_->Begin({"full-1", std::nullopt, 4096}, 5s);
  ASSERT_TRUE(st.ok()) << st.status().ToString();
  EXPECT_EQ(st->frozen, "");
  EXPECT_TRUE(Recording("full-1"));
  EXPECT_GT(st->id, id);
  ASSERT_TRUE(mgr_->End(std::nullopt, 5s).ok());

  // A refused edit starts no session.
  auto bad = mgr_->Begin({"b3", "no-such", std::nullopt}, 5s);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().kind(), Status::Kind::kNotFound);
  EXPECT_FALSE(mgr_->Query().active);
  EXPECT_TRUE(Write(64 * KiB, 3).ok());
}

TEST_F(BackupTest, StoreThatCannotBeCreatedStartsNothing) {
  BackupOptions bo;
  bo.dir = dir_ + "/missing";
  BackupManager m(*tracker_, bo);
  auto st = m.Begin({"b1", "b0", std::nullopt}, 5s);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.status().message().find("cbt-fleece-dir"), std::string::npos)
      << st.status().ToString();
  EXPECT_TRUE(Recording("b0"));
}

// Four writers, each on its own blocks, writing increasing values; a session
// begins meanwhile. Per block, let v be the value the view shows: every
// write acknowledged before Begin started has a value <= v, every write
// started after Begin returned has a value > v; the frozen bitmap has every
// block written up to v, the new one every block written after.
TEST_F(BackupTest, SessionBegunUnderLoadSplitsEveryBlockAtOnePoint) {
  constexpr int kWriters = 4, kPerWriter = 3000;
  constexpr uint64_t kBlock = 64 * KiB, kBlocks = kSize / kBlock;
  using Clock = std::chrono::steady_clock;
  struct Op {
    uint64_t block, value;
    Clock::time_point start, end;
  };
  std::vector<std::vector<Op>> ops(kWriters);
  testing::WorkerFailures wf;
  std::atomic<int> started{0};
  std::vector<std::thread> th;
  for (int w = 0; w < kWriters; ++w)
    th.emplace_back([&, w] {
      ++started;
      for (int i = 0; i < kPerWriter; ++i) {
        // Writer w owns blocks == w (mod kWriters); values increase per writer.
        const uint64_t block = (static_cast<uint64_t>(i) * 7 * kWriters + w) % kBlocks;
        Op op{block, static_cast<uint64_t>(i + 1), Clock::now(), {}};
        Status s = Write(block * kBlock, op.value);
        op.end = Clock::now();
        if (!wf.Check(s.ok(), [&] { return s.ToString(); })) return;
        ops[w].push_back(op);
      }
    });
  while (started.load() < kWriters) std::this_thread::yield();
  std::this_thread::sleep_for(5ms);
  const auto b0 = Clock::now();
  auto st = mgr_->Begin({"b1", "b0", std::nullopt}, 10s);
  const auto b1 = Clock::now();
  for (auto& t : th) t.join();
  wf.Report();
  ASSERT_TRUE(st.ok()) << st.status().ToString();

  std::shared_ptr<Fleece> view = mgr_->Current();
  auto frozen = tracker_->Bitmap("b0");
  auto next = tracker_->Bitmap("b1");
  ASSERT_TRUE(view && frozen && next);
  uint64_t before = 0, after = 0;
  for (int w = 0; w < kWriters; ++w)
    for (const Op& op : ops[w]) {
      std::vector<std::byte> buf(kBlock);
      ASSERT_TRUE(view->Read(op.block * kBlock, buf, Reader()).ok());
      uint64_t v;
      std::memcpy(&v, buf.data(), 8);
      for (uint64_t i = 8; i < kBlock; i += 8)  // never torn
        ASSERT_EQ(std::memcmp(buf.data() + i, &v, 8), 0) << "block " << op.block;
      if (op.end < b0) {
        EXPECT_LE(op.value, v) << "acknowledged before, block " << op.block;
      }
      if (op.start > b1) {
        EXPECT_GT(op.value, v) << "sent after, block " << op.block;
      }
      if (op.value <= v) {
        ++before;
        EXPECT_TRUE(frozen->Test(op.block * kBlock)) << "block " << op.block;
      } else {
        ++after;
        EXPECT_TRUE(next->Test(op.block * kBlock)) << "block " << op.block;
      }
    }
  EXPECT_GT(before, 0u);
  EXPECT_GT(after, 0u);
  ASSERT_TRUE(mgr_->End(std::nullopt, 5s).ok());
}

}  // namespace
}  // namespace cbt
