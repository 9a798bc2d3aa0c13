#include "engine/intent_map.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>

#include "common/endian.h"

namespace cbt {

namespace {

constexpr uint32_t kMagic = 0x43425449;  // "CBTI"
constexpr uint32_t kVersion = 1;

uint64_t RegionsFor(uint64_t disk_size, uint32_t bits) {
  return (disk_size >> bits) + ((disk_size & ((uint64_t{1} << bits) - 1)) ? 1 : 0);
}

size_t RecordBytes(uint64_t nregions) {
  return IntentMap::kHeaderBytes + (((nregions + 7) / 8 + 7) & ~size_t{7});
}

// Sets bits [first, last] of an atomic word array.
void SetRange(std::atomic<uint64_t>* w, uint64_t first, uint64_t last) {
  for (uint64_t i = first >> 6; i <= (last >> 6); ++i) {
    unsigned lo = i == (first >> 6) ? unsigned(first & 63) : 0;
    unsigned hi = i == (last >> 6) ? unsigned(last & 63) : 63;
    uint64_t m = (hi == 63 ? ~uint64_t{0} : ((uint64_t{1} << (hi + 1)) - 1)) & (~uint64_t{0} << lo);
    if ((w[i].load() & m) != m) w[i].fetch_or(m);
  }
}

}  // namespace

BootId CurrentBootId() {
  BootId id{};
  FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "r");
  if (!f) return id;
  char buf[64] = {};
  size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  size_t k = 0;
  for (size_t i = 0; i + 1 < n && k < id.size(); ++i) {
    auto hex = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      return -1;
    };
    int hi = hex(buf[i]), lo = hex(buf[i + 1]);
    if (hi < 0) continue;
    if (lo < 0) continue;
    id[k++] = std::byte(hi << 4 | lo);
    ++i;
  }
  return id;
}

IntentMap::IntentMap(uint64_t disk_size, IntentMode mode, const BootId& boot, uint32_t region_bits)
    : disk_size_(disk_size),
      mode_(mode),
      boot_(boot),
      region_bits_(region_bits),
      nregions_(RegionsFor(disk_size, region_bits)),
      wanted_(new std::atomic<uint64_t>[std::max<uint64_t>(1, (nregions_ + 63) / 64)]()),
      durable_(new std::atomic<uint64_t>[std::max<uint64_t>(1, (nregions_ + 63) / 64)]()) {}

Result<std::unique_ptr<IntentMap>> IntentMap::Create(uint64_t disk_size, IntentMode mode,
                                                     const BootId& boot, size_t max_bytes) {
  for (uint32_t bits = kMinRegionBits; bits <= 62; ++bits) {
    if (RecordBytes(RegionsFor(disk_size, bits)) <= max_bytes)
      return std::unique_ptr<IntentMap>(new IntentMap(disk_size, mode, boot, bits));
  }
  return Status::InvalidArgument(
      "crash-safety record: no room for it in the container's first "
      "cluster; use a larger cluster size");
}

Result<std::unique_ptr<IntentMap>> IntentMap::Parse(std::span<const std::byte> rec) {
  auto bad = [](const std::string& what) {
    return Status::Corruption("crash-safety record: " + what);
  };
  if (rec.size() < kHeaderBytes) return bad("too short");
  if (LoadBE32(rec.data()) != kMagic) return bad("bad magic");
  if (LoadBE32(rec.data() + 4) != kVersion)
    return bad("version " + std::to_string(LoadBE32(rec.data() + 4)) + " not supported");
  uint8_t mode = std::to_integer<uint8_t>(rec[8]);
  uint8_t bits = std::to_integer<uint8_t>(rec[9]);
  if (mode != 1 && mode != 2) return bad("bad mode");
  if (bits < kMinRegionBits || bits > 62) return bad("bad region size");
  for (size_t i = 10; i < 16; ++i)
    if (rec[i] != std::byte{0}) return bad("reserved bytes set");
  uint64_t disk = LoadBE64(rec.data() + 16);
  uint64_t n = LoadBE64(rec.data() + 40);
  if (n != RegionsFor(disk, bits)) return bad("region count does not match the disk size");
  if (rec.size() != RecordBytes(n)) return bad("size does not match the region count");
  BootId boot;
  std::copy_n(rec.begin() + 24, boot.size(), boot.begin());
  std::unique_ptr<IntentMap> m(new IntentMap(disk, static_cast<IntentMode>(mode), boot, bits));
  for (uint64_t r = 0; r < n; ++r) {
    if ((std::to_integer<uint8_t>(rec[kHeaderBytes + r / 8]) >> (r % 8)) & 1) {
      m->wanted_[r >> 6].fetch_or(uint64_t{1} << (r & 63));
      m->durable_[r >> 6].fetch_or(uint64_t{1} << (r & 63));
    }
  }
  return m;
}

size_t IntentMap::record_bytes() const {
  return RecordBytes(nregions_);
}

bool IntentMap::AllDurable(uint64_t first, uint64_t last) const {
  for (uint64_t r = first; r <= last; ++r)
    if (!((durable_[r >> 6].load() >> (r & 63)) & 1)) return false;
  return true;
}

void IntentMap::Want(uint64_t first, uint64_t last) {
  SetRange(wanted_.get(), first, last);
}

std::vector<uint64_t> IntentMap::Snapshot() const {
  std::vector<uint64_t> v(words());
  for (uint64_t i = 0; i < v.size(); ++i) v[i] = wanted_[i].load();
  return v;
}

bool IntentMap::SnapshotIsDurable(const std::vector<uint64_t>& snap) const {
  for (uint64_t i = 0; i < snap.size(); ++i)
    if ((durable_[i].load() & snap[i]) != snap[i]) return false;
  return true;
}

void IntentMap::SetDurable(const std::vector<uint64_t>& snap) {
  for (uint64_t i = 0; i < snap.size(); ++i) durable_[i].fetch_or(snap[i]);
}

void IntentMap::ClearAll() {
  for (uint64_t i = 0; i < words(); ++i) {
    durable_[i].store(0);
    wanted_[i].store(0);
  }
}

std::vector<std::byte> IntentMap::Serialize(const std::vector<uint64_t>& bits) const {
  std::vector<std::byte> rec(record_bytes());
  StoreBE32(rec.data(), kMagic);
  StoreBE32(rec.data() + 4, kVersion);
  rec[8] = std::byte(static_cast<uint8_t>(mode_));
  rec[9] = std::byte(static_cast<uint8_t>(region_bits_));
  StoreBE64(rec.data() + 16, disk_size_);
  std::copy(boot_.begin(), boot_.end(), rec.begin() + 24);
  StoreBE64(rec.data() + 40, nregions_);
  for (uint64_t r = 0; r < nregions_; ++r)
    if (r / 64 < bits.size() && ((bits[r / 64] >> (r % 64)) & 1))
      rec[kHeaderBytes + r / 8] |= std::byte(1u << (r % 8));
  return rec;
}

std::vector<std::pair<uint64_t, uint64_t>> IntentMap::RecordedRanges() const {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (uint64_t r = 0; r < nregions_; ++r) {
    if (!((durable_[r >> 6].load() >> (r & 63)) & 1)) continue;
    uint64_t start = r << region_bits_;
    uint64_t end = std::min(disk_size_, (r + 1) << region_bits_);
    if (!out.empty() && out.back().first + out.back().second == start)
      out.back().second += end - start;
    else
      out.emplace_back(start, end - start);
  }
  return out;
}

}  // namespace cbt
