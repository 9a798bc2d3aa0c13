// Crash-point enumeration of the qcow2 data path (qcow2::Volume), in the
// manner of qcow2/crash_points_test.cc: a fixed sequence of guest requests
// with flushes in between runs over a CrashIO that dies after write N, for
// every N. Each crash leaves a kill -9 image (every completed write landed)
// and power-cut images (unflushed writes dropped, or kept sector by sector
// at random). Every one must:
//  - open writable again, pass our check and qemu-img check with no
//    errors (leaks allowed: exit 0 or 3, never 2);
//  - read back every byte as it was after the last flush that completed,
//    unless a later request wrote it, in which case the byte holds the old
//    value or a value a later request gave it (old-or-new data: the data
//    path writes data before an L2 entry may expose it). A trim after that
//    flush leaves its whole clusters reading zero or as before.
// The sequence covers: allocation of data clusters and L2 tables, copy on
// write of partial clusters, overwrites in place, zero clusters (kept and
// deallocated), trims that free clusters (and their later reuse), writes
// into previously zeroed clusters, and a refcount block/table growth.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <unordered_set>

#include "common/mem_io.h"
#include "qcow2/check.h"
#include "qcow2/image.h"
#include "qcow2/test_util.h"
#include "qcow2/volume.h"
#include "testing/crash_io.h"

namespace cbt::qcow2 {
namespace {

using Bytes = std::vector<std::byte>;
using cbt::testing::CrashIO;

constexpr uint64_t kPowerVariants = 4;

struct Op {
  enum Kind { kWrite, kZero, kZeroTrim, kTrim, kFlush } kind;
  uint64_t offset = 0;
  uint64_t length = 0;
  uint8_t fill = 0;  // kWrite: byte value written
};

// With a backing file: a raw one in memory, every byte kBackingByte.
constexpr std::byte kBackingByte{0x5a};

VolumeOptions Writable(uint64_t backing_size = 0) {
  VolumeOptions o;
  o.writable = true;
  if (backing_size) {
    o.backing = "base.raw";
    o.backing_format = "raw";
    o.open_file = [backing_size](const std::string&) -> Result<std::shared_ptr<BlockIO>> {
      return std::shared_ptr<BlockIO>(
          std::make_shared<MemBlockIO>(Bytes(backing_size, kBackingByte)));
    };
  }
  return o;
}

Status Apply(Volume& v, const Op& op) {
  switch (op.kind) {
    case Op::kWrite: {
      Bytes d(op.length, std::byte(op.fill));
      return v.Write(d, op.offset);
    }
    case Op::kZero:
      return v.Zero(op.offset, op.length, false, false);
    case Op::kZeroTrim:
      return v.Zero(op.offset, op.length, true, false);
    case Op::kTrim:
      return v.Trim(op.offset, op.length);
    case Op::kFlush:
      return v.Flush();
  }
  return Status::OK();
}

// The content after ops[0, n) (trims zero their whole clusters).
Bytes Model(const std::vector<Op>& ops, size_t n, uint64_t size, uint64_t cs, bool backing) {
  Bytes b(size, backing ? kBackingByte : std::byte{0});
  for (size_t i = 0; i < n; ++i) {
    const Op& op = ops[i];
    if (op.kind == Op::kWrite) std::memset(b.data() + op.offset, op.fill, op.length);
    if (op.kind == Op::kZero || op.kind == Op::kZeroTrim)
      std::memset(b.data() + op.offset, 0, op.length);
    if (op.kind == Op::kTrim) {
      uint64_t a = (op.offset + cs - 1) / cs * cs, e = (op.offset + op.length) / cs * cs;
      if (a < e) std::memset(b.data() + a, 0, e - a);
    }
  }
  return b;
}

// Whether byte i may hold value x: the durable model's value, or one a
// request after the last completed flush (ops[from, to]) gave it.
bool Allowed(const std::vector<Op>& ops, size_t from, size_t to, uint64_t i, std::byte x,
             std::byte durable, uint64_t cs) {
  if (x == durable) return true;
  for (size_t k = from; k <= to && k < ops.size(); ++k) {
    const Op& op = ops[k];
    uint64_t a = op.offset, e = op.offset + op.length;
    if (op.kind == Op::kTrim) a = (a + cs - 1) / cs * cs, e = e / cs * cs;
    if (op.kind == Op::kFlush || i < a || i >= e) continue;
    std::byte v = op.kind == Op::kWrite ? std::byte(op.fill) : std::byte{0};
    if (v == x) return true;
  }
  return false;
}

struct Sequence {
  uint32_t cluster_size;
  uint64_t size;
  std::vector<Op> ops;
  bool backing = false;  // over a raw backing file of the same size
};

uint64_t g_images = 0;

void Judge(const Bytes& img, const Sequence& sq, size_t durable_ops, size_t last_op,
           const std::string& where, const testing::TempDir& dir,
           std::unordered_set<std::string>& seen) {
  ++g_images;
  auto io = std::make_shared<MemBlockIO>(img);
  {
    auto image = Image::Open(io);
    ASSERT_TRUE(image.ok()) << where << ": " << image.status().ToString();
    auto rep = Check(**image, false);
    ASSERT_TRUE(rep.ok()) << where;
    ASSERT_EQ(rep->corruptions, 0u) << where << ": " << rep->messages.front();
  }
  auto v = Volume::Open(io, "crash.qcow2", Writable(sq.backing ? sq.size : 0));
  ASSERT_TRUE(v.ok()) << where << ": " << v.status().ToString();
  Bytes got(sq.size);
  ASSERT_TRUE((*v)->Read(got, 0).ok()) << where;
  const Bytes durable = Model(sq.ops, durable_ops, sq.size, sq.cluster_size, sq.backing);
  for (uint64_t i = 0; i < sq.size; ++i) {
    if (got[i] == durable[i]) continue;
    ASSERT_TRUE(Allowed(sq.ops, durable_ops, last_op, i, got[i], durable[i], sq.cluster_size))
        << where << ": byte " << i << " reads " << int(got[i]) << ", durable value "
        << int(durable[i]) << " (ops up to " << durable_ops << " flushed, crash in op " << last_op
        << ")";
  }
  // The crashed image stays usable: a write and a flush succeed.
  Bytes d(512, std::byte(0xee));
  ASSERT_TRUE((*v)->Write(d, 0).ok()) << where;
  ASSERT_TRUE((*v)->Flush().ok()) << where;
  std::string key(reinterpret_cast<const char*>(img.data()), img.size());
  if (testing::HaveTool("qemu-img") && seen.insert(std::move(key)).second) {
    std::string out;
    const int code = testing::QemuCheckBytes(img, dir, &out);
    ASSERT_TRUE(code == 0 || code == 3) << where << ": qemu-img check exit " << code << "\n" << out;
  }
}

void Enumerate(const std::string& label, const Sequence& sq) {
  testing::TempDir dir;
  Bytes initial;
  {
    auto mem = std::make_shared<MemBlockIO>();
    CreateOptions co;
    co.virtual_size = sq.size;
    co.cluster_size = sq.cluster_size;
    ASSERT_TRUE(Image::Create(mem, co).ok());
    initial = mem->contents();
  }
  std::unordered_set<std::string> seen;
  const uint64_t before = g_images;
  uint64_t n = 0;
  for (;; ++n) {
    auto dev = std::make_shared<CrashIO>(initial);
    size_t durable_ops = 0, last = 0;
    {
      auto v = Volume::Open(dev, "crash.qcow2", Writable(sq.backing ? sq.size : 0));
      ASSERT_TRUE(v.ok()) << v.status().ToString();
      dev->CrashAfterWrites(n);
      for (last = 0; last < sq.ops.size(); ++last) {
        Status s = Apply(**v, sq.ops[last]);
        if (!s.ok()) break;
        if (sq.ops[last].kind == Op::kFlush) durable_ops = last + 1;
      }
      if (!dev->crashed()) {
        ASSERT_EQ(last, sq.ops.size()) << label << ": op " << last << " failed without a crash";
      }
    }
    const bool finished = !dev->crashed();
    const std::string where = label + " crash after write " + std::to_string(n);
    Judge(dev->ProcessCrashImage(), sq, durable_ops, last, where + " (kill -9)", dir, seen);
    for (uint64_t k = 0; k < kPowerVariants; ++k)
      Judge(dev->PowerCutImage(k), sq, durable_ops, last,
            where + " (power cut, variant " + std::to_string(k) + ")", dir, seen);
    if (::testing::Test::HasFatalFailure() || finished) break;
  }
  std::printf("%s: %llu crash points, %llu images judged (%zu distinct)\n", label.c_str(),
              static_cast<unsigned long long>(n) + 1,
              static_cast<unsigned long long>(g_images - before), seen.size());
}

// A sequence touching every kind of metadata change, with flushes between.
std::vector<Op> Mixed(uint64_t cs) {
  using K = Op::Kind;
  return {
      {K::kWrite, 100, 3 * cs, 0x11},  // allocations, COW head and tail
      {K::kWrite, 40 * cs, cs, 0x12},  // a whole cluster
      {K::kFlush},
      {K::kWrite, 200, 1000, 0x21},           // in place
      {K::kZero, cs, cs},                     // zero flag, allocation kept
      {K::kZeroTrim, 2 * cs, cs},             // zero flag, cluster freed
      {K::kTrim, 40 * cs, cs},                // freed
      {K::kWrite, 100 * cs + 7, 5000, 0x22},  // a second L2 table (512 B clusters)
      {K::kFlush},
      {K::kWrite, cs + 10, 100, 0x31},     // into a zeroed, allocated cluster
      {K::kWrite, 50 * cs, 2 * cs, 0x32},  // reuses the freed clusters
      {K::kWrite, 2 * cs + 5, 10, 0x33},   // into a zeroed, freed cluster
      {K::kFlush},
      {K::kWrite, 4 * cs, 3 * cs + 1, 0x41},  // unflushed at the end
  };
}

TEST(VolumeCrashPoints, MixedRequests64K) {
  Enumerate("64 KiB clusters", {65536, 8u << 20, Mixed(65536)});
}

TEST(VolumeCrashPoints, MixedRequestsOverBackingFile) {
  // Partial writes copy the backing file's bytes: a cluster exposed before
  // its data landed would read neither old nor new.
  Enumerate("64 KiB clusters over a backing file", {65536, 8u << 20, Mixed(65536), true});
}

TEST(VolumeCrashPoints, MixedRequests512) {
  // 512-byte clusters: an L2 table covers 32 KiB and a refcount block 128 KiB
  // of file, so the sequence also grows the refcount structure.
  std::vector<Op> ops = Mixed(512);
  ops.insert(ops.begin() + 2, {Op::kWrite, 1000 * 512, 40 * 512, 0x13});
  Enumerate("512 B clusters", {512, 1u << 20, ops});
}

}  // namespace
}  // namespace cbt::qcow2
