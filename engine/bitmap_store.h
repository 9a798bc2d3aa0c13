// Glue between the in-memory DirtyBitmap (bitmap/) and bitmaps stored in a
// qcow2 file (qcow2/): load a stored bitmap into memory, and present a
// DirtyBitmap to qcow2 as a BitmapDataSource. Shared by the cbt tool and the
// nbdkit filter. Threading: as the underlying objects (Image: one thread).
#pragma once

#include <memory>
#include <string_view>

#include "bitmap/dirty_bitmap.h"
#include "common/status.h"
#include "qcow2/image.h"

namespace cbt {

// Presents a DirtyBitmap whose chunk_bytes equals the image's cluster size as
// the data of a qcow2 bitmap. Not owning: the bitmap must outlive this.
class DirtyBitmapSource final : public qcow2::BitmapDataSource {
 public:
  explicit DirtyBitmapSource(const DirtyBitmap& b) : b_(b) {}
  bool SlotIsZero(uint64_t slot) const override { return b_.ChunkIsZero(slot); }
  void FillSlot(uint64_t slot, std::span<std::byte> out) const override {
    b_.SerializeChunk(slot, out);
  }

 private:
  const DirtyBitmap& b_;
};

// A new, empty DirtyBitmap shaped like stored bitmap `name` of `img`
// (granularity and cluster size) for a disk of `disk_size` bytes.
// disk_size defaults to the image's virtual size.
Result<std::unique_ptr<DirtyBitmap>> NewBitmapLike(const qcow2::Image& img, std::string_view name,
                                                   uint64_t disk_size = 0);

// Reads stored bitmap `name` into a new DirtyBitmap (see NewBitmapLike).
// Failure: as Image::ReadBitmap (NotFound, InvalidArgument if inconsistent,
// Corruption), or InvalidArgument if disk_size does not fit the bitmap's table.
Result<std::unique_ptr<DirtyBitmap>> LoadBitmap(qcow2::Image& img, std::string_view name,
                                                uint64_t disk_size = 0);

// An exact copy of b (same size, granularity and chunk size; the copy's
// changed-chunk record is empty).
Result<std::shared_ptr<DirtyBitmap>> CopyOf(const DirtyBitmap& b);

}  // namespace cbt
