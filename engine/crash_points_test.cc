// Crash-point enumeration of the tracker's protocol (SQLite-style): a whole
// serving session runs over a container device that dies after write N, for
// every N (testing/crash_io.h, injected through engine/storage.h). The
// session arms the crash-safety record and sets in_use at its first change,
// extends the record, persists (slot writes, in_use and record cleared), sets
// in_use again, persists and closes. At each crash the changes whose
// BeforeChange returned OK count as forwarded to the disk.
//
// After every crash, for the kill -9 image and (power mode) the power-cut
// images, a new tracker must open the container (recovering at open), and
// its bitmap must hold every bit durable before the session and every
// forwarded change; the recovered container must pass qemu-img check. In
// mode none a crash may instead be refused, with the recovery hint. Crashes
// during the recovery itself are enumerated too.
#include <gtest/gtest.h>

#include <cstdio>
#include <functional>
#include <vector>

#include "engine/tracker.h"
#include "qcow2/test_util.h"
#include "testing/crash_io.h"
#include "testing/mem_storage.h"

namespace cbt {
namespace {

using testing::MemStorage;
using Bytes = std::vector<std::byte>;

constexpr uint64_t KiB = 1024, MiB = KiB * KiB;
constexpr uint64_t kDisk = 256 * MiB;
constexpr char kPath[] = "mem:disk.cbt";
constexpr uint64_t kPowerVariants = 4;
uint64_t g_images = 0;

struct Range {
  uint64_t off, len;
};

TrackerOptions Options(MemStorage& st, Durability mode) {
  TrackerOptions o;
  o.container_path = kPath;
  o.bitmaps = {"b0"};
  o.create = true;
  o.durability = mode;
  o.storage = &st;
  return o;
}

// A container with b0 holding `durable` (persisted, closed cleanly).
Bytes Initial(Durability mode, const std::vector<Range>& durable) {
  MemStorage st;
  auto t = Tracker::Open(Options(st, mode), kDisk);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  for (const Range& r : durable) EXPECT_TRUE((*t)->BeforeChange(r.off, r.len).ok());
  EXPECT_TRUE((*t)->Close().ok());
  return st.device(kPath)->ProcessCrashImage();
}

// One serving session; records the changes BeforeChange let through.
// Stops at the first error (the device is dead from there on).
void Session(Tracker& t, std::vector<Range>* forwarded) {
  struct Step {
    Range change;  // len 0: not a change
    std::function<Status()> run;
  };
  auto change = [&](uint64_t off, uint64_t len) {
    return Step{{off, len}, [&t, off, len] { return t.BeforeChange(off, len); }};
  };
  const std::vector<Step> steps = {
      change(1 * MiB, 64 * KiB),              // arms the record, sets in_use
      change(1 * MiB + 200 * KiB, 4 * KiB),   // same region: no write
      change(130 * MiB, 1 * MiB),             // the record grows
      {{0, 0}, [&] { return t.Persist(); }},  // slots; in_use and record cleared
      change(200 * MiB, 64 * KiB),            // in_use again
      change(kDisk - 4 * KiB, 4 * KiB),
      {{0, 0}, [&] { return t.Persist(); }},
      change(3 * MiB, 8 * KiB),  // persisted by Close
      {{0, 0}, [&] { return t.Close(); }},
  };
  for (const Step& s : steps) {
    if (!s.run().ok()) return;
    if (s.change.len) forwarded->push_back(s.change);
  }
}

// Reopens a crash image and judges it. Returns the recovered bytes (empty
// when refused, which only mode none may do).
Bytes Judge(const Bytes& img, Durability mode, const std::vector<Range>& must,
            const std::string& where) {
  ++g_images;
  MemStorage st;
  st.Put(kPath, img);
  auto t = Tracker::Open(Options(st, mode), kDisk);
  if (!t.ok()) {
    EXPECT_EQ(mode, Durability::kNone) << where << ": refused: " << t.status().ToString();
    EXPECT_NE(t.status().message().find("cbt recover"), std::string::npos)
        << where << ": refusal without the recovery hint: " << t.status().message();
    return {};
  }
  for (const Range& r : must)
    EXPECT_TRUE((*t)->bitmap(0).IsDirty(r.off, r.len))
        << where << ": lost [" << r.off << ", +" << r.len << ")";
  EXPECT_TRUE((*t)->Close().ok()) << where;
  return st.device(kPath)->ProcessCrashImage();
}

void QemuCheck(const Bytes& img, const std::string& where) {
  qcow2::testing::TempDir d;
  std::string out;
  const int code = qcow2::testing::QemuCheckBytes(img, d, &out);
  EXPECT_TRUE(code == 0 || code == 3) << where << ": qemu-img check exit " << code << "\n" << out;
}

void Enumerate(Durability mode, const char* label) {
  const std::vector<Range> durable = {{10 * MiB, 64 * KiB}, {100 * MiB, 3 * MiB}};
  const Bytes initial = Initial(mode, durable);
  const bool power = mode == Durability::kPower;
  uint64_t n = 0, recovery_points = 0;
  for (;; ++n) {
    MemStorage st;
    st.Put(kPath, initial);
    auto dev = st.device(kPath);
    std::vector<Range> forwarded;
    {
      auto t = Tracker::Open(Options(st, mode), kDisk);
      ASSERT_TRUE(t.ok()) << t.status().ToString();
      dev->CrashAfterWrites(n);
      Session(**t, &forwarded);
    }
    const bool finished = !dev->crashed();
    std::vector<Range> must = durable;
    must.insert(must.end(), forwarded.begin(), forwarded.end());
    const std::string where = std::string(label) + " crash after write " + std::to_string(n);
    Bytes kill9 = dev->ProcessCrashImage();
    Bytes rec = Judge(kill9, mode, must, where + " (kill -9)");
    if (!rec.empty() && n % 3 == 0) QemuCheck(rec, where + " (kill -9, recovered)");
    if (power) {
      for (uint64_t k = 0; k < kPowerVariants; ++k) {
        Bytes r = Judge(dev->PowerCutImage(k), mode, must,
                        where + " (power cut " + std::to_string(k) + ")");
        if (!r.empty() && k == 1 && n % 3 == 0) QemuCheck(r, where + " (power cut, recovered)");
      }
    }
    // Crash inside the recovery of the kill -9 image: every write of it.
    if (mode != Durability::kNone && !finished) {
      for (uint64_t m = 0;; ++m) {
        MemStorage rs;
        rs.Put(kPath, kill9);
        auto rdev = rs.device(kPath);
        rdev->CrashAfterWrites(m);
        {
          auto t = Tracker::Open(Options(rs, mode), kDisk);
          if (t.ok()) (void)(*t)->Close();
        }
        const bool done = !rdev->crashed();
        ++recovery_points;
        Judge(rdev->ProcessCrashImage(), mode, must,
              where + ", then recovery crash after write " + std::to_string(m));
        if (power)
          Judge(rdev->PowerCutImage(1), mode, must,
                where + ", then recovery power cut after write " + std::to_string(m));
        if (done || ::testing::Test::HasFailure()) break;
      }
    }
    if (finished || ::testing::Test::HasFailure()) break;
  }
  std::printf("%s: %llu session crash points, %llu recovery crash points, %llu images judged\n",
              label, static_cast<unsigned long long>(n) + 1,
              static_cast<unsigned long long>(recovery_points),
              static_cast<unsigned long long>(g_images));
}

TEST(TrackerCrashPoints, PowerModeLosesNothingAtAnyCrashPoint) {
  CBT_REQUIRE_QEMU();
  Enumerate(Durability::kPower, "power");
}

TEST(TrackerCrashPoints, ProcessModeLosesNothingAtAnyKillPoint) {
  CBT_REQUIRE_QEMU();
  Enumerate(Durability::kProcess, "process");
}

TEST(TrackerCrashPoints, NoneModeRefusesOrIsExact) {
  CBT_REQUIRE_QEMU();
  Enumerate(Durability::kNone, "none");
}

}  // namespace
}  // namespace cbt
