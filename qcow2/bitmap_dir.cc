// qcow2 bitmap directory and tables. See bitmap_dir.h; rules from QEMU 7.2.
#include "qcow2/bitmap_dir.h"

#include <cstdio>
#include <set>

#include "common/endian.h"
#include "qcow2/util.h"

namespace cbt::qcow2 {

using internal::DivRoundUp;
using internal::Hex;
using internal::RoundUp8;

namespace {}  // namespace

uint64_t DirEntrySize(const BitmapDirEntry& e) {
  return RoundUp8(kDirEntryHeaderSize + e.extra_data.size() + e.name.size());
}

uint64_t DirectorySize(const std::vector<BitmapDirEntry>& entries) {
  uint64_t n = 0;
  for (const auto& e : entries) n += DirEntrySize(e);
  return n;
}

uint64_t ExpectedTableSize(uint64_t virtual_size, uint32_t granularity_bits,
                           uint32_t cluster_bits) {
  // ceil(a / 2^shift) for any shift (no undefined shift by 64 or more).
  auto div_pow2 = [](uint64_t a, uint32_t shift) -> uint64_t {
    if (shift >= 64) return a != 0;
    return (a >> shift) + ((a & ((uint64_t{1} << shift) - 1)) != 0);
  };
  uint64_t bits = div_pow2(virtual_size, granularity_bits);
  uint64_t bytes = DivRoundUp(bits, 8);
  return div_pow2(bytes, cluster_bits);
}

Status ValidateBitmapName(std::string_view name) {
  if (name.empty()) return Status::InvalidArgument("bitmap name cannot be empty");
  if (name.size() > kMaxBitmapNameSize)
    return Status::InvalidArgument("bitmap name is " + std::to_string(name.size()) +
                                   " bytes; the maximum is 1023");
  if (name.find('\0') != std::string_view::npos)
    return Status::InvalidArgument("bitmap name contains a NUL byte");
  return Status::OK();
}

Status ValidateGranularity(uint64_t g) {
  if (g < (uint64_t{1} << kMinGranularityBits) || g > (uint64_t{1} << kMaxGranularityBits) ||
      (g & (g - 1)) != 0)
    return Status::InvalidArgument("granularity " + std::to_string(g) +
                                   " must be a power of two from 512 bytes to 2 GiB");
  return Status::OK();
}

Status ValidateBitmapSize(uint64_t virtual_size, uint32_t granularity_bits, uint32_t cluster_bits) {
  uint64_t ts = ExpectedTableSize(virtual_size, granularity_bits, cluster_bits);
  if (ts == 0) return Status::InvalidArgument("cannot add a bitmap to a zero-sized disk");
  if (ts > kMaxBitmapTableSize || (ts << cluster_bits) > kMaxBitmapPhysBytes)
    return Status::InvalidArgument(
        "bitmap would take more than 512 MiB (over 2^32 bits); use a larger granularity");
  return Status::OK();
}

Status ValidateBitmapsExtension(const BitmapsExtension& ext, uint32_t cluster_bits,
                                std::string_view ctx) {
  std::string c = std::string(ctx) + ": bitmaps extension: ";
  if (ext.nb_bitmaps == 0)
    return Status::Corruption(c + "found bitmaps extension with zero bitmaps");
  if (ext.nb_bitmaps > kMaxBitmaps)
    return Status::Corruption(c + std::to_string(ext.nb_bitmaps) + " bitmaps (maximum 65535)");
  if (ext.reserved != 0) return Status::Corruption(c + "reserved field is not zero");
  if (ext.directory_size == 0 || ext.directory_size > kMaxBitmapDirSize)
    return Status::Corruption(c + "bad directory size " + std::to_string(ext.directory_size));
  if (ext.directory_offset == 0 || ext.directory_offset % (uint64_t{1} << cluster_bits) != 0)
    return Status::Corruption(c + "directory offset " + Hex(ext.directory_offset) +
                              " not cluster aligned");
  if (ext.directory_offset > kL1OffsetMask)
    return Status::Corruption(c + "directory offset " + Hex(ext.directory_offset) + " too large");
  return Status::OK();
}

Result<std::vector<BitmapDirEntry>> ParseDirectory(std::span<const std::byte> dir,
                                                   uint32_t nb_bitmaps, std::string_view ctx) {
  std::vector<BitmapDirEntry> out;
  uint64_t off = 0;
  std::string c = std::string(ctx) + ": bitmap directory: ";
  while (off < dir.size()) {
    if (out.size() >= nb_bitmaps)
      return Status::Corruption(c + "more bitmaps found than specified (" +
                                std::to_string(nb_bitmaps) + ")");
    if (dir.size() - off < kDirEntryHeaderSize)
      return Status::Corruption(c + "broken bitmap directory (entry " + std::to_string(out.size()) +
                                " truncated)");
    const std::byte* p = dir.data() + off;
    BitmapDirEntry e;
    e.table_offset = LoadBE64(p);
    e.table_size = LoadBE32(p + 8);
    e.flags = LoadBE32(p + 12);
    e.type = std::to_integer<uint8_t>(p[16]);
    e.granularity_bits = std::to_integer<uint8_t>(p[17]);
    uint16_t name_size = LoadBE16(p + 18);
    uint32_t extra = LoadBE32(p + 20);
    uint64_t size = RoundUp8(kDirEntryHeaderSize + uint64_t{extra} + name_size);
    if (size > dir.size() - off)
      return Status::Corruption(c + "broken bitmap directory (entry " + std::to_string(out.size()) +
                                " runs past the end)");
    e.extra_data.assign(p + kDirEntryHeaderSize, p + kDirEntryHeaderSize + extra);
    const char* n = reinterpret_cast<const char*>(p + kDirEntryHeaderSize + extra);
    e.name.assign(n, name_size);
    out.push_back(std::move(e));
    off += size;
  }
  if (out.size() != nb_bitmaps)
    return Status::Corruption(c + "less bitmaps found (" + std::to_string(out.size()) +
                              ") than specified (" + std::to_string(nb_bitmaps) + ")");
  return out;
}

Status ValidateDirEntry(const BitmapDirEntry& e, const Geometry& g, size_t index,
                        std::string_view ctx) {
  auto bad = [&](const std::string& what) {
    return Status::Corruption(std::string(ctx) + ": bitmap directory entry " +
                              std::to_string(index) + " '" + e.name + "': " + what);
  };
  const uint64_t cs = uint64_t{1} << g.cluster_bits;
  if (e.name.empty()) return bad("empty name");
  if (e.name.size() > kMaxBitmapNameSize) return bad("name longer than 1023 bytes");
  if (e.name.find('\0') != std::string::npos) return bad("name contains a NUL byte");
  if (!e.extra_data.empty()) return bad("extra data is not supported");
  if (e.type != kBitmapTypeDirty) return bad("type " + std::to_string(e.type) + " is not 1");
  if (e.flags & ~kBitmapFlagsKnown) return bad("reserved flags " + Hex(e.flags) + " set");
  if (e.granularity_bits < kMinGranularityBits || e.granularity_bits > kMaxGranularityBits)
    return bad("granularity bits " + std::to_string(e.granularity_bits) + " outside 9..31");
  if (e.table_offset == 0) return bad("table offset is 0");
  if (e.table_offset % cs != 0)
    return bad("table offset " + Hex(e.table_offset) + " not cluster aligned");
  if (e.table_offset > kTableEntryOffsetMask)
    return bad("table offset " + Hex(e.table_offset) + " too large");
  if (e.table_size == 0) return bad("table size is 0");
  if (e.table_size > kMaxBitmapTableSize ||
      (uint64_t{e.table_size} << g.cluster_bits) > kMaxBitmapPhysBytes)
    return bad("table size " + std::to_string(e.table_size) + " exceeds 512 MiB of bitmap");
  if (!e.in_use()) {
    uint64_t want = ExpectedTableSize(g.virtual_size, e.granularity_bits, g.cluster_bits);
    if (e.table_size != want)
      return bad("table size " + std::to_string(e.table_size) + " does not match the disk size (" +
                 std::to_string(want) + " expected)");
  }
  return Status::OK();
}

Status ValidateDirectory(const std::vector<BitmapDirEntry>& entries, const Geometry& g,
                         std::string_view ctx) {
  if (entries.size() > kMaxBitmaps)
    return Status::Corruption(std::string(ctx) + ": more than 65535 bitmaps");
  if (DirectorySize(entries) > kMaxBitmapDirSize)
    return Status::Corruption(std::string(ctx) + ": bitmap directory larger than 64 MiB");
  std::set<std::string_view> names;
  for (size_t i = 0; i < entries.size(); ++i) {
    CBT_RETURN_IF_ERROR(ValidateDirEntry(entries[i], g, i, ctx));
    if (!names.insert(entries[i].name).second)
      return Status::Corruption(std::string(ctx) + ": bitmap directory entry " + std::to_string(i) +
                                " '" + entries[i].name + "': duplicate name");
  }
  return Status::OK();
}

std::vector<std::byte> SerializeDirectory(const std::vector<BitmapDirEntry>& entries) {
  std::vector<std::byte> out(DirectorySize(entries));
  uint64_t off = 0;
  for (const auto& e : entries) {
    std::byte* p = out.data() + off;
    StoreBE64(p, e.table_offset);
    StoreBE32(p + 8, e.table_size);
    StoreBE32(p + 12, e.flags);
    p[16] = std::byte(e.type);
    p[17] = std::byte(e.granularity_bits);
    StoreBE16(p + 18, static_cast<uint16_t>(e.name.size()));
    StoreBE32(p + 20, static_cast<uint32_t>(e.extra_data.size()));
    std::copy(e.extra_data.begin(), e.extra_data.end(), p + kDirEntryHeaderSize);
    std::copy(e.name.begin(), e.name.end(),
              reinterpret_cast<char*>(p + kDirEntryHeaderSize + e.extra_data.size()));
    off += DirEntrySize(e);
  }
  return out;
}

uint64_t DirEntryFlagsOffset(const std::vector<BitmapDirEntry>& entries, size_t i) {
  uint64_t off = 0;
  for (size_t j = 0; j < i; ++j) off += DirEntrySize(entries[j]);
  return off + 12;
}

Status ValidateTableEntry(uint64_t entry, uint32_t cluster_bits, uint64_t slot,
                          std::string_view what) {
  auto bad = [&](const char* why) {
    return Status::Corruption(std::string(what) + ": bitmap table entry " + std::to_string(slot) +
                              " (" + Hex(entry) + "): " + why);
  };
  if (entry & kTableEntryReservedMask) return bad("reserved bits set");
  uint64_t off = entry & kTableEntryOffsetMask;
  if (off != 0) {
    if (entry & kTableEntryAllOnes) return bad("all-ones flag set together with an offset");
    if (off % (uint64_t{1} << cluster_bits) != 0) return bad("offset not cluster aligned");
  }
  return Status::OK();
}

Result<std::vector<uint64_t>> ParseTable(std::span<const std::byte> buf, uint64_t table_size,
                                         uint32_t cluster_bits, std::string_view what) {
  if (buf.size() / 8 < table_size)
    return Status::Corruption(std::string(what) + ": bitmap table truncated");
  std::vector<uint64_t> t(table_size);
  for (uint64_t i = 0; i < table_size; ++i) {
    t[i] = LoadBE64(buf.data() + 8 * i);
    CBT_RETURN_IF_ERROR(ValidateTableEntry(t[i], cluster_bits, i, what));
  }
  return t;
}

std::vector<std::byte> SerializeTable(const std::vector<uint64_t>& table, uint64_t pad_to) {
  std::vector<std::byte> out(std::max<uint64_t>(pad_to, table.size() * 8));
  for (size_t i = 0; i < table.size(); ++i) StoreBE64(out.data() + 8 * i, table[i]);
  return out;
}

}  // namespace cbt::qcow2
