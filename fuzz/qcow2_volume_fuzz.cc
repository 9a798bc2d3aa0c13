// libFuzzer target for the qcow2 data path (qcow2::Volume): the L1/L2 table
// and refcount reading paths, compressed and zero clusters, and the write
// path. The input is a qcow2 image; its last bytes also choose the
// operations (see OpBytes).
//
// Per input:
//  1. read-only: Volume::Open over an in-memory copy; read the first 4 MiB
//     of the disk and a few sampled windows; Extents over the same ranges
//     (and over the whole disk when it is at most 64 MiB); a range reported
//     zero must read zeros; Write must fail (read-only).
//  2. writable: Volume::Open on a fresh copy; a few writes / zeroes / trims /
//     flushes in the first MiB of the disk (and its last cluster), derived
//     from the input's last bytes; re-read, Extents. When the image
//     checks clean with qcow2::Check (no corruption, leaks allowed), every
//     byte an acknowledged operation defined must read back, and after the
//     final Flush the file must open again read-only and hold those bytes.
//
// No file system access: VolumeOptions.open_file refuses every backing file
// except, when the op bytes ask for it, a small in-memory raw disk. The
// in-memory file is bounded (writes or growth past kMaxFile fail with
// ENOSPC), so a header or L2 entry naming a huge host offset cannot make the
// harness allocate it.
//
// Build and run: fuzz/build.sh, fuzz/run.sh SECONDS volume. See
// docs/format.md ("Fuzzing").
#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/mem_io.h"
#include "qcow2/check.h"
#include "qcow2/image.h"
#include "qcow2/volume.h"

namespace {

using cbt::BlockIO;
using cbt::MemBlockIO;
using cbt::Status;
namespace q = cbt::qcow2;

constexpr size_t kMaxInput = 16 << 20;           // matches run.sh's -max_len (2 MiB cluster seeds)
constexpr uint64_t kMaxFile = 64ull << 20;       // the in-memory file's capacity
constexpr uint64_t kWindow = 4ull << 20;         // first bytes of the disk read whole
constexpr uint64_t kWriteWindow = 1ull << 20;    // the writable pass works here
constexpr uint64_t kChunk = 256ull << 10;        // read request size
constexpr uint64_t kSample = 64ull << 10;        // sampled window size
constexpr uint64_t kWholeExtents = 64ull << 20;  // Extents over the whole disk up to this
constexpr size_t kOpBytes = 32;                  // the input's last bytes choose the ops

[[noreturn]] void Fail(const char* what, const std::string& detail = "") {
  std::fprintf(stderr, "qcow2_volume_fuzz: invariant broken: %s%s%s\n", what,
               detail.empty() ? "" : ": ", detail.c_str());
  std::abort();
}

// The harness's own byte scans use libc (memcmp, memchr): instrumented
// byte loops over 4 MiB windows would cost most of the run time (traced
// compares) and add no feedback.
bool AllZero(const std::byte* p, uint64_t n) {
  return n == 0 || (p[0] == std::byte{0} && std::memcmp(p, p + 1, n - 1) == 0);
}

// The first i < n with known[i] and got[i] != want[i], or n.
uint64_t FirstDiff(const uint8_t* known, const std::byte* got, const std::byte* want, uint64_t n) {
  uint64_t i = 0;
  while (i < n) {
    const void* z = std::memchr(known + i, 0, n - i);  // end of this known run
    uint64_t end = z ? static_cast<const uint8_t*>(z) - known : n;
    if (std::memcmp(got + i, want + i, end - i) != 0)
      for (uint64_t k = i; k < end; ++k)
        if (got[k] != want[k]) return k;
    if (end == n) break;
    const void* o = std::memchr(known + end, 1, n - end);  // next known run
    if (!o) break;
    i = static_cast<const uint8_t*>(o) - known;
  }
  return n;
}

void FillPattern(std::vector<std::byte>* d, int seed) {
  for (uint64_t k = 0; k < d->size(); ++k) (*d)[k] = std::byte((k * 131 + seed) | 1);
}

// MemBlockIO with a capacity: a write or resize past kMaxFile fails with
// ENOSPC instead of growing the vector (Volume writes wherever an L2 entry
// points).
class BoundedIO final : public BlockIO {
 public:
  explicit BoundedIO(std::vector<std::byte> initial) : mem_(std::move(initial)) {}
  Status pread(std::span<std::byte> out, uint64_t offset) override {
    return mem_.pread(out, offset);
  }
  Status pwrite(std::span<const std::byte> in, uint64_t offset) override {
    if (offset > kMaxFile || in.size() > kMaxFile - offset)
      return Status::IOError("fuzz file full", ENOSPC);
    return mem_.pwrite(in, offset);
  }
  Status flush() override { return Status::OK(); }
  cbt::Result<uint64_t> size() override { return mem_.size(); }
  Status resize(uint64_t n) override {
    if (n > kMaxFile) return Status::IOError("fuzz file full", ENOSPC);
    return mem_.resize(n);
  }
  const char* name() const override { return "fuzz-memory"; }
  std::vector<std::byte> contents() const { return mem_.contents(); }

 private:
  MemBlockIO mem_;
};

// The operation bytes: the last kOpBytes of the input (zeros if shorter).
struct OpBytes {
  std::byte b[kOpBytes]{};
  size_t pos = 0;
  explicit OpBytes(std::span<const std::byte> in) {
    size_t n = std::min(in.size(), kOpBytes);
    std::memcpy(b, in.data() + in.size() - n, n);
  }
  uint8_t Next() { return static_cast<uint8_t>(b[pos++ % kOpBytes]); }
};

// Backing files: refused, or (flag) a 1 MiB in-memory raw disk of a pattern.
q::VolumeOptions Options(bool writable, bool memory_backing) {
  q::VolumeOptions o;
  o.writable = writable;
  o.max_backing_depth = 2;
  o.open_file = [memory_backing](const std::string& path) -> cbt::Result<std::shared_ptr<BlockIO>> {
    if (!memory_backing) return Status::NotFound("fuzz: backing file '" + path + "' refused");
    std::vector<std::byte> raw(1 << 20);
    for (size_t i = 0; i < raw.size(); ++i) raw[i] = std::byte(0x80 | (i >> 9));
    return std::shared_ptr<BlockIO>(std::make_shared<MemBlockIO>(std::move(raw)));
  };
  return o;
}

// The ranges read and probed: [0, kWindow) and sampled windows.
std::vector<std::pair<uint64_t, uint64_t>> Ranges(uint64_t size, OpBytes& ops) {
  std::vector<std::pair<uint64_t, uint64_t>> r;
  auto add = [&](uint64_t off) {
    if (off >= size) return;
    r.emplace_back(off, std::min(kSample, size - off));
  };
  r.emplace_back(0, std::min(size, kWindow));
  if (size > kWindow) {
    add(size - std::min(size, kSample));
    add(size / 2 / 512 * 512);
    add(size / 3);  // unaligned
    uint64_t x = (uint64_t{ops.Next()} << 24) | (uint64_t{ops.Next()} << 16) | ops.Next();
    add((x * 4099) % size);
  }
  return r;
}

// Reads [off, off+len) in kChunk requests into out (resized). False on error.
bool ReadRange(q::Volume& v, uint64_t off, uint64_t len, std::vector<std::byte>* out) {
  out->assign(len, std::byte{0x5a});
  for (uint64_t d = 0; d < len; d += kChunk) {
    uint64_t n = std::min(kChunk, len - d);
    if (!v.Read(std::span(*out).subspan(d, n), off + d).ok()) return false;
  }
  return true;
}

// Extents must tile [off, off+len) in order; a zero extent must read zeros
// (when `data` holds the range's bytes).
void CheckExtents(q::Volume& v, uint64_t off, uint64_t len, const std::vector<std::byte>* data) {
  std::vector<q::Extent> ext;
  if (!v.Extents(off, len, &ext).ok()) return;
  uint64_t at = off;
  for (const q::Extent& e : ext) {
    if (e.offset != at || e.length == 0 || e.length > off + len - at)
      Fail("Extents do not tile the range",
           std::to_string(e.offset) + "+" + std::to_string(e.length) + " at " + std::to_string(at));
    if (data && (e.flags & q::kExtentZero)) {
      if (!AllZero(data->data() + (e.offset - off), e.length))
        Fail("extent reported zero reads non-zero", std::to_string(e.offset));
    }
    at += e.length;
  }
  if (at != off + len) Fail("Extents end short", std::to_string(at));
}

void ReadAll(q::Volume& v, OpBytes& ops) {
  const uint64_t size = v.size();
  for (auto [off, len] : Ranges(size, ops)) {
    std::vector<std::byte> data;
    bool ok = ReadRange(v, off, len, &data);
    CheckExtents(v, off, len, ok ? &data : nullptr);
  }
  if (size <= kWholeExtents) CheckExtents(v, 0, size, nullptr);
  // Past the end: Extents reports a hole, Read zeros (as a backing layer).
  std::vector<q::Extent> tail;
  (void)v.Extents(size, 4096, &tail);
  std::byte past[512];
  (void)v.Read(past, size);
}

// Does the image check clean (no corruption; leaks allowed)?
bool ChecksClean(const std::vector<std::byte>& bytes) {
  auto img = q::Image::Open(std::make_shared<MemBlockIO>(bytes), q::OpenOptions{});
  if (!img.ok()) return false;
  auto rep = q::Check(**img, false);
  return rep.ok() && rep->corruptions == 0;
}

// Expected content of [0, window) of the disk after the ops: known[i] says
// whether want[i] is defined (an acknowledged op or the initial read).
struct Shadow {
  std::vector<std::byte> want;
  std::vector<uint8_t> known;  // 1: want[i] is defined
  bool readable = false;       // the window read whole before the ops
  void Set(uint64_t off, std::span<const std::byte> d) {
    if (off >= want.size()) return;
    uint64_t n = std::min<uint64_t>(d.size(), want.size() - off);
    std::memcpy(want.data() + off, d.data(), n);
    std::memset(known.data() + off, 1, n);
  }
  void Forget(uint64_t off, uint64_t len) {
    if (off >= want.size()) return;
    uint64_t n = std::min<uint64_t>(len, want.size() - off);
    std::memset(known.data() + off, 0, n);
  }
  // [off, off+len) of the window must read as known.
  void Compare(q::Volume& v, const char* when, uint64_t off = 0, uint64_t len = ~0ull) const {
    if (!readable || off >= want.size()) return;
    len = std::min<uint64_t>(len, want.size() - off);
    std::vector<std::byte> got;
    if (!ReadRange(v, off, len, &got)) Fail(when, "read failed");
    if (uint64_t i = FirstDiff(known.data() + off, got.data(), want.data() + off, len); i < len)
      Fail(when, "byte " + std::to_string(off + i) + " reads " +
                     std::to_string(static_cast<int>(got[i])) + ", want " +
                     std::to_string(static_cast<int>(want[off + i])));
  }
};

void FuzzWritable(const std::vector<std::byte>& bytes, OpBytes& ops, bool memory_backing) {
  auto io = std::make_shared<BoundedIO>(bytes);
  auto vol = q::Volume::Open(io, "fuzz.qcow2", Options(true, memory_backing));
  if (!vol.ok()) return;
  q::Volume& v = **vol;
  const uint64_t size = v.size(), cs = v.cluster_size();
  if (size == 0) return;
  const uint64_t window = std::min(size, kWriteWindow);
  const bool strict = ChecksClean(bytes);

  Shadow sh;
  sh.known.assign(window, 0);
  sh.want.assign(window, std::byte{0});
  if (strict && ReadRange(v, 0, window, &sh.want)) {
    sh.known.assign(window, 1);
    sh.readable = true;
  }

  const int nops = 1 + ops.Next() % 8;
  for (int i = 0; i < nops; ++i) {
    const uint8_t kind = ops.Next(), a = ops.Next(), b = ops.Next();
    // Offsets: cluster aligned, quarter clusters or odd sectors, inside the
    // window (sometimes the disk's last bytes).
    uint64_t unit = (kind & 0x10) ? cs : (kind & 0x20) ? std::max<uint64_t>(cs / 4, 1) : 512 + 7;
    uint64_t off = (uint64_t{a} * unit) % window;
    if ((kind & 0xc0) == 0xc0) off = size - std::min<uint64_t>(size, cs);
    uint64_t len = std::max<uint64_t>(1, (uint64_t{b} % 16 + 1) * unit / ((kind & 8) ? 3 : 1));
    len = std::min(len, size - off);
    len = std::min<uint64_t>(len, 4 * cs + 4096);  // bounded buffers
    Status s;
    switch (kind % 6) {
      case 0:
      case 1: {
        std::vector<std::byte> d(len);
        FillPattern(&d, i + 1);
        s = v.Write(d, off);
        if (s.ok())
          sh.Set(off, d);
        else
          sh.Forget(off, len);
        break;
      }
      case 2:
      case 3: {
        const bool may_trim = kind & 0x40, fast = kind & 0x80;
        s = v.Zero(off, len, may_trim, fast);
        if (s.ok()) {
          std::vector<std::byte> z(std::min(len, window));
          sh.Set(off, z);
        } else {
          sh.Forget(off, len);  // a fast zero may refuse; a failure may be partial
        }
        break;
      }
      case 4:
        // Trimmed whole clusters read zeros or the backing file: unknown.
        s = v.Trim(off, len);
        sh.Forget(off / cs * cs, len + cs);
        break;
      case 5:
        s = v.Flush();
        break;
    }
    // The op's range (and a cluster either side) reads back at once.
    if (kind % 6 != 5)
      sh.Compare(v, "read back after an op", off - std::min(off, cs), len + 2 * cs);
  }
  const Status flushed = v.Flush();
  sh.Compare(v, "read back after flush");
  {
    std::vector<std::byte> data;
    bool ok = ReadRange(v, 0, window, &data);
    CheckExtents(v, 0, window, ok ? &data : nullptr);
  }
  vol->reset();
  if (!strict || !flushed.ok()) return;
  // A clean image flushed: it opens again and holds every acknowledged byte.
  auto re = q::Volume::Open(std::make_shared<BoundedIO>(io->contents()), "fuzz.qcow2",
                            Options(false, memory_backing));
  if (!re.ok()) Fail("reopen after flush", re.status().ToString());
  sh.Compare(**re, "reopened after flush");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > kMaxInput) return -1;  // -1: do not add to the corpus
  std::span<const std::byte> in(reinterpret_cast<const std::byte*>(data), size);
  std::vector<std::byte> bytes(in.begin(), in.end());
  OpBytes ops(in);
  const bool memory_backing = ops.Next() & 1;

  // 1. Read-only.
  {
    auto vol = q::Volume::Open(std::make_shared<BoundedIO>(bytes), "fuzz.qcow2",
                               Options(false, memory_backing));
    if (vol.ok()) {
      ReadAll(**vol, ops);
      std::byte one[1]{};
      if ((*vol)->size() > 0 && (*vol)->Write(one, 0).ok()) Fail("read-only Volume wrote");
      (void)(*vol)->Flush();
    }
  }
  // 2. Writable.
  FuzzWritable(bytes, ops, memory_backing);
  return 0;
}
