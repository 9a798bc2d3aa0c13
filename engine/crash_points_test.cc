// Crash-point enumeration of the tracker's protocol (SQLite-style): a whole
// serving session runs over a container device that dies after write N, for
// every N (testing/crash_io.h, injected through engine/storage.h). The
// session arms the crash-safety record and sets in_use at its first change,
// extends the record, persists (slot writes, in_use and record cleared), sets
// in_use again, persists and closes. At each crash the changes whose
// BeginChange returned OK count as forwarded to the disk.
//
// After every crash, for the kill -9 image and (power mode) the power-cut
// images, a new tracker must open the container (recovering at open), and
// its bitmap must hold every bit durable before the session and every
// forwarded change; the recovered container must pass qemu-img check. In
// mode none a crash may instead be refused, with the recovery hint. Crashes
// during the recovery itself are enumerated too.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <thread>
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
  for (const Range& r : durable) EXPECT_TRUE((*t)->BeginChange(r.off, r.len).ok());
  EXPECT_TRUE((*t)->Close().ok());
  return st.device(kPath)->ProcessCrashImage();
}

// One serving session; records the changes BeginChange let through.
// Stops at the first error (the device is dead from there on).
void Session(Tracker& t, std::vector<Range>* forwarded) {
  struct Step {
    Range change;  // len 0: not a change
    std::function<Status()> run;
  };
  auto change = [&](uint64_t off, uint64_t len) {
    return Step{{off, len}, [&t, off, len] { return t.BeginChange(off, len).status(); }};
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
    EXPECT_TRUE((*(*t)->Bitmap("b0")).IsDirty(r.off, r.len))
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

// ---- online edits (Tracker::Edit) ----
//
// A session with two edits: a checkpoint (b0 frozen, b1 new) together with
// adding a disabled t2, then merging b1 into b0 and renaming t2 to t3. After
// a crash at every write, the container holds the set before or after each
// edit, never a mix; every change forwarded before the checkpoint is in b0,
// every change forwarded after it is in b1, and after the merge b0 also
// holds what b1 held then.

struct EditProgress {
  int edits_done = 0;                         // edits that returned OK
  bool in_edit = false;                       // the crash hit an edit
  std::vector<Range> before, after1, after2;  // forwarded changes by stage
  // A change made on another thread while the first edit stores (after its
  // swap, before its commit), in a region already recorded: it needs no
  // gate, so it is forwarded at once. After a crash it must be in b1 if the
  // new set is there, else in b0 (recovered from the record).
  std::vector<Range> window;
};

void EditSession(Tracker& t, testing::CrashIO& dev, EditProgress* p) {
  auto change = [&](uint64_t off, uint64_t len, std::vector<Range>* into) {
    if (!t.BeginChange(off, len).ok()) return false;
    into->push_back({off, len});
    return true;
  };
  auto edit = [&](const Tracker::EditOps& ops) {
    p->in_edit = true;
    if (!t.Edit(ops, std::chrono::milliseconds(1000)).ok()) return false;
    p->in_edit = false;
    ++p->edits_done;
    return true;
  };
  if (!change(1 * MiB, 64 * KiB, &p->before)) return;
  if (!change(130 * MiB, 1 * MiB, &p->before)) return;
  bool armed = true;
  dev.SetWriteHook([&] {
    if (!armed) return;
    armed = false;
    std::thread other([&] { change(1 * MiB + 512 * KiB, 4 * KiB, &p->window); });
    other.join();
  });
  if (!edit([](BitmapEditSet& s) {
        Status st = s.Checkpoint("b0", "b1");
        return st.ok() ? s.Add("t2", 4096, true, /*disabled=*/true) : st;
      }))
    return;
  dev.SetWriteHook(nullptr);
  if (!change(200 * MiB, 64 * KiB, &p->after1)) return;
  if (!change(5 * MiB, 4 * KiB, &p->after1)) return;
  if (!edit([](BitmapEditSet& s) {
        Status st = s.Merge("b0", {"b1"});
        return st.ok() ? s.Rename("t2", "t3") : st;
      }))
    return;
  if (!change(kDisk - 4 * KiB, 4 * KiB, &p->after2)) return;
  (void)t.Close();
}

std::vector<std::string> StoredNames(const Bytes& img) {
  MemStorage st;
  st.Put(kPath, img);
  auto f = st.Open(kPath, Storage::Mode::kReadOnly);
  EXPECT_TRUE(f.ok());
  auto i = qcow2::Image::Open(std::move(f).value());
  EXPECT_TRUE(i.ok()) << i.status().ToString();
  std::vector<std::string> names;
  if (i.ok())
    for (const auto& b : (*i)->Bitmaps()) names.push_back(b.name);
  return names;
}

void JudgeEdit(const Bytes& img, Durability mode, const EditProgress& p, const std::string& where) {
  ++g_images;
  using Names = std::vector<std::string>;
  const Names s0 = {"b0"}, s1 = {"b0", "b1", "t2"}, s2 = {"b0", "b1", "t3"};
  const Names names = StoredNames(img);
  // The set is the one after the last edit that returned, or (crash inside
  // the next edit) the one after that edit.
  const Names& done = p.edits_done == 0 ? s0 : p.edits_done == 1 ? s1 : s2;
  const Names& next = p.edits_done == 0 ? s1 : s2;
  EXPECT_TRUE(names == done || (p.in_edit && names == next))
      << where << ": a mixed or unexpected bitmap set after the crash";
  const bool has_b1 = names != s0;
  MemStorage st;
  st.Put(kPath, img);
  TrackerOptions o = Options(st, mode);
  o.bitmaps = {has_b1 ? "b1" : "b0"};
  o.create = false;
  auto t = Tracker::Open(o, kDisk);
  if (!t.ok()) {
    EXPECT_EQ(mode, Durability::kNone) << where << ": refused: " << t.status().ToString();
    return;
  }
  auto b0 = (*t)->Bitmap("b0");
  if (!b0) {
    ADD_FAILURE() << where << ": b0 is not loaded (left in use)";
    return;
  }
  for (const Range& r : p.before)
    EXPECT_TRUE(b0->IsDirty(r.off, r.len)) << where << ": b0 lost [" << r.off << ", +" << r.len;
  if (!has_b1) {
    for (const Range& r : p.window)
      EXPECT_TRUE(b0->IsDirty(r.off, r.len)) << where << ": b0 lost the window's change";
  }
  if (has_b1) {
    auto b1 = (*t)->Bitmap("b1");
    if (!b1) {
      ADD_FAILURE() << where << ": b1 is not loaded";
      return;
    }
    for (const Range& r : p.after1)
      EXPECT_TRUE(b1->IsDirty(r.off, r.len)) << where << ": b1 lost [" << r.off << ", +" << r.len;
    for (const Range& r : p.window)
      EXPECT_TRUE(b1->IsDirty(r.off, r.len)) << where << ": b1 lost the window's change";
    for (const Range& r : p.after2)
      EXPECT_TRUE(b1->IsDirty(r.off, r.len)) << where << ": b1 lost [" << r.off << ", +" << r.len;
    if (names == s2) {  // merged: b0 holds what b1 held at the merge
      for (const Range& r : p.after1)
        EXPECT_TRUE(b0->IsDirty(r.off, r.len)) << where << ": merge lost [" << r.off;
    }
  }
  EXPECT_TRUE((*t)->Close().ok()) << where;
}

void EnumerateEdits(Durability mode, const char* label) {
  const Bytes initial = Initial(mode, {{10 * MiB, 64 * KiB}});
  uint64_t n = 0;
  for (;; ++n) {
    MemStorage st;
    st.Put(kPath, initial);
    auto dev = st.device(kPath);
    EditProgress p;
    {
      auto t = Tracker::Open(Options(st, mode), kDisk);
      ASSERT_TRUE(t.ok()) << t.status().ToString();
      dev->CrashAfterWrites(n);
      EditSession(**t, *dev, &p);
      dev->SetWriteHook(nullptr);
    }
    const bool finished = !dev->crashed();
    if (finished) {
      EXPECT_EQ(p.window.size(), 1u) << "the change during the edit's store did not run";
      EXPECT_EQ(p.edits_done, 2);
    }
    const std::string where = std::string(label) + " edits, crash after write " + std::to_string(n);
    const Bytes kill9 = dev->ProcessCrashImage();
    JudgeEdit(kill9, mode, p, where + " (kill -9)");
    if (n % 4 == 0) QemuCheck(kill9, where + " (kill -9)");
    if (mode == Durability::kPower)
      for (uint64_t k = 0; k < kPowerVariants; ++k)
        JudgeEdit(dev->PowerCutImage(k), mode, p, where + " (power cut " + std::to_string(k) + ")");
    if (finished || ::testing::Test::HasFailure()) break;
  }
  std::printf("%s: %llu edit-session crash points, %llu images judged in all\n", label,
              static_cast<unsigned long long>(n) + 1, static_cast<unsigned long long>(g_images));
}

TEST(TrackerCrashPoints, EditsAreBeforeOrAfterAtAnyCrashPointPower) {
  CBT_REQUIRE_QEMU();
  EnumerateEdits(Durability::kPower, "power");
}

TEST(TrackerCrashPoints, EditsAreBeforeOrAfterAtAnyKillPointProcess) {
  CBT_REQUIRE_QEMU();
  EnumerateEdits(Durability::kProcess, "process");
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
