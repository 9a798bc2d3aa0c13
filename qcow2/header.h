// qcow2 header (cluster 0): parse into a plain struct and serialise back.
//
// Parsing keeps everything we do not interpret byte for byte: the header tail
// beyond 104 bytes (compression type and unknown fields), every header
// extension other than the bitmaps extension (in file order), the backing
// file name. Serialising writes the fixed header, then the bitmaps extension
// FIRST (so that with header_length 112 the header fields and the bitmaps
// extension lie inside the first 512-byte sector: P13), then the other
// extensions, the end marker and the backing file name.
//
// Parsing works on a byte span so a fuzzer can call it directly; it never
// reads outside the span and never trusts a length it has not checked.
// Threading: plain functions and values; no shared state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/block_io.h"
#include "common/status.h"

namespace cbt::qcow2 {

struct HeaderExtension {
  uint32_t type = 0;
  std::vector<std::byte> data;  // without padding
  bool operator==(const HeaderExtension&) const = default;
};

// The 24-byte bitmaps extension (type 0x23852875), as stored.
struct BitmapsExtension {
  uint32_t nb_bitmaps = 0;
  uint32_t reserved = 0;
  uint64_t directory_size = 0;
  uint64_t directory_offset = 0;
  bool operator==(const BitmapsExtension&) const = default;
};

// One entry of the feature name table extension.
struct FeatureName {
  uint8_t type = 0;  // 0 incompatible, 1 compatible, 2 autoclear
  uint8_t bit = 0;
  std::string name;
};

struct Header {
  uint32_t version = 3;
  uint32_t cluster_bits = 16;
  uint64_t size = 0;  // virtual size as stored
  uint32_t crypt_method = 0;
  uint32_t l1_size = 0;
  uint64_t l1_table_offset = 0;
  uint64_t refcount_table_offset = 0;
  uint32_t refcount_table_clusters = 0;
  uint32_t nb_snapshots = 0;
  uint64_t snapshots_offset = 0;
  uint64_t incompatible = 0;
  uint64_t compatible = 0;
  uint64_t autoclear = 0;
  uint32_t refcount_order = 4;
  uint32_t header_length = 112;  // v3; 72 for v2
  // Bytes [104, header_length) of a v3 header, kept as read (byte 104 is the
  // compression type). Serialise pads or uses it to reach header_length.
  std::vector<std::byte> header_tail;
  std::string backing_file;
  // The parsed bitmaps extension, present or not regardless of autoclear bit 0.
  std::optional<BitmapsExtension> bitmaps;
  // Every other extension except the end marker, in file order.
  std::vector<HeaderExtension> extensions;
  // Offset of the bitmaps extension in the parsed file (0 = absent).
  uint32_t bitmaps_ext_offset = 0;

  uint64_t cluster_size() const { return uint64_t{1} << cluster_bits; }
  // Virtual size as QEMU sees it: floored to a multiple of 512 (P18).
  uint64_t qemu_size() const { return size & ~uint64_t{511}; }
  const HeaderExtension* FindExtension(uint32_t type) const;
  // Adds or replaces the extension of that type (keeps its position).
  // REQUIRES: type is not kExtEnd or kExtBitmaps.
  void SetExtension(uint32_t type, std::vector<std::byte> data);
  // Returns whether one was removed.
  bool RemoveExtension(uint32_t type);
  // Feature name table entries (empty if the extension is absent).
  std::vector<FeatureName> FeatureNames() const;
  // The external data file name extension as a string ("" if absent).
  std::string DataFile() const;
};

// Parses the first bytes of a qcow2 file. `buf` should hold the whole first
// cluster, or the whole file when it is shorter. `ctx` (the file name) starts
// every message.
// Failure: Corruption (bad magic, bad field, extension running past its area,
// "truncated"), NotSupported (version other than 2/3, cluster size outside
// 512 B..2 MiB, refcount_order > 6).
Result<Header> ParseHeader(std::span<const std::byte> buf, std::string_view ctx);

// Reads the fixed fields only to learn the cluster size; REQUIRES nothing.
// Failure as ParseHeader for the first 24 bytes.
Result<uint32_t> PeekClusterBits(std::span<const std::byte> buf, std::string_view ctx);

// The header cluster of the file `io` (at most one cluster, of the size its
// header gives: 24 bytes are peeked first), for ParseHeader. Failure as
// PeekClusterBits, or the read's.
Result<std::vector<std::byte>> ReadHeaderCluster(BlockIO& io, std::string_view ctx);

// Refuses what we must not touch. Always: unknown incompatible bits
// (NotSupported, naming the feature from the feature table). When writable:
// the corrupt bit (Corruption), the dirty bit (NotSupported: refcounts are
// stale; run qemu-img check -r all).
Status CheckFeatures(const Header& h, bool writable, std::string_view ctx);

// Serialises h into a buffer of the used length rounded up to 512 bytes
// (at most one cluster). backing_file_offset is recomputed.
// Failure: InvalidArgument when the extensions and names do not fit into
// cluster 0, or for a bad header_length.
Result<std::vector<std::byte>> SerializeHeader(const Header& h);

}  // namespace cbt::qcow2
