// qcow2 Volume: the guest data of a qcow2 image, read and written the way
// QEMU does (docs/qcow2-plugin.md has the design and the crash analysis).
//
// What it serves: qcow2 v2 and v3, clusters 512 B .. 2 MiB, refcount orders
// 0..6; normal, zero (v3 flag) and compressed clusters (zlib, zstd; read, and
// rewritten uncompressed on write); backing chains (qcow2 or raw, read-only,
// depth bounded); any preallocation. Refused with a named error: encryption,
// extended L2, an external data file, unknown incompatible features,
// compression types other than zlib/zstd; writable only: the corrupt and
// dirty bits, internal snapshots.
//
// Write ordering (R1..R5 of the design):
//  - a new cluster (data or L2 table) gets refcount 1 (written through)
//    before anything references it; guest data (with its copy-on-write
//    head/tail) is written before the L2 entry changes in memory;
//  - L2 and L1 changes stay in memory until Flush(), which writes in this
//    order, each step durable before the next: data + refcounts, L2 tables,
//    L1 entries; only then are the refcounts of clusters the changes
//    released decremented, and only after every I/O that could still use the
//    old mapping has finished (a pin generation), so a freed cluster is never
//    reused or punched while someone reads or writes it.
//  A crash loses at most the unflushed writes and leaks clusters; it never
//  leaves a reference to a cluster with refcount 0, nor an L2 entry exposing
//  a cluster whose data was not written (stricter than QEMU, at the cost of
//  one fdatasync per flush).
//
// Threading: every method may be called from many threads at once.
//  - mu_ guards the metadata in memory: L1, the L2 cache (tables, their
//    loading state and hold counts), the metadata map, busy_ (guest clusters
//    being allocated or copied), pending frees, pins, high_water_, stats.
//    No disk I/O runs under mu_ except in rare cases: allocating a new L2
//    table (GetL2 create=true on an absent table: refcount write-through
//    and fstat) and MarkCorrupt (one header write).
//  - L2 tables load outside mu_: the loader marks the table in loading_,
//    unlocks, reads and parses, relocks and inserts it; others needing it
//    wait on l2_cv_. Whoever drops mu_ re-validates (LoadL2 / Ready loop
//    until one pass dropped nothing), then looks up with mu_ held; a lookup
//    of a table that is not cached is then impossible by construction
//    (GetL2 reports it as an internal error rather than reading).
//  - A write needing a new cluster marks the guest cluster busy (others
//    wait for it), holds its L2 table (EvictIfNeeded skips held tables),
//    unlocks, allocates under rc_->mu only (refcount write-through, fstat),
//    relocks, checks the cluster against the metadata map, raises
//    high_water_, all before any data goes to it; then it unlocks for the
//    data write and relocks to set the entry. Any failure frees the cluster.
//  - rc_->mu (the allocator, shared with internal bitmaps) is taken inside
//    mu_ or alone, never around mu_. Flush releases freed clusters (and
//    punches them) under rc_->mu alone; holes_mu_ guards the one-time
//    metadata-preallocation probe of Extents. Guest data I/O runs with no
//    lock held, protected by busy_, pins and holds.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "common/block_io.h"
#include "common/status.h"
#include "qcow2/header.h"
#include "qcow2/refcount.h"

namespace cbt::qcow2 {

// NBD block status flags of an extent (base:allocation).
inline constexpr uint32_t kExtentHole = 1;
inline constexpr uint32_t kExtentZero = 2;

struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;
  uint32_t flags = 0;  // kExtentHole | kExtentZero, 0 = data
  bool operator==(const Extent&) const = default;
};

// A read-only layer below an image: a backing file.
class Layer {
 public:
  virtual ~Layer() = default;
  virtual uint64_t size() const = 0;
  // Fills out from offset; bytes past size() read as zeros.
  virtual Status Read(std::span<std::byte> out, uint64_t offset) = 0;
  // Appends extents covering [offset, offset+len) (past size(): hole+zero).
  virtual Status Extents(uint64_t offset, uint64_t len, std::vector<Extent>* out) = 0;
};

// Opens a backing file read-only by its resolved path.
using FileOpener = std::function<Result<std::shared_ptr<BlockIO>>(const std::string& path)>;

struct VolumeOptions {
  bool writable = false;
  // L2 cache budget in bytes; 0 = enough for the whole image, at most 32 MiB.
  uint64_t cache_bytes = 0;
  // Backing file: "" = as the image says; kRefuseBacking = refuse an image
  // that names one; otherwise a path replacing the image's.
  std::string backing;
  // "" = the image's backing format extension (else qcow2 magic, else raw);
  // "raw" or "qcow2" overrides it.
  std::string backing_format;
  // Trim frees clusters (and punches host holes); false: trim does nothing.
  bool discard = true;
  uint32_t max_backing_depth = 16;
  // Default: PosixFile read-only.
  FileOpener open_file;
  // Writable only: the allocator to share with the bitmaps of the same file
  // (internal bitmaps; it must describe this file). Null: the volume loads
  // its own.
  std::shared_ptr<SharedRefcounts> refcounts = nullptr;
};
inline constexpr const char* kRefuseBacking = "refuse";

struct VolumeStats {
  uint64_t allocated_clusters = 0;  // data clusters allocated since open
  uint64_t flushes = 0;
};

class Volume final : public Layer {
 public:
  // `path` names the image in messages and is where relative backing names
  // resolve from. Failure: NotSupported / Corruption naming the feature or
  // the bad structure, IOError.
  static Result<std::unique_ptr<Volume>> Open(std::shared_ptr<BlockIO> io, const std::string& path,
                                              const VolumeOptions& opts);
  ~Volume() override;

  uint64_t size() const override { return size_; }
  uint64_t cluster_size() const { return cs_; }
  bool writable() const { return opts_.writable; }
  const Header& header() const { return header_; }
  const std::string& backing_description() const { return backing_desc_; }

  Status Read(std::span<std::byte> out, uint64_t offset) override;
  Status Extents(uint64_t offset, uint64_t len, std::vector<Extent>* out) override;
  // REQUIRES writable(), offset + len <= size().
  Status Write(std::span<const std::byte> in, uint64_t offset);
  // may_trim: the range may be deallocated. fast: fail NotSupported (ENOTSUP)
  // without changing anything if zeroing would need data writes.
  Status Zero(uint64_t offset, uint64_t len, bool may_trim, bool fast);
  // Whole clusters only; parts of clusters are left as they are.
  Status Trim(uint64_t offset, uint64_t len);
  // Makes every write that completed before the call durable (see top).
  Status Flush();
  VolumeStats stats() const;

  // Called once before the first change to the image is made (the plugin
  // guards bitmaps stored in the image). A failure fails that write.
  void SetBeforeFirstWrite(std::function<Status()> hook);

 private:
  enum class Kind { kUnallocated, kZeroPlain, kZeroAlloc, kNormal, kCompressed };
  struct Mapping {
    Kind kind = Kind::kUnallocated;
    uint64_t entry = 0;
    uint64_t host = 0;    // normal / zero-alloc / compressed: host byte offset
    bool copied = false;  // bit 63: refcount 1, writable in place
    uint64_t csize = 0;   // compressed: bytes stored from host on
  };
  // Keeps clusters freed by a change from being reused or punched while
  // an I/O that looked up the old mapping runs (see Flush).
  class Pin {
   public:
    Pin() = default;
    Pin(Volume* v, uint64_t gen) : v_(v), gen_(gen) {}
    Pin(Pin&& o) noexcept : v_(o.v_), gen_(o.gen_) { o.v_ = nullptr; }
    Pin& operator=(Pin&& o) noexcept {
      Release();
      v_ = o.v_, gen_ = o.gen_, o.v_ = nullptr;
      return *this;
    }
    Pin(const Pin&) = delete;
    Pin& operator=(const Pin&) = delete;
    ~Pin();
    void Release();

   private:
    Volume* v_ = nullptr;
    uint64_t gen_ = 0;
  };
  struct L2Table {
    uint64_t host = 0;
    std::vector<uint64_t> e;
    uint64_t gen = 0;          // changes made
    uint64_t written_gen = 0;  // changes on disk
    uint64_t used = 0;         // LRU clock
    uint32_t holds = 0;        // users across an unlock: not evicted
    bool dirty() const { return gen != written_gen; }
  };

  Volume(std::shared_ptr<BlockIO> io, std::string path, const VolumeOptions& opts);
  Status Load(uint32_t depth);
  Status OpenBacking(uint32_t depth);
  Status LoadL1();
  Status BuildMetadataMap();

  // --- under mu_ ---
  // Makes table l1_index cached (or known absent), loading it with mu_
  // released if needed. Returns whether mu_ was released on the way.
  Result<bool> LoadL2(uint64_t l1_index, std::unique_lock<std::mutex>& lk);
  // LoadL2 and (wait_idle) WaitIdle for guest_cluster until one pass
  // released nothing: then the table is cached and the cluster not busy.
  Status Ready(uint64_t guest_cluster, bool wait_idle, std::unique_lock<std::mutex>& lk);
  bool Cached(uint64_t l1_index) const;  // cached, or no table at all
  // A cache operation only: a table on disk but not cached is an internal
  // error (callers LoadL2 first). create: an absent table is allocated.
  Result<L2Table*> GetL2(uint64_t l1_index, bool create);
  Result<Mapping> Lookup(uint64_t guest_cluster);  // REQUIRES Cached()
  // n bytes from guest offset gc*cs+in map to m (normal): grows n over the
  // next host-contiguous normal clusters, up to `left` bytes, while n < cap;
  // stops at a cluster whose table is not cached.
  uint64_t ExtendRun(const Mapping& m, uint64_t gc, uint64_t in, uint64_t n, uint64_t left,
                     uint64_t cap);
  Mapping Classify(uint64_t entry) const;
  Status SetEntry(uint64_t guest_cluster, uint64_t entry);
  void ReleaseOld(const Mapping& m);
  bool IsMetadata(uint64_t host, uint64_t len) const;
  void AddMetadata(uint64_t host, uint64_t len);
  void NoteRefcountStructure();  // REQUIRES rc_->mu held
  Status MarkCorrupt(const std::string& why);
  bool WaitIdle(uint64_t guest_cluster, std::unique_lock<std::mutex>& lk);  // true: waited
  Result<uint64_t> AllocateCluster(bool* fresh);  // with mu_ held: L2 tables only
  void EvictIfNeeded();
  Pin TakePin();

  // --- no lock held ---
  Status ReadHost(std::span<std::byte> out, uint64_t host);
  Status ReadCompressed(const Mapping& m, std::span<std::byte> cluster);
  Status ReadBelow(std::span<std::byte> out, uint64_t offset);
  Status FillOld(const Mapping& m, uint64_t guest_cluster, std::span<std::byte> cluster);
  Status WritePiece(uint64_t guest_cluster, uint64_t in_off, std::span<const std::byte> data);
  Status ZeroWhole(uint64_t guest_cluster, bool may_trim, bool fast, bool trim);
  Status ReadsAsZero(uint64_t guest_cluster, bool* zero);
  // New data cluster, lk unlocked: allocates under rc_->mu, relocks lk
  // (also on failure) and checks it. *fresh: past everything ever written (reads zeros).
  Result<uint64_t> AllocateDataCluster(std::unique_lock<std::mutex>& lk, bool* fresh);
  Result<bool> LooksMetadataPreallocated();  // REQUIRES holes_mu_ held
  Status BeforeChange();
  Status MaybeWriteback();

  std::shared_ptr<BlockIO> io_;
  std::string path_;
  VolumeOptions opts_;
  Header header_;
  uint64_t cs_ = 0;
  uint32_t cluster_bits_ = 0;
  uint64_t l2_entries_ = 0;  // entries per L2 table
  uint64_t size_ = 0;
  uint32_t compression_type_ = 0;
  std::unique_ptr<Layer> backing_;
  std::string backing_desc_;

  mutable std::mutex mu_;  // guards everything below
  std::vector<uint64_t> l1_;
  std::set<uint64_t> l1_dirty_;                                // indices
  std::unordered_map<uint64_t, std::unique_ptr<L2Table>> l2_;  // by L1 index
  std::unordered_set<uint64_t> loading_;                       // L1 indices being read
  std::condition_variable l2_cv_;                              // a load finished
  uint64_t l2_clock_ = 0;
  uint64_t l2_dirty_count_ = 0;
  uint64_t cache_tables_ = 0;                   // budget in tables
  std::shared_ptr<SharedRefcounts> rc_;         // its mu: inside mu_ or alone, never around it
  std::map<uint64_t, uint64_t> metadata_;       // host start -> end: header, L1, L2, bitmaps
  std::map<uint64_t, uint64_t> refcount_meta_;  // the refcount table and blocks
  uint64_t refblocks_seen_ = 0;
  std::unordered_set<uint64_t> busy_;  // guest clusters being allocated
  std::condition_variable busy_cv_;
  uint64_t high_water_ = 0;  // no cluster at or past this was ever written
  uint64_t file_size_ = 0;
  std::vector<std::pair<uint64_t, uint64_t>> pending_free_;  // (host, clusters)
  uint64_t pin_gen_ = 0;
  std::map<uint64_t, uint64_t> pins_;  // generation -> live pins
  std::condition_variable pin_cv_;
  bool corrupt_ = false;
  VolumeStats stats_;

  std::mutex holes_mu_;  // the first Extents decides host_holes_
  int host_holes_ = -1;  // report host holes in data clusters: -1 not decided yet
  std::mutex hook_mu_;   // the first-write hook runs once
  std::function<Status()> before_first_write_;
  std::atomic<bool> first_write_done_{false};
  std::mutex flush_mu_;  // one Flush() at a time
};

}  // namespace cbt::qcow2
