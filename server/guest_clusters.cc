#include "server/guest_clusters.h"

#include <algorithm>
#include <span>
#include <vector>

#include "common/endian.h"
#include "qcow2/format.h"

namespace cbt::cli {

namespace {

// Reads out at offset; bytes past the end of the file read as zeros.
Status ReadPadded(BlockIO* io, std::span<std::byte> out, uint64_t offset, uint64_t fsize) {
  std::fill(out.begin(), out.end(), std::byte{0});
  if (offset >= fsize) return Status::OK();
  const uint64_t have = std::min<uint64_t>(out.size(), fsize - offset);
  return io->pread(out.first(have), offset);
}

}  // namespace

Result<GuestClusters> CountGuestClusters(qcow2::Image& img) {
  using namespace qcow2;
  const Header& h = img.header();
  const uint64_t cs = img.cluster_size();
  GuestClusters out;
  out.total = (img.virtual_size() + cs - 1) / cs;
  if (h.l1_size == 0) return out;
  CBT_ASSIGN_OR_RETURN(uint64_t fsize, img.io()->size());
  std::vector<std::byte> l1(uint64_t{h.l1_size} * 8);
  CBT_RETURN_IF_ERROR(ReadPadded(img.io(), l1, h.l1_table_offset, fsize));
  const bool subclusters = h.incompatible & kIncompatExtendedL2;
  const bool data_file = h.incompatible & kIncompatDataFile;
  const uint64_t entry_bytes = subclusters ? 16 : 8;
  std::vector<std::byte> l2(cs);
  for (uint64_t i = 0; i < h.l1_size; ++i) {
    const uint64_t l2_off = LoadBE64(l1.data() + 8 * i) & kL1OffsetMask;
    if (!l2_off || l2_off % cs) continue;
    CBT_RETURN_IF_ERROR(ReadPadded(img.io(), l2, l2_off, fsize));
    for (uint64_t j = 0; j < cs / entry_bytes; ++j) {
      const uint64_t e = LoadBE64(l2.data() + j * entry_bytes);
      const bool offset = e & kL2OffsetMask;
      bool allocated;  // qcow2_get_cluster_type: compressed, zero-alloc, normal
      if (e & kOflagCompressed)
        allocated = true;
      else if ((e & kOflagZero) && !subclusters)
        allocated = offset;
      else
        allocated = offset || (data_file && (e & kOflagCopied));
      out.allocated += allocated;
    }
  }
  return out;
}

}  // namespace cbt::cli
