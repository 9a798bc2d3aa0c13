// qcow2 on-disk constants and limits: the one place that names them.
//
// Values follow QEMU 7.2 (block/qcow2.h, block/qcow2-bitmap.c) where QEMU is
// stricter than docs/interop/qcow2.txt, because QEMU must accept our files.
// See /work/shared/reference/qcow2-bitmaps.md and docs/format.md.
// Pure constants: no state, safe from any thread.
#pragma once

#include <cstdint>

namespace cbt::qcow2 {

// --- header (cluster 0) ---
inline constexpr uint32_t kMagic = 0x514649fb;       // "QFI\xfb"
inline constexpr uint32_t kV2HeaderLength = 72;      // fixed v2 header
inline constexpr uint32_t kV3MinHeaderLength = 104;  // fixed v3 header
inline constexpr uint32_t kOurHeaderLength = 112;    // what QEMU and we write
inline constexpr uint32_t kMinClusterBits = 9;       // 512 B
inline constexpr uint32_t kMaxClusterBits = 21;      // 2 MiB (QEMU's limit)
inline constexpr uint32_t kDefaultClusterSize = 65536;
inline constexpr uint32_t kMaxRefcountOrder = 6;  // 64-bit refcounts
inline constexpr uint32_t kDefaultRefcountOrder = 4;
inline constexpr uint32_t kMaxBackingFileSize = 1023;
inline constexpr uint64_t kMaxL1Bytes = 32u << 20;            // QEMU_MAX_L1_SIZE
inline constexpr uint64_t kMaxRefcountTableBytes = 8u << 20;  // QCOW_MAX_REFTABLE_SIZE

// Field offsets inside the fixed header that we rewrite on their own.
inline constexpr uint32_t kOffRefcountTableOffset = 48;  // u64, then u32 clusters
inline constexpr uint32_t kOffIncompatible = 72;
inline constexpr uint32_t kOffAutoclear = 88;

// --- feature bits ---
inline constexpr uint64_t kIncompatDirty = 1ull << 0;
inline constexpr uint64_t kIncompatCorrupt = 1ull << 1;
inline constexpr uint64_t kIncompatDataFile = 1ull << 2;
inline constexpr uint64_t kIncompatCompression = 1ull << 3;
inline constexpr uint64_t kIncompatExtendedL2 = 1ull << 4;
inline constexpr uint64_t kIncompatKnown = 0x1f;
inline constexpr uint64_t kCompatLazyRefcounts = 1ull << 0;
inline constexpr uint64_t kAutoclearBitmaps = 1ull << 0;
inline constexpr uint64_t kAutoclearDataFileRaw = 1ull << 1;
// cbt's own autoclear bit: set while cbt's crash-safety record (a private
// header extension, engine/intent_map.h) describes every change. QEMU clears
// unknown autoclear bits when it writes the file, which invalidates the
// record exactly when it stops being true. Bit 62: far from QEMU's bits.
inline constexpr uint64_t kAutoclearCbtIntent = 1ull << 62;
inline constexpr uint64_t kAutoclearKnown = 0x3 | kAutoclearCbtIntent;
// cbt's private header extensions (vouched for by kAutoclearCbtIntent):
// types "CBT" followed by one letter ("CBTI" crash-safety, "CBTD" disk
// identity; docs/format.md).
inline constexpr bool IsPrivateRecordType(uint32_t type) {
  return (type & 0xffffff00u) == 0x43425400u;
}

// --- header extensions ---
inline constexpr uint32_t kExtEnd = 0x00000000;
inline constexpr uint32_t kExtBackingFormat = 0xe2792aca;
inline constexpr uint32_t kExtFeatureTable = 0x6803f857;
inline constexpr uint32_t kExtBitmaps = 0x23852875;
inline constexpr uint32_t kExtCrypto = 0x0537be77;
inline constexpr uint32_t kExtDataFile = 0x44415441;
inline constexpr uint32_t kBitmapsExtLength = 24;
inline constexpr uint32_t kFeatureEntrySize = 48;
inline constexpr uint32_t kFeatureNameSize = 46;

// --- L1/L2 ---
inline constexpr uint64_t kL1OffsetMask = 0x00fffffffffffe00ull;  // bits 9..55
inline constexpr uint64_t kL2OffsetMask = 0x00fffffffffffe00ull;
inline constexpr uint64_t kOflagCopied = 1ull << 63;
inline constexpr uint64_t kOflagCompressed = 1ull << 62;
inline constexpr uint64_t kOflagZero = 1ull << 0;

// --- refcount table ---
inline constexpr uint64_t kRefTableOffsetMask = 0xfffffffffffffe00ull;  // bits 9..63

// --- bitmaps extension, directory, tables (QEMU's limits) ---
inline constexpr uint32_t kMaxBitmaps = 65535;
inline constexpr uint32_t kMaxBitmapNameSize = 1023;

inline constexpr uint64_t kMaxBitmapDirSize = 1024ull * kMaxBitmaps;
inline constexpr uint32_t kMaxBitmapTableSize = 0x8000000;
inline constexpr uint64_t kMaxBitmapPhysBytes = 512ull << 20;  // table_size * cs
inline constexpr uint32_t kMinGranularityBits = 9;             // 512 B
inline constexpr uint32_t kMaxGranularityBits = 31;            // 2 GiB
inline constexpr uint32_t kDirEntryHeaderSize = 24;
inline constexpr uint8_t kBitmapTypeDirty = 1;
inline constexpr uint32_t kBitmapFlagInUse = 1u << 0;
inline constexpr uint32_t kBitmapFlagAuto = 1u << 1;
// Bit 2 (extra_data_compatible) is reserved as far as QEMU 7.2 is concerned.
inline constexpr uint32_t kBitmapFlagsKnown = kBitmapFlagInUse | kBitmapFlagAuto;
inline constexpr uint64_t kTableEntryOffsetMask = 0x00fffffffffffe00ull;  // bits 9..55
inline constexpr uint64_t kTableEntryReservedMask = 0xff000000000001feull;
inline constexpr uint64_t kTableEntryAllOnes = 1;

// QEMU sees the virtual size floored to a multiple of 512 (P18).
inline constexpr uint64_t kSectorSize = 512;

}  // namespace cbt::qcow2
