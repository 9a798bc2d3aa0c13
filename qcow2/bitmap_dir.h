// qcow2 bitmap directory and bitmap tables: parse, validate, serialise.
//
// One validator per structure, used both after parsing and before writing,
// with QEMU 7.2's rules (block/qcow2-bitmap.c check_dir_entry,
// check_table_entry, bitmap_list_load) and the named limits of format.h.
// Everything works on byte spans so a fuzzer can call it directly.
// Threading: plain functions and values; no shared state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "qcow2/format.h"
#include "qcow2/header.h"

namespace cbt::qcow2 {

// One bitmap directory entry, as stored.
struct BitmapDirEntry {
  uint64_t table_offset = 0;
  uint32_t table_size = 0;
  uint32_t flags = 0;
  uint8_t type = kBitmapTypeDirty;
  uint8_t granularity_bits = 16;
  std::vector<std::byte> extra_data;  // parsed only to be refused
  std::string name;

  bool in_use() const { return flags & kBitmapFlagInUse; }
  bool enabled() const { return flags & kBitmapFlagAuto; }
  bool operator==(const BitmapDirEntry&) const = default;
};

// What validation needs to know about the image.
struct Geometry {
  uint32_t cluster_bits = 16;
  uint64_t virtual_size = 0;  // as QEMU sees it (Header::qemu_size())
};

// Bytes one entry takes in the directory: round_up(24 + extra + name, 8).
uint64_t DirEntrySize(const BitmapDirEntry& e);
uint64_t DirectorySize(const std::vector<BitmapDirEntry>& entries);
// ceil(ceil(ceil(size / g) / 8) / cs): the exact table size QEMU demands,
// with g = 2^granularity_bits and cs = 2^cluster_bits. Defined for every
// input (no overflow, no shift of 64 or more: a shift that large divides a
// non-zero value to 1); meaningful for QEMU's ranges, granularity_bits 9..31
// and cluster_bits 9..21, which callers validate separately.
uint64_t ExpectedTableSize(uint64_t virtual_size, uint32_t granularity_bits, uint32_t cluster_bits);

// User-input checks (InvalidArgument): name 1..1023 bytes without NUL;
// granularity a power of two 512 B..2 GiB.
Status ValidateBitmapName(std::string_view name);
Status ValidateGranularity(uint64_t granularity);
// Table-size limit for a new bitmap (InvalidArgument naming the fix).
Status ValidateBitmapSize(uint64_t virtual_size, uint32_t granularity_bits, uint32_t cluster_bits);

// The bitmaps extension: nb_bitmaps 1..65535, reserved 0, directory size
// 1..64 MiB, directory offset non-zero and cluster aligned. Corruption.
Status ValidateBitmapsExtension(const BitmapsExtension& ext, uint32_t cluster_bits,
                                std::string_view ctx);

// Splits the directory bytes into entries. Framing errors ("Broken bitmap
// directory", wrong count) are Corruption. Does not validate fields.
Result<std::vector<BitmapDirEntry>> ParseDirectory(std::span<const std::byte> dir,
                                                   uint32_t nb_bitmaps, std::string_view ctx);
// One entry, index for messages. Corruption with "ctx: bitmap directory
// entry N 'name': what".
Status ValidateDirEntry(const BitmapDirEntry& e, const Geometry& g, size_t index,
                        std::string_view ctx);
// Count, every entry, unique names, total size limit.
Status ValidateDirectory(const std::vector<BitmapDirEntry>& entries, const Geometry& g,
                         std::string_view ctx);
std::vector<std::byte> SerializeDirectory(const std::vector<BitmapDirEntry>& entries);
// Byte offset of entry i's flags field inside the serialised directory.
uint64_t DirEntryFlagsOffset(const std::vector<BitmapDirEntry>& entries, size_t i);

// One bitmap table entry: reserved bits clear, bit 0 only without an offset,
// offset cluster aligned. Corruption naming slot and `what` (the bitmap).
Status ValidateTableEntry(uint64_t entry, uint32_t cluster_bits, uint64_t slot,
                          std::string_view what);
// Parses table_size big-endian entries and validates each.
Result<std::vector<uint64_t>> ParseTable(std::span<const std::byte> buf, uint64_t table_size,
                                         uint32_t cluster_bits, std::string_view what);
// 8 * table.size() bytes, zero padded to `pad_to` bytes (>= that).
std::vector<std::byte> SerializeTable(const std::vector<uint64_t>& table, uint64_t pad_to);

}  // namespace cbt::qcow2
