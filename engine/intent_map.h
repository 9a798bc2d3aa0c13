// IntentMap: the coarse write-intent record behind cbt-durability=process
// and =power (design in docs/crash-safety.md).
//
// One bit per region of the disk (at least 64 MiB, a power of two, larger
// for big disks so the record fits in qcow2 cluster 0). A bit is set, and the
// record written (and in power mode flushed), before the first change in its
// region is forwarded; later changes in the region pass straight through.
// After a crash, every granule of every recorded region is marked dirty:
// a superset of what changed, never a miss. The record is cleared together
// with in_use once the fine bitmaps are persisted.
//
// Record format (a private qcow2 header extension, kIntentExtensionType;
// integers big-endian, bits least significant first as in bitmap data):
//    0  4  magic "CBTI"
//    4  4  version (1)
//    8  1  mode: 1 process, 2 power
//    9  1  region_bits (region size = 2^region_bits)
//   10  6  reserved, zero
//   16  8  disk size in bytes
//   24 16  boot id of the machine that wrote it (/proc/sys/kernel/random/boot_id)
//   40  8  number of regions n
//   48     ceil(n / 8) bytes of region bits, zero-padded to a multiple of 8
// While armed the bits only ever go from 0 to 1 until the whole record is
// cleared, so a write torn at sector boundaries leaves a superset.
//
// Threading: Regions/AllDurable/Want are lock-free and may run concurrently;
// Snapshot/SetDurable/ClearAll are called under the tracker's store lock.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "common/status.h"

namespace cbt {

inline constexpr uint32_t kIntentExtensionType = 0x43425449;  // "CBTI"
// The record counts only while qcow2::kAutoclearCbtIntent is set (see
// qcow2/format.h): QEMU clears that bit when it writes the file.

enum class IntentMode : uint8_t { kProcess = 1, kPower = 2 };
using BootId = std::array<std::byte, 16>;

// The running kernel's boot id; all zeros if it cannot be read.
BootId CurrentBootId();

class IntentMap {
 public:
  static constexpr uint32_t kMinRegionBits = 26;  // 64 MiB
  static constexpr size_t kHeaderBytes = 48;

  // The smallest region size (>= 64 MiB) whose record fits in max_bytes.
  // InvalidArgument if even 2^62-byte regions do not fit.
  static Result<std::unique_ptr<IntentMap>> Create(uint64_t disk_size, IntentMode mode,
                                                   const BootId& boot, size_t max_bytes);
  // A stored record. Corruption if malformed.
  static Result<std::unique_ptr<IntentMap>> Parse(std::span<const std::byte> rec);

  IntentMode mode() const { return mode_; }
  const BootId& boot_id() const { return boot_; }
  uint64_t disk_size() const { return disk_size_; }
  uint32_t region_bits() const { return region_bits_; }
  uint64_t region_count() const { return nregions_; }
  size_t record_bytes() const;

  // Regions touched by [offset, offset + length). REQUIRES: length > 0.
  std::pair<uint64_t, uint64_t> Regions(uint64_t offset, uint64_t length) const {
    return {offset >> region_bits_, (offset + length - 1) >> region_bits_};
  }
  // Are regions [first, last] all recorded on disk?
  bool AllDurable(uint64_t first, uint64_t last) const;
  // Asks for regions [first, last] to be recorded.
  void Want(uint64_t first, uint64_t last);
  // The wanted bits, to be written; then SetDurable(snapshot) once on disk.
  std::vector<uint64_t> Snapshot() const;
  bool SnapshotIsDurable(const std::vector<uint64_t>& snap) const;
  void SetDurable(const std::vector<uint64_t>& snap);
  // Forgets every bit, wanted and durable.
  void ClearAll();
  // The record holding `bits` (a Snapshot()).
  std::vector<std::byte> Serialize(const std::vector<uint64_t>& bits) const;
  // Recorded regions of a parsed record, as byte ranges clipped to the disk.
  std::vector<std::pair<uint64_t, uint64_t>> RecordedRanges() const;

 private:
  IntentMap(uint64_t disk_size, IntentMode mode, const BootId& boot, uint32_t region_bits);
  uint64_t words() const { return (nregions_ + 63) / 64; }

  const uint64_t disk_size_;
  const IntentMode mode_;
  const BootId boot_;
  const uint32_t region_bits_;
  const uint64_t nregions_;
  std::unique_ptr<std::atomic<uint64_t>[]> wanted_;
  std::unique_ptr<std::atomic<uint64_t>[]> durable_;
};

}  // namespace cbt
