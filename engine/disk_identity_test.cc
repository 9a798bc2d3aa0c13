// The disk identity record (disk_identity.h): format bounds, and the
// tracker's check at attach / record at a clean stop, over real files.
#include "engine/disk_identity.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "common/endian.h"
#include "common/posix_file.h"
#include "engine/tracker.h"
#include "qcow2/image.h"

namespace cbt {
namespace {

DiskIdentity Id(std::string path, uint64_t ino, int64_t sec) {
  DiskIdentity d;
  d.path = std::move(path);
  d.dev = 64769;
  d.ino = ino;
  d.size = 1 << 20;
  d.mtime_sec = sec;
  d.mtime_nsec = 123456789;
  return d;
}

IdentityRecord TwoDisks() {
  IdentityRecord r;
  EXPECT_TRUE(r.Set("b0", Id("/srv/disk.raw", 7, 1700000000)).ok());
  EXPECT_TRUE(r.Set("b1", Id("/srv/disk.raw", 7, 1700000000)).ok());
  EXPECT_TRUE(r.Set("older", Id("/srv/disk.raw", 7, 1600000000)).ok());
  return r;
}

TEST(IdentityRecord, RoundTrip) {
  IdentityRecord r = TwoDisks();
  std::vector<std::byte> b = r.Serialize();
  EXPECT_EQ(b.size() % 8, 0u);
  EXPECT_EQ(LoadBE32(b.data() + 8), 2u);   // two distinct identities
  EXPECT_EQ(LoadBE32(b.data() + 12), 3u);  // three bitmaps
  auto p = IdentityRecord::Parse(b);
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  for (const char* n : {"b0", "b1", "older"}) {
    ASSERT_NE(p->For(n), nullptr) << n;
    EXPECT_EQ(*p->For(n), *r.For(n)) << n;
  }
  EXPECT_EQ(p->For("absent"), nullptr);
  EXPECT_EQ(p->Serialize(), b);
}

TEST(IdentityRecord, EveryTruncationRefused) {
  std::vector<std::byte> b = TwoDisks().Serialize();
  for (size_t n = 0; n < b.size(); ++n) {
    auto p = IdentityRecord::Parse(std::span(b).first(n));
    EXPECT_FALSE(p.ok()) << n;
    if (!p.ok()) {
      EXPECT_TRUE(p.status().IsCorruption()) << n;
    }
  }
}

TEST(IdentityRecord, BadFieldsRefused) {
  const std::vector<std::byte> good = TwoDisks().Serialize();
  auto refused = [&](auto mutate, const char* what) {
    std::vector<std::byte> b = good;
    mutate(b);
    auto p = IdentityRecord::Parse(b);
    EXPECT_FALSE(p.ok()) << what;
    if (!p.ok()) {
      EXPECT_TRUE(p.status().IsCorruption()) << what;
      EXPECT_NE(p.status().message().find("disk identity record"), std::string::npos) << what;
    }
  };
  refused([](auto& b) { b[0] = std::byte{'X'}; }, "magic");
  refused([](auto& b) { StoreBE32(b.data() + 4, 2); }, "unknown version");
  refused([](auto& b) { StoreBE32(b.data() + 8, 0); }, "no disks");
  refused([](auto& b) { StoreBE32(b.data() + 8, IdentityRecord::kMaxDisks + 1); }, "disks");
  refused([](auto& b) { StoreBE32(b.data() + 8, 3); }, "disk count beyond the data");
  refused([](auto& b) { StoreBE32(b.data() + 12, 0); }, "no entries");
  refused([](auto& b) { StoreBE32(b.data() + 12, 70000); }, "entries");
  refused([](auto& b) { StoreBE32(b.data() + 16 + 32, 1000000000); }, "nanoseconds");
  refused([](auto& b) { StoreBE16(b.data() + 16 + 36, 0); }, "empty path");
  refused([](auto& b) { StoreBE16(b.data() + 16 + 36, 5000); }, "path too long");
  refused([](auto& b) { StoreBE16(b.data() + 16 + 38, 1); }, "reserved");
  refused([](auto& b) { b[16 + 40] = std::byte{'x'}; }, "relative path");
  refused([](auto& b) { b.push_back(std::byte{0}); }, "trailing byte");
  refused(
      [](auto& b) {
        for (int i = 0; i < 8; ++i) b.push_back(std::byte{0});
      },
      "trailing entry");
  // The first bitmap entry: after two disk entries of 40 + 16 bytes.
  const size_t e0 = 16 + 2 * (40 + 16);
  refused([&](auto& b) { StoreBE32(b.data() + e0, 2); }, "disk index");
  refused([&](auto& b) { StoreBE16(b.data() + e0 + 4, 0); }, "empty name");
  refused([&](auto& b) { StoreBE16(b.data() + e0 + 4, 1024); }, "name too long");
  refused([&](auto& b) { b[e0 + 8 + 2] = std::byte{1}; }, "padding");
  refused([&](auto& b) { b[e0 + 8 + 1] = std::byte{'1'}; }, "duplicate name (b0 -> b1)");
  // "older" (the only user of disk 1) pointed at disk 0: disk 1 unused.
  refused([&](auto& b) { StoreBE32(b.data() + e0 + 32, 0); }, "unused disk");
}

TEST(IdentityRecord, SetBounds) {
  IdentityRecord r;
  EXPECT_FALSE(r.Set("", Id("/a", 1, 1)).ok());
  EXPECT_FALSE(r.Set(std::string(1024, 'n'), Id("/a", 1, 1)).ok());
  EXPECT_FALSE(r.Set("b", Id("relative", 1, 1)).ok());
  EXPECT_FALSE(r.Set("b", Id("/" + std::string(4095, 'p'), 1, 1)).ok());
  EXPECT_TRUE(r.Set("b", Id("/" + std::string(4094, 'p'), 1, 1)).ok());
  EXPECT_TRUE(IdentityRecord::Parse(r.Serialize()).ok());
}

// The verdict the filter's attach and the offline backup share: frozen
// bitmaps are not looked at, inconsistent ones count as unrecorded, a disk
// moved with its size and mtime is the same disk.
TEST(IdentityRecord, JudgeDiskIdentity) {
  const IdentityRecord r = TwoDisks();  // b0, b1 at 1700000000; older at 1600000000
  auto info = [](std::string name, bool enabled, bool consistent) {
    qcow2::BitmapInfo b;
    b.name = std::move(name);
    b.enabled = enabled;
    b.consistent = consistent;
    return b;
  };
  const DiskIdentity same = Id("/srv/disk.raw", 7, 1700000000);
  IdentityVerdict v = JudgeDiskIdentity(
      r, {info("b0", true, true), info("older", false, true), info("new", true, true)}, same);
  EXPECT_TRUE(v.changed.empty());  // 'older' is frozen: not judged
  EXPECT_EQ(v.missing, std::vector<std::string>{"new"});
  EXPECT_TRUE(v.moved.empty());

  v = JudgeDiskIdentity(r, {info("b0", true, true), info("b1", true, false)},
                        Id("/mnt/moved.raw", 99, 1700000000));
  EXPECT_TRUE(v.changed.empty());
  EXPECT_EQ(v.missing, std::vector<std::string>{"b1"});  // inconsistent: no entry counts
  EXPECT_NE(v.moved.find("/mnt/moved.raw"), std::string::npos) << v.moved;

  v = JudgeDiskIdentity(r, {info("b0", true, true), info("older", true, true)}, same);
  EXPECT_EQ(v.changed, std::vector<std::string>{"older"});
  EXPECT_NE(v.what.find("mtime 1600000000.123456789 -> 1700000000.123456789"), std::string::npos)
      << v.what;
  const std::string msg = ChangedDiskRefusal(v, same, "/srv/disk.cbt", "BACKUP", "else");
  EXPECT_NE(msg.find("bitmap(s) 'older' in /srv/disk.cbt would miss those changes"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("'cbt recover /srv/disk.cbt --bitmap older --compare BACKUP'"),
            std::string::npos)
      << msg;
}

TEST(IdentityRecord, DescribeChange) {
  DiskIdentity a = Id("/d", 1, 10), b = a;
  EXPECT_EQ(DescribeIdentityChange(a, b), "");
  b.mtime_nsec = 1;
  EXPECT_NE(DescribeIdentityChange(a, b).find("mtime 10.123456789 -> 10.000000001"),
            std::string::npos);
  b = a;
  b.size = 5;
  EXPECT_NE(DescribeIdentityChange(a, b).find("size 1048576 -> 5 bytes"), std::string::npos);
  b = a;
  b.ino = 2;
  EXPECT_NE(DescribeIdentityChange(a, b).find("inode"), std::string::npos);
  // A move keeps the content: only size and mtime count for a refusal.
  b.path = "/elsewhere";
  EXPECT_EQ(DescribeContentChange(a, b), "");
  b.size = 5;
  EXPECT_NE(DescribeContentChange(a, b).find("size"), std::string::npos);
  b = a;
  b.mtime_sec = 11;
  EXPECT_NE(DescribeContentChange(a, b).find("mtime"), std::string::npos);
}

TEST(DiskIdentity, AnotherFileNeedsAnotherPathAndInode) {
  DiskIdentity a;
  a.path = "/d/f.raw";
  a.dev = 1;
  a.ino = 7;
  DiskIdentity b = a;
  EXPECT_FALSE(IsAnotherFile(a, b));
  b.path = "/d/g.raw";  // renamed: the same file
  EXPECT_FALSE(IsAnotherFile(a, b));
  b.ino = 8;
  EXPECT_TRUE(IsAnotherFile(a, b));
  b.path = a.path;  // replaced under its name (restored, copied back)
  EXPECT_FALSE(IsAnotherFile(a, b));
  b = a;
  b.path = "/d/g.raw";
  b.dev = 2;
  EXPECT_TRUE(IsAnotherFile(a, b));
}

// The tracker over a real raw file and container.
class TrackerIdentityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cbt-identity-XXXXXX";
    dir_ = mkdtemp(tmpl);
    disk_ = dir_ + "/disk.raw";
    std::filesystem::resize_file(Touch(disk_), kSize);
    opts_.container_path = dir_ + "/disk.cbt";
    opts_.bitmaps = {"b0"};
    opts_.create = true;
    opts_.disk_identity = [this] { return FileIdentity(disk_); };
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  static std::string Touch(const std::string& p) {
    std::ofstream(p, std::ios::app).flush();
    return p;
  }
  // A session that writes `n` bytes at 0 through the tracker (and to the
  // disk), then stops cleanly.
  Status Session(size_t n = 4096) {
    auto t = Tracker::Open(opts_, kSize);
    if (!t.ok()) return t.status();
    if (n) {
      auto c = (*t)->BeginChange(0, n);
      if (!c.ok()) return c.status();
      WriteDisk(0, n);
    }
    return (*t)->Close();
  }
  void WriteDisk(uint64_t off, size_t n) {
    std::fstream f(disk_, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(off));
    std::string data(n, 'x');
    f.write(data.data(), static_cast<std::streamsize>(n));
  }
  void BumpMtime() {
    // A distinct timestamp however coarse the clock: one second later.
    auto t = std::filesystem::last_write_time(disk_);
    std::filesystem::last_write_time(disk_, t + std::chrono::seconds(1));
  }
  IdentityRecord Stored() {
    auto f = PosixFile::Open(opts_.container_path, PosixFile::Mode::kReadOnly);
    EXPECT_TRUE(f.ok());
    auto img = qcow2::Image::Open(std::shared_ptr<BlockIO>(std::move(f).value()));
    EXPECT_TRUE(img.ok());
    auto r = LoadIdentityRecord(**img);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : IdentityRecord{};
  }
  static constexpr uint64_t kSize = 1 << 20;
  std::string dir_, disk_;
  TrackerOptions opts_;
};

TEST_F(TrackerIdentityTest, CleanStopRecordsAndStartAccepts) {
  ASSERT_TRUE(Session().ok());
  IdentityRecord r = Stored();
  ASSERT_NE(r.For("b0"), nullptr);
  EXPECT_EQ(*r.For("b0"), *FileIdentity(disk_));
  EXPECT_TRUE(Session().ok());  // no outside change
  EXPECT_TRUE(Session(0).ok());
}

TEST_F(TrackerIdentityTest, OutsideChangeRefusedWithTheFix) {
  ASSERT_TRUE(Session().ok());
  BumpMtime();
  auto t = Tracker::Open(opts_, kSize);
  ASSERT_FALSE(t.ok());
  const std::string& m = t.status().message();
  EXPECT_NE(m.find(disk_ + " changed while no tracker ran (mtime"), std::string::npos) << m;
  EXPECT_NE(m.find("cbt recover " + opts_.container_path + " --bitmap b0 --compare BACKUP"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("--mark-all"), std::string::npos) << m;
  EXPECT_NE(m.find("cbt-trust-disk=true"), std::string::npos) << m;
  // Read-only too.
  TrackerOptions ro = opts_;
  ro.readonly = true;
  auto p = Tracker::Prepare(ro);
  ASSERT_TRUE(p.ok());
  EXPECT_FALSE((*p)->AttachReadOnly(kSize).ok());
  p->reset();  // drops its lock
  // Trusted: accepted and recorded anew.
  opts_.trust_disk = true;
  ASSERT_TRUE(Session(0).ok());
  EXPECT_EQ(*Stored().For("b0"), *FileIdentity(disk_));
  opts_.trust_disk = false;
  EXPECT_TRUE(Session().ok());
}

// The container of another disk (another path and inode, another mtime):
// the refusal says so first, and the recovery only for a moved disk.
TEST_F(TrackerIdentityTest, AnotherDisksContainerSaidFirst) {
  ASSERT_TRUE(Session().ok());
  const std::string other = dir_ + "/g.raw";
  std::filesystem::resize_file(Touch(other), kSize);
  std::filesystem::last_write_time(
      other, std::filesystem::last_write_time(disk_) + std::chrono::seconds(5));
  opts_.disk_identity = [other] { return FileIdentity(other); };
  auto t = Tracker::Open(opts_, kSize);
  ASSERT_FALSE(t.ok());
  const std::string& m = t.status().message();
  const std::string lead = opts_.container_path + ": this container was made for disk " + disk_ +
                           " (inode " + std::to_string(FileIdentity(disk_)->ino) + "), not for " +
                           other + ": use " + other + "'s own container (or create one); only if ";
  EXPECT_EQ(m.rfind(lead, 0), 0u) << m;
  EXPECT_GT(m.find("cbt recover " + opts_.container_path + " --bitmap b0 --compare BACKUP"),
            lead.size())
      << m;
  EXPECT_EQ(m.find("cbt-trust-disk"), std::string::npos) << m;
  // The disk itself changed under its own path: the usual refusal.
  opts_.disk_identity = [this] { return FileIdentity(disk_); };
  BumpMtime();
  t = Tracker::Open(opts_, kSize);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().message().find("this container was made for"), std::string::npos);
  EXPECT_NE(t.status().message().find("(cbt serve: -o cbt-trust-disk=true)"), std::string::npos)
      << t.status().message();
}

TEST_F(TrackerIdentityTest, SizeChangeRefused) {
  ASSERT_TRUE(Session().ok());
  // Same size for the container, another for the file (grown, then cut back
  // to the old size would change the mtime too): check the message part.
  std::filesystem::resize_file(disk_, kSize + 512);
  auto t = Tracker::Open(opts_, kSize);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("size 1048576 -> 1049088 bytes"), std::string::npos)
      << t.status().message();
}

// From the first change on, the disk changes under our own writes: the
// record goes (a crash then leaves none, never a stale one that would refuse
// the session's own writes), and the clean stop records it again.
TEST_F(TrackerIdentityTest, RecordDroppedWhileTracking) {
  ASSERT_TRUE(Session().ok());
  for (Durability d : {Durability::kPower, Durability::kProcess, Durability::kNone}) {
    opts_.durability = d;
    auto t = Tracker::Open(opts_, kSize);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    EXPECT_NE(Stored().For("b0"), nullptr) << static_cast<int>(d);  // nothing changed yet
    {
      // Granules already dirty on disk: no mark, but the disk changes.
      auto c = (*t)->BeginChange(0, 4096);
      ASSERT_TRUE(c.ok());
    }
    EXPECT_TRUE(Stored().empty()) << static_cast<int>(d);
    WriteDisk(0, 4096);
    BumpMtime();
    ASSERT_TRUE((*t)->Close().ok());
    ASSERT_NE(Stored().For("b0"), nullptr) << static_cast<int>(d);
    EXPECT_EQ(*Stored().For("b0"), *FileIdentity(disk_));
  }
}

TEST_F(TrackerIdentityTest, UpdateBitmapIdentityMakesOneUsable) {
  opts_.bitmaps = {"b0", "b1"};
  ASSERT_TRUE(Session().ok());
  BumpMtime();
  {
    auto f = PosixFile::Open(opts_.container_path, PosixFile::Mode::kReadWrite);
    ASSERT_TRUE(f.ok());
    qcow2::OpenOptions oo;
    oo.writable = true;
    auto img = qcow2::Image::Open(std::shared_ptr<BlockIO>(std::move(f).value()), oo);
    ASSERT_TRUE(img.ok());
    auto path = RecordedDiskPath(**img, opts_.container_path, "b0");
    ASSERT_TRUE(path.has_value());
    EXPECT_EQ(*path, disk_);
    ASSERT_TRUE(UpdateBitmapIdentity(**img, "b0", *FileIdentity(disk_)).ok());
  }
  auto t = Tracker::Open(opts_, kSize);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("bitmap(s) 'b1'"), std::string::npos) << t.status().message();
  EXPECT_EQ(t.status().message().find("'b0'"), std::string::npos) << t.status().message();
}

TEST_F(TrackerIdentityTest, UnknownIdentityBehavesAsBefore) {
  opts_.disk_identity = nullptr;
  ASSERT_TRUE(Session().ok());
  EXPECT_TRUE(Stored().empty());
  BumpMtime();
  EXPECT_TRUE(Session().ok());
}

}  // namespace
}  // namespace cbt
