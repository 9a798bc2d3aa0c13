// qcow2 header parse/serialise. See header.h.
#include "qcow2/header.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "common/endian.h"
#include "qcow2/format.h"
#include "qcow2/util.h"

namespace cbt::qcow2 {

using internal::Hex;
using internal::RoundUp8;

namespace {

Status Bad(std::string_view ctx, const std::string& what) {
  return Status::Corruption(std::string(ctx) + ": qcow2 header: " + what);
}

// Known feature names for messages when the file has no feature table.
const char* BuiltinFeatureName(uint8_t type, uint8_t bit) {
  if (type == 0) {
    switch (bit) {
      case 0:
        return "dirty bit";
      case 1:
        return "corrupt bit";
      case 2:
        return "external data file";
      case 3:
        return "compression type";
      case 4:
        return "extended L2 entries";
    }
  } else if (type == 2) {
    if (bit == 0) return "bitmaps";
    if (bit == 1) return "raw external data";
  }
  return nullptr;
}

bool IsKnownExtension(uint32_t type) {
  return type == kExtBackingFormat || type == kExtFeatureTable || type == kExtCrypto ||
         type == kExtDataFile;
}

}  // namespace

const HeaderExtension* Header::FindExtension(uint32_t type) const {
  for (const auto& e : extensions)
    if (e.type == type) return &e;
  return nullptr;
}

void Header::SetExtension(uint32_t type, std::vector<std::byte> data) {
  for (auto& e : extensions) {
    if (e.type == type) {
      e.data = std::move(data);
      return;
    }
  }
  extensions.push_back(HeaderExtension{type, std::move(data)});
}

bool Header::RemoveExtension(uint32_t type) {
  auto it = std::remove_if(extensions.begin(), extensions.end(),
                           [type](const HeaderExtension& e) { return e.type == type; });
  bool removed = it != extensions.end();
  extensions.erase(it, extensions.end());
  return removed;
}

std::vector<FeatureName> Header::FeatureNames() const {
  std::vector<FeatureName> out;
  const HeaderExtension* e = FindExtension(kExtFeatureTable);
  if (!e) return out;
  for (size_t off = 0; off + kFeatureEntrySize <= e->data.size(); off += kFeatureEntrySize) {
    FeatureName f;
    f.type = std::to_integer<uint8_t>(e->data[off]);
    f.bit = std::to_integer<uint8_t>(e->data[off + 1]);
    const char* p = reinterpret_cast<const char*>(e->data.data() + off + 2);
    f.name.assign(p, strnlen(p, kFeatureNameSize));
    out.push_back(std::move(f));
  }
  return out;
}

std::string Header::DataFile() const {
  const HeaderExtension* e = FindExtension(kExtDataFile);
  if (!e) return {};
  return std::string(reinterpret_cast<const char*>(e->data.data()), e->data.size());
}

Result<uint32_t> PeekClusterBits(std::span<const std::byte> buf, std::string_view ctx) {
  if (buf.size() < 24) return Bad(ctx, "truncated (file shorter than the header)");
  if (LoadBE32(buf.data()) != kMagic) return Bad(ctx, "bad magic (not a qcow2 file)");
  uint32_t version = LoadBE32(buf.data() + 4);
  if (version != 2 && version != 3)
    return Status::NotSupported(std::string(ctx) + ": unsupported qcow2 version " +
                                std::to_string(version));
  uint32_t cluster_bits = LoadBE32(buf.data() + 20);
  if (cluster_bits < kMinClusterBits || cluster_bits > kMaxClusterBits)
    return Status::NotSupported(std::string(ctx) + ": unsupported cluster_bits " +
                                std::to_string(cluster_bits) + " (QEMU opens 9..21)");
  return cluster_bits;
}

Result<std::vector<std::byte>> ReadHeaderCluster(BlockIO& io, std::string_view ctx) {
  CBT_ASSIGN_OR_RETURN(uint64_t fsize, io.size());
  std::vector<std::byte> first(std::min<uint64_t>(fsize, 24));
  CBT_RETURN_IF_ERROR(io.pread(first, 0));
  CBT_ASSIGN_OR_RETURN(uint32_t cbits, PeekClusterBits(first, ctx));
  std::vector<std::byte> buf(std::min<uint64_t>(fsize, uint64_t{1} << cbits));
  CBT_RETURN_IF_ERROR(io.pread(buf, 0));
  return buf;
}

Result<Header> ParseHeader(std::span<const std::byte> buf, std::string_view ctx) {
  CBT_ASSIGN_OR_RETURN(uint32_t cluster_bits, PeekClusterBits(buf, ctx));
  const std::byte* p = buf.data();
  Header h;
  h.version = LoadBE32(p + 4);
  h.cluster_bits = cluster_bits;
  const uint64_t cs = h.cluster_size();
  if (buf.size() < kV2HeaderLength) return Bad(ctx, "truncated (file shorter than the header)");
  uint64_t backing_offset = LoadBE64(p + 8);
  uint32_t backing_size = LoadBE32(p + 16);
  h.size = LoadBE64(p + 24);
  h.crypt_method = LoadBE32(p + 32);
  h.l1_size = LoadBE32(p + 36);
  h.l1_table_offset = LoadBE64(p + 40);
  h.refcount_table_offset = LoadBE64(p + 48);
  h.refcount_table_clusters = LoadBE32(p + 56);
  h.nb_snapshots = LoadBE32(p + 60);
  h.snapshots_offset = LoadBE64(p + 64);
  if (h.version == 2) {
    h.header_length = kV2HeaderLength;
    h.refcount_order = 4;
  } else {
    if (buf.size() < kV3MinHeaderLength)
      return Bad(ctx, "truncated (file shorter than the header)");
    h.incompatible = LoadBE64(p + 72);
    h.compatible = LoadBE64(p + 80);
    h.autoclear = LoadBE64(p + 88);
    h.refcount_order = LoadBE32(p + 96);
    h.header_length = LoadBE32(p + 100);
    if (h.header_length < kV3MinHeaderLength || h.header_length % 8 != 0 || h.header_length > cs)
      return Bad(ctx, "bad header_length " + std::to_string(h.header_length));
    if (buf.size() < h.header_length) return Bad(ctx, "truncated (file shorter than the header)");
    h.header_tail.assign(p + kV3MinHeaderLength, p + h.header_length);
  }
  if (h.refcount_order > kMaxRefcountOrder)
    return Status::NotSupported(std::string(ctx) + ": unsupported refcount_order " +
                                std::to_string(h.refcount_order));
  if (h.refcount_table_clusters == 0) return Bad(ctx, "refcount_table_clusters is 0");
  if (h.refcount_table_offset % cs != 0)
    return Bad(ctx,
               "refcount table offset " + Hex(h.refcount_table_offset) + " not cluster aligned");
  if (h.l1_table_offset % cs != 0)
    return Bad(ctx, "L1 table offset " + Hex(h.l1_table_offset) + " not cluster aligned");
  if (uint64_t{h.l1_size} * 8 > kMaxL1Bytes)
    return Bad(ctx, "L1 size " + std::to_string(h.l1_size) + " too large");
  // QEMU 7.2 qcow2_do_open: the active L1 table must have an entry for
  // every L2 table the virtual size needs (size_to_l1, with its uint64
  // wrap-around kept), that count must fit an int, and the table's end must
  // not pass INT64_MAX.
  {
    const uint32_t l2_bits = h.cluster_bits - ((h.incompatible & kIncompatExtendedL2) ? 4u : 3u);
    const uint32_t shift = h.cluster_bits + l2_bits;
    const uint64_t needed = (h.size + ((uint64_t{1} << shift) - 1)) >> shift;
    if (needed > uint64_t{INT32_MAX})
      return Bad(ctx, "image is too big (virtual size " + std::to_string(h.size) + ")");
    if (h.l1_size < needed)
      return Bad(ctx, "L1 table is too small (" + std::to_string(h.l1_size) + " entries; " +
                          std::to_string(needed) + " needed for virtual size " +
                          std::to_string(h.size) + ")");
    if (uint64_t{INT64_MAX} - uint64_t{h.l1_size} * 8 < h.l1_table_offset)
      return Bad(ctx, "L1 table offset " + Hex(h.l1_table_offset) + " invalid");
  }
  if (uint64_t{h.refcount_table_clusters} * cs > kMaxRefcountTableBytes)
    return Bad(ctx, "refcount table too large");
  if (h.nb_snapshots && h.snapshots_offset % cs != 0)
    return Bad(ctx, "snapshot table offset " + Hex(h.snapshots_offset) + " not cluster aligned");

  // Extension area: [header_length, backing_offset or cluster end).
  uint64_t area_end = cs;
  if (backing_offset != 0) {
    if (backing_offset > cs || backing_size > kMaxBackingFileSize ||
        backing_offset + backing_size > cs)
      return Bad(ctx, "bad backing file offset/size");
    if (backing_offset + backing_size > buf.size())
      return Bad(ctx, "truncated (backing file name past end of file)");
    h.backing_file.assign(reinterpret_cast<const char*>(p + backing_offset), backing_size);
    area_end = backing_offset;
  }
  uint64_t off = h.header_length;
  while (true) {
    if (off + 8 > area_end) {
      // QEMU stops at the area end without an end marker; accept that.
      break;
    }
    if (off + 8 > buf.size()) return Bad(ctx, "truncated (in header extensions)");
    uint32_t type = LoadBE32(p + off);
    uint32_t len = LoadBE32(p + off + 4);
    if (type == kExtEnd) break;
    if (uint64_t{len} > area_end - off - 8)
      return Bad(ctx, "header extension " + Hex(type) + " at offset " + Hex(off) + " too large");
    if (off + 8 + len > buf.size()) return Bad(ctx, "truncated (in header extensions)");
    const std::byte* d = p + off + 8;
    if (type == kExtBitmaps) {
      if (h.bitmaps) return Bad(ctx, "duplicate bitmaps extension");
      if (len != kBitmapsExtLength)
        return Bad(ctx, "bitmaps extension length " + std::to_string(len) + ", expected 24");
      BitmapsExtension b;
      b.nb_bitmaps = LoadBE32(d);
      b.reserved = LoadBE32(d + 4);
      b.directory_size = LoadBE64(d + 8);
      b.directory_offset = LoadBE64(d + 16);
      h.bitmaps = b;
      h.bitmaps_ext_offset = static_cast<uint32_t>(off);
    } else {
      if (h.FindExtension(type)) return Bad(ctx, "duplicate header extension " + Hex(type));
      h.extensions.push_back(HeaderExtension{type, std::vector<std::byte>(d, d + len)});
    }
    off += 8 + RoundUp8(len);
  }
  return h;
}

Status CheckFeatures(const Header& h, bool writable, std::string_view ctx) {
  uint64_t unknown = h.incompatible & ~kIncompatKnown;
  if (unknown) {
    std::string names;
    auto table = h.FeatureNames();
    for (int bit = 0; bit < 64; ++bit) {
      if (!(unknown & (1ull << bit))) continue;
      std::string name = "bit " + std::to_string(bit);
      bool named = false;
      for (const auto& f : table) {
        if (f.type == 0 && f.bit == bit && !f.name.empty() && !named) {
          name += " '" + f.name + "'";
          named = true;
        }
      }
      if (!named && BuiltinFeatureName(0, static_cast<uint8_t>(bit)))
        name += std::string(" '") + BuiltinFeatureName(0, static_cast<uint8_t>(bit)) + "'";
      if (!names.empty()) names += ", ";
      names += name;
    }
    return Status::NotSupported(std::string(ctx) + ": unsupported incompatible qcow2 feature " +
                                names);
  }
  if (writable && (h.incompatible & kIncompatCorrupt))
    return Status::Corruption(std::string(ctx) +
                              ": image is marked corrupt (incompatible feature 'corrupt bit'); "
                              "repair with qemu-img check -r all");
  if (writable && (h.incompatible & kIncompatDirty))
    return Status::NotSupported(std::string(ctx) +
                                ": refcounts may be stale (incompatible feature 'dirty bit'); "
                                "repair with qemu-img check -r all");
  return Status::OK();
}

Result<std::vector<std::byte>> SerializeHeader(const Header& h) {
  const uint64_t cs = h.cluster_size();
  uint32_t hl = h.version == 2 ? kV2HeaderLength : h.header_length;
  if (h.version == 3 && (hl < kV3MinHeaderLength || hl % 8 != 0 || hl > cs))
    return Status::InvalidArgument("qcow2 header: bad header_length " + std::to_string(hl));
  uint64_t need = hl;
  if (h.bitmaps) need += 8 + kBitmapsExtLength;
  for (const auto& e : h.extensions) need += 8 + RoundUp8(e.data.size());
  need += 8;  // end marker
  uint64_t backing_off = 0;
  if (!h.backing_file.empty()) {
    backing_off = need;
    need += h.backing_file.size();
  }
  if (need > cs)
    return Status::InvalidArgument("qcow2 header: header extensions (" + std::to_string(need) +
                                   " bytes) do not fit into one cluster of " + std::to_string(cs) +
                                   " bytes");
  std::vector<std::byte> out((need + 511) & ~uint64_t{511});
  std::byte* p = out.data();
  StoreBE32(p, kMagic);
  StoreBE32(p + 4, h.version);
  StoreBE64(p + 8, backing_off);
  StoreBE32(p + 16, static_cast<uint32_t>(h.backing_file.size()));
  StoreBE32(p + 20, h.cluster_bits);
  StoreBE64(p + 24, h.size);
  StoreBE32(p + 32, h.crypt_method);
  StoreBE32(p + 36, h.l1_size);
  StoreBE64(p + 40, h.l1_table_offset);
  StoreBE64(p + 48, h.refcount_table_offset);
  StoreBE32(p + 56, h.refcount_table_clusters);
  StoreBE32(p + 60, h.nb_snapshots);
  StoreBE64(p + 64, h.snapshots_offset);
  if (h.version == 3) {
    StoreBE64(p + 72, h.incompatible);
    StoreBE64(p + 80, h.compatible);
    StoreBE64(p + 88, h.autoclear);
    StoreBE32(p + 96, h.refcount_order);
    StoreBE32(p + 100, hl);
    size_t n = std::min<size_t>(h.header_tail.size(), hl - kV3MinHeaderLength);
    std::copy_n(h.header_tail.begin(), n, p + kV3MinHeaderLength);
  }
  uint64_t off = hl;
  if (h.bitmaps) {
    StoreBE32(p + off, kExtBitmaps);
    StoreBE32(p + off + 4, kBitmapsExtLength);
    StoreBE32(p + off + 8, h.bitmaps->nb_bitmaps);
    StoreBE32(p + off + 12, h.bitmaps->reserved);
    StoreBE64(p + off + 16, h.bitmaps->directory_size);
    StoreBE64(p + off + 24, h.bitmaps->directory_offset);
    off += 8 + kBitmapsExtLength;
  }
  // Unknown (private) extensions next, so a fixed-size private record that
  // follows the bitmaps extension also sits in sector 0; then QEMU's own.
  for (int pass = 0; pass < 2; ++pass) {
    for (const auto& e : h.extensions) {
      if (IsKnownExtension(e.type) != (pass == 1)) continue;
      StoreBE32(p + off, e.type);
      StoreBE32(p + off + 4, static_cast<uint32_t>(e.data.size()));
      std::copy(e.data.begin(), e.data.end(), p + off + 8);
      off += 8 + RoundUp8(e.data.size());
    }
  }
  off += 8;  // end marker: zeros
  std::copy(h.backing_file.begin(), h.backing_file.end(), reinterpret_cast<char*>(p + off));
  return out;
}

}  // namespace cbt::qcow2
