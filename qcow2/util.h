// Small helpers shared by the qcow2/ sources: message formatting and
// rounding. Internal to qcow2/.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>

namespace cbt::qcow2::internal {

// "0x1234": offsets in messages.
inline std::string Hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

inline uint64_t DivRoundUp(uint64_t a, uint64_t b) {
  return a / b + (a % b != 0);
}

// Extension data and directory entries are padded to 8 bytes.
inline uint64_t RoundUp8(uint64_t v) {
  return (v + 7) & ~uint64_t{7};
}

inline bool AllZero(std::span<const std::byte> b) {
  return std::all_of(b.begin(), b.end(), [](std::byte x) { return x == std::byte{0}; });
}

}  // namespace cbt::qcow2::internal
