// Walk-through of bitmap/: record a few writes on a 1 TiB disk, print the
// dirty extents and the bytes QEMU would find on disk.
#include <cstdio>

#include "bitmap/dirty_bitmap.h"

int main() {
  constexpr uint64_t KiB = 1024, MiB = KiB * KiB, GiB = MiB * KiB;
  auto r = cbt::DirtyBitmap::Create(1024 * GiB, 64 * KiB);
  if (!r.ok()) {
    std::fprintf(stderr, "demo: %s\n", r.status().ToString().c_str());
    return 1;
  }
  auto& b = **r;
  struct {
    uint64_t off, len;
    const char* what;
  } writes[] = {
      {0, 512, "boot sector"},
      {1 * MiB, 4 * KiB, "4 KiB at 1 MiB"},
      {1 * MiB + 4 * KiB, 4 * KiB, "next 4 KiB (same granule)"},
      {100 * GiB - 1, 2, "2 bytes across a granule boundary"},
      {512 * GiB, 64 * MiB, "64 MiB at 512 GiB"},
  };
  std::printf("disk 1 TiB, granularity 64 KiB, %llu granules, %llu bytes of bitmap in memory\n",
              static_cast<unsigned long long>(b.granule_count()),
              static_cast<unsigned long long>((b.granule_count() + 7) / 8));
  for (auto& w : writes) {
    bool fresh = *b.Mark(w.off, w.len);
    std::printf("  write %-34s -> %s\n", w.what, fresh ? "new dirty granules" : "already dirty");
  }
  std::printf("dirty: %llu granules, %llu bytes\n",
              static_cast<unsigned long long>(b.DirtyGranules()),
              static_cast<unsigned long long>(b.DirtyBytes()));
  std::printf("dirty extents:\n");
  b.ForEachExtent(0, b.disk_size(), [](const cbt::Extent& e) {
    if (e.dirty)
      std::printf("  %14llu +%llu\n", static_cast<unsigned long long>(e.offset),
                  static_cast<unsigned long long>(e.length));
    return true;
  });
  auto changed = b.TakeChangedChunks();
  std::printf("qcow2 clusters (64 KiB) to persist: %zu of %llu\n", changed.size(),
              static_cast<unsigned long long>(b.chunk_count()));
  std::vector<std::byte> chunk(b.chunk_bytes());
  b.SerializeChunk(0, chunk);
  std::printf("first bytes of cluster 0 in QEMU's bit order: %02x %02x %02x\n",
              std::to_integer<int>(chunk[0]), std::to_integer<int>(chunk[1]),
              std::to_integer<int>(chunk[2]));
  return 0;
}
