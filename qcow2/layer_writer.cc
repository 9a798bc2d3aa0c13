// LayerWriter: see layer_writer.h and docs/format.md ("Backup layers").
#include "qcow2/layer_writer.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "common/endian.h"
#include "qcow2/format.h"
#include "qcow2/util.h"

namespace cbt::qcow2 {

using internal::DivRoundUp;
using internal::Hex;

namespace {

// Faster than a byte loop: a buffer is all zero iff its first byte is zero
// and it equals itself shifted by one byte.
bool IsZero(const std::byte* p, size_t n) {
  if (n == 0) return true;
  if (p[0] != std::byte{0}) return false;
  return std::memcmp(p, p + 1, n - 1) == 0;
}

std::vector<std::byte> Bytes(const std::string& s) {
  const auto* p = reinterpret_cast<const std::byte*>(s.data());
  return {p, p + s.size()};
}

}  // namespace

Result<std::unique_ptr<LayerWriter>> LayerWriter::Create(std::shared_ptr<BlockIO> io,
                                                         const LayerOptions& opts) {
  const uint64_t cs = opts.cluster_size;
  if (cs < (uint64_t{1} << kMinClusterBits) || cs > (uint64_t{1} << kMaxClusterBits) ||
      (cs & (cs - 1)) != 0)
    return Status::InvalidArgument("layer: cluster size " + std::to_string(cs) +
                                   " must be a power of two from 512 bytes to 2 MiB");
  uint32_t cbits = 0;
  while ((uint64_t{1} << cbits) < cs) ++cbits;
  if (opts.virtual_size > (uint64_t{1} << 62))
    return Status::InvalidArgument("layer: virtual size " + std::to_string(opts.virtual_size) +
                                   " too large");
  const uint64_t size = (opts.virtual_size + kSectorSize - 1) & ~(kSectorSize - 1);
  const uint64_t l2_entries = cs / 8;
  const uint64_t l1_size = DivRoundUp(size, cs * l2_entries);
  if (l1_size * 8 > kMaxL1Bytes)
    return Status::InvalidArgument("layer: virtual size " + std::to_string(size) +
                                   " too large for cluster size " + std::to_string(cs) +
                                   " (L1 table over QEMU's 32 MiB limit)");
  if (opts.backing_file.empty() != opts.backing_format.empty())
    return Status::InvalidArgument(
        opts.backing_file.empty()
            ? "layer: backing format '" + opts.backing_format + "' given without a backing file"
            : "layer: backing file '" + opts.backing_file + "' needs a backing format");
  if (!opts.backing_format.empty() && opts.backing_format != "qcow2" &&
      opts.backing_format != "raw")
    return Status::InvalidArgument("layer: backing format '" + opts.backing_format +
                                   "' is neither 'qcow2' nor 'raw'");
  if (opts.backing_file.size() > kMaxBackingFileSize)
    return Status::InvalidArgument("layer: backing file name longer than " +
                                   std::to_string(kMaxBackingFileSize) + " bytes");
  if (opts.backing_file.find('\0') != std::string::npos)
    return Status::InvalidArgument("layer: backing file name contains a NUL byte");

  Header h;
  h.version = 3;
  h.cluster_bits = cbits;
  h.size = size;
  h.l1_size = static_cast<uint32_t>(l1_size);
  h.refcount_order = kDefaultRefcountOrder;
  h.header_length = kOurHeaderLength;
  h.header_tail.assign(kOurHeaderLength - kV3MinHeaderLength, std::byte{0});
  h.backing_file = opts.backing_file;
  if (!opts.backing_format.empty()) h.SetExtension(kExtBackingFormat, Bytes(opts.backing_format));
  // Refuses now what would not fit into cluster 0 at Finish().
  if (auto hb = SerializeHeader(h); !hb.ok()) return std::move(hb).status().WithContext("layer");

  CBT_ASSIGN_OR_RETURN(uint64_t existing, io->size());
  if (existing != 0)
    return Status::InvalidArgument(std::string(io->name()) +
                                   ": refusing to write a layer over a non-empty file");
  return std::unique_ptr<LayerWriter>(
      new LayerWriter(std::move(io), opts, cbits, size, l1_size, std::move(h)));
}

LayerWriter::LayerWriter(std::shared_ptr<BlockIO> io, const LayerOptions& opts,
                         uint32_t cluster_bits, uint64_t size, uint64_t l1_size, Header header)
    : io_(std::move(io)),
      ctx_(io_->name()),
      cluster_bits_(cluster_bits),
      cs_(uint64_t{1} << cluster_bits),
      requested_size_(opts.virtual_size),
      size_(size),
      guest_clusters_(DivRoundUp(size, uint64_t{1} << cluster_bits)),
      l2_entries_((uint64_t{1} << cluster_bits) / 8),
      l1_size_(l1_size),
      header_(std::move(header)) {}

LayerWriter::~LayerWriter() = default;

uint64_t LayerWriter::data_clusters() const {
  std::lock_guard<std::mutex> lock(mu_);
  return data_clusters_;
}

uint64_t LayerWriter::zero_clusters() const {
  std::lock_guard<std::mutex> lock(mu_);
  return zero_clusters_;
}

Status LayerWriter::CheckRange(const char* op, uint64_t offset, uint64_t length, uint64_t* first,
                               uint64_t* count) const {
  auto bad = [&](const std::string& why) {
    return Status::InvalidArgument(ctx_ + ": " + op + " [" + Hex(offset) + ", +" + Hex(length) +
                                   "): " + why);
  };
  if (offset % cs_ != 0) return bad("offset not aligned to the cluster size " + Hex(cs_));
  if (offset > size_ || length > size_ - offset)
    return bad("past the end of the virtual size " + Hex(size_));
  const uint64_t end = offset + length;
  // The last piece may end at the disk's size (as given, or rounded to 512).
  if (length % cs_ != 0 && end != requested_size_ && end != size_)
    return bad("length not a multiple of the cluster size " + Hex(cs_) +
               " and not ending at the virtual size");
  *first = offset >> cluster_bits_;
  *count = DivRoundUp(length, cs_);
  return Status::OK();
}

Status LayerWriter::StateLocked(const char* op) const {
  if (!failed_.ok()) return failed_.WithContext(ctx_ + ": " + op + ": an earlier write failed");
  if (finished_) return Status::InvalidArgument(ctx_ + ": " + op + ": layer already finished");
  return Status::OK();
}

uint64_t* LayerWriter::EntryLocked(uint64_t g) {
  std::vector<uint64_t>& t = l2_[g / l2_entries_];
  if (t.empty()) t.assign(l2_entries_, 0);
  return &t[g % l2_entries_];
}

Status LayerWriter::CheckUnwrittenLocked(const char* op, uint64_t first, uint64_t count) const {
  uint64_t g = first;
  const uint64_t end = first + count;
  while (g < end) {
    const uint64_t l1 = g / l2_entries_;
    const uint64_t table_end = std::min(end, (l1 + 1) * l2_entries_);
    auto it = l2_.find(l1);
    if (it == l2_.end()) {
      g = table_end;
      continue;
    }
    for (; g < table_end; ++g)
      if (it->second[g % l2_entries_] != 0)
        return Status::InvalidArgument(ctx_ + ": " + op + ": cluster at " + Hex(g * cs_) +
                                       " written twice");
  }
  return Status::OK();
}

Status LayerWriter::WriteData(uint64_t offset, std::span<const std::byte> data) {
  uint64_t first = 0, count = 0;
  CBT_RETURN_IF_ERROR(CheckRange("write", offset, data.size(), &first, &count));
  if (count == 0) {
    std::lock_guard<std::mutex> lock(mu_);
    return StateLocked("write");
  }
  // Zero detection outside the lock: it reads every byte.
  std::vector<bool> zero(count);
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t n = std::min<uint64_t>(cs_, data.size() - i * cs_);
    zero[i] = IsZero(data.data() + i * cs_, n);
  }
  const auto ndata = static_cast<uint64_t>(std::count(zero.begin(), zero.end(), false));

  uint64_t host = 0;  // first allocated host cluster; the data clusters follow in guest order
  {
    std::lock_guard<std::mutex> lock(mu_);
    CBT_RETURN_IF_ERROR(StateLocked("write"));
    CBT_RETURN_IF_ERROR(CheckUnwrittenLocked("write", first, count));
    host = next_cluster_;
    next_cluster_ += ndata;
    uint64_t h = host;
    for (uint64_t i = 0; i < count; ++i)
      *EntryLocked(first + i) = zero[i] ? kOflagZero : (kOflagCopied | ((h++) << cluster_bits_));
    data_clusters_ += ndata;
    zero_clusters_ += count - ndata;
    if (ndata == 0) return Status::OK();
    ++in_flight_;
  }

  // Runs of consecutive data clusters are contiguous on the host: one pwrite
  // each. A partial last cluster is padded with zeros to a whole cluster.
  Status st;
  uint64_t h = host;
  for (uint64_t i = 0; i < count && st.ok();) {
    if (zero[i]) {
      ++i;
      continue;
    }
    uint64_t j = i;
    while (j < count && !zero[j]) ++j;
    const uint64_t begin = i * cs_;
    const uint64_t len = std::min<uint64_t>(j * cs_, data.size()) - begin;
    const uint64_t whole = len / cs_ * cs_;
    if (whole > 0) st = io_->pwrite(data.subspan(begin, whole), h << cluster_bits_);
    if (st.ok() && whole < len) {
      std::vector<std::byte> pad(cs_, std::byte{0});
      std::copy_n(data.data() + begin + whole, len - whole, pad.data());
      st = io_->pwrite(pad, (h << cluster_bits_) + whole);
    }
    h += j - i;
    i = j;
  }

  std::lock_guard<std::mutex> lock(mu_);
  --in_flight_;
  if (!st.ok()) {
    st = st.WithContext(ctx_ + ": write at " + Hex(offset));
    if (failed_.ok()) failed_ = st;
  }
  return st;
}

Status LayerWriter::WriteZeroes(uint64_t offset, uint64_t length) {
  uint64_t first = 0, count = 0;
  CBT_RETURN_IF_ERROR(CheckRange("write zeroes", offset, length, &first, &count));
  std::lock_guard<std::mutex> lock(mu_);
  CBT_RETURN_IF_ERROR(StateLocked("write zeroes"));
  CBT_RETURN_IF_ERROR(CheckUnwrittenLocked("write zeroes", first, count));
  for (uint64_t i = 0; i < count; ++i) *EntryLocked(first + i) = kOflagZero;
  zero_clusters_ += count;
  return Status::OK();
}

Status LayerWriter::Finish() {
  std::lock_guard<std::mutex> lock(mu_);
  CBT_RETURN_IF_ERROR(StateLocked("finish"));
  if (in_flight_ != 0)
    return Status::InvalidArgument(ctx_ + ": finish: " + std::to_string(in_flight_) +
                                   " writes still in flight");
  // Whatever happens now, no more writes: a failed Finish leaves an invalid file.
  finished_ = true;
  Status st = WriteMetadata();
  if (!st.ok()) failed_ = st;
  return st;
}

// REQUIRES: mu_ held, no write in flight.
Status LayerWriter::WriteMetadata() {
  const uint64_t cs = cs_;
  // Host layout after the data clusters [1, next_cluster_):
  //   L2 tables (one per used L1 entry, in L1 order), L1 table, refcount
  //   blocks, refcount table. Every cluster in [0, total) has refcount 1.
  const uint64_t l2_off = next_cluster_ * cs;
  const uint64_t n_l2 = l2_.size();
  const uint64_t l1_off = l2_off + n_l2 * cs;
  // QEMU counts only l1_size * 8 bytes as the L1 table: a zero-sized disk
  // has no L1 cluster (and offset 0, as qemu-img create writes it).
  const uint64_t l1_clusters = DivRoundUp(l1_size_ * 8, cs);
  const uint64_t before_refcounts = next_cluster_ + n_l2 + l1_clusters;
  const uint64_t epb = cs * 8 / (uint64_t{1} << kDefaultRefcountOrder);
  // Fixed point: the refcount blocks and table count themselves.
  uint64_t blocks = 1, tclusters = 1;
  for (;;) {
    const uint64_t total = before_refcounts + blocks + tclusters;
    const uint64_t nb = DivRoundUp(total, epb);
    const uint64_t nt = DivRoundUp(nb * 8, cs);
    if (nb == blocks && nt == tclusters) break;
    blocks = std::max(blocks, nb);
    tclusters = std::max(tclusters, nt);
  }
  if (tclusters * cs > kMaxRefcountTableBytes)
    return Status::NotSupported(ctx_ + ": finish: refcount table of " +
                                std::to_string(tclusters * cs) +
                                " bytes over QEMU's 8 MiB limit; use a larger cluster size");
  const uint64_t total = before_refcounts + blocks + tclusters;
  const uint64_t blocks_off = l1_off + l1_clusters * cs;
  const uint64_t table_off = blocks_off + blocks * cs;

  // L2 tables, in batches of up to 1 MiB per pwrite.
  std::vector<uint64_t> l1(l1_size_, 0);
  {
    const uint64_t per_batch = std::max<uint64_t>(1, (uint64_t{1} << 20) / cs);
    std::vector<std::byte> buf;
    buf.reserve(per_batch * cs);
    uint64_t batch_off = l2_off;
    uint64_t off = l2_off;
    for (const auto& [index, table] : l2_) {
      const size_t at = buf.size();
      buf.resize(at + cs);
      for (uint64_t j = 0; j < l2_entries_; ++j) StoreBE64(buf.data() + at + 8 * j, table[j]);
      l1[index] = kOflagCopied | off;
      off += cs;
      if (buf.size() >= per_batch * cs) {
        CBT_RETURN_IF_ERROR(io_->pwrite(buf, batch_off));
        batch_off = off;
        buf.clear();
      }
    }
    if (!buf.empty()) CBT_RETURN_IF_ERROR(io_->pwrite(buf, batch_off));
  }
  if (l1_clusters > 0) {
    std::vector<std::byte> buf(l1_clusters * cs, std::byte{0});
    for (uint64_t i = 0; i < l1_size_; ++i) StoreBE64(buf.data() + 8 * i, l1[i]);
    CBT_RETURN_IF_ERROR(io_->pwrite(buf, l1_off));
  }
  {
    std::vector<std::byte> buf(cs);
    for (uint64_t b = 0; b < blocks; ++b) {
      std::fill(buf.begin(), buf.end(), std::byte{0});
      for (uint64_t e = 0; e < epb && b * epb + e < total; ++e) StoreBE16(buf.data() + 2 * e, 1);
      CBT_RETURN_IF_ERROR(io_->pwrite(buf, blocks_off + b * cs));
    }
  }
  {
    std::vector<std::byte> buf(tclusters * cs, std::byte{0});
    for (uint64_t b = 0; b < blocks; ++b) StoreBE64(buf.data() + 8 * b, blocks_off + b * cs);
    CBT_RETURN_IF_ERROR(io_->pwrite(buf, table_off));
  }

  Header h = header_;
  h.l1_table_offset = l1_clusters > 0 ? l1_off : 0;
  h.refcount_table_offset = table_off;
  h.refcount_table_clusters = static_cast<uint32_t>(tclusters);
  CBT_ASSIGN_OR_RETURN(std::vector<std::byte> hbytes, SerializeHeader(h));
  hbytes.resize(cs, std::byte{0});
  // Everything the header points at is durable before the header exists.
  CBT_RETURN_IF_ERROR(io_->flush());
  CBT_RETURN_IF_ERROR(io_->pwrite(hbytes, 0));
  return io_->flush();
}

}  // namespace cbt::qcow2
