#include "server/bitmap_io.h"

#include <bit>

namespace cbt::cli {

Result<uint64_t> CountDirtyBytes(qcow2::Image& img, std::string_view name) {
  CBT_ASSIGN_OR_RETURN(qcow2::BitmapInfo info, img.Find(name));
  const uint64_t size = img.virtual_size();
  const uint64_t g = info.granularity();
  const uint64_t nbits = size / g + (size % g != 0);
  const uint64_t bits_per_slot = img.cluster_size() * 8;
  uint64_t count = 0;
  bool last_set = false;
  CBT_RETURN_IF_ERROR(img.ReadBitmap(name, [&](uint64_t slot, std::span<const std::byte> data) {
    const uint64_t first = slot * bits_per_slot;
    if (first >= nbits) return Status::OK();
    const uint64_t n = std::min<uint64_t>(bits_per_slot, nbits - first);  // bits to count
    const uint64_t whole = n / 8;
    for (uint64_t i = 0; i < whole; ++i)
      count += std::popcount(static_cast<unsigned>(std::to_integer<uint8_t>(data[i])));
    if (n % 8) {
      unsigned mask = (1u << (n % 8)) - 1;
      count += std::popcount(std::to_integer<uint8_t>(data[whole]) & mask);
    }
    if (first + n == nbits) {
      uint64_t b = n - 1;
      last_set = (std::to_integer<uint8_t>(data[b / 8]) >> (b % 8)) & 1;
    }
    return Status::OK();
  }));
  uint64_t bytes = count * g;
  if (last_set && size % g) bytes -= g - size % g;
  return bytes;
}

}  // namespace cbt::cli
