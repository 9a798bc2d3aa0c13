// Crash-point enumeration for every qcow2 metadata update (SQLite-style).
//
// Each scenario builds an image, then runs one operation over a CrashIO
// (testing/crash_io.h) that dies after write N, for every N from 0 to the
// number of writes the operation makes. Each crash leaves two kinds of
// image: the kill -9 one (every completed write landed) and power-cut ones
// (unflushed writes dropped, or torn at 512-byte sectors, kPowerVariants
// ways). Every such image must:
//  - open (read-only and writable) without hiding the bitmaps extension
//    (autoclear bit 0 present whenever the extension is: the window QEMU's
//    multi-sector header rewrite leaves must not exist here);
//  - pass our check and qemu-img check with no errors (leaks are allowed);
//  - keep every bit that was durable before the operation in every bitmap
//    the operation keeps, and show a bitmap it adds or drops either whole
//    (old or new content) or not at all.
// The total number of crash images judged is printed per scenario and in
// all (docs/crash-safety.md quotes it).
#include <gtest/gtest.h>

#include <cstdio>
#include <functional>
#include <map>
#include <set>
#include <string_view>
#include <unordered_set>

#include "common/endian.h"
#include "common/mem_io.h"
#include "qcow2/check.h"
#include "qcow2/format.h"
#include "qcow2/image.h"
#include "qcow2/test_util.h"
#include "qcow2/util.h"
#include "testing/crash_io.h"

namespace cbt::qcow2 {
namespace {

using namespace testing;  // NOLINT(google-build-using-namespace): test helpers
using cbt::testing::CrashIO;
using internal::DivRoundUp;

constexpr uint64_t kPowerVariants = 4;  // 0 = all unflushed writes dropped
uint64_t g_total_images = 0;

using Bytes = std::vector<std::byte>;

// What a reader sees in an image: per bitmap, its set bits (empty set and
// in_use = true for a bitmap left in use, which cannot be read).
struct View {
  std::map<std::string, std::set<uint64_t>> bits;
  std::map<std::string, bool> in_use;
};

Result<View> Read(const Bytes& bytes) {
  auto io = std::make_shared<MemBlockIO>(bytes);
  CBT_ASSIGN_OR_RETURN(std::unique_ptr<Image> img, Image::Open(io));
  if (img->stale_bitmaps_extension())
    return Status::Corruption("bitmaps extension present without autoclear bit 0");
  View v;
  for (const BitmapInfo& b : img->Bitmaps()) {
    v.in_use[b.name] = b.in_use;
    if (b.in_use) continue;
    std::vector<uint64_t> set = SetBits(*img, b.name);
    v.bits[b.name] = {set.begin(), set.end()};
  }
  return v;
}

bool Superset(const std::set<uint64_t>& big, const std::set<uint64_t>& small) {
  return std::includes(big.begin(), big.end(), small.begin(), small.end());
}

struct Scenario {
  // Builds the starting image in memory.
  std::function<Bytes()> setup;
  // The operation under test, on the image opened writable over the device.
  std::function<Status(Image&)> op;
  // Bitmaps left in use by the operation on purpose (SetInUse): their bits
  // are not readable and are judged by the engine's tests instead.
  std::set<std::string> may_be_in_use = {};
  // More to judge in every crash image (private records), if given.
  std::function<void(Image&, const std::string&)> extra = nullptr;
};

// Judges one crash image against the views before and after the operation.
void Judge(const Bytes& img, const View& before, const View& after, const Scenario& sc,
           const std::string& where, const TempDir& dir, std::unordered_set<std::string>& seen) {
  ++g_total_images;
  auto v = Read(img);
  ASSERT_TRUE(v.ok()) << where << ": " << v.status().ToString();
  {
    auto io = std::make_shared<MemBlockIO>(img);
    auto w = Image::Open(io, {.writable = true});
    ASSERT_TRUE(w.ok()) << where << ": writable open: " << w.status().ToString();
    auto rep = Check(**w, false);
    ASSERT_TRUE(rep.ok()) << where;
    ASSERT_EQ(rep->corruptions, 0u) << where << ": " << rep->messages.front();
    if (sc.extra) sc.extra(**w, where);
  }
  // qemu-img check once per distinct image (many crash points coincide).
  std::string key(reinterpret_cast<const char*>(img.data()), img.size());
  if (seen.insert(std::move(key)).second) {
    std::string out;
    const int code = QemuCheckBytes(img, dir, &out);
    ASSERT_TRUE(code == 0 || code == 3) << where << ": qemu-img check exit " << code << "\n" << out;
  }
  for (const auto& [name, bits] : before.bits) {
    const bool kept = after.bits.count(name) || after.in_use.count(name);
    auto it = v->bits.find(name);
    if (it == v->bits.end()) {
      if (v->in_use.count(name) && sc.may_be_in_use.count(name)) continue;
      ASSERT_FALSE(kept) << where << ": bitmap '" << name << "' lost";
      continue;
    }
    ASSERT_TRUE(Superset(it->second, bits)) << where << ": bitmap '" << name << "' lost bits";
  }
  for (const auto& [name, bits] : v->bits) {
    if (before.bits.count(name)) continue;
    auto a = after.bits.find(name);
    ASSERT_NE(a, after.bits.end()) << where << ": unexpected bitmap '" << name << "'";
    ASSERT_EQ(bits, a->second) << where << ": new bitmap '" << name << "' half written";
  }
}

// Runs sc for every crash point; returns the number of writes it makes.
uint64_t Enumerate(const std::string& label, const Scenario& sc) {
  TempDir dir;
  const Bytes initial = sc.setup();
  auto before = Read(initial);
  EXPECT_TRUE(before.ok()) << label << ": " << before.status().ToString();
  if (!before.ok()) return 0;
  // Clean run: how many writes, and the outcome.
  auto clean = std::make_shared<CrashIO>(initial);
  {
    auto img = Image::Open(clean, {.writable = true});
    EXPECT_TRUE(img.ok()) << img.status().ToString();
    if (!img.ok()) return 0;
    Status s = sc.op(**img);
    EXPECT_TRUE(s.ok()) << label << ": " << s.ToString();
  }
  auto after = Read(clean->ProcessCrashImage());
  EXPECT_TRUE(after.ok()) << label;
  if (!after.ok()) return 0;
  std::unordered_set<std::string> seen;
  const uint64_t before_images = g_total_images;
  uint64_t n = 0;
  for (;; ++n) {
    auto dev = std::make_shared<CrashIO>(initial);
    auto img = Image::Open(dev, {.writable = true});
    EXPECT_TRUE(img.ok());
    if (!img.ok()) return n;
    dev->CrashAfterWrites(n);
    Status s = sc.op(**img);
    const bool finished = !dev->crashed();
    if (finished) {
      EXPECT_TRUE(s.ok()) << label << ": " << s.ToString();
    }
    std::string where = label + " crash after write " + std::to_string(n);
    Judge(dev->ProcessCrashImage(), *before, *after, sc, where + " (kill -9)", dir, seen);
    for (uint64_t k = 0; k < kPowerVariants; ++k)
      Judge(dev->PowerCutImage(k), *before, *after, sc,
            where + " (power cut, variant " + std::to_string(k) + ")", dir, seen);
    if (::testing::Test::HasFatalFailure() || finished) break;
  }
  std::printf("%s: %llu crash points, %llu images judged (%zu distinct)\n", label.c_str(),
              static_cast<unsigned long long>(n) + 1,
              static_cast<unsigned long long>(g_total_images - before_images), seen.size());
  return n;
}

// --- image builders -------------------------------------------------------

Bytes Created(uint64_t size, uint32_t cluster_size) {
  auto mem = std::make_shared<MemBlockIO>();
  EXPECT_TRUE(Image::Create(mem, CreateOptions{size, cluster_size, ""}).ok());
  return mem->contents();
}

// A bitmap's data with bits set at every `stride`-th granule from `first`.
VectorSource Pattern(const Image& img, uint32_t gbits, uint64_t first, uint64_t stride) {
  uint64_t granules = DivRoundUp(img.virtual_size(), uint64_t{1} << gbits);
  VectorSource src(Bytes(DivRoundUp(granules, 8)), img.cluster_size());
  for (uint64_t g = first; g < granules; g += stride) src.SetBit(g);
  return src;
}

// Applies f to the image in bytes (no crash) and returns the result.
Bytes With(Bytes bytes, const std::function<void(Image&)>& f) {
  auto mem = std::make_shared<MemBlockIO>(std::move(bytes));
  {
    auto img = Image::Open(mem, {.writable = true});
    EXPECT_TRUE(img.ok()) << img.status().ToString();
    if (img.ok()) f(**img);
  }
  return mem->contents();
}

// 1 GiB, 4 KiB clusters: 'a' (4 KiB granules) spans 8 data clusters, 'b'
// (1 MiB granules) one.
Bytes TwoBitmaps() {
  return With(Created(1 << 30, 4096), [](Image& img) {
    VectorSource a = Pattern(img, 12, 3, 97), b = Pattern(img, 20, 1, 5);
    EXPECT_OK(img.Commit({Spec("a", 12, true, "", &a), Spec("b", 20, true, "", &b)}));
  });
}

// --- scenarios ------------------------------------------------------------

TEST(CrashPoints, DirectoryCommitAddKeepRemove) {
  Enumerate("commit: keep a, drop b, add c with data",
            {TwoBitmaps, [](Image& img) {
               VectorSource c = Pattern(img, 16, 0, 7);
               return img.Commit({Spec("a", 12, true, "a"), Spec("c", 16, true, "", &c)});
             }});
  Enumerate("commit: rewrite a with a superset (mark-all)",
            {TwoBitmaps, [](Image& img) {
               VectorSource all = Pattern(img, 12, 0, 1);
               return img.Commit({Spec("a", 12, true, "", &all), Spec("b", 20, true, "b")});
             }});
}

// A header laid out by another program: the bitmaps extension after a
// 600-byte extension, past sector 0. The first switch must move it to
// sector 0 without ever leaving the extension unvouched (QEMU clears bit 0
// around this rewrite).
Bytes ForeignLayout() {
  Bytes b = TwoBitmaps();
  auto h = ParseHeader(std::span(b).first(4096), "t");
  EXPECT_TRUE(h.ok());
  Bytes area(h->cluster_size() - 112);
  StoreBE32(area.data(), 0x77777777);
  StoreBE32(area.data() + 4, 600);
  const uint64_t off = 608;
  StoreBE32(area.data() + off, kExtBitmaps);
  StoreBE32(area.data() + off + 4, 24);
  StoreBE32(area.data() + off + 8, h->bitmaps->nb_bitmaps);
  StoreBE64(area.data() + off + 16, h->bitmaps->directory_size);
  StoreBE64(area.data() + off + 24, h->bitmaps->directory_offset);
  std::copy(area.begin(), area.end(), b.begin() + 112);
  return b;
}

TEST(CrashPoints, HeaderSwitchFromForeignLayout) {
  Enumerate("header switch: foreign layout, keep both",
            {ForeignLayout, [](Image& img) { return img.Commit(img.CurrentSpecs()); }});
  Enumerate("header switch: foreign layout, drop b",
            {ForeignLayout, [](Image& img) { return img.Commit({Spec("a", 12, true, "a")}); }});
}

TEST(CrashPoints, PrivateRecordSetRewriteRemove) {
  constexpr uint32_t kType = 0x43425449;
  auto rec = [](std::byte fill) { return Bytes(2000, fill); };  // spans 5 sectors
  Enumerate("private record: first set", {TwoBitmaps, [&](Image& img) {
                                            return img.SetPrivateRecord(kType, rec(std::byte{1}));
                                          }});
  auto with_rec = [&] {
    return With(TwoBitmaps(),
                [&](Image& img) { EXPECT_OK(img.SetPrivateRecord(kType, rec(std::byte{1}))); });
  };
  Enumerate("private record: same-length rewrite",
            {with_rec, [&](Image& img) { return img.SetPrivateRecord(kType, rec(std::byte{2})); }});
  Enumerate("private record: in-place bit update", {with_rec, [&](Image& img) {
                                                      Bytes r = rec(std::byte{1});
                                                      r[700] = std::byte{3};
                                                      r[1900] = std::byte{3};
                                                      return img.RewriteExtensionInPlace(kType, r);
                                                    }});
  Enumerate("private record: remove",
            {with_rec, [&](Image& img) { return img.RemovePrivateRecord(kType); }});
  Enumerate("private record: commit beside it", {with_rec, [](Image& img) {
                                                   VectorSource c = Pattern(img, 16, 5, 11);
                                                   auto specs = img.CurrentSpecs();
                                                   specs.push_back(Spec("c", 16, true, "", &c));
                                                   return img.Commit(specs);
                                                 }});
}

// The filter's first change: the crash-safety record armed and the disk
// identity record dropped in one header switch (engine ArmLocked). Every
// crash image holds each vouched record whole, old or new: the identity as
// recorded, the intent record as armed, or neither.
TEST(CrashPoints, PrivateRecordsArmDropsIdentity) {
  constexpr uint32_t kIntent = 0x43425449, kIdentity = 0x43425444;
  const Bytes old_id(1200, std::byte{7}), armed(600, std::byte{9});
  auto with_identity = [&] {
    return With(TwoBitmaps(),
                [&](Image& img) { EXPECT_OK(img.SetPrivateRecord(kIdentity, old_id)); });
  };
  auto judge = [&](Image& img, const std::string& where) {
    if (!img.private_record_vouched()) return;
    const Bytes* id = img.GetExtension(kIdentity);
    const Bytes* in = img.GetExtension(kIntent);
    ASSERT_TRUE(id || in) << where << ": the bit set without a record";
    if (id) {
      EXPECT_EQ(*id, old_id) << where << ": identity record torn";
    }
    if (in) {
      EXPECT_EQ(*in, armed) << where << ": intent record torn";
    }
  };
  Scenario arm{with_identity, [&](Image& img) {
                 Image::PrivateRecordUpdate u[2];
                 u[0].type = kIntent;
                 u[0].data = armed;
                 u[1].type = kIdentity;
                 Status st = img.UpdatePrivateRecords(u);
                 if (st.ok() && (img.GetExtension(kIdentity) || !img.GetExtension(kIntent)))
                   return Status::Corruption("not armed");
                 return st;
               }};
  arm.extra = judge;
  Enumerate("private records: arm intent, drop identity", arm);
  // A clean stop: the identity recorded beside the (emptied) intent record.
  auto with_intent = [&] {
    return With(TwoBitmaps(), [&](Image& img) { EXPECT_OK(img.SetPrivateRecord(kIntent, armed)); });
  };
  Scenario stop{with_intent, [&](Image& img) { return img.SetPrivateRecord(kIdentity, old_id); }};
  stop.extra = judge;
  Enumerate("private records: identity set beside intent", stop);
}

TEST(CrashPoints, InPlaceSlotWritesAndInUse) {
  // Every slot of 'a' rewritten with a superset of its bits: slots with
  // data are overwritten in place, clean slots get their first cluster
  // (refcount, data, flush, table entry).
  Enumerate("write slots: superset in place and new clusters",
            {TwoBitmaps, [](Image& img) {
               VectorSource more = Pattern(img, 12, 0, 3);
               const uint64_t granules = DivRoundUp(img.virtual_size(), uint64_t{1} << 12);
               for (uint64_t g = 3; g < granules; g += 97) more.SetBit(g);
               std::vector<uint64_t> slots(img.Find("a")->table_size);
               for (uint64_t s = 0; s < slots.size(); ++s) slots[s] = s;
               return img.WriteSlots("a", slots, more).status();
             }});
  Enumerate("in_use: set", {TwoBitmaps,
                            [](Image& img) {
                              std::vector<std::string> n{"a", "b"};
                              return img.SetInUse(n, true);
                            },
                            {"a", "b"}});
  // An empty bitmap 'e' (8 unallocated slots) gets every data cluster.
  auto with_empty = [] {
    return With(TwoBitmaps(), [](Image& img) {
      auto specs = img.CurrentSpecs();
      specs.push_back(Spec("e", 12));
      EXPECT_OK(img.Commit(specs));
    });
  };
  Enumerate("preallocate", {with_empty, [](Image& img) { return img.Preallocate("e"); }});
}

// Refcount structures growing inside an operation: with 512-byte clusters
// a refcount block covers 256 clusters and the one-cluster table 64 blocks.
// The setup fills the file up to just below a block (or the table) limit
// with leaked clusters, so that the operation's allocations grow it.
// Free clusters the refcount table can still describe (a range without a
// block yet loses one cluster to the block itself); for blocks: only up
// to the end of the last block's range.
uint64_t FreeCovered(Refcounts& rc, bool table) {
  const uint64_t epb = rc.entries_per_block();
  uint64_t free = 0;
  for (uint64_t b = 0; b < rc.table().size(); ++b) {
    if (rc.table()[b] == 0) {
      if (table) free += epb - 1;
      continue;
    }
    for (uint64_t c = b * epb; c < (b + 1) * epb; ++c) free += *rc.Get(c) == 0;
  }
  return free;
}

Bytes NearLimit(bool table) {
  return With(Created(64 << 20, 512), [table](Image& img) {
    VectorSource a = Pattern(img, 16, 3, 97);
    EXPECT_OK(img.Commit({Spec("a", 16, true, "", &a)}));
    Refcounts& rc = img.refcounts();
    // Leave two free clusters. One cluster at a time: first fit fills the
    // holes of existing blocks before it starts a new one, and runs longer
    // than a block's range cannot be placed (see Refcounts::Allocate).
    for (uint64_t f; (f = FreeCovered(rc, table)) > 2;) {
      for (uint64_t i = 0; i + 2 < f; ++i) {
        auto r = rc.Allocate(1);
        ASSERT_TRUE(r.ok()) << r.status().ToString();
      }
    }
  });
}

TEST(CrashPoints, RefcountBlockAndTableGrowth) {
  auto add = [](Image& img) {
    VectorSource c = Pattern(img, 16, 0, 5);
    return img.Commit({Spec("a", 16, true, "a"), Spec("c", 16, true, "", &c)});
  };
  // The operation really grows what it is meant to grow.
  for (bool table : {false, true}) {
    auto mem = std::make_shared<MemBlockIO>(NearLimit(table));
    auto img = std::move(Image::Open(mem, {.writable = true})).value();
    auto count = [&] {
      auto& t = img->refcounts().table();
      return std::count_if(t.begin(), t.end(), [](uint64_t e) { return e != 0; });
    };
    const uint64_t toff = img->refcounts().table_offset();
    const auto blocks = count();
    ASSERT_OK(add(*img));
    EXPECT_GT(count(), blocks);
    if (table) {
      EXPECT_NE(img->refcounts().table_offset(), toff);
    }
  }
  Enumerate("refcount block growth", {[] { return NearLimit(false); }, add});
  Enumerate("refcount table growth", {[] { return NearLimit(true); }, add});
}

TEST(CrashPoints, Total) {
  std::printf("crash-point enumeration so far: %llu crash images judged\n",
              static_cast<unsigned long long>(g_total_images));
}

}  // namespace
}  // namespace cbt::qcow2
