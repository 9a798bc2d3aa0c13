// LayerWriter: backup layers judged by QEMU's own tools (qemu-img check,
// info, map, convert) against the disk content computed in memory.
#include "qcow2/layer_writer.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "common/mem_io.h"
#include "qcow2/test_util.h"

namespace cbt::qcow2 {
namespace {

using testing::NewFile;
using testing::RunResult;
using testing::Sh;
using testing::TempDir;

constexpr uint64_t KiB = 1024, MiB = 1024 * KiB, GiB = 1024 * MiB;

// --- QEMU judges ---

nlohmann::json QemuJson(const std::string& cmd) {
  RunResult r = Sh(cmd);
  EXPECT_EQ(r.exit_code, 0) << cmd << "\n" << r.out;
  return nlohmann::json::parse(r.out, nullptr, false);
}

// qemu-img check must say: exit 0 (no errors, no leaks).
void ExpectQemuCheckClean(const std::string& path) {
  RunResult r = Sh("qemu-img check " + path);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("No errors were found"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("leaked"), std::string::npos) << r.out;
}

std::vector<std::byte> ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> c((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::byte> out(c.size());
  std::memcpy(out.data(), c.data(), c.size());
  return out;
}

void WriteAll(const std::string& path, const std::vector<std::byte>& b) {
  FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(std::fwrite(b.data(), 1, b.size(), f), b.size());
  ASSERT_EQ(std::fclose(f), 0);
}

// --- the expected disk ---

void FillRandom(std::vector<std::byte>& b, std::mt19937_64& rng) {
  for (size_t i = 0; i < b.size(); i += 8) {
    const uint64_t v = rng();
    std::memcpy(b.data() + i, &v, std::min<size_t>(8, b.size() - i));
  }
}

// A region the base image has written with `qemu-io -c 'write -P pattern'`.
struct Region {
  uint64_t offset, length;
  uint8_t pattern;
};

enum class Kind { kUntouched, kData, kZero };

// What the layer holds per cluster, and the base beneath it.
struct Model {
  uint64_t cs = 0, size = 0;  // size: the stored (512-rounded) virtual size
  std::vector<Region> base;   // later regions win
  std::vector<Kind> kind;
  std::map<uint64_t, std::vector<std::byte>> data;  // cluster -> bytes (kData)
  uint64_t stored_data = 0, stored_zero = 0;        // what the writer must count

  uint64_t clusters() const { return (size + cs - 1) / cs; }
  // Whether cluster g must read as zeros (cheap: no buffer).
  bool IsZero(uint64_t g) const {
    if (kind[g] == Kind::kZero) return true;
    if (kind[g] == Kind::kData) return false;
    const uint64_t begin = g * cs, end = std::min(size, begin + cs);
    return std::none_of(base.begin(), base.end(), [&](const Region& r) {
      return r.offset < end && begin < r.offset + r.length;
    });
  }
  // Expected contents of cluster g (cut at the virtual size).
  std::vector<std::byte> Cluster(uint64_t g) const {
    const uint64_t begin = g * cs, len = std::min(cs, size - begin);
    std::vector<std::byte> out(len, std::byte{0});
    if (kind[g] == Kind::kData) {
      const auto& d = data.at(g);
      std::copy_n(d.begin(), std::min<uint64_t>(len, d.size()), out.begin());
    } else if (kind[g] == Kind::kUntouched) {
      for (const Region& r : base) {
        const uint64_t a = std::max(begin, r.offset),
                       b = std::min(begin + len, r.offset + r.length);
        if (a < b)
          std::fill(out.begin() + (a - begin), out.begin() + (b - begin), std::byte{r.pattern});
      }
    }
    return out;
  }
};

std::string QemuIoWrites(const std::vector<Region>& regions) {
  std::string c;
  for (const Region& r : regions)
    c += " -c 'write -q -P " + std::to_string(r.pattern) + " " + std::to_string(r.offset) + " " +
         std::to_string(r.length) + "'";
  return c;
}

// out.raw from `qemu-img convert` byte-equals the model. Clusters the model
// knows to be zero are read only where out.raw is not a hole (SEEK_DATA),
// so a sparse 1 GiB disk costs what its data costs.
void ExpectConvertEquals(const TempDir& d, const std::string& layer, const Model& m) {
  const std::string raw = d / "out.raw";
  std::remove(raw.c_str());
  RunResult r = Sh("qemu-img convert -O raw " + layer + " " + raw);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const int fd = open(raw.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  struct stat st {};
  ASSERT_EQ(fstat(fd, &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), m.size) << "out.raw size";
  std::vector<std::byte> buf(m.cs);
  uint64_t bad = 0, data_at = 0;  // data_at: no data in out.raw in [begin, data_at)
  for (uint64_t g = 0; g < m.clusters(); ++g) {
    const uint64_t begin = g * m.cs, len = std::min(m.cs, m.size - begin);
    const bool zero = m.IsZero(g);
    if (zero) {
      if (data_at <= begin) {
        const off_t next = lseek(fd, static_cast<off_t>(begin), SEEK_DATA);
        data_at = next < 0 ? ~uint64_t{0} : static_cast<uint64_t>(next);
      }
      if (data_at >= begin + len) continue;  // a hole: zeros
    }
    buf.resize(len);
    ASSERT_EQ(pread(fd, buf.data(), len, static_cast<off_t>(begin)), static_cast<ssize_t>(len))
        << "short out.raw at cluster " << g;
    const bool same =
        zero ? std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0}; })
             : buf == m.Cluster(g);
    if (!same && bad++ < 5)
      ADD_FAILURE() << "cluster " << g << " (kind " << static_cast<int>(m.kind[g])
                    << ") differs in out.raw";
  }
  close(fd);
  EXPECT_EQ(bad, 0u);
}

// qemu-img map: zero clusters are zero in the top layer, data clusters are
// data in the top layer, untouched clusters come from the backing file.
void ExpectMap(const std::string& layer, const Model& m) {
  nlohmann::json j = QemuJson("qemu-img map --output=json " + layer);
  ASSERT_TRUE(j.is_array()) << j.dump();
  uint64_t covered = 0, bad = 0;
  for (const auto& e : j) {
    const uint64_t start = e["start"], length = e["length"];
    const int depth = e["depth"];
    const bool zero = e["zero"], data = e["data"];
    covered += length;
    for (uint64_t g = start / m.cs; g * m.cs < start + length; ++g) {
      bool ok = true;
      switch (m.kind[g]) {
        case Kind::kData:
          ok = depth == 0 && data && !zero;
          break;
        case Kind::kZero:
          ok = depth == 0 && zero && !data;
          break;
        case Kind::kUntouched:
          ok = depth == 1;
          break;
      }
      if (!ok && bad++ < 5)
        ADD_FAILURE() << "cluster " << g << " kind " << static_cast<int>(m.kind[g]) << " mapped as "
                      << e.dump();
    }
  }
  EXPECT_EQ(covered, m.size);
  EXPECT_EQ(bad, 0u);
}

std::unique_ptr<LayerWriter> NewLayer(const std::string& path, const LayerOptions& o) {
  auto w = LayerWriter::Create(NewFile(path), o);
  EXPECT_TRUE(w.ok()) << w.status().ToString();
  return w.ok() ? std::move(w).value() : nullptr;
}

// One call to the writer.
struct Piece {
  bool zeroes;  // WriteZeroes, else WriteData
  uint64_t first, count;
};

// Random layer over a qcow2 base: random data/zero clusters (some data
// clusters all zero, some pieces mixing both), shuffled, from 2-4 threads.
void RandomLayer(uint32_t cs, uint64_t requested_size, uint64_t touch, int threads, uint64_t seed) {
  SCOPED_TRACE("cluster size " + std::to_string(cs));
  TempDir d;
  std::mt19937_64 rng(seed);
  Model m;
  m.cs = cs;
  m.size = (requested_size + 511) & ~uint64_t{511};
  const uint64_t n = m.clusters();
  m.kind.assign(n, Kind::kUntouched);

  // The base: a qcow2 with its own cluster size and a few pattern regions,
  // some cut across layer clusters.
  for (int i = 0; i < 8; ++i) {
    uint64_t off = (rng() % m.size) & ~uint64_t{511};
    uint64_t len = std::min<uint64_t>(m.size - off, 512 * (1 + rng() % (4 * cs / 512 + 64)));
    m.base.push_back(Region{off, len, static_cast<uint8_t>(0x11 * (i + 1))});
  }
  m.base.push_back(
      Region{0, std::min<uint64_t>(m.size, uint64_t{3} * cs), 0x7e});  // cluster 0 from base
  const std::string base = d / "base.qcow2";
  ASSERT_EQ(Sh("qemu-img create -q -f qcow2 " + base + " " + std::to_string(m.size)).exit_code, 0);
  RunResult w = Sh("qemu-io -f qcow2" + QemuIoWrites(m.base) + " " + base);
  ASSERT_EQ(w.exit_code, 0) << w.out;

  // Which clusters the layer touches, and how; then pieces of up to 4 clusters.
  const double p = std::min(0.7, static_cast<double>(touch) / static_cast<double>(n));
  std::bernoulli_distribution touched(p), as_zeroes(0.3), zero_content(0.1);
  std::vector<bool> zero_op(n, false);
  for (uint64_t g = 0; g < n; ++g) {
    if (!touched(rng)) continue;
    zero_op[g] = as_zeroes(rng);
    m.kind[g] = zero_op[g] ? Kind::kZero : Kind::kData;
  }
  m.kind[n - 1] = Kind::kData;  // the tail piece is always written
  zero_op[n - 1] = false;
  std::vector<Piece> pieces;
  for (uint64_t g = 0; g < n;) {
    if (m.kind[g] == Kind::kUntouched) {
      ++g;
      continue;
    }
    Piece pc{zero_op[g], g, 0};
    const uint64_t max = 1 + rng() % 4;
    while (g < n && pc.count < max && m.kind[g] != Kind::kUntouched && zero_op[g] == pc.zeroes) {
      ++pc.count;
      ++g;
    }
    pieces.push_back(pc);
  }
  for (uint64_t g = 0; g < n; ++g) {
    if (m.kind[g] == Kind::kZero) {
      ++m.stored_zero;
      continue;
    }
    if (m.kind[g] != Kind::kData) continue;
    const uint64_t len = std::min<uint64_t>(cs, requested_size - g * cs);
    std::vector<std::byte> bytes(len, std::byte{0});
    if (zero_content(rng)) {
      m.kind[g] = Kind::kZero;  // written as data, must be stored as a zero cluster
      ++m.stored_zero;
    } else {
      FillRandom(bytes, rng);
      ++m.stored_data;
    }
    m.data[g] = std::move(bytes);
  }
  std::shuffle(pieces.begin(), pieces.end(), rng);

  LayerOptions o;
  o.virtual_size = requested_size;
  o.cluster_size = cs;
  o.backing_file = "base.qcow2";  // relative to the layer's directory
  o.backing_format = "qcow2";
  const std::string layer = d / "layer.qcow2";
  auto writer = NewLayer(layer, o);
  ASSERT_NE(writer, nullptr);

  std::atomic<size_t> next{0};
  std::vector<std::string> errors(threads);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      std::vector<std::byte> buf;
      for (size_t i = next.fetch_add(1); i < pieces.size(); i = next.fetch_add(1)) {
        const Piece& pc = pieces[i];
        Status s;
        if (pc.zeroes) {
          const uint64_t end = std::min<uint64_t>((pc.first + pc.count) * cs, requested_size);
          s = writer->WriteZeroes(pc.first * cs, end - pc.first * cs);
        } else {
          buf.clear();
          for (uint64_t g = pc.first; g < pc.first + pc.count; ++g) {
            const auto& b = m.data.at(g);
            buf.insert(buf.end(), b.begin(), b.end());
          }
          s = writer->WriteData(pc.first * cs, buf);
        }
        if (!s.ok() && errors[t].empty()) errors[t] = s.ToString();
      }
    });
  for (auto& th : pool) th.join();
  for (const auto& e : errors) EXPECT_EQ(e, "");
  ASSERT_OK(writer->Finish());
  EXPECT_EQ(writer->data_clusters(), m.stored_data);
  EXPECT_EQ(writer->zero_clusters(), m.stored_zero);
  writer.reset();

  ExpectQemuCheckClean(layer);
  nlohmann::json info = QemuJson("qemu-img info --output=json " + layer);
  EXPECT_EQ(info["format"], "qcow2");
  EXPECT_EQ(info["virtual-size"], m.size);
  EXPECT_EQ(info["cluster-size"], cs);
  EXPECT_EQ(info["backing-filename"], "base.qcow2");
  EXPECT_EQ(info["backing-filename-format"], "qcow2");
  EXPECT_EQ(info["format-specific"]["data"]["compat"], "1.1");
  EXPECT_EQ(info["format-specific"]["data"]["refcount-bits"], 16);
  ExpectConvertEquals(d, layer, m);
  ExpectMap(layer, m);
}

TEST(LayerWriterTest, RandomLayersOverQcow2BaseMatchQemu) {
  CBT_REQUIRE_QEMU();
  // Sizes give several L2 tables (except at 2 MiB, where one covers 512 GiB)
  // and, but for 64 KiB, a partial last cluster.
  RandomLayer(512, 2 * MiB + 700, 1500, 2, 1);
  RandomLayer(4096, 8 * MiB + 1536, 1200, 3, 2);
  RandomLayer(65536, 1 * GiB + 192 * KiB, 600, 4, 3);
  RandomLayer(2 * MiB, 40 * MiB + 1 * MiB, 12, 3, 4);
}

// Tail piece over a raw base shorter than the layer; backing format raw.
TEST(LayerWriterTest, TailPieceOverRawBase) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  constexpr uint64_t cs = 65536;
  const uint64_t requested = 3 * MiB + 1000;
  std::mt19937_64 rng(7);
  std::vector<std::byte> raw(3 * MiB + 1000);
  FillRandom(raw, rng);
  WriteAll(d / "base.raw", raw);

  LayerOptions o{requested, cs, "base.raw", "raw"};
  const std::string layer = d / "layer.qcow2";
  auto w = NewLayer(layer, o);
  ASSERT_NE(w, nullptr);
  std::vector<std::byte> tail(1000, std::byte{0x5c});
  std::vector<std::byte> first(cs, std::byte{0xa1});
  ASSERT_OK(w->WriteData(48 * cs, tail));  // ends at virtual_size
  ASSERT_OK(w->WriteZeroes(cs, cs));
  ASSERT_OK(w->WriteData(0, first));
  ASSERT_OK(w->Finish());
  EXPECT_EQ(w->data_clusters(), 2u);
  EXPECT_EQ(w->zero_clusters(), 1u);
  EXPECT_EQ(w->virtual_size(), 3 * MiB + 1024);
  w.reset();

  ExpectQemuCheckClean(layer);
  nlohmann::json info = QemuJson("qemu-img info --output=json " + layer);
  EXPECT_EQ(info["backing-filename"], "base.raw");
  EXPECT_EQ(info["backing-filename-format"], "raw");
  EXPECT_EQ(info["virtual-size"], 3 * MiB + 1024);

  std::vector<std::byte> want = raw;
  want.resize(3 * MiB + 1024, std::byte{0});
  std::fill_n(want.begin(), cs, std::byte{0xa1});
  std::fill_n(want.begin() + cs, cs, std::byte{0});
  std::fill_n(want.begin() + 48 * cs, 1000, std::byte{0x5c});
  std::fill(want.begin() + 48 * cs + 1000, want.end(), std::byte{0});
  RunResult r = Sh("qemu-img convert -O raw " + layer + " " + (d / "out.raw"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_TRUE(ReadAll(d / "out.raw") == want);
}

TEST(LayerWriterTest, NoBackingFile) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  constexpr uint64_t cs = 4096;
  const uint64_t size = 1 * MiB;
  LayerOptions o{size, cs, "", ""};
  const std::string layer = d / "layer.qcow2";
  auto w = NewLayer(layer, o);
  ASSERT_NE(w, nullptr);
  std::vector<std::byte> want(size, std::byte{0});
  std::vector<std::byte> piece(3 * cs, std::byte{0x42});
  std::fill_n(piece.begin() + cs, cs, std::byte{0});  // the middle one is a zero cluster
  ASSERT_OK(w->WriteData(10 * cs, piece));
  std::copy(piece.begin(), piece.end(), want.begin() + 10 * cs);
  ASSERT_OK(w->WriteZeroes(100 * cs, 5 * cs));
  ASSERT_OK(w->WriteData(size - cs, std::vector<std::byte>(cs, std::byte{0x99})));
  std::fill(want.end() - cs, want.end(), std::byte{0x99});
  ASSERT_OK(w->Finish());
  EXPECT_EQ(w->data_clusters(), 3u);
  EXPECT_EQ(w->zero_clusters(), 6u);
  w.reset();

  ExpectQemuCheckClean(layer);
  nlohmann::json info = QemuJson("qemu-img info --output=json " + layer);
  EXPECT_FALSE(info.contains("backing-filename")) << info.dump();
  EXPECT_EQ(info["virtual-size"], size);
  RunResult r = Sh("qemu-img convert -O raw " + layer + " " + (d / "out.raw"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_TRUE(ReadAll(d / "out.raw") == want);
}

TEST(LayerWriterTest, EmptyLayerChecksClean) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  // Over a qcow2 base: reads through entirely.
  const std::string base = d / "base.qcow2";
  ASSERT_EQ(Sh("qemu-img create -q -f qcow2 " + base + " 4M").exit_code, 0);
  ASSERT_EQ(Sh("qemu-io -f qcow2 -c 'write -q -P 0x33 1M 1M' " + base).exit_code, 0);
  {
    const std::string layer = d / "empty.qcow2";
    auto w = NewLayer(layer, LayerOptions{4 * MiB, 65536, "base.qcow2", "qcow2"});
    ASSERT_NE(w, nullptr);
    ASSERT_OK(w->Finish());
    EXPECT_EQ(w->data_clusters() + w->zero_clusters(), 0u);
    w.reset();
    ExpectQemuCheckClean(layer);
    RunResult r = Sh("qemu-img compare -f qcow2 -F qcow2 " + layer + " " + base);
    EXPECT_EQ(r.exit_code, 0) << r.out;
    r = Sh("qemu-io -r -f qcow2 -c 'read -q -P 0x33 1M 1M' -c 'read -q -P 0 0 1M' " + layer);
    EXPECT_EQ(r.exit_code, 0) << r.out;
    EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
  }
  // No backing file, every cluster size, and a zero-sized one.
  for (uint32_t cs : {512u, 65536u, 2u << 20}) {
    const std::string layer = d / ("alone" + std::to_string(cs) + ".qcow2");
    auto w = NewLayer(layer, LayerOptions{64 * MiB, cs, "", ""});
    ASSERT_NE(w, nullptr);
    ASSERT_OK(w->Finish());
    w.reset();
    ExpectQemuCheckClean(layer);
  }
  const std::string layer = d / "zero-size.qcow2";
  auto w = NewLayer(layer, LayerOptions{0, 65536, "", ""});
  ASSERT_NE(w, nullptr);
  ASSERT_OK(w->Finish());
  w.reset();
  ExpectQemuCheckClean(layer);
}

// 1 TiB with three touched clusters: a few clusters of metadata.
TEST(LayerWriterTest, LargeSparseLayerIsSmall) {
  CBT_REQUIRE_QEMU();
  TempDir d;
  constexpr uint64_t cs = 65536;
  const uint64_t size = 1024 * GiB;
  const std::string layer = d / "big.qcow2";
  auto w = NewLayer(layer, LayerOptions{size, cs, "", ""});
  ASSERT_NE(w, nullptr);
  ASSERT_OK(w->WriteData(size - cs, std::vector<std::byte>(cs, std::byte{0x21})));
  ASSERT_OK(w->WriteData(0, std::vector<std::byte>(cs, std::byte{0x12})));
  ASSERT_OK(w->WriteZeroes(600 * GiB, cs));
  ASSERT_OK(w->Finish());
  w.reset();
  // header, 2 data, 3 L2, 1 L1 (2048 entries), 1 refcount block, 1 table.
  EXPECT_EQ(ReadAll(layer).size(), 9u * cs);
  ExpectQemuCheckClean(layer);
  RunResult r = Sh("qemu-io -r -f qcow2 -c 'read -q -P 0x12 0 64k' -c 'read -q -P 0x21 " +
                   std::to_string(size - cs) + " 64k' -c 'read -q -P 0 600G 64k' " + layer);
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.out.find("Pattern verification failed"), std::string::npos) << r.out;
}

// --- refusals (in memory) ---

Result<std::unique_ptr<LayerWriter>> MemLayer(const LayerOptions& o) {
  return LayerWriter::Create(std::make_shared<MemBlockIO>(), o);
}

TEST(LayerWriterTest, CreateRefusesBadOptions) {
  for (uint32_t cs : {0u, 256u, 1000u, 3u * 4096, 4u << 20}) {
    auto w = MemLayer(LayerOptions{MiB, cs, "", ""});
    EXPECT_TRUE(w.status().IsInvalidArgument()) << cs << " " << w.status().ToString();
  }
  auto no_format = MemLayer(LayerOptions{MiB, 65536, "base.qcow2", ""});
  EXPECT_TRUE(no_format.status().IsInvalidArgument()) << no_format.status().ToString();
  auto no_file = MemLayer(LayerOptions{MiB, 65536, "", "qcow2"});
  EXPECT_TRUE(no_file.status().IsInvalidArgument()) << no_file.status().ToString();
  auto vmdk = MemLayer(LayerOptions{MiB, 65536, "base.vmdk", "vmdk"});
  EXPECT_TRUE(vmdk.status().IsInvalidArgument()) << vmdk.status().ToString();
  auto long_name = MemLayer(LayerOptions{MiB, 65536, std::string(1024, 'a'), "raw"});
  EXPECT_TRUE(long_name.status().IsInvalidArgument()) << long_name.status().ToString();
  // 900 bytes do not fit into a 512-byte cluster 0 with the header.
  auto no_fit = MemLayer(LayerOptions{MiB, 512, std::string(900, 'a'), "raw"});
  EXPECT_TRUE(no_fit.status().IsInvalidArgument()) << no_fit.status().ToString();
  EXPECT_TRUE(MemLayer(LayerOptions{MiB, 4096, std::string(900, 'a'), "raw"}).ok());
  // L1 limit: 32 MiB of L1 at 512-byte clusters covers 4Mi * 64 * 512 = 128 GiB.
  EXPECT_TRUE(MemLayer(LayerOptions{128 * GiB, 512, "", ""}).ok());
  auto big = MemLayer(LayerOptions{128 * GiB + 512, 512, "", ""});
  EXPECT_TRUE(big.status().IsInvalidArgument()) << big.status().ToString();
  auto huge = MemLayer(LayerOptions{~uint64_t{0}, 2u << 20, "", ""});
  EXPECT_TRUE(huge.status().IsInvalidArgument()) << huge.status().ToString();
  // The file must be empty.
  auto full =
      LayerWriter::Create(std::make_shared<MemBlockIO>(std::vector<std::byte>(1, std::byte{1})),
                          LayerOptions{MiB, 65536, "", ""});
  EXPECT_TRUE(full.status().IsInvalidArgument()) << full.status().ToString();
}

TEST(LayerWriterTest, WritesRefuseMisalignedDoubleAndPastTheEnd) {
  constexpr uint64_t cs = 4096;
  const uint64_t size = 64 * cs + 1000;  // stored as 64 * cs + 1024
  auto wr = MemLayer(LayerOptions{size, cs, "", ""});
  ASSERT_TRUE(wr.ok()) << wr.status().ToString();
  LayerWriter& w = **wr;
  const std::vector<std::byte> one(cs, std::byte{1}), two(2 * cs, std::byte{2});

  // Misaligned offset, or a length that is no multiple and does not end at the end.
  EXPECT_TRUE(w.WriteData(512, one).IsInvalidArgument());
  EXPECT_TRUE(w.WriteZeroes(512, cs).IsInvalidArgument());
  EXPECT_TRUE(w.WriteData(0, std::span(one).first(1000)).IsInvalidArgument());
  EXPECT_TRUE(w.WriteZeroes(0, cs + 512).IsInvalidArgument());
  // Past the end.
  EXPECT_TRUE(w.WriteData(65 * cs, one).IsInvalidArgument());
  EXPECT_TRUE(w.WriteData(64 * cs, one).IsInvalidArgument());  // only 1000 bytes are left
  EXPECT_TRUE(w.WriteZeroes(63 * cs, 2 * cs).IsInvalidArgument());
  EXPECT_TRUE(w.WriteZeroes(~uint64_t{0} & ~uint64_t{cs - 1}, cs).IsInvalidArgument());
  EXPECT_TRUE(w.WriteZeroes(cs, ~uint64_t{0}).IsInvalidArgument());
  // The tail: ends at the virtual size as given, or as stored.
  ASSERT_OK(w.WriteData(64 * cs, std::span(one).first(1000)));
  EXPECT_TRUE(w.WriteZeroes(64 * cs, 1024).IsInvalidArgument());  // written already

  // Each cluster at most once, data or zeroes; a refused call changes nothing.
  ASSERT_OK(w.WriteData(0, one));
  EXPECT_TRUE(w.WriteData(0, one).IsInvalidArgument());
  EXPECT_TRUE(w.WriteZeroes(0, cs).IsInvalidArgument());
  ASSERT_OK(w.WriteZeroes(2 * cs, cs));
  EXPECT_TRUE(w.WriteZeroes(2 * cs, cs).IsInvalidArgument());
  EXPECT_TRUE(w.WriteData(2 * cs, one).IsInvalidArgument());
  EXPECT_TRUE(w.WriteData(cs, two).IsInvalidArgument());  // overlaps cluster 2
  EXPECT_TRUE(w.WriteZeroes(cs, 2 * cs).IsInvalidArgument());
  ASSERT_OK(w.WriteData(cs, one));  // cluster 1 untouched by the refusals
  ASSERT_OK(w.WriteData(3 * cs, {}));
  EXPECT_EQ(w.data_clusters(), 3u);
  EXPECT_EQ(w.zero_clusters(), 1u);

  ASSERT_OK(w.Finish());
  EXPECT_TRUE(w.WriteData(4 * cs, one).IsInvalidArgument());
  EXPECT_TRUE(w.WriteZeroes(4 * cs, cs).IsInvalidArgument());
  EXPECT_TRUE(w.Finish().IsInvalidArgument());
}

// A BlockIO whose pwrites past `limit` fail with ENOSPC.
class FullDisk final : public BlockIO {
 public:
  explicit FullDisk(uint64_t limit) : limit_(limit) {}
  Status pread(std::span<std::byte> out, uint64_t offset) override {
    return mem_.pread(out, offset);
  }
  Status pwrite(std::span<const std::byte> in, uint64_t offset) override {
    if (offset + in.size() > limit_) return Status::IOError("full", ENOSPC);
    return mem_.pwrite(in, offset);
  }
  Status flush() override { return Status::OK(); }
  Result<uint64_t> size() override { return mem_.size(); }
  Status resize(uint64_t n) override { return mem_.resize(n); }
  const char* name() const override { return "full"; }
  MemBlockIO mem_;

 private:
  uint64_t limit_;
};

TEST(LayerWriterTest, FailedDataWriteFailsFinishAndNoHeaderIsWritten) {
  constexpr uint64_t cs = 4096;
  auto io = std::make_shared<FullDisk>(3 * cs);
  auto wr = LayerWriter::Create(io, LayerOptions{MiB, cs, "", ""});
  ASSERT_TRUE(wr.ok()) << wr.status().ToString();
  LayerWriter& w = **wr;
  const std::vector<std::byte> one(cs, std::byte{1});
  ASSERT_OK(w.WriteData(0, one));
  ASSERT_OK(w.WriteData(cs, one));
  Status s = w.WriteData(2 * cs, one);  // host cluster 3: past the limit
  EXPECT_TRUE(s.IsIOError()) << s.ToString();
  EXPECT_EQ(s.err(), ENOSPC);
  EXPECT_FALSE(w.WriteZeroes(4 * cs, cs).ok());
  Status f = w.Finish();
  EXPECT_EQ(f.err(), ENOSPC) << f.ToString();
  // Nothing wrote the header: cluster 0 is not a qcow2 header.
  std::vector<std::byte> c0 = io->mem_.contents();
  c0.resize(4);
  EXPECT_EQ(c0, std::vector<std::byte>(4, std::byte{0}));
}

}  // namespace
}  // namespace cbt::qcow2
