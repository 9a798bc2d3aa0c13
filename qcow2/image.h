// qcow2 Image: an open qcow2 file as an in-memory model of its header,
// refcounts, bitmap directory and bitmap tables, with the bitmap operations
// the cbt tool and the nbdkit filter need.
//
// Two update paths (docs/format.md has the full crash analysis):
//  1. Commit(): directory switch. The caller describes the complete new set
//     of bitmaps; new data clusters, tables and the directory go to freshly
//     allocated clusters, everything is flushed, the header is switched in
//     one sector write, flushed, and only then are the old clusters freed.
//     A crash leaves either the old or the new set (plus leaks), never a mix.
//  2. In place (the filter): SetInUse() rewrites the 4-byte flags field of
//     directory entries; WriteSlots() rewrites changed bitmap data clusters
//     in place and allocates clusters for slots that gain their first bit
//     (refcount and data flushed before the table entry points at them).
//
// Format code never picks durability policy: beyond the flushes that the
// on-disk ordering requires (documented per method), the caller flushes.
//
// Threading: not thread-safe. One thread at a time (the engine holds a lock).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/block_io.h"
#include "common/status.h"
#include "qcow2/bitmap_dir.h"
#include "qcow2/header.h"
#include "qcow2/refcount.h"

namespace cbt::qcow2 {

// The data of one bitmap, one slot (= one cluster of bitmap data, = chunk i of
// a DirtyBitmap whose chunk_bytes is the cluster size) at a time.
class BitmapDataSource {
 public:
  virtual ~BitmapDataSource() = default;
  // True when slot holds no set bit (nothing needs to be stored).
  virtual bool SlotIsZero(uint64_t slot) const = 0;
  // Fills out (cluster_size bytes) with slot's bytes in QEMU's order; bits
  // past the bitmap's end must be zero.
  virtual void FillSlot(uint64_t slot, std::span<std::byte> out) const = 0;
};

// Receives stored bitmap data, once per slot that is not all zeros, in
// ascending slot order. data.size() == cluster size. Non-OK stops the read.
using SlotSink = std::function<Status(uint64_t slot, std::span<const std::byte> data)>;

// What the tools show about one bitmap.
struct BitmapInfo {
  std::string name;
  uint32_t granularity_bits = 0;
  bool in_use = false;     // flag bit 0 as stored
  bool enabled = false;    // flag "auto": recording
  bool consistent = true;  // false: in_use was set when we opened the file
  uint32_t table_size = 0;
  uint64_t data_clusters = 0;  // allocated data clusters
  uint64_t granularity() const { return uint64_t{1} << granularity_bits; }
};

// One bitmap of the set passed to Commit().
struct BitmapSpec {
  std::string name;
  uint32_t granularity_bits = 16;
  bool enabled = true;
  // Name of the stored bitmap whose data this one keeps; empty = new bitmap.
  std::string existing;
  // New content (not owned; must outlive Commit). nullptr: keep `existing`'s
  // stored data (its table is reused, not copied), or all zeros if new.
  const BitmapDataSource* data = nullptr;
  // The in_use flag of the new entry. nullopt: a kept bitmap keeps its
  // flag, a new one starts clear. true: the bitmap is (still) being
  // recorded by the caller, whose crash-safety covers it; false: its stored
  // data is exact (flushed before the switch, like everything Commit
  // writes). Not allowed on an inconsistent bitmap.
  std::optional<bool> in_use;
};

// What Commit() does with the old directory and the clusters of dropped
// bitmaps once the new set is in place. kLeave is for repair (repair.cc):
// there they may be shared with other structures or have wrong refcounts,
// so freeing them could corrupt; they are left to the caller's leak repair.
enum class OldClusters { kFree, kLeave };

struct OpenOptions {
  bool writable = false;
  // For recovery only (cbt recover --mark-all), with writable: load a
  // bitmaps extension whose autoclear bit 0 is clear instead of refusing
  // the open. Its bitmaps are inconsistent (in use): they can only be
  // dropped or rewritten whole.
  bool adopt_stale_bitmaps = false;
  // Internal bitmaps: the allocator the data path of the same file uses
  // (it must describe this file). Null: the image loads its own.
  std::shared_ptr<SharedRefcounts> refcounts = nullptr;
};

struct CreateOptions {
  // Disk size in bytes; the header stores it rounded UP to a multiple of 512
  // (QEMU floors sizes that are not; rounding up keeps the last bytes of the
  // disk covered).
  uint64_t virtual_size = 0;
  uint32_t cluster_size = 65536;  // power of two, 512 B .. 2 MiB
  // Absolute path of a raw disk to link as QEMU's external data file
  // (incompatible bit 2 + data_file_raw + identity-mapped L2 tables). The raw
  // file itself is never opened or touched. Empty: no data file.
  std::string data_file;
};

class Image {
 public:
  // Opens a qcow2 file. Reads and validates the header, the refcount table,
  // the bitmap directory and every bitmap table (QEMU's rules: a file QEMU
  // refuses is refused here too). A bitmaps extension without autoclear
  // bit 0 is ignored read-only, as QEMU does, and refused writable
  // (Corruption naming 'cbt recover --mark-all'), unless adopted (OpenOptions).
  // Failure: Corruption (says what and where; truncation included),
  // NotSupported (unknown incompatible features; when writable also the
  // dirty/corrupt bits), IOError.
  static Result<std::unique_ptr<Image>> Open(std::shared_ptr<BlockIO> io,
                                             const OpenOptions& opts = {});

  // Writes a new bitmaps-only qcow2 v3 into io (which must be empty), flushes
  // and returns it opened writable. Layout: header, refcount table, refcount
  // blocks, L1 (all zeros, or pointing at identity L2 tables with a data
  // file). Failure: InvalidArgument (bad size, cluster size, relative data
  // file path, too large for the cluster size), IOError.
  static Result<std::unique_ptr<Image>> Create(std::shared_ptr<BlockIO> io,
                                               const CreateOptions& opts);

  const Header& header() const { return header_; }
  const std::string& name() const { return ctx_; }
  uint64_t cluster_size() const { return header_.cluster_size(); }
  // Virtual size in bytes as QEMU sees it (floored to 512).
  uint64_t virtual_size() const { return header_.qemu_size(); }
  bool writable() const { return writable_; }
  std::string data_file() const { return header_.DataFile(); }

  std::vector<BitmapInfo> Bitmaps() const;
  // NotFound naming the bitmap and the file.
  Result<BitmapInfo> Find(std::string_view name) const;
  // The current set as specs that keep everything unchanged: the starting
  // point for Commit() (erase = remove, push_back = add, ...).
  std::vector<BitmapSpec> CurrentSpecs() const;

  // Streams a bitmap's stored data into sink (all-ones table entries arrive
  // as a cluster of 0xff). Failure: NotFound; InvalidArgument if the bitmap
  // is inconsistent; Corruption on truncated data.
  Status ReadBitmap(std::string_view name, const SlotSink& sink);

  // Replaces the whole bitmap set with `specs`, atomically (directory switch,
  // see top). Allowed changes per stored bitmap: drop it, rename it, change
  // enabled, give new data. Inconsistent bitmaps may only be dropped or kept
  // exactly (same name, flags, no data). The header is rewritten (sector 0
  // only, once our layout is in place); unknown autoclear bits are cleared.
  // Failure: InvalidArgument (bad/duplicate name, bad granularity, too large,
  // a spec naming an unknown bitmap, an inconsistent bitmap changed, one
  // stored table reused twice), NotSupported (qcow2 v2), IOError. On failure
  // the file still holds the old set (maybe with leaked clusters).
  Status Commit(const std::vector<BitmapSpec>& specs, OldClusters old = OldClusters::kFree);

  // Sets or clears in_use on the named bitmaps by rewriting the 4-byte flags
  // field of their directory entries in place (one sector each: atomic).
  // Not flushed: the caller flushes (in_use durable before the first change;
  // data durable before clearing it). Setting it makes the bitmap ours:
  // it stays consistent. Failure: NotFound, InvalidArgument (inconsistent).
  Status SetInUse(std::span<const std::string> names, bool in_use);

  // Writes the given slots of a bitmap from src, in place: allocated data
  // clusters are overwritten (zeros when the slot became clean); a clean slot
  // that gains bits gets a new cluster (refcount, then data, flush, then the
  // table entry: a crash leaks, never corrupts). Returns the bytes written
  // (data + refcount + table entries + refcount-structure growth). Not
  // flushed at the end. REQUIRES: the bitmap's geometry matches src.
  // Failure: NotFound, InvalidArgument (inconsistent, slot out of range),
  // IOError.
  Result<uint64_t> WriteSlots(std::string_view name, std::span<const uint64_t> slots,
                              const BitmapDataSource& src);

  // Gives every unallocated slot of the bitmap a zeroed data cluster, so that
  // later WriteSlots never allocate. Same ordering as WriteSlots.
  Status Preallocate(std::string_view name);

  // Private header extensions (our crash-safety record). Get returns nullptr
  // if absent. Set/Remove rewrite the header (safe switch) and flush.
  // REQUIRES: type is not the end marker, bitmaps, feature table or data file.
  const std::vector<std::byte>* GetExtension(uint32_t type) const;
  Status SetExtension(uint32_t type, std::vector<std::byte> data);
  Status RemoveExtension(uint32_t type);

  // A private record: header extension `type` vouched for by autoclear bit
  // kAutoclearCbtIntent, set or removed together in one header switch
  // (flushed). Programs that do not know the bit clear it when they write
  // the file, so a record whose bit is clear must not be trusted.
  // Private record types are "CBT" plus one letter (IsPrivateRecordType);
  // the bit vouches for all of them at once, so a record found unvouched is
  // dropped when another one is set, and the bit is cleared with the last.
  Status SetPrivateRecord(uint32_t type, std::vector<std::byte> data);
  Status RemovePrivateRecord(uint32_t type);
  bool private_record_vouched() const;
  // Several records set (data) or removed (no data) in one header switch.
  struct PrivateRecordUpdate {
    uint32_t type = 0;
    std::optional<std::vector<std::byte>> data;
  };
  Status UpdatePrivateRecords(std::span<const PrivateRecordUpdate> updates);

  // Rewrites the data of existing private extension `type` in place, at its
  // current position in cluster 0, when the new data has the same length:
  // only the bytes that differ are written (each sector they span is written
  // whole by the device, so a torn write leaves every sector old or new).
  // Not flushed. For records updated on the write path (engine/intent_map).
  // Failure: NotFound (absent), InvalidArgument (length differs), IOError.
  Status RewriteExtensionInPlace(uint32_t type, std::span<const std::byte> data);

  // Treats bitmap `name`, found in_use when the file was opened, as
  // consistent: the caller holds its own crash-safety record showing the
  // stored bits are a subset of the truth, and will make them a superset and
  // rewrite them. Checks the table size as for a consistent bitmap.
  // Failure: NotFound, Corruption (table size wrong for the disk).
  Status AdoptInconsistent(std::string_view name);

  // Total bytes written through this image so far.
  uint64_t bytes_written() const;

  // --- for check.cc and tests ---
  BlockIO* io();
  // REQUIRES refcounts_mutex() held while another writer may run.
  Refcounts& refcounts() { return *refcounts_->rc; }
  std::mutex& refcounts_mutex() { return refcounts_->mu; }
  const std::vector<BitmapDirEntry>& dir_entries() const { return entries_; }
  const std::vector<uint64_t>& table(size_t i) const { return tables_[i]; }
  // Set when the bitmaps extension lacks autoclear bit 0 on disk (P4):
  // read-only, the bitmaps are hidden; adopted, they are all inconsistent.
  bool stale_bitmaps_extension() const { return stale_ext_; }
  bool autoclear_without_extension() const { return bit_without_ext_; }

  ~Image();

 private:
  class CountingIO;
  Image(std::shared_ptr<BlockIO> io, bool writable);
  // The allocator, under its lock (shared with the data path: internal
  // bitmaps).
  Result<uint64_t> Alloc(uint64_t n);
  Status FreeClusters(uint64_t offset, uint64_t n);
  Status Load();
  int IndexOf(std::string_view name) const;
  Status RequireWritable(const char* op) const;
  Status RequireConsistent(size_t i) const;
  // Writes `next` as the new header; every crash point leaves a whole old,
  // intermediate or new header (image.cc's design note); flushes.
  Status SwitchHeader(Header next);
  Status SwitchHeaderLocked(Header next);  // REQUIRES refcounts_->mu held
  // Writes bytes[from, to) of a serialised header at the same offsets and
  // records them in header_on_disk_. Not flushed.
  Status WriteHeaderBytes(std::span<const std::byte> bytes, uint64_t from, uint64_t to);
  Result<uint64_t> AllocateZeroedCluster();
  Status FreeBitmapClusters(const BitmapDirEntry& e, const std::vector<uint64_t>& table);

  std::unique_ptr<CountingIO> io_;
  bool writable_;
  std::string ctx_;
  Header header_;
  std::vector<std::byte> header_on_disk_;  // header bytes as last read/written
  std::shared_ptr<SharedRefcounts> refcounts_;
  std::vector<BitmapDirEntry> entries_;
  std::vector<std::vector<uint64_t>> tables_;
  std::vector<bool> inconsistent_;  // in_use when opened (someone else's)
  bool stale_ext_ = false;
  bool adopt_stale_ = false;
  bool bit_without_ext_ = false;
};

}  // namespace cbt::qcow2
