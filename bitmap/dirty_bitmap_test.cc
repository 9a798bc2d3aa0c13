#include "bitmap/dirty_bitmap.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include "tests/tools/worker_failures.h"

namespace cbt {
namespace {

constexpr uint64_t KiB = 1024, MiB = 1024 * KiB, GiB = 1024 * MiB, TiB = 1024 * GiB;

std::unique_ptr<DirtyBitmap> Make(uint64_t size, uint64_t g, uint32_t chunk = 65536) {
  auto r = DirtyBitmap::Create(size, g, chunk);
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return std::move(r).value();
}

std::vector<std::byte> Chunk(const DirtyBitmap& b, uint64_t idx) {
  std::vector<std::byte> out(b.chunk_bytes());
  b.SerializeChunk(idx, out);
  return out;
}

// ---- construction limits ----

TEST(DirtyBitmapTest, GranularityLimits) {
  EXPECT_TRUE(DirtyBitmap::Create(1 * GiB, 512).ok());
  EXPECT_TRUE(DirtyBitmap::Create(1 * TiB, 2 * GiB).ok());
  for (uint64_t bad :
       {uint64_t{0}, uint64_t{256}, uint64_t{4 * GiB}, uint64_t{65535}, uint64_t{3 * 512}}) {
    auto r = DirtyBitmap::Create(1 * GiB, bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_TRUE(r.status().IsInvalidArgument());
    EXPECT_NE(r.status().message().find("granularity"), std::string::npos);
  }
}

TEST(DirtyBitmapTest, ChunkSizeLimits) {
  EXPECT_FALSE(DirtyBitmap::Create(GiB, 65536, 256).ok());
  EXPECT_FALSE(DirtyBitmap::Create(GiB, 65536, 4 * MiB).ok());
  EXPECT_FALSE(DirtyBitmap::Create(GiB, 65536, 1000).ok());
  EXPECT_TRUE(DirtyBitmap::Create(GiB, 65536, 512).ok());
  EXPECT_TRUE(DirtyBitmap::Create(GiB, 65536, 2 * MiB).ok());
}

TEST(DirtyBitmapTest, AbsurdSizeAsksForLargerGranularity) {
  auto r = DirtyBitmap::Create(~uint64_t{0}, 512);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("larger granularity"), std::string::npos);
}

TEST(DirtyBitmapTest, EmptyDiskHasNoChunks) {
  auto b = Make(0, 65536);
  EXPECT_EQ(b->granule_count(), 0u);
  EXPECT_EQ(b->chunk_count(), 0u);
  EXPECT_FALSE(*b->Mark(0, 0));
  EXPECT_FALSE(b->Mark(0, 1).ok());
  EXPECT_FALSE(b->NextDirty(0));
  EXPECT_TRUE(b->Extents(0, 100).empty());
}

TEST(DirtyBitmapTest, SizesMatchQemuTableSize) {
  // 16 TiB at 64 KiB granularity, 64 KiB clusters: 512 table slots.
  auto b = Make(16 * TiB, 64 * KiB);
  EXPECT_EQ(b->granule_count(), 256u * 1024 * 1024);
  EXPECT_EQ(b->chunk_count(), 512u);
  // 1 byte disk: one granule, one chunk.
  auto c = Make(1, 512);
  EXPECT_EQ(c->granule_count(), 1u);
  EXPECT_EQ(c->chunk_count(), 1u);
}

// ---- marking edge cases ----

TEST(DirtyBitmapTest, UnalignedWriteMarksEveryTouchedGranule) {
  auto b = Make(1 * MiB, 64 * KiB);
  auto r = b->Mark(64 * KiB - 1, 2);  // straddles granules 0 and 1
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(*r);
  EXPECT_TRUE(b->Test(0));
  EXPECT_TRUE(b->Test(64 * KiB));
  EXPECT_FALSE(b->Test(128 * KiB));
  EXPECT_EQ(b->DirtyGranules(), 2u);
  EXPECT_EQ(b->DirtyBytes(), 128 * KiB);
}

TEST(DirtyBitmapTest, MarkReportsOnlyNewBits) {
  auto b = Make(1 * MiB, 64 * KiB);
  EXPECT_TRUE(*b->Mark(0, 4096));
  EXPECT_FALSE(*b->Mark(100, 4096));
  EXPECT_TRUE(*b->Mark(0, 128 * KiB));  // granule 1 is new
  EXPECT_FALSE(*b->Mark(0, 128 * KiB));
}

TEST(DirtyBitmapTest, IsDirtyNeedsEveryTouchedGranule) {
  auto b = Make(1 * MiB, 64 * KiB);
  ASSERT_TRUE(b->Mark(0, 128 * KiB).ok());
  EXPECT_TRUE(b->IsDirty(0, 128 * KiB));
  EXPECT_TRUE(b->IsDirty(100, 5000));
  EXPECT_FALSE(b->IsDirty(100 * KiB, 64 * KiB));  // reaches granule 2
  EXPECT_TRUE(b->IsDirty(700 * KiB, 0));
  EXPECT_FALSE(b->IsDirty(1 * MiB - 1, 2));  // past the end
}

TEST(DirtyBitmapTest, ZeroLengthIsNoOp) {
  auto b = Make(1 * MiB, 64 * KiB);
  auto r = b->Mark(5000, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(*r);
  EXPECT_EQ(b->DirtyGranules(), 0u);
  EXPECT_TRUE(b->Mark(1 * MiB, 0).ok());  // at the end: still a no-op
}

TEST(DirtyBitmapTest, RangesPastTheEndAreRefusedAndMarkNothing) {
  auto b = Make(1 * MiB, 64 * KiB);
  EXPECT_TRUE(b->Mark(1 * MiB - 1, 1).ok());
  ASSERT_TRUE(b->ClearRange(0, 1 * MiB).ok());
  auto r = b->Mark(1 * MiB - 1, 2);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument());
  EXPECT_FALSE(b->Mark(1 * MiB, 1).ok());
  EXPECT_FALSE(b->Mark(~uint64_t{0}, 2).ok());  // overflowing end
  EXPECT_FALSE(b->Mark(10, ~uint64_t{0}).ok());
  EXPECT_EQ(b->DirtyGranules(), 0u);
}

TEST(DirtyBitmapTest, LastPartialGranuleCountsItsRealSize) {
  auto b = Make(1 * MiB + 100, 64 * KiB);
  EXPECT_EQ(b->granule_count(), 17u);
  ASSERT_TRUE(b->Mark(1 * MiB + 99, 1).ok());
  EXPECT_EQ(b->DirtyBytes(), 100u);
  ASSERT_TRUE(b->Mark(0, 1).ok());
  EXPECT_EQ(b->DirtyBytes(), 64 * KiB + 100);
  auto ext = b->Extents(0, ~uint64_t{0});
  ASSERT_EQ(ext.size(), 3u);
  EXPECT_EQ(ext[2], (Extent{1 * MiB, 100, true}));
}

TEST(DirtyBitmapTest, ClearRangeKeepsPartlyCoveredGranules) {
  auto b = Make(1 * MiB, 64 * KiB);
  ASSERT_TRUE(b->Mark(0, 1 * MiB).ok());
  ASSERT_TRUE(b->ClearRange(1000, 200 * KiB).ok());  // covers granules 1, 2 fully
  EXPECT_TRUE(b->Test(0));
  EXPECT_FALSE(b->Test(64 * KiB));
  EXPECT_FALSE(b->Test(128 * KiB));
  EXPECT_TRUE(b->Test(192 * KiB));
  EXPECT_EQ(b->DirtyGranules(), 14u);
  EXPECT_FALSE(b->ClearRange(1 * MiB, 1).ok());
}

TEST(DirtyBitmapTest, ClearRangeToTheEndClearsPartialLastGranule) {
  auto b = Make(1 * MiB + 100, 64 * KiB);
  ASSERT_TRUE(b->Mark(0, 1 * MiB + 100).ok());
  ASSERT_TRUE(b->ClearRange(1 * MiB, 100).ok());
  EXPECT_FALSE(b->Test(1 * MiB));
  EXPECT_EQ(b->DirtyBytes(), 1 * MiB);
  b->ClearAll();
  EXPECT_EQ(b->DirtyBytes(), 0u);
  EXPECT_FALSE(b->NextDirty(0));
}

// ---- extents ----

TEST(DirtyBitmapTest, NextDirtyAndCleanReturnBytePositions) {
  auto b = Make(100 * MiB, 64 * KiB);
  ASSERT_TRUE(b->Mark(50 * MiB, 1).ok());
  EXPECT_EQ(b->NextDirty(0), 50 * MiB);
  EXPECT_EQ(b->NextDirty(50 * MiB + 7), 50 * MiB + 7);
  EXPECT_EQ(b->NextClean(50 * MiB), 50 * MiB + 64 * KiB);
  EXPECT_EQ(b->NextClean(3), 3u);
  EXPECT_FALSE(b->NextDirty(50 * MiB + 64 * KiB));
  EXPECT_FALSE(b->NextDirty(100 * MiB));
}

TEST(DirtyBitmapTest, ExtentsAreMaximalAndCoverTheRange) {
  auto b = Make(10 * MiB, 64 * KiB);
  ASSERT_TRUE(b->Mark(1 * MiB, 3 * 64 * KiB).ok());
  ASSERT_TRUE(b->Mark(1 * MiB + 3 * 64 * KiB, 1).ok());  // adjacent: merges
  ASSERT_TRUE(b->Mark(9 * MiB, 1).ok());
  auto e = b->Extents(0, 10 * MiB);
  std::vector<Extent> want = {{0, 1 * MiB, false},
                              {1 * MiB, 4 * 64 * KiB, true},
                              {1 * MiB + 256 * KiB, 8 * MiB - 256 * KiB, false},
                              {9 * MiB, 64 * KiB, true},
                              {9 * MiB + 64 * KiB, 1 * MiB - 64 * KiB, false}};
  EXPECT_EQ(e, want);
  auto sub = b->Extents(1 * MiB + 10, 100);
  ASSERT_EQ(sub.size(), 1u);
  EXPECT_EQ(sub[0], (Extent{1 * MiB + 10, 100, true}));
}

TEST(DirtyBitmapTest, SearchSkipsHugeCleanAreas) {
  // 16 TiB disk, 64 KiB granules: 2^28 bits. One dirty granule near the end.
  auto b = Make(16 * TiB, 64 * KiB);
  ASSERT_TRUE(b->Mark(16 * TiB - 1, 1).ok());
  EXPECT_EQ(b->NextDirty(0), 16 * TiB - 64 * KiB);
  auto e = b->Extents(0, 16 * TiB);
  ASSERT_EQ(e.size(), 2u);
  EXPECT_TRUE(e[1].dirty);
  for (uint64_t c = 0; c + 1 < b->chunk_count(); ++c) ASSERT_TRUE(b->ChunkIsZero(c));
  EXPECT_FALSE(b->ChunkIsZero(b->chunk_count() - 1));
}

// ---- serialisation: QEMU's bit order (measured with qemu-io 7.2) ----

TEST(DirtyBitmapTest, SerialisationMatchesQemuKnownBytes) {
  auto b = Make(64 * MiB, 64 * KiB);
  ASSERT_TRUE(b->Mark(0, 1).ok());
  ASSERT_TRUE(b->Mark(1 * MiB, 64 * KiB).ok());
  ASSERT_TRUE(b->Mark(63 * MiB, 4096).ok());
  auto c = Chunk(*b, 0);
  EXPECT_EQ(c[0], std::byte{0x01});
  EXPECT_EQ(c[2], std::byte{0x01});
  EXPECT_EQ(c[126], std::byte{0x01});
  EXPECT_EQ(std::count(c.begin(), c.end(), std::byte{0}), static_cast<long>(c.size()) - 3);

  auto s = Make(64 * MiB, 512);
  ASSERT_TRUE(s->Mark(1536, 1).ok());
  EXPECT_EQ(Chunk(*s, 0)[0], std::byte{0x08});

  auto m = Make(128 * MiB, 1 * MiB);
  ASSERT_TRUE(m->Mark(99 * MiB, 1).ok());
  EXPECT_EQ(Chunk(*m, 0)[12], std::byte{0x08});
}

TEST(DirtyBitmapTest, ByteLandsInSlotByteDivClusterSize) {
  // 512-byte chunks: byte 600 of the bitmap is byte 88 of chunk 1.
  auto b = Make(1 * GiB, 64 * KiB, 512);
  uint64_t bit = 600 * 8 + 5;
  ASSERT_TRUE(b->Mark(bit * 64 * KiB, 1).ok());
  EXPECT_TRUE(b->ChunkIsZero(0));
  EXPECT_FALSE(b->ChunkIsZero(1));
  EXPECT_EQ(Chunk(*b, 1)[88], std::byte{0x20});
}

TEST(DirtyBitmapTest, RoundTripThroughChunks) {
  std::mt19937_64 rng(42);
  auto a = Make(3 * GiB + 12345, 4096, 4096);
  for (int i = 0; i < 5000; ++i) {
    uint64_t off = rng() % a->disk_size();
    ASSERT_TRUE(a->Mark(off, std::min<uint64_t>(rng() % (1 * MiB), a->disk_size() - off)).ok());
  }
  auto b = Make(a->disk_size(), 4096, 4096);
  for (uint64_t c = 0; c < a->chunk_count(); ++c) b->LoadChunk(c, Chunk(*a, c));
  EXPECT_EQ(a->DirtyGranules(), b->DirtyGranules());
  EXPECT_EQ(a->DirtyBytes(), b->DirtyBytes());
  EXPECT_EQ(a->Extents(0, ~uint64_t{0}), b->Extents(0, ~uint64_t{0}));
  EXPECT_FALSE(b->HasChangedChunks());  // loading is not a change
}

TEST(DirtyBitmapTest, LoadIgnoresTailBitsPastTheEnd) {
  auto b = Make(10 * 64 * KiB, 64 * KiB, 512);  // 10 bits
  std::vector<std::byte> ones(512, std::byte{0xff});
  b->LoadChunk(0, ones);
  EXPECT_EQ(b->DirtyGranules(), 10u);
  auto c = Chunk(*b, 0);
  EXPECT_EQ(c[0], std::byte{0xff});
  EXPECT_EQ(c[1], std::byte{0x03});
  EXPECT_EQ(c[2], std::byte{0x00});
  std::vector<std::byte> zero(512);
  b->LoadChunk(0, zero);
  EXPECT_EQ(b->DirtyGranules(), 0u);
  EXPECT_FALSE(b->NextDirty(0));
}

TEST(DirtyBitmapTest, ChangedChunksRecordOnlyTouchedChunks) {
  auto b = Make(1 * TiB, 64 * KiB);  // 32 GiB per chunk
  EXPECT_FALSE(b->HasChangedChunks());
  ASSERT_TRUE(b->Mark(40 * GiB, 1).ok());
  ASSERT_TRUE(b->Mark(40 * GiB + 5, 1).ok());
  ASSERT_TRUE(b->Mark(1 * TiB - 1, 1).ok());
  EXPECT_EQ(b->ChangedChunkCount(), 2u);
  EXPECT_EQ(b->TakeChangedChunks(), (std::vector<uint64_t>{1, 31}));
  EXPECT_EQ(b->ChangedChunkCount(), 0u);
  EXPECT_TRUE(b->TakeChangedChunks().empty());
  ASSERT_TRUE(b->Mark(40 * GiB, 1).ok());  // already dirty: no change
  EXPECT_FALSE(b->HasChangedChunks());
  ASSERT_TRUE(b->ClearRange(32 * GiB, 32 * GiB).ok());
  EXPECT_EQ(b->TakeChangedChunks(), (std::vector<uint64_t>{1}));
  uint64_t again[] = {3, 5, 999};
  b->MarkChunksChanged(again);
  EXPECT_EQ(b->TakeChangedChunks(), (std::vector<uint64_t>{3, 5}));
}

// ---- merge ----

TEST(DirtyBitmapTest, MergeFromFinerGranularity) {
  auto fine = Make(100 * MiB, 64 * KiB);
  auto coarse = Make(100 * MiB, 1 * MiB);
  ASSERT_TRUE(fine->Mark(1 * MiB + 64 * KiB, 1).ok());
  ASSERT_TRUE(fine->Mark(99 * MiB + 960 * KiB, 1).ok());
  coarse->Merge(*fine);
  EXPECT_EQ(coarse->Extents(0, ~uint64_t{0}), (std::vector<Extent>{{0, 1 * MiB, false},
                                                                   {1 * MiB, 1 * MiB, true},
                                                                   {2 * MiB, 97 * MiB, false},
                                                                   {99 * MiB, 1 * MiB, true}}));
}

TEST(DirtyBitmapTest, MergeFromCoarserGranularityMarksEveryOverlappedGranule) {
  auto coarse = Make(100 * MiB, 1 * MiB);
  auto fine = Make(100 * MiB, 64 * KiB);
  ASSERT_TRUE(coarse->Mark(5 * MiB + 3, 1).ok());
  ASSERT_TRUE(fine->Mark(0, 1).ok());
  fine->Merge(*coarse);
  EXPECT_EQ(fine->DirtyGranules(), 17u);
  EXPECT_TRUE(fine->Test(5 * MiB));
  EXPECT_TRUE(fine->Test(6 * MiB - 1));
  EXPECT_FALSE(fine->Test(6 * MiB));
}

TEST(DirtyBitmapTest, MergeClipsSourceToTargetSize) {
  auto big = Make(10 * MiB, 64 * KiB);
  auto small = Make(5 * MiB + 10, 2 * MiB);
  ASSERT_TRUE(big->Mark(5 * MiB, 1).ok());
  ASSERT_TRUE(big->Mark(9 * MiB, 1).ok());
  small->Merge(*big);
  EXPECT_EQ(small->DirtyGranules(), 1u);
  EXPECT_TRUE(small->Test(5 * MiB + 9));
  small->Merge(*small);  // self-merge: no-op, no deadlock
  EXPECT_EQ(small->DirtyGranules(), 1u);
}

// ---- randomized property test against a trivially correct model ----

struct Model {
  uint64_t size, g;
  std::vector<bool> bits;
  Model(uint64_t s, uint64_t gran) : size(s), g(gran), bits((s + gran - 1) / gran) {}
  bool Mark(uint64_t off, uint64_t len) {
    bool fresh = false;
    for (uint64_t n = off / g; n <= (off + len - 1) / g; ++n) fresh |= !bits[n], bits[n] = true;
    return fresh;
  }
  void Clear(uint64_t off, uint64_t len) {
    for (uint64_t n = 0; n < bits.size(); ++n) {
      uint64_t s = n * g, e = std::min(size, s + g);
      if (s >= off && e <= off + len) bits[n] = false;
    }
  }
  uint64_t DirtyBytes() const {
    uint64_t t = 0;
    for (uint64_t n = 0; n < bits.size(); ++n)
      if (bits[n]) t += std::min(size, (n + 1) * g) - n * g;
    return t;
  }
  std::vector<Extent> Extents(uint64_t off, uint64_t len) const {
    std::vector<Extent> out;
    uint64_t end = std::min(size, off + len);
    for (uint64_t p = off; p < end;) {
      bool d = bits[p / g];
      uint64_t q = std::min(end, (p / g + 1) * g);
      if (!out.empty() && out.back().dirty == d)
        out.back().length += q - p;
      else
        out.push_back({p, q - p, d});
      p = q;
    }
    return out;
  }
};

void RunProperty(uint64_t seed, int ops) {
  std::mt19937_64 rng(seed);
  const uint64_t g = uint64_t{512} << (rng() % 6);
  const uint64_t size = rng() % (g * 3000) + (rng() % 2 ? 0 : 1);
  auto b = Make(size, g, 512);
  Model m(size, g);
  // The "disk": what a persister wrote for each chunk at its last Take.
  std::vector<std::vector<std::byte>> disk(b->chunk_count(), std::vector<std::byte>(512));
  uint64_t dirty_bytes = 0;
  for (int i = 0; i < ops; ++i) {
    SCOPED_TRACE("seed " + std::to_string(seed) + " op " + std::to_string(i));
    uint64_t off = size ? rng() % (size + 2) : rng() % 3;
    uint64_t len = (rng() % 4 == 0) ? rng() % (size + 2) : rng() % (4 * g);
    switch (rng() % 16) {
      case 0: {
        Status s = b->ClearRange(off, len);
        if (off > size || len > size - off) {
          ASSERT_FALSE(s.ok());
        } else {
          ASSERT_TRUE(s.ok());
          m.Clear(off, len);
          dirty_bytes = m.DirtyBytes();
        }
        break;
      }
      case 1:
        if (rng() % 50 == 0) {
          b->ClearAll();
          m.Clear(0, size);
          dirty_bytes = 0;
        }
        break;
      case 2: {  // persist: take changed chunks, write them to "disk"
        for (uint64_t c : b->TakeChangedChunks()) b->SerializeChunk(c, disk[c]);
        for (uint64_t c = 0; c < b->chunk_count(); ++c) ASSERT_EQ(disk[c], Chunk(*b, c));
        break;
      }
      case 3: {
        auto want = m.Extents(off, len);
        ASSERT_EQ(b->Extents(off, len), want);
        break;
      }
      default: {
        auto r = b->Mark(off, len);
        if (off > size || len > size - off) {
          ASSERT_FALSE(r.ok());
        } else {
          ASSERT_TRUE(r.ok());
          bool fresh = len ? m.Mark(off, len) : false;
          ASSERT_EQ(*r, fresh);
          if (fresh) dirty_bytes = m.DirtyBytes();
        }
      }
    }
    ASSERT_EQ(b->DirtyBytes(), dirty_bytes);
    if (off <= size && len <= size - off && len > 0) {
      bool all = true;
      for (uint64_t n = off / g; n <= (off + len - 1) / g; ++n) all = all && m.bits[n];
      ASSERT_EQ(b->IsDirty(off, len), all);
    }
    if (size) {
      uint64_t p = rng() % size;
      ASSERT_EQ(b->Test(p), static_cast<bool>(m.bits[p / g]));
      auto nd = b->NextDirty(p);
      uint64_t want = p;
      while (want < size && !m.bits[want / g]) want = (want / g + 1) * g;
      if (want >= size)
        ASSERT_FALSE(nd);
      else
        ASSERT_EQ(nd, want);
    }
  }
}

TEST(DirtyBitmapPropertyTest, MatchesReferenceModel) {
  // About 2 million operations in total; the seed is in every failure trace.
  const char* env = std::getenv("CBT_PROPERTY_SEEDS");
  int seeds = env ? std::atoi(env) : 200;
  for (int s = 1; s <= seeds; ++s) {
    RunProperty(static_cast<uint64_t>(s), 10000);
    if (HasFatalFailure()) return;
  }
}

// ---- concurrency ----
// Checks in worker threads go through WorkerFailures (tests/tools/
// worker_failures.h) and are reported by the main thread after join().

TEST(DirtyBitmapConcurrencyTest, ParallelMarksEqualSequentialUnion) {
  const uint64_t size = 8 * GiB + 777;
  const int kThreads = 8, kOps = 40000;
  auto shared = Make(size, 64 * KiB, 4096);
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> ops(kThreads);
  for (int t = 0; t < kThreads; ++t) {
    std::mt19937_64 rng(1000 + t);
    for (int i = 0; i < kOps; ++i) {
      uint64_t off = rng() % size;
      uint64_t len = std::min<uint64_t>(rng() % (2 * MiB) + 1, size - off);
      ops[t].emplace_back(off, len);
    }
  }
  // A persister takes changed chunks and serialises them while marks run.
  std::vector<std::vector<std::byte>> disk(shared->chunk_count(),
                                           std::vector<std::byte>(shared->chunk_bytes()));
  std::atomic<bool> stop{false};
  std::thread persister([&] {
    while (!stop.load()) {
      for (uint64_t c : shared->TakeChangedChunks()) shared->SerializeChunk(c, disk[c]);
    }
  });
  testing::WorkerFailures wf;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      for (auto [off, len] : ops[t]) {
        auto r = shared->Mark(off, len);
        if (!wf.Check(r.ok(), [&] { return "Mark: " + r.status().ToString(); })) return;
      }
    });
  for (auto& th : threads) th.join();
  stop = true;
  persister.join();
  wf.Report();
  if (wf.count()) return;
  for (uint64_t c : shared->TakeChangedChunks()) shared->SerializeChunk(c, disk[c]);

  auto seq = Make(size, 64 * KiB, 4096);
  for (auto& v : ops)
    for (auto [off, len] : v) ASSERT_TRUE(seq->Mark(off, len).ok());
  EXPECT_EQ(shared->DirtyGranules(), seq->DirtyGranules());
  EXPECT_EQ(shared->Extents(0, size), seq->Extents(0, size));
  for (uint64_t c = 0; c < seq->chunk_count(); ++c) ASSERT_EQ(disk[c], Chunk(*seq, c)) << c;
}

TEST(DirtyBitmapConcurrencyTest, MarksRacingClearsKeepCountsConsistent) {
  auto b = Make(1 * GiB, 64 * KiB, 4096);
  std::atomic<bool> stop{false};
  testing::WorkerFailures wf;
  std::thread clearer([&] {
    std::mt19937_64 rng(7);
    while (!stop.load() && !wf.stop()) {
      Status st = b->ClearRange(rng() % (512 * MiB), 256 * MiB);
      if (!wf.Check(st.ok(), [&] { return "ClearRange: " + st.ToString(); })) return;
    }
  });
  std::vector<std::thread> markers;
  for (int t = 0; t < 4; ++t)
    markers.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      for (int i = 0; i < 50000 && !wf.stop(); ++i) {
        auto r = b->Mark(rng() % (1 * GiB - 1), 1);
        if (!wf.Check(r.ok(), [&] { return "Mark: " + r.status().ToString(); })) return;
      }
    });
  for (auto& th : markers) th.join();
  stop = true;
  clearer.join();
  wf.Report();
  if (wf.count()) return;
  // The counter must equal the bits actually set, and the summary must find them all.
  uint64_t counted = 0;
  for (const Extent& e : b->Extents(0, 1 * GiB))
    if (e.dirty) counted += e.length / (64 * KiB);
  EXPECT_EQ(counted, b->DirtyGranules());
}

}  // namespace
}  // namespace cbt
