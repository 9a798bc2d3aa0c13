// CrashIO: TEST ONLY. A BlockIO over memory that simulates a crash at a
// chosen point, for the crash-point enumeration (SQLite's crash tests and
// LevelDB's fault-injection Env are the models).
//
// Method. The device keeps two images: `durable` (as of the last completed
// flush) and `current` (every completed write applied, in order), and the
// list of writes since the last flush. CrashAfterWrites(n) lets n more
// pwrite calls complete; the next one (or a flush with writes pending that
// comes first) and every call after it fail with EIO, as if the process had
// died there. What the disk then holds:
//  - after kill -9 (ProcessCrashImage): `current`; the page cache survives
//    the process, so every completed write landed.
//  - after a power cut (PowerCutImage): `durable` plus what the device's
//    cache happened to write back of the unflushed writes. Variant 0 drops
//    them all; variant k > 0 applies each unflushed write's 512-byte sectors
//    in order, each kept or dropped by a generator seeded with k: dropped,
//    torn and reordered-by-omission writes, at sector granularity (a sector
//    itself is atomic, as on the devices QEMU and cbt assume).
// Threading: one mutex around everything (tests only).
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <mutex>
#include <vector>

#include "common/block_io.h"

namespace cbt::testing {

class CrashIO final : public BlockIO {
 public:
  static constexpr uint64_t kNever = std::numeric_limits<uint64_t>::max();
  static constexpr uint64_t kSector = 512;

  explicit CrashIO(std::vector<std::byte> initial);

  // After n more completed pwrites, fail everything (EIO). kNever: no crash.
  void CrashAfterWrites(uint64_t n);
  bool crashed() const;
  uint64_t writes() const;   // completed pwrites
  uint64_t flushes() const;  // completed flushes

  std::vector<std::byte> ProcessCrashImage() const;
  std::vector<std::byte> PowerCutImage(uint64_t variant) const;
  // Called at the start of every pwrite, on the writing thread, outside the
  // device's lock (a test runs something "while the write is under way").
  void SetWriteHook(std::function<void()> hook);
  // Unflushed writes at this moment (what power-cut variants choose from).
  size_t pending_writes() const;

  Status pread(std::span<std::byte> out, uint64_t offset) override;
  Status pwrite(std::span<const std::byte> in, uint64_t offset) override;
  Status flush() override;
  Result<uint64_t> size() override;
  Status resize(uint64_t new_size) override;
  const char* name() const override { return "crash-io"; }

 private:
  struct Write {
    uint64_t offset;
    std::vector<std::byte> data;
  };
  Status CheckAlive();

  mutable std::mutex mu_;  // guards everything below
  std::vector<std::byte> durable_, current_;
  std::vector<Write> pending_;
  uint64_t durable_size_ = 0;
  uint64_t budget_ = kNever;
  bool crashed_ = false;
  uint64_t writes_ = 0, flushes_ = 0;
  std::function<void()> hook_;
};

}  // namespace cbt::testing
