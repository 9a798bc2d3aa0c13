#include "testing/crash_io.h"

#include <algorithm>
#include <random>

namespace cbt::testing {

namespace {

void Apply(std::vector<std::byte>& img, uint64_t off, std::span<const std::byte> d) {
  if (img.size() < off + d.size()) img.resize(off + d.size());
  std::copy(d.begin(), d.end(), img.begin() + static_cast<ptrdiff_t>(off));
}

}  // namespace

CrashIO::CrashIO(std::vector<std::byte> initial)
    : durable_(initial), current_(std::move(initial)), durable_size_(durable_.size()) {}

void CrashIO::CrashAfterWrites(uint64_t n) {
  std::lock_guard lock(mu_);
  budget_ = n;
}

bool CrashIO::crashed() const {
  std::lock_guard lock(mu_);
  return crashed_;
}

uint64_t CrashIO::writes() const {
  std::lock_guard lock(mu_);
  return writes_;
}

uint64_t CrashIO::flushes() const {
  std::lock_guard lock(mu_);
  return flushes_;
}

size_t CrashIO::pending_writes() const {
  std::lock_guard lock(mu_);
  return pending_.size();
}

Status CrashIO::CheckAlive() {
  if (crashed_) return Status::IOError("crash-io: simulated crash", EIO);
  return Status::OK();
}

std::vector<std::byte> CrashIO::ProcessCrashImage() const {
  std::lock_guard lock(mu_);
  return current_;
}

std::vector<std::byte> CrashIO::PowerCutImage(uint64_t variant) const {
  std::lock_guard lock(mu_);
  std::vector<std::byte> img = durable_;
  // A file never shrinks below what a flush made durable, and writes past
  // its end that were lost leave zeros (the size may have grown).
  img.resize(std::max<uint64_t>(durable_size_, current_.size()), std::byte{0});
  if (variant == 0) return img;
  std::mt19937_64 rng(variant);
  for (const Write& w : pending_) {
    const uint64_t end = w.offset + w.data.size();
    for (uint64_t s = w.offset / kSector * kSector; s < end; s += kSector) {
      if (rng() & 1) continue;  // this sector of this write never reached the disk
      uint64_t lo = std::max(s, w.offset), hi = std::min(s + kSector, end);
      Apply(img, lo, std::span(w.data).subspan(lo - w.offset, hi - lo));
    }
  }
  return img;
}

Status CrashIO::pread(std::span<std::byte> out, uint64_t offset) {
  std::lock_guard lock(mu_);
  CBT_RETURN_IF_ERROR(CheckAlive());
  if (offset > current_.size() || out.size() > current_.size() - offset)
    return Status::OutOfRange("crash-io: read past the end");
  std::copy_n(current_.begin() + static_cast<ptrdiff_t>(offset), out.size(), out.begin());
  return Status::OK();
}

void CrashIO::SetWriteHook(std::function<void()> hook) {
  std::lock_guard lock(mu_);
  hook_ = std::move(hook);
}

Status CrashIO::pwrite(std::span<const std::byte> in, uint64_t offset) {
  std::function<void()> hook;
  {
    std::lock_guard lock(mu_);
    hook = hook_;
  }
  if (hook) hook();  // outside the lock: it may use the device's owner
  std::lock_guard lock(mu_);
  CBT_RETURN_IF_ERROR(CheckAlive());
  if (budget_ == 0) {
    crashed_ = true;
    return CheckAlive();
  }
  if (budget_ != kNever) --budget_;
  Apply(current_, offset, in);
  pending_.push_back(Write{offset, {in.begin(), in.end()}});
  ++writes_;
  return Status::OK();
}

Status CrashIO::flush() {
  std::lock_guard lock(mu_);
  CBT_RETURN_IF_ERROR(CheckAlive());
  if (budget_ == 0 && !pending_.empty()) {
    // The crash comes before this flush completes: the last writes are
    // not durable yet (the state a crash at the next write cannot show).
    crashed_ = true;
    return CheckAlive();
  }
  durable_ = current_;
  durable_size_ = current_.size();
  pending_.clear();
  ++flushes_;
  return Status::OK();
}

Result<uint64_t> CrashIO::size() {
  std::lock_guard lock(mu_);
  CBT_RETURN_IF_ERROR(CheckAlive());
  return uint64_t{current_.size()};
}

Status CrashIO::resize(uint64_t new_size) {
  std::lock_guard lock(mu_);
  CBT_RETURN_IF_ERROR(CheckAlive());
  // Treated as durable at once (the library resizes only to grow, and a
  // grown tail reads as zeros either way).
  current_.resize(new_size, std::byte{0});
  durable_.resize(new_size, std::byte{0});
  durable_size_ = new_size;
  return Status::OK();
}

}  // namespace cbt::testing
