// qcow2 Image, part 2: the in-place write path used by the filter while it
// serves (in_use flags, changed bitmap slots, preallocation) and header
// extensions, including cbt's private crash-safety record. See image.h for
// the contracts and docs/format.md ("In place") for what a crash leaves.
// Part 1 (image.cc): open, create, queries, reads, the directory switch.
#include <algorithm>
#include <string>

#include "common/endian.h"
#include "qcow2/format.h"
#include "qcow2/image.h"
#include "qcow2/image_internal.h"

namespace cbt::qcow2 {

using namespace internal;  // NOLINT(google-build-using-namespace): file-local helpers

Status Image::SetInUse(std::span<const std::string> names, bool in_use) {
  CBT_RETURN_IF_ERROR(RequireWritable("set in_use"));
  std::vector<int> idx;
  for (const auto& n : names) {
    int i = IndexOf(n);
    if (i < 0) return Find(n).status();
    CBT_RETURN_IF_ERROR(RequireConsistent(i));
    idx.push_back(i);
  }
  // The flags field is 4 bytes at an offset = 4 (mod 8): never straddles a
  // sector, so each write is atomic.
  for (int i : idx) {
    uint32_t flags =
        in_use ? entries_[i].flags | kBitmapFlagInUse : entries_[i].flags & ~kBitmapFlagInUse;
    if (flags == entries_[i].flags) continue;
    std::byte f[4];
    StoreBE32(f, flags);
    CBT_RETURN_IF_ERROR(
        io_->pwrite(f, header_.bitmaps->directory_offset + DirEntryFlagsOffset(entries_, i)));
    entries_[i].flags = flags;
  }
  return Status::OK();
}

Result<uint64_t> Image::WriteSlots(std::string_view name, std::span<const uint64_t> slots,
                                   const BitmapDataSource& src) {
  CBT_RETURN_IF_ERROR(RequireWritable("write bitmap"));
  int i = IndexOf(name);
  if (i < 0) return Find(name).status();
  CBT_RETURN_IF_ERROR(RequireConsistent(i));
  const uint64_t before = bytes_written();
  const uint64_t cs = cluster_size();
  std::vector<uint64_t>& t = tables_[i];
  const uint64_t toff = entries_[i].table_offset;
  std::vector<std::byte> buf(cs);
  std::vector<std::pair<uint64_t, uint64_t>> new_entries;  // slot, table entry
  // On failure (ENOSPC, EIO) before the table points at a new cluster, give
  // it back, so a failed persist that is retried later leaks nothing.
  auto fail = [&](Status s, size_t referenced) -> Status {
    for (size_t k = referenced; k < new_entries.size(); ++k)
      if (new_entries[k].second) (void)FreeClusters(new_entries[k].second, 1);
    return s;
  };
  for (uint64_t slot : slots) {
    if (slot >= t.size())
      return Status::InvalidArgument(ctx_ + ": bitmap '" + std::string(name) + "': slot " +
                                     std::to_string(slot) + " out of range");
    const bool zero = src.SlotIsZero(slot);
    if (zero)
      std::fill(buf.begin(), buf.end(), std::byte{0});
    else
      src.FillSlot(slot, buf);
    uint64_t off = t[slot] & kTableEntryOffsetMask;
    if (off) {
      // In place. A torn write here leaves a mix of old and new bits; the
      // caller keeps in_use set until it has flushed (P14).
      if (Status s = io_->pwrite(buf, off); !s.ok()) return fail(std::move(s), 0);
    } else if (zero || AllZero(buf)) {
      if (t[slot] == kTableEntryAllOnes) new_entries.emplace_back(slot, 0);
    } else {
      auto noff = Alloc(1);
      if (!noff.ok()) return fail(std::move(noff).status(), 0);
      new_entries.emplace_back(slot, *noff);
      if (Status s = io_->pwrite(buf, *noff); !s.ok()) return fail(std::move(s), 0);
    }
  }
  if (!new_entries.empty()) {
    // Refcounts and data durable before the table points at them (P8).
    if (Status s = io_->flush(); !s.ok()) return fail(std::move(s), 0);
    for (size_t k = 0; k < new_entries.size(); ++k) {
      auto [slot, e] = new_entries[k];
      std::byte b[8];
      StoreBE64(b, e);  // 8 bytes, 8-aligned: inside one sector
      // A failed entry write may still have landed: keep that cluster (a
      // leak at worst); free only the ones nothing can point at.
      if (Status s = io_->pwrite(b, toff + 8 * slot); !s.ok()) return fail(std::move(s), k + 1);
      t[slot] = e;
    }
  }
  return bytes_written() - before;
}

Status Image::Preallocate(std::string_view name) {
  CBT_RETURN_IF_ERROR(RequireWritable("preallocate bitmap"));
  int i = IndexOf(name);
  if (i < 0) return Find(name).status();
  CBT_RETURN_IF_ERROR(RequireConsistent(i));
  const uint64_t cs = cluster_size();
  std::vector<uint64_t>& t = tables_[i];
  std::vector<std::byte> zeros(cs), ones(cs, std::byte{0xff});
  std::vector<std::pair<uint64_t, uint64_t>> fresh;
  for (uint64_t slot = 0; slot < t.size(); ++slot) {
    if (t[slot] & kTableEntryOffsetMask) continue;
    CBT_ASSIGN_OR_RETURN(uint64_t off, Alloc(1));
    CBT_RETURN_IF_ERROR(io_->pwrite(t[slot] == kTableEntryAllOnes ? ones : zeros, off));
    fresh.emplace_back(slot, off);
  }
  if (fresh.empty()) return Status::OK();
  CBT_RETURN_IF_ERROR(io_->flush());  // P8
  for (auto [slot, off] : fresh) {
    std::byte b[8];
    StoreBE64(b, off);
    CBT_RETURN_IF_ERROR(io_->pwrite(b, entries_[i].table_offset + 8 * slot));
    t[slot] = off;
  }
  return Status::OK();
}

const std::vector<std::byte>* Image::GetExtension(uint32_t type) const {
  const HeaderExtension* e = header_.FindExtension(type);
  return e ? &e->data : nullptr;
}

Status Image::SetExtension(uint32_t type, std::vector<std::byte> data) {
  CBT_RETURN_IF_ERROR(RequireWritable("set header extension"));
  if (IsReservedExtension(type))
    return Status::InvalidArgument(ctx_ + ": header extension " + Hex(type) + " is reserved");
  Header next = header_;
  next.SetExtension(type, std::move(data));
  return SwitchHeader(std::move(next));
}

Status Image::RemoveExtension(uint32_t type) {
  CBT_RETURN_IF_ERROR(RequireWritable("remove header extension"));
  if (IsReservedExtension(type))
    return Status::InvalidArgument(ctx_ + ": header extension " + Hex(type) + " is reserved");
  Header next = header_;
  if (!next.RemoveExtension(type)) return Status::OK();
  return SwitchHeader(std::move(next));
}

Status Image::RewriteExtensionInPlace(uint32_t type, std::span<const std::byte> data) {
  CBT_RETURN_IF_ERROR(RequireWritable("rewrite header extension"));
  if (IsReservedExtension(type))
    return Status::InvalidArgument(ctx_ + ": header extension " + Hex(type) + " is reserved");
  HeaderExtension* ext = nullptr;
  for (HeaderExtension& e : header_.extensions)
    if (e.type == type) ext = &e;
  if (!ext) return Status::NotFound(ctx_ + ": no header extension " + Hex(type));
  if (ext->data.size() != data.size())
    return Status::InvalidArgument(ctx_ + ": header extension " + Hex(type) + ": size " +
                                   std::to_string(data.size()) + " differs from the stored " +
                                   std::to_string(ext->data.size()));
  // Find it where it sits on disk: QEMU may have reordered the extensions.
  const std::vector<std::byte>& h = header_on_disk_;
  uint64_t off = LoadBE32(h.data() + 100);  // header_length
  uint64_t at = 0;
  while (off + 8 <= h.size()) {
    uint32_t t = LoadBE32(h.data() + off);
    uint32_t len = LoadBE32(h.data() + off + 4);
    if (t == 0) break;
    if (t == type) {
      if (len != data.size() || off + 8 + len > h.size()) break;
      at = off + 8;
      break;
    }
    off += 8 + ((uint64_t{len} + 7) & ~uint64_t{7});
  }
  if (at == 0)
    return Status::Corruption(ctx_ + ": header extension " + Hex(type) + " not found in cluster 0");
  size_t first = data.size(), last = 0;
  for (size_t i = 0; i < data.size(); ++i) {
    if (h[at + i] != data[i]) {
      if (first == data.size()) first = i;
      last = i;
    }
  }
  if (first == data.size()) return Status::OK();
  CBT_RETURN_IF_ERROR(io_->pwrite(data.subspan(first, last - first + 1), at + first));
  std::copy(data.begin(), data.end(), header_on_disk_.begin() + static_cast<ptrdiff_t>(at));
  ext->data.assign(data.begin(), data.end());
  return Status::OK();
}

Status Image::AdoptInconsistent(std::string_view name) {
  int i = IndexOf(name);
  if (i < 0) return Find(name).status();
  if (!inconsistent_[i]) return Status::OK();
  const BitmapDirEntry& e = entries_[i];
  uint64_t want = ExpectedTableSize(virtual_size(), e.granularity_bits, header_.cluster_bits);
  if (e.table_size != want)
    return Status::Corruption(ctx_ + ": bitmap '" + e.name + "' has " +
                              std::to_string(e.table_size) + " table entries, the disk needs " +
                              std::to_string(want));
  inconsistent_[i] = false;
  return Status::OK();
}

Status Image::SetPrivateRecord(uint32_t type, std::vector<std::byte> data) {
  std::vector<PrivateRecordUpdate> u(1);
  u[0].type = type;
  u[0].data = std::move(data);
  return UpdatePrivateRecords(u);
}

Status Image::RemovePrivateRecord(uint32_t type) {
  std::vector<PrivateRecordUpdate> u(1);
  u[0].type = type;
  return UpdatePrivateRecords(u);
}

// One header switch. The bit vouches for every private record at once, so:
// records found unvouched (a program that does not know the bit wrote the
// file) are dropped before the bit is set again, never vouched by accident;
// the bit is cleared once no private record remains.
Status Image::UpdatePrivateRecords(std::span<const PrivateRecordUpdate> updates) {
  CBT_RETURN_IF_ERROR(RequireWritable("update private records"));
  for (const PrivateRecordUpdate& u : updates)
    if (IsReservedExtension(u.type) || !IsPrivateRecordType(u.type))
      return Status::InvalidArgument(ctx_ + ": header extension " + Hex(u.type) +
                                     " is not a private record type");
  Header next = header_;
  if (!(next.autoclear & kAutoclearCbtIntent))
    std::erase_if(next.extensions,
                  [](const HeaderExtension& e) { return IsPrivateRecordType(e.type); });
  for (const PrivateRecordUpdate& u : updates) {
    if (u.data)
      next.SetExtension(u.type, *u.data);
    else
      next.RemoveExtension(u.type);
  }
  const bool any =
      std::any_of(next.extensions.begin(), next.extensions.end(),
                  [](const HeaderExtension& e) { return IsPrivateRecordType(e.type); });
  if (any)
    next.autoclear |= kAutoclearCbtIntent;
  else
    next.autoclear &= ~kAutoclearCbtIntent;
  if (next.autoclear == header_.autoclear && next.extensions.size() == header_.extensions.size()) {
    bool same = true;
    for (size_t i = 0; same && i < next.extensions.size(); ++i)
      same = next.extensions[i].type == header_.extensions[i].type &&
             next.extensions[i].data == header_.extensions[i].data;
    if (same) return Status::OK();
  }
  return SwitchHeader(std::move(next));
}

bool Image::private_record_vouched() const {
  return header_.autoclear & kAutoclearCbtIntent;
}

}  // namespace cbt::qcow2
