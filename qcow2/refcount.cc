// qcow2 refcounts. See refcount.h for the crash-ordering contract.
#include "qcow2/refcount.h"

#include <algorithm>
#include <cstdio>
#include <set>

#include "common/endian.h"
#include "qcow2/format.h"
#include "qcow2/util.h"

namespace cbt::qcow2 {

using internal::Hex;

namespace {

// A short read of metadata means the file is truncated: Corruption.
Status ReadMeta(BlockIO* io, std::span<std::byte> out, uint64_t off, const std::string& ctx,
                const char* what) {
  Status s = io->pread(out, off);
  if (s.IsOutOfRange())
    return Status::Corruption(ctx + ": " + what + " at " + Hex(off) + " truncated");
  return s.WithContext(ctx + ": " + what + " at " + Hex(off));
}
}  // namespace

Refcounts::Refcounts(BlockIO* io, uint32_t cluster_bits, uint32_t order, std::string ctx)
    : io_(io),
      cluster_bits_(cluster_bits),
      order_(order),
      cs_(uint64_t{1} << cluster_bits),
      epb_((uint64_t{1} << cluster_bits) * 8 >> order),
      max_value_(order == 6 ? ~uint64_t{0} : (uint64_t{1} << (1u << order)) - 1),
      ctx_(std::move(ctx)) {}

Result<Refcounts> Refcounts::Load(BlockIO* io, uint32_t cluster_bits, uint32_t refcount_order,
                                  uint64_t table_offset, uint32_t table_clusters, std::string ctx) {
  Refcounts r(io, cluster_bits, refcount_order, std::move(ctx));
  r.table_offset_ = table_offset;
  r.table_clusters_ = table_clusters;
  uint64_t bytes = uint64_t{table_clusters} * r.cs_;
  if (bytes > kMaxRefcountTableBytes || table_offset % r.cs_ != 0)
    return Status::Corruption(r.ctx_ + ": bad refcount table location");
  CBT_ASSIGN_OR_RETURN(uint64_t fsize, io->size());
  if (table_offset > fsize || bytes > fsize - table_offset)
    return Status::Corruption(r.ctx_ + ": refcount table at " + Hex(table_offset) + " truncated");
  std::vector<std::byte> buf(bytes);
  CBT_RETURN_IF_ERROR(ReadMeta(io, buf, table_offset, r.ctx_, "refcount table"));
  r.table_.resize(bytes / 8);
  for (uint64_t i = 0; i < r.table_.size(); ++i) {
    uint64_t e = LoadBE64(buf.data() + i * 8);
    if (e & ~kRefTableOffsetMask || e % r.cs_ != 0)
      return Status::Corruption(r.ctx_ + ": refcount table entry " + std::to_string(i) + " (" +
                                Hex(e) + ") not cluster aligned");
    r.table_[i] = e;
  }
  return r;
}

Status Refcounts::CheckForAllocation() const {
  std::set<uint64_t> seen;
  for (uint64_t e : table_)
    if (e && !seen.insert(e).second)
      return Status::Corruption(ctx_ + ": refcount block " + Hex(e) +
                                " is named by two refcount table entries; repair with qemu-img "
                                "check -r all");
  return Status::OK();
}

Result<std::vector<std::byte>*> Refcounts::Block(uint64_t b) {
  auto it = blocks_.find(b);
  if (it != blocks_.end()) return &it->second;
  std::vector<std::byte> blk(cs_);
  Status s = io_->pread(blk, table_[b]);
  if (s.IsOutOfRange()) {
    // A block in a last cluster the file holds only in part reads zero
    // padded, as in QEMU (the zeros are written on the first change). One
    // that starts at or past the end of the file is truncation.
    CBT_ASSIGN_OR_RETURN(uint64_t fsize, io_->size());
    if (table_[b] >= fsize)
      return Status::Corruption(ctx_ + ": refcount block at " + Hex(table_[b]) + " truncated");
    uint64_t have = std::min<uint64_t>(cs_, fsize - table_[b]);
    s = io_->pread(std::span(blk).first(have), table_[b]);
  }
  CBT_RETURN_IF_ERROR(
      s.WithContext(ctx_ + ": refcount block " + std::to_string(b) + " at " + Hex(table_[b])));
  return &blocks_.emplace(b, std::move(blk)).first->second;
}

void Refcounts::EntryBytes(uint64_t i, uint64_t* first, uint64_t* last) const {
  if (order_ < 3) {
    *first = (i << order_) / 8;
    *last = *first + 1;
  } else {
    uint64_t w = uint64_t{1} << (order_ - 3);
    *first = i * w;
    *last = *first + w;
  }
}

uint64_t Refcounts::ReadEntry(const std::vector<std::byte>& blk, uint64_t i) const {
  const std::byte* p = blk.data();
  switch (order_) {
    case 3:
      return std::to_integer<uint64_t>(p[i]);
    case 4:
      return LoadBE16(p + 2 * i);
    case 5:
      return LoadBE32(p + 4 * i);
    case 6:
      return LoadBE64(p + 8 * i);
    default: {
      uint64_t bit = i << order_;
      return (std::to_integer<uint64_t>(p[bit / 8]) >> (bit % 8)) & max_value_;
    }
  }
}

void Refcounts::WriteEntry(std::vector<std::byte>& blk, uint64_t i, uint64_t v) const {
  std::byte* p = blk.data();
  switch (order_) {
    case 3:
      p[i] = std::byte(v);
      break;
    case 4:
      StoreBE16(p + 2 * i, static_cast<uint16_t>(v));
      break;
    case 5:
      StoreBE32(p + 4 * i, static_cast<uint32_t>(v));
      break;
    case 6:
      StoreBE64(p + 8 * i, v);
      break;
    default: {
      uint64_t bit = i << order_;
      unsigned sh = bit % 8;
      uint8_t byte = std::to_integer<uint8_t>(p[bit / 8]);
      byte = static_cast<uint8_t>((byte & ~(max_value_ << sh)) | ((v & max_value_) << sh));
      p[bit / 8] = std::byte(byte);
    }
  }
}

Result<uint64_t> Refcounts::Get(uint64_t index) {
  uint64_t b = index / epb_;
  if (b >= table_.size() || table_[b] == 0) return uint64_t{0};
  CBT_ASSIGN_OR_RETURN(std::vector<std::byte> * blk, Block(b));
  return ReadEntry(*blk, index % epb_);
}

Status Refcounts::SetRange(uint64_t start, uint64_t n, uint64_t value) {
  uint64_t i = start;
  while (i < start + n) {
    uint64_t b = i / epb_;
    uint64_t end = std::min(start + n, (b + 1) * epb_);
    CBT_ASSIGN_OR_RETURN(std::vector<std::byte> * blk, Block(b));
    uint64_t first, last, f2, l2;
    EntryBytes(i % epb_, &first, &l2);
    EntryBytes((end - 1) % epb_, &f2, &last);
    for (uint64_t j = i; j < end; ++j) WriteEntry(*blk, j % epb_, value);
    CBT_RETURN_IF_ERROR(io_->pwrite(std::span<const std::byte>(blk->data() + first, last - first),
                                    table_[b] + first));
    i = end;
  }
  return Status::OK();
}

Result<uint64_t> Refcounts::FindFreeRun(uint64_t n) {
  uint64_t start = free_hint_;
  uint64_t run = 0;
  bool first_free_seen = false;
  for (uint64_t c = free_hint_;; ++c) {
    uint64_t b = c / epb_;
    if (b >= table_.size() || table_[b] == 0) {
      // Whole uncovered block: free. Jump when possible.
      if (run == 0) start = c;
      if (!first_free_seen) {
        free_hint_ = c;
        first_free_seen = true;
      }
      uint64_t block_end = (b + 1) * epb_;
      uint64_t take = std::min(block_end - c, n - run);
      run += take;
      c += take - 1;
      if (run >= n) return start;
      continue;
    }
    CBT_ASSIGN_OR_RETURN(uint64_t rc, Get(c));
    if (rc == 0) {
      if (!first_free_seen) {
        free_hint_ = c;
        first_free_seen = true;
      }
      if (run == 0) start = c;
      if (++run >= n) return start;
    } else {
      run = 0;
    }
    if (c > (uint64_t{1} << (56 - cluster_bits_)))
      return Status::IOError(ctx_ + ": no free cluster found", ENOSPC);
  }
}

Status Refcounts::NewBlock(uint64_t b) {
  // Self-describing block: it lives in the first cluster of the range it
  // covers (every cluster there is free, since the range had no block).
  uint64_t r = b * epb_;
  if (b == 0) return Status::Corruption(ctx_ + ": refcount block 0 (for the header) is missing");
  std::vector<std::byte> blk(cs_);
  WriteEntry(blk, 0, 1);
  CBT_RETURN_IF_ERROR(io_->pwrite(blk, r * cs_));
  // The block must be durable before the table entry points at it.
  CBT_RETURN_IF_ERROR(io_->flush());
  std::byte e[8];
  StoreBE64(e, r * cs_);
  CBT_RETURN_IF_ERROR(io_->pwrite(e, table_offset_ + b * 8));
  table_[b] = r * cs_;
  blocks_[b] = std::move(blk);
  ++structure_changes_;
  return Status::OK();
}

Status Refcounts::GrowTable(uint64_t b) {
  // New table + one refcount block placed at the first block index beyond
  // the old coverage, the block describing itself and the table.
  uint64_t nb = table_.size();
  uint64_t want_entries = std::max(b, nb) + 1;
  want_entries = std::max(want_entries * 2, nb + 1);
  uint64_t per_cluster = cs_ / 8;
  uint64_t t_clusters = (want_entries + per_cluster - 1) / per_cluster;
  if (t_clusters * cs_ > kMaxRefcountTableBytes)
    return Status::IOError(ctx_ + ": refcount table would exceed 8 MiB", EFBIG);
  if (t_clusters + 1 > epb_)
    return Status::NotSupported(ctx_ + ": refcount table growth needs more than one new block");
  uint64_t new_entries = t_clusters * per_cluster;
  uint64_t r = nb * epb_;  // cluster index of the new block
  std::vector<std::byte> blk(cs_);
  for (uint64_t i = 0; i <= t_clusters; ++i) WriteEntry(blk, i, 1);
  std::vector<uint64_t> table = table_;
  table.resize(new_entries, 0);
  table[nb] = r * cs_;
  std::vector<std::byte> tbuf(t_clusters * cs_);
  for (uint64_t i = 0; i < table.size(); ++i) StoreBE64(tbuf.data() + i * 8, table[i]);
  uint64_t new_off = (r + 1) * cs_;
  CBT_RETURN_IF_ERROR(io_->pwrite(blk, r * cs_));
  CBT_RETURN_IF_ERROR(io_->pwrite(tbuf, new_off));
  // New table and block durable before the header points at them.
  CBT_RETURN_IF_ERROR(io_->flush());
  std::byte hdr[12];
  StoreBE64(hdr, new_off);
  StoreBE32(hdr + 8, static_cast<uint32_t>(t_clusters));
  CBT_RETURN_IF_ERROR(io_->pwrite(hdr, kOffRefcountTableOffset));  // one sector: atomic
  CBT_RETURN_IF_ERROR(io_->flush());
  uint64_t old_off = table_offset_;
  uint64_t old_clusters = table_clusters_;
  table_ = std::move(table);
  table_offset_ = new_off;
  table_clusters_ = static_cast<uint32_t>(t_clusters);
  blocks_[nb] = std::move(blk);
  ++structure_changes_;
  // Nothing points at the old table any more; a crash here leaks it.
  return Free(old_off, old_clusters);
}

// XXX: a run that must cross the first cluster of a range with no refcount
// block yet cannot be placed (NewBlock puts the block there, the run moves
// past it and meets the next such range): runs longer than a block's range
// (entries_per_block clusters) in uncovered space fail "did not converge".
// Only tiny clusters with large tables reach that (512-byte clusters, a
// bitmap table over 128 KiB); the operation fails cleanly, nothing changes.
Result<uint64_t> Refcounts::Allocate(uint64_t n) {
  for (int round = 0;; ++round) {
    if (round > 64) return Status::IOError(ctx_ + ": refcount allocation did not converge");
    CBT_ASSIGN_OR_RETURN(uint64_t start, FindFreeRun(n));
    bool changed = false;
    for (uint64_t b = start / epb_; b <= (start + n - 1) / epb_; ++b) {
      if (b >= table_.size()) {
        CBT_RETURN_IF_ERROR(GrowTable(b));
        changed = true;
        break;
      }
      if (table_[b] == 0) {
        CBT_RETURN_IF_ERROR(NewBlock(b));
        changed = true;
        break;
      }
    }
    if (changed) continue;
    CBT_RETURN_IF_ERROR(SetRange(start, n, 1));
    if (start == free_hint_) free_hint_ = start + n;
    return start * cs_;
  }
}

Status Refcounts::Free(uint64_t offset, uint64_t n) {
  uint64_t start = offset / cs_;
  for (uint64_t c = start; c < start + n; ++c) {
    CBT_ASSIGN_OR_RETURN(uint64_t rc, Get(c));
    if (rc == 0)
      return Status::Corruption(ctx_ + ": freeing cluster at " + Hex(c * cs_) +
                                " whose refcount is already 0");
    CBT_RETURN_IF_ERROR(SetRange(c, 1, rc - 1));
    if (rc == 1 && c < free_hint_) free_hint_ = c;
  }
  return Status::OK();
}

Status Refcounts::Set(uint64_t index, uint64_t value) {
  if (value > max_value_) return Status::InvalidArgument(ctx_ + ": refcount value too large");
  uint64_t b = index / epb_;
  if (b >= table_.size()) {
    if (value == 0) return Status::OK();
    CBT_RETURN_IF_ERROR(GrowTable(b));
  }
  if (table_[b] == 0) {
    if (value == 0) return Status::OK();
    CBT_RETURN_IF_ERROR(NewBlock(b));
  }
  CBT_RETURN_IF_ERROR(SetRange(index, 1, value));
  if (value == 0 && index < free_hint_) free_hint_ = index;
  return Status::OK();
}

}  // namespace cbt::qcow2
