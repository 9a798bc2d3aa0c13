// Decompression of qcow2 compressed clusters: zlib (raw deflate, QEMU's
// default) and zstd (compression_type=zstd). The stored length is only an
// upper bound (whole 512-byte sectors), so both decoders stop when the
// cluster is full and ignore what follows. Pure functions, any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "common/status.h"

namespace cbt::qcow2 {

inline constexpr uint32_t kCompressionZlib = 0;
inline constexpr uint32_t kCompressionZstd = 1;

// Fills all of `out` (one cluster) from the compressed bytes `in`.
// Failure: Corruption when the data is malformed or too short.
Status Decompress(uint32_t type, std::span<const std::byte> in, std::span<std::byte> out);

}  // namespace cbt::qcow2
