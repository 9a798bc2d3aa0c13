// Helpers shared by image.cc and image_inplace.cc (the generic ones are in
// qcow2/util.h). Internal to qcow2/.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>

#include "common/block_io.h"
#include "qcow2/format.h"
#include "qcow2/image.h"
#include "qcow2/util.h"

namespace cbt::qcow2::internal {

// A metadata read; a short read means the file is truncated there.
inline Status ReadMeta(BlockIO* io, std::span<std::byte> out, uint64_t off, const std::string& ctx,
                       const std::string& what) {
  Status s = io->pread(out, off);
  if (s.IsOutOfRange())
    return Status::Corruption(ctx + ": " + what + " at " + Hex(off) + " truncated");
  return s;
}

// Extensions the library manages itself (never set through SetExtension).
inline bool IsReservedExtension(uint32_t type) {
  return type == kExtEnd || type == kExtBitmaps || type == kExtFeatureTable ||
         type == kExtDataFile || type == kExtBackingFormat || type == kExtCrypto;
}

}  // namespace cbt::qcow2::internal

namespace cbt::qcow2 {

// Counts bytes written, so in-place persists can report their cost.
class Image::CountingIO final : public BlockIO {
 public:
  explicit CountingIO(std::shared_ptr<BlockIO> io) : io_(std::move(io)) {}
  Status pread(std::span<std::byte> out, uint64_t offset) override {
    return io_->pread(out, offset);
  }
  Status pwrite(std::span<const std::byte> in, uint64_t offset) override {
    written_.fetch_add(in.size(), std::memory_order_relaxed);
    return io_->pwrite(in, offset);
  }
  Status flush() override { return io_->flush(); }
  Result<uint64_t> size() override { return io_->size(); }
  Status resize(uint64_t n) override { return io_->resize(n); }
  const char* name() const override { return io_->name(); }
  uint64_t written() const { return written_.load(std::memory_order_relaxed); }

 private:
  std::shared_ptr<BlockIO> io_;
  std::atomic<uint64_t> written_{0};
};

}  // namespace cbt::qcow2
