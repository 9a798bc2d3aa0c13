// Google Benchmark for bitmap/: the cost of mark() on the write path and of
// extent iteration. Results and the command that produced them: docs/perf.md.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "bitmap/dirty_bitmap.h"

namespace {

constexpr uint64_t KiB = 1024, GiB = KiB * KiB * KiB, TiB = 1024 * GiB;

std::unique_ptr<cbt::DirtyBitmap> Make(uint64_t size, uint64_t g) {
  return std::move(cbt::DirtyBitmap::Create(size, g).value());
}

std::vector<uint64_t> RandomOffsets(uint64_t size, size_t n, uint64_t align) {
  std::mt19937_64 rng(1);
  std::vector<uint64_t> v(n);
  for (auto& o : v) o = (rng() % (size / align)) * align;
  return v;
}

// A 4 KiB write whose granule is already dirty: the steady-state write path.
void BM_MarkAlreadyDirty4K(benchmark::State& state) {
  static auto b = Make(1 * TiB, 64 * KiB);
  static auto offs = RandomOffsets(64 * GiB, 1 << 16, 4096);  // hot 64 GiB
  if (state.thread_index() == 0) (void)b->Mark(0, 64 * GiB - 1);
  size_t i = static_cast<size_t>(state.thread_index()) * 7919;
  for (auto _ : state) {
    auto r = b->Mark(offs[i++ & 0xffff], 4096);
    benchmark::DoNotOptimize(r);
  }
}
BENCHMARK(BM_MarkAlreadyDirty4K)->Threads(1)->Threads(2);

// A 4 KiB write to a clean granule: sets a bit, a summary bit and a chunk bit.
void BM_MarkFresh4K(benchmark::State& state) {
  auto b = Make(1 * TiB, 64 * KiB);
  uint64_t off = 0;
  for (auto _ : state) {
    auto r = b->Mark(off, 4096);
    benchmark::DoNotOptimize(r);
    off += 64 * KiB;
    if (off >= b->disk_size()) {
      state.PauseTiming();
      b->ClearAll();
      off = 0;
      state.ResumeTiming();
    }
  }
}
BENCHMARK(BM_MarkFresh4K);

// All dirty extents of a 1 TiB disk at 64 KiB granularity, `percent` of the
// granules dirty at scattered random positions.
void BM_Extents1TiB(benchmark::State& state) {
  const uint64_t percent = static_cast<uint64_t>(state.range(0));
  auto b = Make(1 * TiB, 64 * KiB);
  std::mt19937_64 rng(2);
  const uint64_t n = b->granule_count();
  if (percent <= 50) {
    for (uint64_t k = 0; k < n * percent / 100; ++k) (void)b->Mark((rng() % n) * 64 * KiB, 1);
  } else {
    (void)b->Mark(0, b->disk_size());
    for (uint64_t k = 0; k < n * (100 - percent) / 100; ++k)
      (void)b->ClearRange((rng() % n) * 64 * KiB, 64 * KiB);
  }
  uint64_t extents = 0;
  for (auto _ : state) {
    extents = 0;
    uint64_t bytes = 0;
    b->ForEachExtent(0, b->disk_size(), [&](const cbt::Extent& e) {
      if (e.dirty) ++extents, bytes += e.length;
      return true;
    });
    benchmark::DoNotOptimize(bytes);
  }
  state.counters["dirty_extents"] = static_cast<double>(extents);
  state.counters["dirty_pct"] =
      100.0 * static_cast<double>(b->DirtyGranules()) / static_cast<double>(n);
}
BENCHMARK(BM_Extents1TiB)->Arg(1)->Arg(99)->Unit(benchmark::kMillisecond);

// Serialising every changed chunk of a 16 TiB bitmap after one small write.
void BM_PersistOneChangeOn16TiB(benchmark::State& state) {
  auto b = Make(16 * TiB, 64 * KiB);
  std::vector<std::byte> buf(b->chunk_bytes());
  uint64_t off = 0;
  for (auto _ : state) {
    (void)b->Mark(off, 4096);
    off += 64 * KiB;
    for (uint64_t c : b->TakeChangedChunks()) b->SerializeChunk(c, buf);
    benchmark::DoNotOptimize(buf.data());
  }
}
BENCHMARK(BM_PersistOneChangeOn16TiB);

}  // namespace

BENCHMARK_MAIN();
