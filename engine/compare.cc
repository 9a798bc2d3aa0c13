#include "engine/compare.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "qcow2/volume.h"

namespace cbt {

namespace {

class RawInput final : public CompareInput {
 public:
  RawInput(std::shared_ptr<BlockIO> io, uint64_t size) : io_(std::move(io)), size_(size) {}
  uint64_t size() const override { return size_; }
  Status Read(std::span<std::byte> out, uint64_t offset) override {
    const uint64_t have = offset >= size_ ? 0 : std::min<uint64_t>(out.size(), size_ - offset);
    if (have) CBT_RETURN_IF_ERROR(io_->pread(out.first(have), offset));
    std::memset(out.data() + have, 0, out.size() - have);
    return Status::OK();
  }

 private:
  std::shared_ptr<BlockIO> io_;
  uint64_t size_;
};

class LayerInput final : public CompareInput {
 public:
  explicit LayerInput(std::shared_ptr<qcow2::Layer> layer) : layer_(std::move(layer)) {}
  uint64_t size() const override { return layer_->size(); }
  Status Read(std::span<std::byte> out, uint64_t offset) override {
    return layer_->Read(out, offset);
  }

 private:
  std::shared_ptr<qcow2::Layer> layer_;
};

// What the workers share.
struct Job {
  Job(CompareInput& d, CompareInput& b, DirtyBitmap& o, const CompareOptions& op)
      : disk(d), backup(b), out(o), opts(op) {}
  CompareInput& disk;
  CompareInput& backup;
  DirtyBitmap& out;
  const CompareOptions& opts;
  uint64_t length = 0;  // bytes to compare
  uint64_t chunks = 0;
  std::atomic<uint64_t> next{0};  // next chunk to take
  std::atomic<bool> failed{false};
  std::mutex mu;  // guards first_error, done, and the progress calls
  Status first_error;
  uint64_t done = 0;

  void Fail(Status s) {
    std::lock_guard lk(mu);
    if (!failed.exchange(true)) first_error = std::move(s);
  }
};

// Marks the granules of [off, off + len) in which a and b differ. The
// pieces follow granule boundaries (a granule larger than the chunk is
// compared piece by piece, and skipped once some piece of it was found
// different).
Status CompareChunk(DirtyBitmap& out, const std::byte* a, const std::byte* b, uint64_t off,
                    uint64_t len) {
  const uint64_t g = out.granularity();
  for (uint64_t p = off; p < off + len;) {
    const uint64_t end = std::min(off + len, (p / g + 1) * g);
    if (!out.Test(p) && std::memcmp(a + (p - off), b + (p - off), end - p) != 0) {
      CBT_ASSIGN_OR_RETURN(bool fresh, out.Mark(p, end - p));
      (void)fresh;
    }
    p = end;
  }
  return Status::OK();
}

void Work(Job& job) {
  const uint64_t cb = job.opts.chunk_bytes;
  std::unique_ptr<std::byte[]> a(new std::byte[cb]);
  std::unique_ptr<std::byte[]> b(new std::byte[cb]);
  while (!job.failed.load(std::memory_order_relaxed)) {
    const uint64_t idx = job.next.fetch_add(1, std::memory_order_relaxed);
    if (idx >= job.chunks) return;
    const uint64_t off = idx * cb;
    const uint64_t len = std::min(cb, job.length - off);
    Status s = job.disk.Read({a.get(), len}, off);
    if (s.ok()) s = job.backup.Read({b.get(), len}, off);
    if (s.ok()) s = CompareChunk(job.out, a.get(), b.get(), off, len);
    if (!s.ok()) return job.Fail(std::move(s));
    std::lock_guard lk(job.mu);
    job.done += len;
    if (job.opts.progress) job.opts.progress(job.done);
  }
}

}  // namespace

std::unique_ptr<CompareInput> RawCompareInput(std::shared_ptr<BlockIO> io, uint64_t size) {
  return std::make_unique<RawInput>(std::move(io), size);
}

std::unique_ptr<CompareInput> LayerCompareInput(std::shared_ptr<qcow2::Layer> layer) {
  return std::make_unique<LayerInput>(std::move(layer));
}

Result<CompareStats> CompareInto(CompareInput& disk, CompareInput& backup, DirtyBitmap& out,
                                 const CompareOptions& opts) {
  if (!std::has_single_bit(opts.chunk_bytes) || opts.chunk_bytes < (uint64_t{64} << 10) ||
      opts.chunk_bytes > (uint64_t{256} << 20))
    return Status::InvalidArgument("compare chunk size " + std::to_string(opts.chunk_bytes) +
                                   " is not a power of two from 64 KiB to 256 MiB");
  if (opts.workers < 1 || opts.workers > 64)
    return Status::InvalidArgument("compare workers " + std::to_string(opts.workers) +
                                   " is not in 1 .. 64");
  if (disk.size() > out.disk_size())
    return Status::InvalidArgument("the disk (" + std::to_string(disk.size()) +
                                   " bytes) is larger than the bitmap's disk (" +
                                   std::to_string(out.disk_size()) + " bytes)");
  Job job(disk, backup, out, opts);
  job.length = disk.size();
  job.chunks = (job.length + opts.chunk_bytes - 1) / opts.chunk_bytes;
  const unsigned n = static_cast<unsigned>(std::min<uint64_t>(opts.workers, job.chunks));
  {
    std::vector<std::jthread> pool;
    pool.reserve(n);
    for (unsigned i = 0; i < n; ++i) pool.emplace_back([&job] { Work(job); });
  }  // joined
  if (job.failed) return job.first_error;
  return CompareStats{.bytes_compared = job.length};
}

}  // namespace cbt
