#include "engine/bitmap_store.h"

#include <string>

namespace cbt {

Result<std::unique_ptr<DirtyBitmap>> NewBitmapLike(const qcow2::Image& img, std::string_view name,
                                                   uint64_t disk_size) {
  CBT_ASSIGN_OR_RETURN(qcow2::BitmapInfo info, img.Find(name));
  if (disk_size == 0) disk_size = img.virtual_size();
  CBT_ASSIGN_OR_RETURN(std::unique_ptr<DirtyBitmap> b,
                       DirtyBitmap::Create(disk_size, info.granularity(),
                                           static_cast<uint32_t>(img.cluster_size())));
  if (info.consistent && b->chunk_count() != info.table_size)
    return Status::InvalidArgument(img.name() + ": bitmap '" + std::string(name) + "' has " +
                                   std::to_string(info.table_size) +
                                   " table entries but a disk of " + std::to_string(disk_size) +
                                   " bytes needs " + std::to_string(b->chunk_count()));
  return b;
}

Result<std::unique_ptr<DirtyBitmap>> LoadBitmap(qcow2::Image& img, std::string_view name,
                                                uint64_t disk_size) {
  CBT_ASSIGN_OR_RETURN(std::unique_ptr<DirtyBitmap> b, NewBitmapLike(img, name, disk_size));
  DirtyBitmap* raw = b.get();
  CBT_RETURN_IF_ERROR(img.ReadBitmap(name, [raw](uint64_t slot, std::span<const std::byte> data) {
    if (slot >= raw->chunk_count())
      return Status::Corruption("bitmap slot " + std::to_string(slot) + " past the end");
    raw->LoadChunk(slot, data);
    return Status::OK();
  }));
  return b;
}

Result<std::shared_ptr<DirtyBitmap>> CopyOf(const DirtyBitmap& b) {
  CBT_ASSIGN_OR_RETURN(std::unique_ptr<DirtyBitmap> c,
                       DirtyBitmap::Create(b.disk_size(), b.granularity(), b.chunk_bytes()));
  std::vector<std::byte> buf(b.chunk_bytes());
  for (uint64_t i = 0; i < b.chunk_count(); ++i) {
    if (b.ChunkIsZero(i)) continue;
    b.SerializeChunk(i, buf);
    c->LoadChunk(i, buf);
  }
  return std::shared_ptr<DirtyBitmap>(std::move(c));
}

}  // namespace cbt
