#include "testing/volatile_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "common/endian.h"

namespace cbt {

namespace {
constexpr char kMagic[8] = {'C', 'B', 'T', 'J', 'C', 'O', 'N', 'T'};

Status WriteAll(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n) {
    ssize_t r = ::write(fd, c, n);
    if (r < 0) return Status::FromErrno(errno, "volatile journal");
    c += r;
    n -= static_cast<size_t>(r);
  }
  return Status::OK();
}
}  // namespace

Result<std::unique_ptr<VolatileBlockIO>> VolatileBlockIO::Wrap(std::shared_ptr<BlockIO> inner,
                                                               const std::string& journal) {
  int fd = ::open(journal.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, "open " + journal);
  if (Status s = WriteAll(fd, kMagic, sizeof(kMagic)); !s.ok()) {
    ::close(fd);
    return s;
  }
  return std::unique_ptr<VolatileBlockIO>(new VolatileBlockIO(std::move(inner), fd));
}

VolatileBlockIO::~VolatileBlockIO() {
  ::close(fd_);
}

Status VolatileBlockIO::pread(std::span<std::byte> out, uint64_t offset) {
  std::lock_guard lock(mu_);
  uint64_t end = offset + out.size();
  // The part the file has; pending writes may extend it.
  CBT_ASSIGN_OR_RETURN(uint64_t fsize, inner_->size());
  uint64_t have = fsize > offset ? std::min<uint64_t>(fsize - offset, out.size()) : 0;
  uint64_t covered = have;
  if (have) CBT_RETURN_IF_ERROR(inner_->pread(out.first(have), offset));
  std::fill(out.begin() + static_cast<ptrdiff_t>(have), out.end(), std::byte{0});
  for (const Pending& p : pending_) {
    uint64_t pend = p.offset + p.data.size();
    if (pend <= offset || p.offset >= end) continue;
    uint64_t lo = std::max(offset, p.offset), hi = std::min(end, pend);
    std::copy_n(p.data.begin() + static_cast<ptrdiff_t>(lo - p.offset), hi - lo,
                out.begin() + static_cast<ptrdiff_t>(lo - offset));
    covered = std::max(covered, hi - offset);
  }
  if (covered < out.size())
    return Status::OutOfRange(std::string("read ") + name() + ": past the end");
  return Status::OK();
}

Status VolatileBlockIO::pwrite(std::span<const std::byte> in, uint64_t offset) {
  std::lock_guard lock(mu_);
  std::byte hdr[16];
  StoreLE64(hdr, offset);
  StoreLE64(hdr + 8, in.size());
  CBT_RETURN_IF_ERROR(WriteAll(fd_, hdr, sizeof(hdr)));
  CBT_RETURN_IF_ERROR(WriteAll(fd_, in.data(), in.size()));
  pending_.push_back(Pending{offset, std::vector<std::byte>(in.begin(), in.end())});
  return Status::OK();
}

Status VolatileBlockIO::punch_hole(uint64_t offset, uint64_t len) {
  // The data layer punches freed clusters (at most 2 MiB each): bounded.
  if (len > (uint64_t{64} << 20))
    return Status::NotSupported("volatile cache: punch of more than 64 MiB");
  std::vector<std::byte> zeros(len);
  return pwrite(zeros, offset);
}

Status VolatileBlockIO::ApplyLocked() {
  for (const Pending& p : pending_) CBT_RETURN_IF_ERROR(inner_->pwrite(p.data, p.offset));
  pending_.clear();
  if (::ftruncate(fd_, sizeof(kMagic)) != 0) return Status::FromErrno(errno, "volatile journal");
  return Status::OK();
}

Status VolatileBlockIO::flush() {
  std::lock_guard lock(mu_);
  // Apply, then make durable: only then is the journal emptied, so a crash in
  // between replays writes that had already landed (harmless).
  for (const Pending& p : pending_) CBT_RETURN_IF_ERROR(inner_->pwrite(p.data, p.offset));
  CBT_RETURN_IF_ERROR(inner_->flush());
  pending_.clear();
  if (::ftruncate(fd_, sizeof(kMagic)) != 0) return Status::FromErrno(errno, "volatile journal");
  return Status::OK();
}

Result<uint64_t> VolatileBlockIO::size() {
  std::lock_guard lock(mu_);
  CBT_ASSIGN_OR_RETURN(uint64_t s, inner_->size());
  for (const Pending& p : pending_) s = std::max<uint64_t>(s, p.offset + p.data.size());
  return s;
}

Status VolatileBlockIO::resize(uint64_t new_size) {
  std::lock_guard lock(mu_);
  CBT_RETURN_IF_ERROR(ApplyLocked());  // rare (never on the write path): keep it simple
  return inner_->resize(new_size);
}

}  // namespace cbt
