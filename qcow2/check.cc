// qcow2 check/repair. See check.h.
#include "qcow2/check.h"

#include <cstdio>

#include "common/endian.h"
#include "qcow2/format.h"

namespace cbt::qcow2 {

namespace {

std::string Hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}
uint64_t DivRoundUp(uint64_t a, uint64_t b) {
  return a / b + (a % b != 0);
}

// Reference counter over the file's clusters.
class Refs {
 public:
  Refs(uint64_t file_size, uint32_t cluster_bits, CheckReport* rep)
      : cbits_(cluster_bits),
        nclusters_(DivRoundUp(file_size, uint64_t{1} << cluster_bits)),
        refs_(nclusters_, 0),
        rep_(rep) {}
  // Counts [offset, offset+bytes) cluster by cluster.
  void Add(uint64_t offset, uint64_t bytes, const std::string& what) {
    if (bytes == 0) return;
    uint64_t first = offset >> cbits_, last = (offset + bytes - 1) >> cbits_;
    for (uint64_t c = first; c <= last; ++c) {
      if (c >= nclusters_) {
        ++rep_->corruptions;
        rep_->messages.push_back("ERROR " + what + ": reference to cluster at " + Hex(c << cbits_) +
                                 " past the end of the file");
        return;
      }
      ++refs_[c];
    }
  }
  uint64_t size() const { return nclusters_; }
  uint64_t at(uint64_t c) const { return c < nclusters_ ? refs_[c] : 0; }

 private:
  uint32_t cbits_;
  uint64_t nclusters_;
  std::vector<uint32_t> refs_;
  CheckReport* rep_;
};

// Walks one L1 table and its L2 tables.
Status CountL1(Image& img, Refs& refs, uint64_t l1_off, uint32_t l1_size, const char* what,
               CheckReport* rep) {
  const Header& h = img.header();
  const uint64_t cs = h.cluster_size();
  refs.Add(l1_off, uint64_t{l1_size} * 8, what);
  if (l1_size == 0) return Status::OK();
  // Snapshot L1 sizes are not validated at open: bound them (QEMU's limit)
  // and by the file before allocating.
  CBT_ASSIGN_OR_RETURN(uint64_t fsize, img.io()->size());
  if (uint64_t{l1_size} * 8 > kMaxL1Bytes || l1_off > fsize ||
      uint64_t{l1_size} * 8 > fsize - l1_off) {
    ++rep->corruptions;
    rep->messages.push_back(std::string("ERROR ") + what + " (" + std::to_string(l1_size) +
                            " entries at " + Hex(l1_off) +
                            ") too large or past the end of the file");
    return Status::OK();
  }
  std::vector<std::byte> l1(uint64_t{l1_size} * 8);
  Status s = img.io()->pread(l1, l1_off);
  if (!s.ok()) {
    ++rep->corruptions;
    rep->messages.push_back(std::string("ERROR ") + what + " unreadable: " + s.message());
    return Status::OK();
  }
  const bool ext_l2 = h.incompatible & kIncompatExtendedL2;
  const bool data_file = h.incompatible & kIncompatDataFile;
  const uint64_t entry_bytes = ext_l2 ? 16 : 8;
  std::vector<std::byte> l2(cs);
  for (uint32_t i = 0; i < l1_size; ++i) {
    uint64_t l2_off = LoadBE64(l1.data() + 8 * i) & kL1OffsetMask;
    if (!l2_off) continue;
    if (l2_off % cs) {
      ++rep->corruptions;
      rep->messages.push_back("ERROR L2 table offset " + Hex(l2_off) + " not cluster aligned");
      continue;
    }
    refs.Add(l2_off, cs, "L2 table");
    if (data_file) continue;  // guest data is in the other file: not counted
    if (!img.io()->pread(l2, l2_off).ok()) continue;  // already reported past EOF
    for (uint64_t j = 0; j < cs / entry_bytes; ++j) {
      uint64_t e = LoadBE64(l2.data() + j * entry_bytes);
      if (e & kOflagCompressed) {
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

}  // namespace

Result<CheckReport> Check(Image& img, bool repair_leaks) {
  if (repair_leaks && !img.writable())
    return Status::InvalidArgument(img.name() + ": repair needs a writable image");
  CheckReport rep;
  const Header& h = img.header();
  const uint64_t cs = h.cluster_size();
  CBT_ASSIGN_OR_RETURN(uint64_t fsize, img.io()->size());
  Refs refs(fsize, h.cluster_bits, &rep);
  Refcounts& rc = img.refcounts();

  refs.Add(0, cs, "header");
  refs.Add(rc.table_offset(), uint64_t{rc.table_clusters()} * cs, "refcount table");
  for (uint64_t b : rc.table())
    if (b) refs.Add(b, cs, "refcount block");
  CBT_RETURN_IF_ERROR(CountL1(img, refs, h.l1_table_offset, h.l1_size, "L1 table", &rep));
  if (const HeaderExtension* e = h.FindExtension(kExtCrypto); e && e->data.size() >= 16)
    refs.Add(LoadBE64(e->data.data()), LoadBE64(e->data.data() + 8), "crypto header");
  // Snapshots: table entries, then each snapshot's L1 tree.
  uint64_t off = h.snapshots_offset;
  for (uint32_t i = 0; i < h.nb_snapshots; ++i) {
    std::byte sh[40];
    if (!img.io()->pread(sh, off).ok()) {
      ++rep.corruptions;
      rep.messages.push_back("ERROR snapshot table truncated");
      break;
    }
    uint64_t l1 = LoadBE64(sh);
    uint32_t l1_size = LoadBE32(sh + 8);
    uint64_t len = 40 + LoadBE32(sh + 36) + LoadBE16(sh + 12) + LoadBE16(sh + 14);
    len = (len + 7) & ~uint64_t{7};
    CBT_RETURN_IF_ERROR(CountL1(img, refs, l1, l1_size, "snapshot L1 table", &rep));
    off += len;
  }
  if (h.nb_snapshots) refs.Add(h.snapshots_offset, off - h.snapshots_offset, "snapshot table");
  // Bitmaps.
  if (h.bitmaps && (h.autoclear & kAutoclearBitmaps))
    refs.Add(h.bitmaps->directory_offset, h.bitmaps->directory_size, "bitmap directory");
  const auto& entries = img.dir_entries();
  for (size_t i = 0; i < entries.size(); ++i) {
    std::string what = "bitmap '" + entries[i].name + "'";
    refs.Add(entries[i].table_offset, uint64_t{entries[i].table_size} * 8, what + " table");
    for (uint64_t t : img.table(i))
      if (t & kTableEntryOffsetMask) refs.Add(t & kTableEntryOffsetMask, cs, what + " data");
  }
  if (img.autoclear_without_extension()) {
    ++rep.corruptions;
    rep.messages.push_back("ERROR autoclear bit 0 (bitmaps) set without a bitmaps extension");
  }

  // Compare over every cluster that is referenced or has a refcount.
  uint64_t limit = std::max(refs.size(), rc.covered_clusters());
  for (uint64_t c = 0; c < limit; ++c) {
    if (c >= refs.size() && rc.table()[c / rc.entries_per_block()] == 0) {
      c = (c / rc.entries_per_block() + 1) * rc.entries_per_block() - 1;
      continue;
    }
    CBT_ASSIGN_OR_RETURN(uint64_t r, rc.Get(c));
    uint64_t n = refs.at(c);
    if (r) ++rep.allocated_clusters;
    if (r == n) continue;
    std::string where = "cluster " + std::to_string(c) + " refcount=" + std::to_string(r) +
                        " reference=" + std::to_string(n);
    if (r < n) {
      ++rep.corruptions;
      rep.messages.push_back("ERROR " + where);
    } else {
      ++rep.leaks;
      rep.messages.push_back("Leaked " + where);
      if (repair_leaks) {
        CBT_RETURN_IF_ERROR(rc.Set(c, n));
        ++rep.leaks_fixed;
        rep.messages.push_back("Repaired " + where);
      }
    }
  }
  if (rep.leaks_fixed) CBT_RETURN_IF_ERROR(img.io()->flush());
  return rep;
}

}  // namespace cbt::qcow2
