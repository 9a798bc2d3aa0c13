#include "common/mem_io.h"

#include <algorithm>
#include <string>

namespace cbt {

namespace {
// Refuse absurd sizes instead of throwing bad_alloc at a fuzzer.
constexpr uint64_t kMaxMemSize = uint64_t{1} << 32;
}  // namespace

Status MemBlockIO::pread(std::span<std::byte> out, uint64_t offset) {
  std::lock_guard lock(mu_);
  if (offset > data_.size() || out.size() > data_.size() - offset)
    return Status::OutOfRange("read memory: past the end at offset " + std::to_string(offset));
  std::copy_n(data_.begin() + static_cast<ptrdiff_t>(offset), out.size(), out.begin());
  return Status::OK();
}

Status MemBlockIO::pwrite(std::span<const std::byte> in, uint64_t offset) {
  std::lock_guard lock(mu_);
  if (offset > kMaxMemSize || in.size() > kMaxMemSize - offset)
    return Status::IOError("write memory: too large", EFBIG);
  if (offset + in.size() > data_.size()) data_.resize(offset + in.size());
  std::copy(in.begin(), in.end(), data_.begin() + static_cast<ptrdiff_t>(offset));
  return Status::OK();
}

Result<uint64_t> MemBlockIO::size() {
  std::lock_guard lock(mu_);
  return static_cast<uint64_t>(data_.size());
}

Status MemBlockIO::resize(uint64_t new_size) {
  std::lock_guard lock(mu_);
  if (new_size > kMaxMemSize) return Status::IOError("resize memory: too large", EFBIG);
  data_.resize(new_size);
  return Status::OK();
}

std::vector<std::byte> MemBlockIO::contents() const {
  std::lock_guard lock(mu_);
  return data_;
}

}  // namespace cbt
