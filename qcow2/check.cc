// qcow2 check/repair. See check.h.
#include "qcow2/check.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <span>

#include "common/endian.h"
#include "qcow2/check_count.h"
#include "qcow2/format.h"
#include "qcow2/repair.h"

namespace cbt::qcow2 {

namespace check_internal {

void Note(CheckReport* rep, std::string msg) {
  if (rep->messages.size() < kMaxCheckMessages)
    rep->messages.push_back(std::move(msg));
  else
    ++rep->messages_dropped;
}

namespace {

// Reads out at offset as QEMU does: bytes past the end of the file read as
// zeros (a metadata cluster in a last cluster the file only partly holds is
// read zero padded). Failure: IOError only.
Status ReadPadded(BlockIO* io, std::span<std::byte> out, uint64_t offset, uint64_t fsize) {
  Status s = io->pread(out, offset);
  if (!s.IsOutOfRange()) return s;
  uint64_t have = offset < fsize ? std::min<uint64_t>(out.size(), fsize - offset) : 0;
  std::fill(out.begin() + static_cast<ptrdiff_t>(have), out.end(), std::byte{0});
  if (have) CBT_RETURN_IF_ERROR(io->pread(out.first(have), offset));
  return Status::OK();
}

// Reference counter over the file's clusters, with qemu-img check's rules
// (qcow2_inc_refcounts_imrt): a region that runs one cluster or more past
// the end of the file is corruption and counts nothing; one that ends less
// than a cluster past it counts every cluster (at most one beyond the
// rounded-up file end); a count that reaches refcount_max is an overflow
// (corruption) and stays there. Watched clusters (a bitmap's) also record
// who references them.
class Refs {
 public:
  Refs(Counted* out, uint32_t cluster_bits, uint32_t refcount_order, CheckReport* rep)
      : out_(out),
        cbits_(cluster_bits),
        max_(refcount_order >= 5 ? UINT32_MAX : (uint32_t{1} << (1u << refcount_order)) - 1),
        rep_(rep) {
    uint64_t n = DivRoundUp(out->file_size, uint64_t{1} << cluster_bits);
    out->refs.assign(n + 1, 0);
    out->watched.assign(n + 1, false);
    out->clusters = n;
  }
  // Marks [offset, offset+bytes) as used by bitmap `b`, in `role`.
  void Watch(Counted::Bitmap* b, uint64_t offset, uint64_t bytes, const char* role) {
    if (bytes == 0 || offset > UINT64_MAX - bytes) return;
    for (uint64_t c = offset >> cbits_; c <= (offset + bytes - 1) >> cbits_; ++c) {
      b->uses.push_back({c, role});
      if (c < out_->watched.size()) out_->watched[c] = true;
    }
  }
  // Counts [offset, offset+bytes) cluster by cluster.
  void Add(uint64_t offset, uint64_t bytes, const std::string& what) {
    if (bytes == 0) return;
    const uint64_t cs = uint64_t{1} << cbits_;
    if (offset > UINT64_MAX - bytes || offset + bytes > out_->file_size + cs - 1) {
      ++rep_->corruptions;
      Note(rep_, "ERROR " + what + ": reference to " + Hex(bytes) + " bytes at " + Hex(offset) +
                     " exceeds the end of the file by one cluster or more");
      return;
    }
    uint64_t first = offset >> cbits_, last = (offset + bytes - 1) >> cbits_;
    for (uint64_t c = first; c <= last; ++c) {
      if (out_->watched[c]) out_->owners[c].push_back(what);
      if (out_->refs[c] >= max_) {
        ++rep_->corruptions;
        Note(rep_, "ERROR " + what + ": refcount overflow for cluster at " + Hex(c << cbits_));
        continue;
      }
      ++out_->refs[c];
      out_->clusters = std::max(out_->clusters, c + 1);
    }
  }

 private:
  Counted* out_;
  uint32_t cbits_;
  uint32_t max_;  // refcount_max, capped to the counter width
  CheckReport* rep_;
};

// Metadata QEMU cannot read (its requests stop at kQemuMaxOffset): qemu-img
// check fails ("Check failed", exit 1) rather than finding corruption, so
// the check cannot be completed here either.
Status QemuReadable(uint64_t offset, uint64_t bytes, const std::string& what) {
  if (offset <= kQemuMaxOffset && bytes <= kQemuMaxOffset - offset) return Status::OK();
  return Status::IOError(what + " at " + Hex(offset) +
                         " cannot be read (past the largest offset QEMU reads, " +
                         Hex(kQemuMaxOffset) + ")");
}

// Walks one L1 table and its L2 tables. Metadata past the end of the file
// reads as zeros, as in QEMU (Refs has reported the region already).
Status CountL1(Image& img, Refs& refs, uint64_t l1_off, uint32_t l1_size, const char* what,
               CheckReport* rep) {
  const Header& h = img.header();
  const uint64_t cs = h.cluster_size();
  refs.Add(l1_off, uint64_t{l1_size} * 8, what);
  if (l1_size == 0) return Status::OK();
  CBT_RETURN_IF_ERROR(QemuReadable(l1_off, uint64_t{l1_size} * 8, what));
  // Snapshot L1 sizes are not validated at open: bound them (QEMU's limit).
  if (uint64_t{l1_size} * 8 > kMaxL1Bytes) {
    ++rep->corruptions;
    Note(rep, std::string("ERROR ") + what + " (" + std::to_string(l1_size) + " entries at " +
                  Hex(l1_off) + ") too large");
    return Status::OK();
  }
  // Entries past the end of the file are zeros: read (and allocate) only
  // those the file holds.
  CBT_ASSIGN_OR_RETURN(uint64_t fsize, img.io()->size());
  if (l1_off >= fsize) return Status::OK();
  const uint64_t n = std::min<uint64_t>(l1_size, DivRoundUp(fsize - l1_off, 8));
  std::vector<std::byte> l1(n * 8);
  CBT_RETURN_IF_ERROR(ReadPadded(img.io(), l1, l1_off, fsize));
  const bool ext_l2 = h.incompatible & kIncompatExtendedL2;
  const bool data_file = h.incompatible & kIncompatDataFile;
  const uint64_t entry_bytes = ext_l2 ? 16 : 8;
  std::vector<std::byte> l2(cs);
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t l2_off = LoadBE64(l1.data() + 8 * i) & kL1OffsetMask;
    if (!l2_off) continue;
    if (l2_off % cs) {
      ++rep->corruptions;
      Note(rep, "ERROR L2 table offset " + Hex(l2_off) + " not cluster aligned");
      continue;
    }
    refs.Add(l2_off, cs, "L2 table");
    CBT_RETURN_IF_ERROR(QemuReadable(l2_off, cs, "L2 table"));
    if (data_file) continue;  // guest data is in the other file: not counted
    // An L2 table in a last cluster the file holds only in part is read
    // zero padded (qemu-img check does); one wholly past EOF is all zeros.
    if (l2_off >= fsize) continue;
    CBT_RETURN_IF_ERROR(ReadPadded(img.io(), l2, l2_off, fsize));
    for (uint64_t j = 0; j < cs / entry_bytes; ++j) {
      uint64_t e = LoadBE64(l2.data() + j * entry_bytes);
      if (e & kOflagCompressed) {
        if (e & kOflagCopied) {
          ++rep->corruptions;
          Note(rep, "ERROR compressed cluster entry " + Hex(e) + ": copied flag set");
          e &= ~kOflagCopied;
        }
        uint32_t x = 62 - (h.cluster_bits - 8);
        uint64_t off = e & ((uint64_t{1} << x) - 1);
        uint64_t sectors = ((e >> x) & ((uint64_t{1} << (62 - x)) - 1)) + 1;
        refs.Add(off & ~uint64_t{511}, sectors * 512, "compressed cluster");
        continue;
      }
      uint64_t off = e & kL2OffsetMask;
      if (off) refs.Add(off, cs, "data cluster");
    }
  }
  return Status::OK();
}

// The first of a bitmap's clusters that cannot be trusted, as a reason
// ("its data cluster 0x... is also used by ..."); empty when none.
std::string UntrustedReason(Image& img, const Counted& counted, const Counted::Bitmap& b) {
  const uint64_t cs = img.cluster_size();
  std::string first;
  uint64_t bad = 0;
  for (const Counted::Use& u : b.uses) {
    const uint64_t off = u.cluster * cs;
    std::string why;
    auto it = counted.owners.find(u.cluster);
    if (off >= counted.file_size) {
      why = "lies past the end of the file";
    } else if (it != counted.owners.end() && it->second.size() >= 2) {
      // Everything else that references it (this use removed once).
      std::vector<std::string> others = it->second;
      const std::string self = std::string(u.role) == "directory"
                                   ? "bitmap directory"
                                   : "bitmap '" + img.dir_entries()[b.index].name + "' " +
                                         (std::string(u.role) == "table" ? "table" : "data");
      if (auto s = std::find(others.begin(), others.end(), self); s != others.end())
        others.erase(s);
      why = "is also used by ";
      for (size_t k = 0; k < others.size(); ++k) why += (k ? ", " : "") + others[k];
    } else {
      auto r = img.refcounts().Get(u.cluster);
      if (r.ok() && *r == 0) why = "has refcount 0";
    }
    if (why.empty()) continue;
    if (bad++ == 0) first = std::string("its ") + u.role + " cluster " + Hex(off) + " " + why;
  }
  if (bad > 1) first += " (and " + std::to_string(bad - 1) + " more)";
  return first;
}

}  // namespace

Result<Counted> CountReferences(Image& img, const CountOptions& opts, CheckReport* rep) {
  std::lock_guard rl(img.refcounts_mutex());  // the data path may allocate meanwhile
  const Header& h = img.header();
  const uint64_t cs = h.cluster_size();
  Counted out;
  CBT_ASSIGN_OR_RETURN(out.file_size, img.io()->size());
  Refs refs(&out, h.cluster_bits, h.refcount_order, rep);
  Refcounts& rc = img.refcounts();

  // Bitmap clusters first, so that every reference to them is recorded.
  const auto& entries = img.dir_entries();
  // Image::Open keeps the extension only when bit 0 vouches for it, or when
  // the caller adopted a stale one (which it will write back).
  const bool count_dir = h.bitmaps && !opts.skip_directory;
  uint64_t entry_off = h.bitmaps ? h.bitmaps->directory_offset : 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const uint64_t size = DirEntrySize(entries[i]);
    entry_off += size;
    if (i < opts.skip_bitmap.size() && opts.skip_bitmap[i]) continue;
    Counted::Bitmap b{i, {}};
    if (count_dir) refs.Watch(&b, entry_off - size, size, "directory");
    refs.Watch(&b, entries[i].table_offset, uint64_t{entries[i].table_size} * 8, "table");
    for (uint64_t t : img.table(i))
      if (t & kTableEntryOffsetMask) refs.Watch(&b, t & kTableEntryOffsetMask, cs, "data");
    out.bitmaps.push_back(std::move(b));
  }

  refs.Add(0, cs, "header");
  refs.Add(rc.table_offset(), uint64_t{rc.table_clusters()} * cs, "refcount table");
  for (uint64_t b : rc.table())
    if (b) refs.Add(b, cs, "refcount block");
  CBT_RETURN_IF_ERROR(CountL1(img, refs, h.l1_table_offset, h.l1_size, "L1 table", rep));
  if (const HeaderExtension* e = h.FindExtension(kExtCrypto); e && e->data.size() >= 16)
    refs.Add(LoadBE64(e->data.data()), LoadBE64(e->data.data() + 8), "crypto header");
  // Snapshots: table entries, then each snapshot's L1 tree.
  uint64_t off = h.snapshots_offset;
  for (uint32_t i = 0; i < h.nb_snapshots; ++i) {
    CBT_RETURN_IF_ERROR(QemuReadable(off, 40, "snapshot table"));
    std::byte sh[40];
    if (!img.io()->pread(sh, off).ok()) {
      ++rep->corruptions;
      Note(rep, "ERROR snapshot table truncated");
      break;
    }
    uint64_t l1 = LoadBE64(sh);
    uint32_t l1_size = LoadBE32(sh + 8);
    uint64_t len = 40 + LoadBE32(sh + 36) + LoadBE16(sh + 12) + LoadBE16(sh + 14);
    len = (len + 7) & ~uint64_t{7};
    CBT_RETURN_IF_ERROR(CountL1(img, refs, l1, l1_size, "snapshot L1 table", rep));
    off += len;
  }
  if (h.nb_snapshots) refs.Add(h.snapshots_offset, off - h.snapshots_offset, "snapshot table");
  // Bitmaps.
  if (count_dir)
    refs.Add(h.bitmaps->directory_offset, h.bitmaps->directory_size, "bitmap directory");
  for (const Counted::Bitmap& b : out.bitmaps) {
    const BitmapDirEntry& e = entries[b.index];
    std::string what = "bitmap '" + e.name + "'";
    refs.Add(e.table_offset, uint64_t{e.table_size} * 8, what + " table");
    for (uint64_t t : img.table(b.index))
      if (t & kTableEntryOffsetMask) refs.Add(t & kTableEntryOffsetMask, cs, what + " data");
  }
  if (img.autoclear_without_extension()) {
    ++rep->corruptions;
    Note(rep, "ERROR autoclear bit 0 (bitmaps) set without a bitmaps extension");
  }
  return out;
}

Status CompareRefcounts(Image& img, const Counted& counted, bool repair_leaks, CheckReport* rep) {
  std::lock_guard rl(img.refcounts_mutex());  // the data path may allocate meanwhile
  // Compare over the clusters of the file, as qemu-img check does: a
  // refcount for a cluster past the end of the file is not looked at (it
  // describes nothing; qemu-img reports nothing for it). Refcount blocks
  // are read only for clusters inside the file, so the work is bounded by
  // the file size, not by what the refcount table could describe.
  Refcounts& rc = img.refcounts();
  const uint64_t epb = rc.entries_per_block();
  uint64_t fixed = 0;
  for (uint64_t c = 0; c < counted.clusters; ++c) {
    auto got = rc.Get(c);
    if (!got.ok()) {
      if (!got.status().IsCorruption()) return got.status();
      CBT_RETURN_IF_ERROR(QemuReadable(rc.table()[c / epb], img.cluster_size(),
                                       "refcount block " + std::to_string(c / epb)));
      // Refcount block unreadable (wholly past the end of the file): its
      // clusters' refcounts are unknown; say so once and skip the block.
      if (!repair_leaks) {
        ++rep->corruptions;
        Note(rep, "ERROR refcounts of clusters " + std::to_string(c) +
                      ".. unreadable: " + got.status().message());
      }
      c = (c / epb + 1) * epb - 1;
      continue;
    }
    const uint64_t r = *got;
    const uint64_t n = counted.at(c);
    if (r && !repair_leaks) ++rep->allocated_clusters;
    std::string where = "cluster " + std::to_string(c) + " refcount=" + std::to_string(r) +
                        " reference=" + std::to_string(n);
    const std::vector<std::string>* owners = nullptr;
    if (counted.watched[c]) {
      auto it = counted.owners.find(c);
      if (it != counted.owners.end()) owners = &it->second;
    }
    if (owners) {
      where += " (";
      for (size_t k = 0; k < owners->size(); ++k) where += (k ? ", " : "") + (*owners)[k];
      where += ")";
    }
    if (r < n) {
      if (repair_leaks) continue;
      ++rep->corruptions;
      Note(rep, "ERROR " + where);
    } else if (r > n) {
      if (!repair_leaks) {
        ++rep->leaks;
        Note(rep, "Leaked " + where);
      } else {
        CBT_RETURN_IF_ERROR(rc.Set(c, n));
        ++fixed;
        Note(rep, "Repaired " + where);
      }
    }
    if (!repair_leaks && r >= n && owners && owners->size() >= 2 && owners->size() == n) {
      // The refcount covers it (qemu-img check -r all raises it so), but
      // bitmap clusters are never shared: writing one owner overwrites the
      // other.
      ++rep->corruptions;
      Note(rep, "ERROR " + where + ": a bitmap cluster must not be shared");
    }
  }
  if (fixed) CBT_RETURN_IF_ERROR(img.io()->flush());
  rep->leaks_fixed += fixed;
  if (repair_leaks) return Status::OK();
  for (const Counted::Bitmap& b : counted.bitmaps) {
    std::string why = UntrustedReason(img, counted, b);
    if (!why.empty()) rep->untrusted_bitmaps.push_back({img.dir_entries()[b.index].name, why});
  }
  return Status::OK();
}

}  // namespace check_internal

Result<CheckReport> Check(Image& img, bool repair, bool leaks_only) {
  using namespace check_internal;
  if (repair && !img.writable())
    return Status::InvalidArgument(img.name() + ": repair needs a writable image");
  CheckReport rep;
  CBT_ASSIGN_OR_RETURN(Counted counted, CountReferences(img, {}, &rep));
  CBT_RETURN_IF_ERROR(CompareRefcounts(img, counted, /*repair_leaks=*/false, &rep));
  if (repair) {
    CBT_ASSIGN_OR_RETURN(rep, Repair(img, std::move(rep), leaks_only));
  }
  if (rep.messages_dropped)
    rep.messages.push_back("... " + std::to_string(rep.messages_dropped) + " more");
  return rep;
}

Status CheckBeforeWrite(Image& img) {
  CBT_ASSIGN_OR_RETURN(CheckReport rep, Check(img, /*repair=*/false));
  if (rep.corruptions == 0) return Status::OK();
  std::string first;
  for (const std::string& m : rep.messages) {
    if (m.rfind("ERROR", 0) == 0) {
      first = m;
      break;
    }
  }
  if (first.empty() && !rep.messages.empty()) first = rep.messages.front();
  return Status::Corruption(
      img.name() + ": refusing to write: " + std::to_string(rep.corruptions) +
      " metadata error(s), a write could overwrite live data (first: " + first +
      "); see 'cbt check " + img.name() + "', repair with 'cbt check " + img.name() + " --repair'");
}

}  // namespace cbt::qcow2
