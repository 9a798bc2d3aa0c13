// qcow2 Image, part 1: in-memory model, open, create, queries, reads and the
// directory switch. See image.h. Part 2 (image_inplace.cc): the in-place
// write path and header extensions.
//
// Design note: header switches.
//  A device writes a 512-byte sector whole or not at all; nothing larger is
//  atomic. Our layout puts the bitmaps extension directly after the 112-byte
//  header, so a directory switch changes only bytes 0..143: one sector, one
//  write. SwitchHeader() compares the new serialised header with the bytes on
//  disk and with what each of the two headers READS (fixed fields, the
//  extension chain up to its end marker, the backing file name):
//   (A) only sector 0 changes: write it.
//   (C) bytes past sector 0 change, but the new header does not read them
//       (a removed extension): write sector 0; the rest is dead.
//   (B) the new header reads changed bytes past sector 0 that the header on
//       disk does not read (an extension added after its end marker): write
//       them, flush, then write sector 0.
//   (D) both read changed bytes past sector 0 (an extension rewritten in
//       place, QEMU's layout with the bitmaps extension after the feature
//       table): first switch (C) to an intermediate header that fits in
//       sector 0 (the new one without feature names or private records, so
//       every bitmap stays), then (B) to the new one.
//  Each step is flushed before the next. A crash at any point leaves the
//  old, the intermediate or the new header, each complete, and autoclear
//  bit 0 never leaves the bitmaps extension it vouches for: no crash point
//  hides the bitmaps. (QEMU instead clears bit 0 around a multi-sector
//  rewrite; a crash inside that window loses every bitmap.) A header whose
//  backing/data file names leave no room for the intermediate is refused
//  (NotSupported) rather than rewritten unsafely.
//  Found on open, a bitmaps extension without bit 0 (written by a program
//  that does not know bitmaps) is refused for writing unless the caller
//  adopts it for recovery (OpenOptions::adopt_stale_bitmaps).
//
// Crash analysis of Commit (directory switch):
//  1. new data clusters, tables, directory written to fresh clusters whose
//     refcounts were raised first; crash: leaks only (nothing points there).
//  2. flush.
//  3. header switch (sector 0); crash before: old set; after: new set.
//  4. flush.
//  5. free old directory/tables/data; crash: leaks only.
#include "qcow2/image.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <set>

#include "common/endian.h"
#include "qcow2/format.h"
#include "qcow2/image_internal.h"

namespace cbt::qcow2 {

using namespace internal;  // NOLINT(google-build-using-namespace): file-local helpers

Image::Image(std::shared_ptr<BlockIO> io, bool writable)
    : io_(std::make_unique<CountingIO>(std::move(io))), writable_(writable), ctx_(io_->name()) {}
Image::~Image() = default;

Result<uint64_t> Image::Alloc(uint64_t n) {
  std::lock_guard rl(refcounts_->mu);
  return refcounts_->rc->Allocate(n);
}

Status Image::FreeClusters(uint64_t offset, uint64_t n) {
  std::lock_guard rl(refcounts_->mu);
  return refcounts_->rc->Free(offset, n);
}

BlockIO* Image::io() {
  return io_.get();
}
uint64_t Image::bytes_written() const {
  return io_->written();
}

Result<std::unique_ptr<Image>> Image::Open(std::shared_ptr<BlockIO> io, const OpenOptions& opts) {
  if (!io) return Status::InvalidArgument("qcow2 open: no file");
  std::unique_ptr<Image> img(new Image(std::move(io), opts.writable));
  img->adopt_stale_ = opts.adopt_stale_bitmaps && opts.writable;
  img->refcounts_ = opts.refcounts;
  CBT_RETURN_IF_ERROR(img->Load());
  return img;
}

Status Image::Load() {
  CBT_ASSIGN_OR_RETURN(std::vector<std::byte> buf, ReadHeaderCluster(*io_, ctx_));
  CBT_ASSIGN_OR_RETURN(header_, ParseHeader(buf, ctx_));
  CBT_RETURN_IF_ERROR(CheckFeatures(header_, writable_, ctx_));
  header_on_disk_ = std::move(buf);
  if (refcounts_) {
    std::lock_guard rl(refcounts_->mu);
    if (!refcounts_->rc || refcounts_->rc->table_offset() != header_.refcount_table_offset)
      return Status::InvalidArgument(ctx_ + ": the shared refcounts describe another file");
  } else {
    CBT_ASSIGN_OR_RETURN(
        Refcounts rc,
        Refcounts::Load(io_.get(), header_.cluster_bits, header_.refcount_order,
                        header_.refcount_table_offset, header_.refcount_table_clusters, ctx_));
    refcounts_ = std::make_shared<SharedRefcounts>();
    refcounts_->rc.emplace(std::move(rc));
  }

  const bool bit = header_.version == 3 && (header_.autoclear & kAutoclearBitmaps);
  if (header_.bitmaps && !bit && !adopt_stale_) {
    // Written by a program that does not know bitmaps (or a header rewrite
    // by one that clears bit 0 around it was interrupted): the bitmaps may
    // miss changes. QEMU ignores the extension and drops it on its next
    // header write, and with it every bitmap, silently. We never write over
    // it (P4): a read-only open shows no bitmaps; a writable one is refused
    // unless the caller adopts the bitmaps for recovery.
    stale_ext_ = true;
    if (writable_)
      return Status::Corruption(
          ctx_ + ": the bitmaps extension (" + std::to_string(header_.bitmaps->nb_bitmaps) +
          " bitmap(s)) is not vouched for by autoclear bit 0: a program that does not know "
          "bitmaps wrote the file, or a header rewrite was interrupted, so the bitmaps may "
          "miss changes; 'cbt recover " +
          ctx_ +
          " --bitmap NAME --mark-all' keeps a bitmap with every granule dirty (its next backup "
          "is full)");
    header_.bitmaps.reset();
  } else if (!header_.bitmaps && bit) {
    bit_without_ext_ = true;  // cleared on our next header write (P4)
  } else if (header_.bitmaps) {
    const BitmapsExtension& ext = *header_.bitmaps;
    CBT_RETURN_IF_ERROR(ValidateBitmapsExtension(ext, header_.cluster_bits, ctx_));
    std::vector<std::byte> dir(ext.directory_size);
    CBT_RETURN_IF_ERROR(ReadMeta(io_.get(), dir, ext.directory_offset, ctx_, "bitmap directory"));
    CBT_ASSIGN_OR_RETURN(entries_, ParseDirectory(dir, ext.nb_bitmaps, ctx_));
    Geometry g{header_.cluster_bits, header_.qemu_size()};
    CBT_RETURN_IF_ERROR(ValidateDirectory(entries_, g, ctx_));
    for (const auto& e : entries_) {
      std::string what = ctx_ + ": bitmap '" + e.name + "'";
      std::vector<std::byte> tb(uint64_t{e.table_size} * 8);
      CBT_RETURN_IF_ERROR(ReadMeta(io_.get(), tb, e.table_offset, what, "bitmap table"));
      CBT_ASSIGN_OR_RETURN(auto t, ParseTable(tb, e.table_size, header_.cluster_bits, what));
      tables_.push_back(std::move(t));
      inconsistent_.push_back(e.in_use());
    }
    if (!bit) {
      // Adopted stale bitmaps: untrusted, like bitmaps left in use. Their
      // in_use flag is set in our model, so that a directory switch (which
      // sets bit 0 again) stores them as in use: never as consistent.
      stale_ext_ = true;
      for (size_t i = 0; i < entries_.size(); ++i) {
        entries_[i].flags |= kBitmapFlagInUse;
        inconsistent_[i] = true;
      }
    }
  }
  // A writer must clear autoclear bits it does not know before changing
  // anything (spec); QEMU does so on every read-write open.
  if (writable_ && header_.version == 3 && (header_.autoclear & ~kAutoclearKnown)) {
    header_.autoclear &= kAutoclearKnown;
    std::byte f[8];
    StoreBE64(f, header_.autoclear);
    CBT_RETURN_IF_ERROR(io_->pwrite(f, kOffAutoclear));
    CBT_RETURN_IF_ERROR(io_->flush());
    std::copy_n(f, 8, header_on_disk_.begin() + kOffAutoclear);
  }
  return Status::OK();
}

Result<std::unique_ptr<Image>> Image::Create(std::shared_ptr<BlockIO> io,
                                             const CreateOptions& opts) {
  const uint64_t cs = opts.cluster_size;
  if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1)))
    return Status::InvalidArgument("cluster size " + std::to_string(cs) +
                                   " must be a power of two from 512 bytes to 2 MiB");
  uint32_t cbits = 0;
  while ((uint64_t{1} << cbits) < cs) ++cbits;
  if (opts.virtual_size > (uint64_t{1} << 62))
    return Status::InvalidArgument("virtual size too large");
  if (!opts.data_file.empty() && opts.data_file[0] != '/')
    return Status::InvalidArgument("data file '" + opts.data_file +
                                   "' must be an absolute path (QEMU resolves relative names "
                                   "against its working directory)");
  CBT_ASSIGN_OR_RETURN(uint64_t existing, io->size());
  if (existing != 0)
    return Status::InvalidArgument(std::string(io->name()) +
                                   ": refusing to create over a "
                                   "non-empty file");
  const uint64_t size = (opts.virtual_size + 511) & ~uint64_t{511};
  const uint64_t l2_entries = cs / 8;
  const uint64_t l1_size = DivRoundUp(size, cs * l2_entries);
  if (l1_size * 8 > kMaxL1Bytes)
    return Status::InvalidArgument("virtual size " + std::to_string(size) +
                                   " too large for cluster size " + std::to_string(cs));
  const uint64_t l1_clusters = std::max<uint64_t>(1, DivRoundUp(l1_size * 8, cs));
  const bool data_file = !opts.data_file.empty();
  const uint64_t l2_count = data_file ? l1_size : 0;
  const uint64_t epb = cs * 8 / 16;  // refcount_order 4
  uint64_t blocks = 1, tclusters = 1, total = 0;
  for (int i = 0; i < 16; ++i) {
    total = 1 + tclusters + blocks + l1_clusters + l2_count;
    blocks = DivRoundUp(total, epb);
    tclusters = DivRoundUp(blocks * 8, cs);
  }
  total = 1 + tclusters + blocks + l1_clusters + l2_count;
  if (tclusters * cs > kMaxRefcountTableBytes)
    return Status::InvalidArgument("data file mapping too large for cluster size " +
                                   std::to_string(cs));
  const uint64_t reftable_off = cs;
  const uint64_t blocks_off = reftable_off + tclusters * cs;
  const uint64_t l1_off = blocks_off + blocks * cs;
  const uint64_t l2_off = l1_off + l1_clusters * cs;

  Header h;
  h.version = 3;
  h.cluster_bits = cbits;
  h.size = size;
  h.l1_size = static_cast<uint32_t>(l1_size);
  h.l1_table_offset = l1_off;
  h.refcount_table_offset = reftable_off;
  h.refcount_table_clusters = static_cast<uint32_t>(tclusters);
  h.refcount_order = kDefaultRefcountOrder;
  h.header_length = kOurHeaderLength;
  h.header_tail.assign(kOurHeaderLength - kV3MinHeaderLength, std::byte{0});
  if (data_file) {
    h.incompatible |= kIncompatDataFile;
    h.autoclear |= kAutoclearDataFileRaw;
    h.SetExtension(kExtDataFile, std::vector<std::byte>(
                                     reinterpret_cast<const std::byte*>(opts.data_file.data()),
                                     reinterpret_cast<const std::byte*>(opts.data_file.data()) +
                                         opts.data_file.size()));
  }
  CBT_ASSIGN_OR_RETURN(std::vector<std::byte> hbytes, SerializeHeader(h));

  // Crash during create: a file without a valid header (written last).
  std::vector<std::byte> buf(tclusters * cs);
  for (uint64_t b = 0; b < blocks; ++b) StoreBE64(buf.data() + 8 * b, blocks_off + b * cs);
  CBT_RETURN_IF_ERROR(io->pwrite(buf, reftable_off));
  buf.assign(blocks * cs, std::byte{0});
  for (uint64_t c = 0; c < total; ++c) StoreBE16(buf.data() + 2 * c, 1);
  CBT_RETURN_IF_ERROR(io->pwrite(buf, blocks_off));
  buf.assign(l1_clusters * cs, std::byte{0});
  for (uint64_t i = 0; i < l2_count; ++i)
    StoreBE64(buf.data() + 8 * i, kOflagCopied | (l2_off + i * cs));
  CBT_RETURN_IF_ERROR(io->pwrite(buf, l1_off));
  const uint64_t guest_clusters = DivRoundUp(size, cs);
  std::vector<std::byte> l2(cs);
  for (uint64_t i = 0; i < l2_count; ++i) {
    std::fill(l2.begin(), l2.end(), std::byte{0});
    for (uint64_t j = 0; j < l2_entries; ++j) {
      uint64_t g = i * l2_entries + j;
      if (g >= guest_clusters) break;
      StoreBE64(l2.data() + 8 * j, kOflagCopied | (g * cs));  // identity map (P19)
    }
    CBT_RETURN_IF_ERROR(io->pwrite(l2, l2_off + i * cs));
  }
  hbytes.resize(cs, std::byte{0});
  CBT_RETURN_IF_ERROR(io->pwrite(hbytes, 0));
  CBT_RETURN_IF_ERROR(io->flush());
  return Open(std::move(io), OpenOptions{.writable = true});
}

std::vector<BitmapInfo> Image::Bitmaps() const {
  std::vector<BitmapInfo> out;
  for (size_t i = 0; i < entries_.size(); ++i) {
    const auto& e = entries_[i];
    BitmapInfo b;
    b.name = e.name;
    b.granularity_bits = e.granularity_bits;
    b.in_use = e.in_use();
    b.enabled = e.enabled();
    b.consistent = !inconsistent_[i];
    b.table_size = e.table_size;
    for (uint64_t t : tables_[i]) b.data_clusters += (t & kTableEntryOffsetMask) != 0;
    out.push_back(std::move(b));
  }
  return out;
}

int Image::IndexOf(std::string_view name) const {
  for (size_t i = 0; i < entries_.size(); ++i)
    if (entries_[i].name == name) return static_cast<int>(i);
  return -1;
}

Result<BitmapInfo> Image::Find(std::string_view name) const {
  int i = IndexOf(name);
  if (i < 0) return Status::NotFound(ctx_ + ": bitmap '" + std::string(name) + "' not found");
  return Bitmaps()[i];
}

std::vector<BitmapSpec> Image::CurrentSpecs() const {
  std::vector<BitmapSpec> out;
  for (const auto& e : entries_)
    out.push_back(
        BitmapSpec{e.name, e.granularity_bits, e.enabled(), e.name, nullptr, std::nullopt});
  return out;
}

Status Image::RequireWritable(const char* op) const {
  if (!writable_)
    return Status::InvalidArgument(ctx_ + ": " + op + ": image opened read-only", EROFS);
  return Status::OK();
}

Status Image::RequireConsistent(size_t i) const {
  if (inconsistent_[i])
    return Status::InvalidArgument(ctx_ + ": bitmap '" + entries_[i].name +
                                   "' is inconsistent (in use by a writer that did not close "
                                   "it) and cannot be used; only removal is allowed");
  return Status::OK();
}

Status Image::ReadBitmap(std::string_view name, const SlotSink& sink) {
  int i = IndexOf(name);
  if (i < 0) return Find(name).status();
  CBT_RETURN_IF_ERROR(RequireConsistent(i));
  const uint64_t cs = cluster_size();
  std::vector<std::byte> buf(cs);
  const auto& t = tables_[i];
  for (uint64_t slot = 0; slot < t.size(); ++slot) {
    uint64_t off = t[slot] & kTableEntryOffsetMask;
    if (off) {
      CBT_RETURN_IF_ERROR(
          ReadMeta(io_.get(), buf, off, ctx_, "bitmap '" + entries_[i].name + "' data cluster"));
      if (AllZero(buf)) continue;
    } else if (t[slot] & kTableEntryAllOnes) {
      std::fill(buf.begin(), buf.end(), std::byte{0xff});
    } else {
      continue;
    }
    CBT_RETURN_IF_ERROR(sink(slot, buf));
  }
  return Status::OK();
}

namespace {

// The byte ranges [begin, end) of cluster 0 that parsing the header in `h`
// reads: the fixed header and the extension chain up to and including its end
// marker, and the backing file name. Walks only inside h (a chain running past
// it reads to its end).
std::vector<std::pair<uint64_t, uint64_t>> HeaderReadSet(std::span<const std::byte> h) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  if (h.size() < kV2HeaderLength) return {{0, h.size()}};
  const uint32_t version = LoadBE32(h.data() + 4);
  uint64_t off =
      version >= 3 && h.size() >= kV3MinHeaderLength ? LoadBE32(h.data() + 100) : kV2HeaderLength;
  while (off + 8 <= h.size()) {
    const uint32_t type = LoadBE32(h.data() + off);
    const uint64_t len = LoadBE32(h.data() + off + 4);
    off += 8;
    if (type == kExtEnd) break;
    off += RoundUp8(len);
  }
  out.emplace_back(0, std::min<uint64_t>(off, h.size()));
  const uint64_t boff = LoadBE64(h.data() + 8);
  const uint64_t blen = LoadBE32(h.data() + 16);
  if (boff && blen && boff < h.size()) out.emplace_back(boff, std::min(boff + blen, h.size()));
  return out;
}

// Does any byte at offset >= from differ between a and b (b past a's end
// counts as different) inside one of the ranges?
bool DiffersIn(std::span<const std::byte> a, std::span<const std::byte> b, uint64_t from,
               const std::vector<std::pair<uint64_t, uint64_t>>& ranges) {
  for (auto [lo, hi] : ranges) {
    for (uint64_t i = std::max(lo, from); i < hi && i < b.size(); ++i)
      if (i >= a.size() || a[i] != b[i]) return true;
  }
  return false;
}

// Extensions a header cannot do without for a moment (they change how the
// image is read). The others (feature names, private records) may be left
// out of a short-lived intermediate header.
bool IsEssentialExtension(uint32_t type) {
  return type == kExtDataFile || type == kExtBackingFormat || type == kExtCrypto;
}

}  // namespace

Status Image::WriteHeaderBytes(std::span<const std::byte> bytes, uint64_t from, uint64_t to) {
  if (from >= to) return Status::OK();
  CBT_RETURN_IF_ERROR(io_->pwrite(bytes.subspan(from, to - from), from));
  if (header_on_disk_.size() < to) header_on_disk_.resize(to);
  std::copy(bytes.begin() + static_cast<ptrdiff_t>(from),
            bytes.begin() + static_cast<ptrdiff_t>(to),
            header_on_disk_.begin() + static_cast<ptrdiff_t>(from));
  return Status::OK();
}

Status Image::SwitchHeader(Header next) {
  // Held throughout: the data path of an image with internal bitmaps may
  // grow the refcount table (and write its header fields) otherwise.
  std::lock_guard rl(refcounts_->mu);
  return SwitchHeaderLocked(std::move(next));
}

Status Image::SwitchHeaderLocked(Header next) {
  next.refcount_table_offset = refcounts_->rc->table_offset();
  next.refcount_table_clusters = refcounts_->rc->table_clusters();
  next.autoclear &= kAutoclearKnown;  // clear unknown autoclear bits (spec)
  if (next.bitmaps)                   // P4: bit 0 set exactly when the extension is present
    next.autoclear |= kAutoclearBitmaps;
  else
    next.autoclear &= ~kAutoclearBitmaps;
  CBT_ASSIGN_OR_RETURN(std::vector<std::byte> bytes, SerializeHeader(next));
  // The refcount-table fields may have been switched on disk by Refcounts.
  StoreBE64(header_on_disk_.data() + kOffRefcountTableOffset, next.refcount_table_offset);
  StoreBE32(header_on_disk_.data() + kOffRefcountTableOffset + 8, next.refcount_table_clusters);
  const std::span<const std::byte> old(header_on_disk_);
  const auto all = std::vector<std::pair<uint64_t, uint64_t>>{{0, bytes.size()}};
  if (!DiffersIn(old, bytes, 0, all)) {
    header_ = std::move(next);
    return Status::OK();
  }
  // Sector 0 is written in one piece, which a device applies whole: the
  // switch happens there. What lies past it must be in place before (if the
  // new header reads it) and must not be read by the header on disk while it
  // changes (else a crash shows that header a torn mix). See the design note.
  const bool tail_changes = DiffersIn(old, bytes, kSectorSize, all);
  const bool old_reads_tail = DiffersIn(old, bytes, kSectorSize, HeaderReadSet(old));
  const bool new_reads_tail = DiffersIn(old, bytes, kSectorSize, HeaderReadSet(bytes));
  if (!tail_changes || !new_reads_tail) {
    // (A) only sector 0 changes, or (C) what changes past it is read by the
    // new header no more: one sector write switches.
    CBT_RETURN_IF_ERROR(WriteHeaderBytes(bytes, 0, kSectorSize));
    CBT_RETURN_IF_ERROR(io_->flush());
    // (C) what follows is read by nothing now; keep the disk equal to our
    // model (unflushed: nothing depends on it).
    if (tail_changes) CBT_RETURN_IF_ERROR(WriteHeaderBytes(bytes, kSectorSize, bytes.size()));
  } else if (!old_reads_tail) {
    // (B) the new tail lies where the header on disk does not read: write
    // it, make it durable, then switch sector 0.
    CBT_RETURN_IF_ERROR(WriteHeaderBytes(bytes, kSectorSize, bytes.size()));
    CBT_RETURN_IF_ERROR(io_->flush());
    CBT_RETURN_IF_ERROR(WriteHeaderBytes(bytes, 0, kSectorSize));
    CBT_RETURN_IF_ERROR(io_->flush());
  } else {
    // (D) both read the changing tail. Go through a header that fits in
    // sector 0: the new one without its optional extensions (feature names,
    // private records). old -> mid is (C), mid -> next is (B). A crash
    // leaves old, mid or next; mid has every bitmap of next.
    Header mid = next;
    std::erase_if(mid.extensions,
                  [](const HeaderExtension& e) { return !IsEssentialExtension(e.type); });
    if (next.extensions.size() != mid.extensions.size())
      mid.autoclear &= ~kAutoclearCbtIntent;  // a private record it leaves out is not vouched
    CBT_ASSIGN_OR_RETURN(std::vector<std::byte> mbytes, SerializeHeader(mid));
    if (mbytes.size() > kSectorSize)
      return Status::NotSupported(
          ctx_ +
          ": cannot rewrite the header safely: the backing file and data file names "
          "do not leave room in its first sector for an intermediate header (shorten "
          "them, or rewrite the header with qemu-img)");
    CBT_RETURN_IF_ERROR(WriteHeaderBytes(mbytes, 0, kSectorSize));
    CBT_RETURN_IF_ERROR(io_->flush());
    header_ = std::move(mid);
    return SwitchHeaderLocked(std::move(next));
  }
  header_ = std::move(next);
  return Status::OK();
}

Status Image::FreeBitmapClusters(const BitmapDirEntry& e, const std::vector<uint64_t>& table) {
  for (uint64_t t : table) {
    uint64_t off = t & kTableEntryOffsetMask;
    if (off) CBT_RETURN_IF_ERROR(FreeClusters(off, 1));
  }
  return FreeClusters(e.table_offset, DivRoundUp(uint64_t{e.table_size} * 8, cluster_size()));
}

Status Image::Commit(const std::vector<BitmapSpec>& specs, OldClusters old) {
  CBT_RETURN_IF_ERROR(RequireWritable("bitmap commit"));
  if (header_.version != 3)
    return Status::NotSupported(ctx_ + ": cannot store dirty bitmaps in qcow2 v2 files");
  if (specs.size() > kMaxBitmaps)
    return Status::InvalidArgument(ctx_ + ": too many bitmaps (maximum 65535)");
  const uint64_t cs = cluster_size();
  const Geometry g{header_.cluster_bits, virtual_size()};

  // 1. Validate the request and build the new entries.
  struct Plan {
    BitmapDirEntry entry;
    int kept = -1;  // index of the stored bitmap whose table is reused
    const BitmapDataSource* data = nullptr;
  };
  std::vector<Plan> plans;
  std::set<std::string> names;
  std::set<int> reused;
  for (const auto& s : specs) {
    CBT_RETURN_IF_ERROR(ValidateBitmapName(s.name));
    if (!names.insert(s.name).second)
      return Status::InvalidArgument(ctx_ + ": bitmap '" + s.name + "' given twice");
    if (s.granularity_bits < kMinGranularityBits || s.granularity_bits > kMaxGranularityBits)
      return ValidateGranularity(uint64_t{1} << std::min<uint32_t>(s.granularity_bits, 40));
    Plan p;
    int src = -1;
    if (!s.existing.empty()) {
      src = IndexOf(s.existing);
      if (src < 0) return Find(s.existing).status();
    }
    if (src >= 0 && inconsistent_[src]) {
      const auto& e = entries_[src];
      if (s.name != e.name || s.granularity_bits != e.granularity_bits ||
          s.enabled != e.enabled() || s.data || s.in_use.has_value())
        return RequireConsistent(src);
    }
    if (src >= 0 && !s.data) {
      if (s.granularity_bits != entries_[src].granularity_bits)
        return Status::InvalidArgument(ctx_ + ": bitmap '" + s.name +
                                       "': cannot change the granularity of stored data");
      if (!reused.insert(src).second)
        return Status::InvalidArgument(ctx_ + ": bitmap '" + s.existing +
                                       "' kept twice; give the copy its own data");
      p.entry = entries_[src];
      p.entry.name = s.name;
      if (!inconsistent_[src])
        p.entry.flags = (p.entry.flags & kBitmapFlagInUse) | (s.enabled ? kBitmapFlagAuto : 0);
      p.kept = src;
    } else {
      Status st = ValidateBitmapSize(g.virtual_size, s.granularity_bits, g.cluster_bits);
      if (!st.ok()) return st.WithContext(ctx_ + ": bitmap '" + s.name + "'");
      p.entry.name = s.name;
      p.entry.type = kBitmapTypeDirty;
      p.entry.granularity_bits = static_cast<uint8_t>(s.granularity_bits);
      p.entry.flags = s.enabled ? kBitmapFlagAuto : 0;
      p.entry.table_size = static_cast<uint32_t>(
          ExpectedTableSize(g.virtual_size, s.granularity_bits, g.cluster_bits));
      p.entry.table_offset = cs;  // placeholder for validation
      p.data = s.data;
    }
    if (s.in_use.has_value())
      p.entry.flags = (p.entry.flags & ~kBitmapFlagInUse) | (*s.in_use ? kBitmapFlagInUse : 0);
    plans.push_back(std::move(p));
  }
  std::vector<BitmapDirEntry> new_entries;
  new_entries.reserve(plans.size());
  for (const auto& p : plans) new_entries.push_back(p.entry);
  CBT_RETURN_IF_ERROR(ValidateDirectory(new_entries, g, ctx_));

  // 2. Write new data, tables and directory into fresh clusters.
  //    Crash or failure here: leaks only (nothing points at them yet).
  std::vector<std::vector<uint64_t>> new_tables(plans.size());
  std::vector<std::byte> buf(cs);
  for (size_t i = 0; i < plans.size(); ++i) {
    Plan& p = plans[i];
    if (p.kept >= 0) {
      new_tables[i] = tables_[p.kept];
      continue;
    }
    std::vector<uint64_t>& t = new_tables[i];
    t.assign(p.entry.table_size, 0);
    if (p.data) {
      for (uint64_t slot = 0; slot < t.size(); ++slot) {
        if (p.data->SlotIsZero(slot)) continue;
        p.data->FillSlot(slot, buf);
        if (AllZero(buf)) continue;
        CBT_ASSIGN_OR_RETURN(uint64_t off, Alloc(1));
        CBT_RETURN_IF_ERROR(io_->pwrite(buf, off));
        t[slot] = off;
      }
    }
    uint64_t tc = DivRoundUp(t.size() * 8, cs);
    CBT_ASSIGN_OR_RETURN(uint64_t toff, Alloc(tc));
    CBT_RETURN_IF_ERROR(io_->pwrite(SerializeTable(t, tc * cs), toff));
    p.entry.table_offset = toff;
    new_entries[i].table_offset = toff;
  }
  CBT_RETURN_IF_ERROR(ValidateDirectory(new_entries, g, ctx_));
  Header next = header_;
  if (new_entries.empty()) {
    next.bitmaps.reset();
  } else {
    std::vector<std::byte> dir = SerializeDirectory(new_entries);
    uint64_t dc = DivRoundUp(dir.size(), cs);
    CBT_ASSIGN_OR_RETURN(uint64_t doff, Alloc(dc));
    dir.resize(dc * cs, std::byte{0});
    CBT_RETURN_IF_ERROR(io_->pwrite(dir, doff));
    next.bitmaps = BitmapsExtension{static_cast<uint32_t>(new_entries.size()), 0,
                                    DirectorySize(new_entries), doff};
  }
  // 3. Everything durable before the header points at it (P8).
  CBT_RETURN_IF_ERROR(io_->flush());
  // 4. Switch (flushes). From here the new set is the file's truth.
  std::optional<BitmapsExtension> old_ext = header_.bitmaps;
  CBT_RETURN_IF_ERROR(SwitchHeader(std::move(next)));

  // 5. Free what nothing points at any more. A crash here leaks only.
  std::vector<BitmapDirEntry> old_entries = std::move(entries_);
  std::vector<std::vector<uint64_t>> old_tables = std::move(tables_);
  entries_ = std::move(new_entries);
  tables_ = std::move(new_tables);
  std::vector<bool> inc(plans.size(), false);
  for (size_t i = 0; i < plans.size(); ++i)
    if (plans[i].kept >= 0) inc[i] = inconsistent_[plans[i].kept];
  inconsistent_ = std::move(inc);
  if (old == OldClusters::kLeave) return Status::OK();
  Status st;
  if (old_ext)
    st = FreeClusters(old_ext->directory_offset, DivRoundUp(old_ext->directory_size, cs));
  for (size_t i = 0; i < old_entries.size() && st.ok(); ++i)
    if (!reused.count(static_cast<int>(i))) st = FreeBitmapClusters(old_entries[i], old_tables[i]);
  if (!st.ok())
    return st.WithContext(ctx_ +
                          ": new bitmap set committed, but freeing old clusters failed "
                          "(they leak; qemu-img check -r leaks frees them)");
  return Status::OK();
}

}  // namespace cbt::qcow2
