// Byte order lives here and nowhere else. qcow2 metadata is big-endian;
// bitmap data words are serialised little-endian (bit n is bit n%8 of byte
// n/8, least significant first). Loads and stores work on unaligned bytes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cbt {

inline uint16_t LoadBE16(const std::byte* p) {
  return static_cast<uint16_t>((std::to_integer<uint16_t>(p[0]) << 8) |
                               std::to_integer<uint16_t>(p[1]));
}
inline uint32_t LoadBE32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | std::to_integer<uint32_t>(p[i]);
  return v;
}
inline uint64_t LoadBE64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | std::to_integer<uint64_t>(p[i]);
  return v;
}
inline void StoreBE16(std::byte* p, uint16_t v) {
  p[0] = std::byte(v >> 8);
  p[1] = std::byte(v);
}
inline void StoreBE32(std::byte* p, uint32_t v) {
  for (int i = 3; i >= 0; --i, v >>= 8) p[i] = std::byte(v & 0xff);
}
inline void StoreBE64(std::byte* p, uint64_t v) {
  for (int i = 7; i >= 0; --i, v >>= 8) p[i] = std::byte(v & 0xff);
}
inline uint64_t LoadLE64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | std::to_integer<uint64_t>(p[i]);
  return v;
}
inline void StoreLE64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i, v >>= 8) p[i] = std::byte(v & 0xff);
}

}  // namespace cbt
