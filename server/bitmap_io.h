// Reading stored bitmaps for display, without building a DirtyBitmap
// (engine/bitmap_store.h does that for map and merge).
#pragma once

#include <cstdint>
#include <string_view>

#include "common/status.h"
#include "qcow2/image.h"

namespace cbt::cli {

// Bytes of the disk covered by set bits of stored bitmap `name` (the last
// partial granule counts its real size; bits past the disk's end, which QEMU
// ignores, are ignored). Streams the data: memory is one cluster.
// Failure: as Image::ReadBitmap (NotFound, InvalidArgument if inconsistent,
// Corruption).
Result<uint64_t> CountDirtyBytes(qcow2::Image& img, std::string_view name);

}  // namespace cbt::cli
