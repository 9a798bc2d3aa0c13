// Fleece: QEMU's fleecing patterns, the view/writer interlock under threads,
// zero blocks and extents, the two error policies, the store limit, End.
#include "engine/fleece.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "common/mem_io.h"

namespace cbt {
namespace {

using namespace std::chrono_literals;
constexpr uint64_t KiB = 1024;

std::vector<std::byte> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::byte> v(n);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

// A store whose writes can be made to fail.
class FlakyStore final : public BlockIO {
 public:
  Status pread(std::span<std::byte> out, uint64_t off) override { return mem_.pread(out, off); }
  Status pwrite(std::span<const std::byte> in, uint64_t off) override {
    if (int e = fail_errno.load()) return Status::IOError("store write failed", e);
    return mem_.pwrite(in, off);
  }
  Status flush() override { return Status::OK(); }
  Result<uint64_t> size() override { return mem_.size(); }
  Status resize(uint64_t n) override { return mem_.resize(n); }
  const char* name() const override { return "flaky"; }
  std::atomic<int> fail_errno{0};

 private:
  MemBlockIO mem_;
};

// The disk: bytes in memory, changed through the fleece as the filter does.
struct Disk {
  explicit Disk(std::vector<std::byte> b) : bytes(std::move(b)) {}
  std::vector<std::byte> bytes;
  std::mutex mu;  // only to keep concurrent memcpy of one range defined
  DiskRead reader() {
    return [this](uint64_t off, std::span<std::byte> out) {
      std::lock_guard l(mu);
      std::memcpy(out.data(), bytes.data() + off, out.size());
      return Status::OK();
    };
  }
  // Write (data) or zero/trim (data == nullptr) through the fleece.
  Status Change(Fleece& f, uint64_t off, uint64_t len, const std::byte* data) {
    CBT_RETURN_IF_ERROR(f.BeforeChange(off, len, reader()));
    std::lock_guard l(mu);
    if (data)
      std::memcpy(bytes.data() + off, data, len);
    else
      std::memset(bytes.data() + off, 0, len);
    return Status::OK();
  }
};

class FleeceTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kSize = 1024 * KiB + 3 * KiB;  // a partial last block
  static constexpr uint32_t kBlock = 64 * KiB;
  void SetUp() override {
    before_ = Random(kSize, 1);
    disk_ = std::make_unique<Disk>(before_);
    store_ = std::make_shared<FlakyStore>();
  }
  std::unique_ptr<Fleece> Make(FleeceErrorPolicy p = FleeceErrorPolicy::kBreakBackup,
                               uint64_t max = 0) {
    FleeceOptions o;
    o.disk_size = kSize;
    o.block_size = kBlock;
    o.on_error = p;
    o.max_bytes = max;
    auto f = Fleece::Create(store_, o);
    EXPECT_TRUE(f.ok()) << f.status().ToString();
    return std::move(*f);
  }
  std::vector<std::byte> View(Fleece& f, uint64_t off, uint64_t len) {
    std::vector<std::byte> out(len);
    Status s = f.Read(off, out, disk_->reader());
    EXPECT_TRUE(s.ok()) << s.ToString();
    return out;
  }
  std::vector<std::byte> Old(uint64_t off, uint64_t len) {
    return {before_.begin() + off, before_.begin() + off + len};
  }
  std::vector<std::byte> before_;
  std::unique_ptr<Disk> disk_;
  std::shared_ptr<FlakyStore> store_;
};

TEST_F(FleeceTest, QemuFleecingPatternsViewKeepsOldDataLiveGetsNew) {
  auto f = Make();
  auto data = Random(kSize, 2);
  struct Case {
    uint64_t off, len;
    bool zero;
  };
  // full-block overwrite, partial-left, partial-right, two adjacent writes
  // across a boundary, a write spanning three blocks, zero, trim (zero
  // here too), the partial last block.
  const Case cases[] = {{0, kBlock, false},
                        {2 * kBlock, 512, false},
                        {4 * kBlock - 512, 512, false},
                        {5 * kBlock - 4096, 4096, false},
                        {5 * kBlock, 4096, false},
                        {7 * kBlock + 100, 2 * kBlock + 5, false},
                        {11 * kBlock, kBlock, true},
                        {13 * kBlock + 8192, 8192, true},
                        {kSize - 1000, 1000, false}};
  for (const Case& c : cases)
    ASSERT_TRUE(disk_->Change(*f, c.off, c.len, c.zero ? nullptr : data.data() + c.off).ok());
  // The view is the disk as it was; the disk has every change.
  EXPECT_EQ(View(*f, 0, kSize), before_);
  for (const Case& c : cases) {
    std::vector<std::byte> live(disk_->bytes.begin() + c.off, disk_->bytes.begin() + c.off + c.len);
    std::vector<std::byte> want(c.len);
    if (!c.zero) want.assign(data.begin() + c.off, data.begin() + c.off + c.len);
    EXPECT_EQ(live, want) << "at " << c.off;
    EXPECT_EQ(View(*f, c.off, c.len), Old(c.off, c.len)) << "at " << c.off;
  }
  // Overwriting preserved blocks again copies nothing more.
  const uint64_t copied = f->stats().copied_blocks;
  ASSERT_TRUE(disk_->Change(*f, 0, kBlock, data.data() + kBlock).ok());
  EXPECT_EQ(f->stats().copied_blocks, copied);
  EXPECT_EQ(View(*f, 0, kSize), before_);
  // 1 + 1 + 1 + 2 + 3 + 1 + 1 + 1 blocks: every block touched, once.
  EXPECT_EQ(copied, 11u);
}

TEST_F(FleeceTest, ZeroBlocksStoreNothingAndAreNotReportedAsHoles) {
  std::memset(before_.data() + 3 * kBlock, 0, 2 * kBlock);
  disk_ = std::make_unique<Disk>(before_);
  auto f = Make();
  auto data = Random(2 * kBlock, 3);
  ASSERT_TRUE(disk_->Change(*f, 3 * kBlock, 2 * kBlock, data.data()).ok());
  ASSERT_TRUE(disk_->Change(*f, 6 * kBlock, kBlock, nullptr).ok());  // trim of data
  FleeceStats st = f->stats();
  EXPECT_EQ(st.copied_blocks, 3u);
  EXPECT_EQ(st.zero_blocks, 2u);
  EXPECT_EQ(st.stored_bytes, kBlock);
  EXPECT_EQ(View(*f, 0, kSize), before_);

  // The disk says: all a hole after the trim (as a plugin would). The view
  // must say data for the trimmed block (it has data at the point in time),
  // zero for the blocks that were zeros, and the disk's answer elsewhere.
  DiskExtents holes = [](uint64_t off, uint64_t len, std::vector<ViewExtent>& out) {
    out.push_back({off, len, true, true});
    return Status::OK();
  };
  std::vector<ViewExtent> ext;
  ASSERT_TRUE(f->Extents(0, kSize, holes, ext).ok());
  std::vector<ViewExtent> want = {{0, 3 * kBlock, true, true},
                                  {3 * kBlock, 2 * kBlock, false, true},
                                  {5 * kBlock, kBlock, true, true},
                                  {6 * kBlock, kBlock, false, false},
                                  {7 * kBlock, kSize - 7 * kBlock, true, true}};
  ASSERT_EQ(ext.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(ext[i].offset, want[i].offset) << i;
    EXPECT_EQ(ext[i].length, want[i].length) << i;
    EXPECT_EQ(ext[i].hole, want[i].hole) << i;
    EXPECT_EQ(ext[i].zero, want[i].zero) << i;
  }
  // A disk answer that stops early or says nothing is filled with data.
  DiskExtents nothing = [](uint64_t, uint64_t, std::vector<ViewExtent>&) { return Status::OK(); };
  ext.clear();
  ASSERT_TRUE(f->Extents(kBlock, kBlock, nothing, ext).ok());
  ASSERT_EQ(ext.size(), 1u);
  EXPECT_FALSE(ext[0].hole);
  EXPECT_EQ(ext[0].length, kBlock);
}

// Writers and view readers on overlapping ranges from several threads: a
// view read never sees a byte written after the session started. The disk
// reader of the view sleeps between halves to widen the race window (a
// writer that did not wait for the frozen read would land in between).
TEST_F(FleeceTest, ViewReadsNeverSeeNewDataUnderConcurrentWriters) {
  auto f = Make();
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::atomic<uint64_t> reads{0};
  DiskRead slow = [&](uint64_t off, std::span<std::byte> out) {
    const size_t half = out.size() / 2;
    CBT_RETURN_IF_ERROR(disk_->reader()(off, out.first(half)));
    std::this_thread::sleep_for(200us);
    return disk_->reader()(off + half, out.subspan(half));
  };
  std::vector<std::thread> th;
  for (int r = 0; r < 2; ++r)
    th.emplace_back([&, r] {
      std::mt19937_64 rng(100 + r);
      while (!stop.load()) {
        const uint64_t off = rng() % kSize,
                       len = 1 + rng() % std::min<uint64_t>(kSize - off, 3 * kBlock);
        std::vector<std::byte> out(len);
        Status s = f->Read(off, out, slow);
        if (!s.ok() || std::memcmp(out.data(), before_.data() + off, len) != 0) ++bad;
        ++reads;
      }
    });
  for (int w = 0; w < 4; ++w)
    th.emplace_back([&, w] {
      std::mt19937_64 rng(200 + w);
      auto data = Random(2 * kBlock, 300 + w);
      for (int i = 0; i < 400; ++i) {
        const uint64_t off = rng() % kSize,
                       len = 1 + rng() % std::min<uint64_t>(kSize - off, 2 * kBlock);
        if (!disk_->Change(*f, off, len, (i % 5) ? data.data() : nullptr).ok()) ++bad;
        if (i % 50 == 0) std::this_thread::sleep_for(1ms);  // let readers in
      }
    });
  for (size_t i = 2; i < th.size(); ++i) th[i].join();
  stop.store(true);
  th[0].join();
  th[1].join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(reads.load(), 0u);
  EXPECT_EQ(View(*f, 0, kSize), before_);
  EXPECT_EQ(f->stats().copied_blocks, (kSize + kBlock - 1) / kBlock);
}

TEST_F(FleeceTest, FailWritePolicyFailsTheChangeAndKeepsTheView) {
  auto f = Make(FleeceErrorPolicy::kFailWrite);
  auto data = Random(kBlock, 4);
  store_->fail_errno = EIO;
  Status s = disk_->Change(*f, 2 * kBlock, kBlock, data.data());
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.err(), EIO);
  EXPECT_EQ(disk_->bytes, before_);  // not forwarded
  EXPECT_FALSE(f->broken());
  EXPECT_EQ(View(*f, 0, kSize), before_);
  // The store recovers: the same change now goes through.
  store_->fail_errno = 0;
  ASSERT_TRUE(disk_->Change(*f, 2 * kBlock, kBlock, data.data()).ok());
  EXPECT_EQ(View(*f, 0, kSize), before_);
}

TEST_F(FleeceTest, BreakBackupPolicyLetsWritesGoAndFailsEveryLaterViewRead) {
  auto f = Make(FleeceErrorPolicy::kBreakBackup);
  auto data = Random(kBlock, 5);
  store_->fail_errno = ENOSPC;
  ASSERT_TRUE(disk_->Change(*f, 2 * kBlock, kBlock, data.data()).ok());
  EXPECT_EQ(std::memcmp(disk_->bytes.data() + 2 * kBlock, data.data(), kBlock), 0);
  ASSERT_TRUE(f->broken());
  EXPECT_NE(f->broken()->find("store write failed"), std::string::npos) << *f->broken();
  std::vector<std::byte> out(4096);
  Status s = f->Read(0, out, disk_->reader());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("backup session broken"), std::string::npos) << s.ToString();
  std::vector<ViewExtent> ext;
  EXPECT_FALSE(f->Extents(0, kSize, nullptr, ext).ok());
  // Later changes copy nothing more.
  ASSERT_TRUE(disk_->Change(*f, 5 * kBlock, kBlock, data.data()).ok());
  EXPECT_EQ(f->stats().copied_blocks, 0u);
}

TEST_F(FleeceTest, StoreLimitIsEnospcUnderEitherPolicy) {
  auto data = Random(4 * kBlock, 6);
  {
    auto f = Make(FleeceErrorPolicy::kFailWrite, 2 * kBlock);
    ASSERT_TRUE(disk_->Change(*f, 0, 2 * kBlock, data.data()).ok());
    Status s = disk_->Change(*f, 2 * kBlock, kBlock, data.data());
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.err(), ENOSPC);
    EXPECT_NE(s.message().find("cbt-fleece-max"), std::string::npos) << s.ToString();
    // Blocks already preserved still take changes; the view is whole.
    ASSERT_TRUE(disk_->Change(*f, 0, kBlock, data.data() + kBlock).ok());
    EXPECT_EQ(View(*f, 0, kSize), before_);
  }
  disk_ = std::make_unique<Disk>(before_);
  store_ = std::make_shared<FlakyStore>();
  auto f = Make(FleeceErrorPolicy::kBreakBackup, 2 * kBlock);
  ASSERT_TRUE(disk_->Change(*f, 0, 3 * kBlock, data.data()).ok());
  ASSERT_TRUE(f->broken());
  EXPECT_NE(f->broken()->find("full"), std::string::npos) << *f->broken();
}

TEST_F(FleeceTest, EndFailsLaterReadsAndWaitsForReadsUnderWay) {
  auto f = Make();
  std::atomic<bool> in_read{false}, release{false}, ended{false};
  DiskRead blocking = [&](uint64_t off, std::span<std::byte> out) {
    in_read = true;
    while (!release.load()) std::this_thread::sleep_for(1ms);
    return disk_->reader()(off, out);
  };
  std::thread reader([&] {
    std::vector<std::byte> out(kBlock);
    EXPECT_TRUE(f->Read(0, out, blocking).ok());
  });
  while (!in_read.load()) std::this_thread::sleep_for(1ms);
  std::thread ender([&] {
    f->End();
    ended = true;
  });
  std::this_thread::sleep_for(50ms);
  EXPECT_FALSE(ended.load());  // still waiting for the read under way
  release = true;
  reader.join();
  ender.join();
  EXPECT_TRUE(ended.load());
  std::vector<std::byte> out(512);
  Status s = f->Read(0, out, disk_->reader());
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("ended"), std::string::npos) << s.ToString();
  // Changes after the end pass straight through.
  EXPECT_TRUE(f->BeforeChange(0, kBlock, disk_->reader()).ok());
}

TEST_F(FleeceTest, OptionsAreChecked) {
  FleeceOptions o;
  o.disk_size = kSize;
  o.block_size = 1000;
  EXPECT_FALSE(Fleece::Create(store_, o).ok());
  o.block_size = 2048;
  EXPECT_FALSE(Fleece::Create(store_, o).ok());
  o.block_size = 65536;
  EXPECT_FALSE(Fleece::Create(nullptr, o).ok());
  o.disk_size = uint64_t{1} << 50;  // 2^34 blocks
  EXPECT_FALSE(Fleece::Create(store_, o).ok());
}

TEST(FleeceFileTest, TemporaryStoreLeavesNothingInItsDirectory) {
  char tmpl[] = "/tmp/cbt-fleece-XXXXXX";
  std::string dir = mkdtemp(tmpl);
  {
    auto f = CreateFleeceFile(dir);
    ASSERT_TRUE(f.ok()) << f.status().ToString();
    std::vector<std::byte> b(4096, std::byte{7});
    ASSERT_TRUE((*f)->pwrite(b, 1 << 20).ok());
    EXPECT_TRUE(std::filesystem::is_empty(dir));
  }
  EXPECT_FALSE(CreateFleeceFile(dir + "/missing").ok());
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace cbt
