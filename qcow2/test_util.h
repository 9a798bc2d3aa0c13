// Test helpers for qcow2/ unit tests: temp dirs, running QEMU's tools as
// judges, and a BitmapDataSource over a plain byte vector.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "common/posix_file.h"
#include "qcow2/image.h"

#define ASSERT_OK(expr)                            \
  do {                                             \
    ::cbt::Status cbt_s_ = (expr);                 \
    ASSERT_TRUE(cbt_s_.ok()) << cbt_s_.ToString(); \
  } while (0)
#define EXPECT_OK(expr)                            \
  do {                                             \
    ::cbt::Status cbt_s_ = (expr);                 \
    EXPECT_TRUE(cbt_s_.ok()) << cbt_s_.ToString(); \
  } while (0)

namespace cbt::qcow2::testing {

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/cbt_qcow2_XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string operator/(const std::string& n) const { return path + "/" + n; }
};

struct RunResult {
  int exit_code = -1;
  std::string out;
};

// Runs a shell command, capturing stdout+stderr.
inline RunResult Sh(const std::string& cmd) {
  RunResult r;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  int st = pclose(p);
  r.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

// A spec for Commit(): new (or kept, when existing is given) bitmap.
inline BitmapSpec Spec(std::string name, uint32_t gbits, bool enabled = true,
                       std::string existing = "", const BitmapDataSource* data = nullptr) {
  BitmapSpec s;
  s.name = std::move(name);
  s.granularity_bits = gbits;
  s.enabled = enabled;
  s.existing = std::move(existing);
  s.data = data;
  return s;
}

// qemu-img check of an image held in memory (written to a file in dir).
// Returns qemu-img's exit code (-1 if the file cannot be written); its
// output goes to *out.
inline int QemuCheckBytes(const std::vector<std::byte>& img, const TempDir& dir, std::string* out) {
  const std::string p = dir / "check.qcow2";
  FILE* f = std::fopen(p.c_str(), "wb");
  if (!f) {
    *out = "cannot write " + p;
    return -1;
  }
  const bool ok = std::fwrite(img.data(), 1, img.size(), f) == img.size();
  if (std::fclose(f) != 0 || !ok) {
    *out = "cannot write " + p;
    return -1;
  }
  RunResult r = Sh("qemu-img check -f qcow2 " + p);
  *out = r.out;
  return r.exit_code;
}

inline bool HaveTool(const char* tool) {
  return Sh(std::string("command -v ") + tool + " >/dev/null").exit_code == 0;
}

#define CBT_REQUIRE_QEMU()                                                        \
  do {                                                                            \
    if (!::cbt::qcow2::testing::HaveTool("qemu-img") ||                           \
        !::cbt::qcow2::testing::HaveTool("qemu-io"))                              \
      GTEST_SKIP() << "qemu-img/qemu-io not installed; QEMU interop not checked"; \
  } while (0)

// Bitmap data held as one byte string in QEMU's order.
class VectorSource final : public BitmapDataSource {
 public:
  VectorSource(std::vector<std::byte> bytes, uint64_t cluster_size)
      : bytes_(std::move(bytes)), cs_(cluster_size) {}
  bool SlotIsZero(uint64_t slot) const override {
    for (uint64_t i = slot * cs_; i < std::min<uint64_t>(bytes_.size(), (slot + 1) * cs_); ++i)
      if (bytes_[i] != std::byte{0}) return false;
    return true;
  }
  void FillSlot(uint64_t slot, std::span<std::byte> out) const override {
    for (uint64_t i = 0; i < out.size(); ++i) {
      uint64_t b = slot * cs_ + i;
      out[i] = b < bytes_.size() ? bytes_[b] : std::byte{0};
    }
  }
  void SetBit(uint64_t n) { bytes_[n / 8] |= std::byte(1u << (n % 8)); }

 private:
  std::vector<std::byte> bytes_;
  uint64_t cs_;
};

inline std::shared_ptr<BlockIO> OpenFile(const std::string& path, bool writable) {
  auto f =
      PosixFile::Open(path, writable ? PosixFile::Mode::kReadWrite : PosixFile::Mode::kReadOnly);
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  return f.ok() ? std::shared_ptr<BlockIO>(std::move(f).value()) : nullptr;
}

inline std::shared_ptr<BlockIO> NewFile(const std::string& path) {
  auto f = PosixFile::Open(path, PosixFile::Mode::kCreateExclusive);
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  return f.ok() ? std::shared_ptr<BlockIO>(std::move(f).value()) : nullptr;
}

// Reads all set bit indexes of a bitmap.
inline std::vector<uint64_t> SetBits(Image& img, const std::string& name) {
  std::vector<uint64_t> bits;
  uint64_t cs = img.cluster_size();
  Status s = img.ReadBitmap(name, [&](uint64_t slot, std::span<const std::byte> d) {
    for (uint64_t i = 0; i < d.size(); ++i) {
      auto v = std::to_integer<unsigned>(d[i]);
      for (int b = 0; b < 8; ++b)
        if (v & (1u << b)) bits.push_back((slot * cs + i) * 8 + b);
    }
    return Status::OK();
  });
  EXPECT_TRUE(s.ok()) << s.ToString();
  return bits;
}

}  // namespace cbt::qcow2::testing
