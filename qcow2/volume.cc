// qcow2 Volume: opening, the L2 cache, reads and extents. Writes, zeroes,
// trims and flush are in volume_write.cc. See volume.h for the contract.
#include "qcow2/volume.h"

#include <algorithm>
#include <cstring>

#include "common/endian.h"
#include "common/posix_file.h"
#include "qcow2/compress.h"
#include "qcow2/format.h"
#include "qcow2/util.h"
#include "qcow2/volume_internal.h"

namespace cbt::qcow2 {

using internal::DivRoundUp;
using internal::Hex;

namespace {

constexpr uint64_t kDefaultCacheMax = 32u << 20;
constexpr uint64_t kL1ReservedMask = 0x7f000000000001ffull;  // bits 0..8, 56..62

// A raw backing file: bytes as they are, holes as holes.
class RawLayer final : public Layer {
 public:
  RawLayer(std::shared_ptr<BlockIO> io, uint64_t size) : io_(std::move(io)), size_(size) {}
  uint64_t size() const override { return size_; }
  Status Read(std::span<std::byte> out, uint64_t offset) override {
    uint64_t have = offset >= size_ ? 0 : std::min<uint64_t>(out.size(), size_ - offset);
    if (have) CBT_RETURN_IF_ERROR(io_->pread(out.first(have), offset));
    std::memset(out.data() + have, 0, out.size() - have);
    return Status::OK();
  }
  Status Extents(uint64_t offset, uint64_t len, std::vector<Extent>* out) override {
    uint64_t end = offset + len;
    while (offset < end) {
      if (offset >= size_) {
        AppendExtent(out, {offset, end - offset, kExtentHole | kExtentZero});
        break;
      }
      uint64_t n = std::min(end, size_) - offset;
      CBT_ASSIGN_OR_RETURN(BlockIO::Run r, io_->probe_run(offset, n));
      r.length = std::clamp<uint64_t>(r.length, 1, n);
      AppendExtent(out, {offset, r.length, r.hole ? kExtentHole | kExtentZero : 0u});
      offset += r.length;
    }
    return Status::OK();
  }

 private:
  std::shared_ptr<BlockIO> io_;
  uint64_t size_;
};

// Protocol prefixes ("nbd:", "https://") and JSON names are not files.
bool IsProtocolName(const std::string& name) {
  if (name.starts_with("json:")) return true;
  size_t colon = name.find(':');
  if (colon == std::string::npos || colon == 0) return false;
  size_t slash = name.find('/');
  return slash == std::string::npos || colon < slash;
}

std::string DirOf(const std::string& path) {
  size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string() : path.substr(0, slash + 1);
}

}  // namespace

void AppendExtent(std::vector<Extent>* out, Extent e) {
  if (e.length == 0) return;
  if (!out->empty() && out->back().flags == e.flags &&
      out->back().offset + out->back().length == e.offset) {
    out->back().length += e.length;
    return;
  }
  out->push_back(e);
}

Volume::Pin::~Pin() {
  Release();
}

void Volume::Pin::Release() {
  if (!v_) return;
  std::lock_guard lk(v_->mu_);
  auto it = v_->pins_.find(gen_);
  if (--it->second == 0) {
    v_->pins_.erase(it);
    v_->pin_cv_.notify_all();
  }
  v_ = nullptr;
}

Volume::Pin Volume::TakePin() {
  ++pins_[pin_gen_];
  return Pin(this, pin_gen_);
}

Volume::Volume(std::shared_ptr<BlockIO> io, std::string path, const VolumeOptions& opts)
    : io_(std::move(io)), path_(std::move(path)), opts_(opts) {
  if (!opts_.open_file) {
    opts_.open_file = [](const std::string& p) -> Result<std::shared_ptr<BlockIO>> {
      CBT_ASSIGN_OR_RETURN(auto f, PosixFile::Open(p, PosixFile::Mode::kReadOnly));
      return std::shared_ptr<BlockIO>(std::move(f));
    };
  }
}

Volume::~Volume() = default;

Result<std::unique_ptr<Volume>> Volume::Open(std::shared_ptr<BlockIO> io, const std::string& path,
                                             const VolumeOptions& opts) {
  std::unique_ptr<Volume> v(new Volume(std::move(io), path, opts));
  CBT_RETURN_IF_ERROR(v->Load(0));
  return v;
}

Status Volume::Load(uint32_t depth) {
  CBT_ASSIGN_OR_RETURN(uint64_t fsize, io_->size());
  CBT_ASSIGN_OR_RETURN(std::vector<std::byte> first, ReadHeaderCluster(*io_, path_));
  CBT_ASSIGN_OR_RETURN(header_, ParseHeader(first, path_));
  const Header& h = header_;
  const bool rw = opts_.writable;
  CBT_RETURN_IF_ERROR(CheckFeatures(h, rw, path_));
  if (h.crypt_method != 0)
    return Status::NotSupported(path_ + ": encrypted qcow2 images (" +
                                (h.crypt_method == 1 ? "AES" : "LUKS") + ") are not supported");
  if (h.incompatible & kIncompatExtendedL2)
    return Status::NotSupported(path_ +
                                ": extended L2 entries (extended_l2=on) are not supported; "
                                "convert with qemu-img convert -O qcow2 -o extended_l2=off");
  if (h.incompatible & kIncompatDataFile)
    return Status::NotSupported(
        path_ + ": the image keeps its data in an external data file ('" + h.DataFile() +
        "'); serve that file with the file plugin and the cbt filter instead");
  if (h.incompatible & kIncompatCompression) {
    if (h.header_tail.empty())
      return Status::Corruption(path_ + ": compression type bit set without the header field");
    compression_type_ = static_cast<uint32_t>(h.header_tail[0]);
    if (compression_type_ > kCompressionZstd)
      return Status::NotSupported(path_ + ": unknown compression type " +
                                  std::to_string(compression_type_));
  }
  if (rw && h.nb_snapshots > 0)
    return Status::NotSupported(path_ + ": the image has " + std::to_string(h.nb_snapshots) +
                                " internal snapshot(s); serve it read-only (-r) or delete them "
                                "with qemu-img snapshot -d");
  cs_ = h.cluster_size();
  cluster_bits_ = h.cluster_bits;
  l2_entries_ = cs_ / 8;
  size_ = h.qemu_size();
  file_size_ = fsize;
  high_water_ = fsize;
  const uint64_t need_l1 = DivRoundUp(size_, cs_ * l2_entries_);
  if (h.l1_size < need_l1)
    return Status::Corruption(path_ + ": L1 table has " + std::to_string(h.l1_size) +
                              " entries, the disk size needs " + std::to_string(need_l1));
  if (uint64_t{h.l1_size} * 8 > kMaxL1Bytes)
    return Status::Corruption(path_ + ": L1 table larger than 32 MiB");
  uint64_t budget =
      opts_.cache_bytes ? opts_.cache_bytes : std::min<uint64_t>(kDefaultCacheMax, need_l1 * cs_);
  cache_tables_ = std::max<uint64_t>(2, budget / cs_);
  CBT_RETURN_IF_ERROR(LoadL1());
  if (rw) {
    if (opts_.refcounts) {
      rc_ = opts_.refcounts;
      std::lock_guard rl(rc_->mu);
      if (!rc_->rc || rc_->rc->table_offset() != h.refcount_table_offset)
        return Status::InvalidArgument(path_ + ": the shared refcounts describe another file");
    } else {
      CBT_ASSIGN_OR_RETURN(
          auto rc, Refcounts::Load(io_.get(), h.cluster_bits, h.refcount_order,
                                   h.refcount_table_offset, h.refcount_table_clusters, path_));
      rc_ = std::make_shared<SharedRefcounts>();
      rc_->rc.emplace(std::move(rc));
    }
    {
      std::lock_guard rl(rc_->mu);
      CBT_RETURN_IF_ERROR(rc_->rc->CheckForAllocation());
    }
    CBT_RETURN_IF_ERROR(BuildMetadataMap());
  }
  return OpenBacking(depth);
}

Status Volume::LoadL1() {
  const Header& h = header_;
  if (h.l1_size == 0) return Status::OK();
  if (h.l1_table_offset % cs_ != 0)
    return Status::Corruption(path_ + ": L1 table offset " + Hex(h.l1_table_offset) +
                              " is not cluster aligned");
  CBT_ASSIGN_OR_RETURN(uint64_t fsize, io_->size());
  if (h.l1_table_offset > fsize || uint64_t{h.l1_size} * 8 > fsize - h.l1_table_offset)
    return Status::Corruption(path_ + ": L1 table truncated");
  std::vector<std::byte> buf(uint64_t{h.l1_size} * 8);
  Status s = io_->pread(buf, h.l1_table_offset);
  if (s.IsOutOfRange()) return Status::Corruption(path_ + ": L1 table truncated");
  CBT_RETURN_IF_ERROR(s);
  l1_.resize(h.l1_size);
  for (uint64_t i = 0; i < l1_.size(); ++i) {
    uint64_t e = LoadBE64(buf.data() + i * 8);
    uint64_t off = e & kL1OffsetMask;
    if ((e & kL1ReservedMask) || off % cs_ != 0)
      return Status::Corruption(path_ + ": L1 entry " + std::to_string(i) + " (" + Hex(e) +
                                ") is malformed");
    if (opts_.writable && off && !(e & kOflagCopied))
      return Status::NotSupported(path_ + ": L2 table " + std::to_string(i) +
                                  " is shared (internal snapshots); serve it read-only (-r)");
    l1_[i] = e;
  }
  return Status::OK();
}

namespace {
void AddRange(std::map<uint64_t, uint64_t>& m, uint64_t host, uint64_t len, uint64_t cs) {
  if (len == 0) return;
  uint64_t end = host + DivRoundUp(len, cs) * cs;
  auto [it, inserted] = m.emplace(host, end);
  if (!inserted) it->second = std::max(it->second, end);
}
bool Overlaps(const std::map<uint64_t, uint64_t>& m, uint64_t host, uint64_t len) {
  auto it = m.upper_bound(host + len - 1);
  if (it == m.begin()) return false;
  return std::prev(it)->second > host;
}
}  // namespace

void Volume::AddMetadata(uint64_t host, uint64_t len) {
  AddRange(metadata_, host, len, cs_);
}

bool Volume::IsMetadata(uint64_t host, uint64_t len) const {
  return Overlaps(metadata_, host, len) || Overlaps(refcount_meta_, host, len);
}

Status Volume::BuildMetadataMap() {
  const Header& h = header_;
  AddMetadata(0, cs_);
  AddMetadata(h.l1_table_offset, uint64_t{h.l1_size} * 8);
  for (uint64_t e : l1_)
    if (e & kL1OffsetMask) AddMetadata(e & kL1OffsetMask, cs_);
  // Bitmap clusters are left out: with internal bitmaps they move and are
  // freed by the bitmap code, and their refcounts keep them from us.
  std::lock_guard rl(rc_->mu);
  NoteRefcountStructure();
  return Status::OK();
}

void Volume::NoteRefcountStructure() {
  const Refcounts& rc = *rc_->rc;
  if (!refcount_meta_.empty() && rc.structure_changes() == refblocks_seen_) return;
  // Rebuilt whole: a table move frees the old table's clusters.
  refblocks_seen_ = rc.structure_changes();
  refcount_meta_.clear();
  AddRange(refcount_meta_, rc.table_offset(), uint64_t{rc.table_clusters()} * cs_, cs_);
  for (uint64_t b : rc.table())
    if (b) AddRange(refcount_meta_, b, cs_, cs_);
}

Status Volume::OpenBacking(uint32_t depth) {
  std::string name = header_.backing_file;
  std::string format;
  if (const HeaderExtension* e = header_.FindExtension(kExtBackingFormat))
    format.assign(reinterpret_cast<const char*>(e->data.data()), e->data.size());
  std::string resolved;
  if (depth == 0 && opts_.backing == kRefuseBacking) {
    if (!name.empty())
      return Status::NotSupported(path_ + ": the image names backing file '" + name +
                                  "' and backing=refuse was given");
    return Status::OK();
  }
  if (depth == 0 && !opts_.backing.empty()) {
    resolved = opts_.backing;  // as the user gave it
  } else {
    if (name.empty()) return Status::OK();
    if (IsProtocolName(name))
      return Status::NotSupported(path_ + ": backing file '" + name +
                                  "' is not a local file name; give backing=PATH");
    resolved = name.starts_with("/") ? name : DirOf(path_) + name;
  }
  if (depth == 0 && !opts_.backing_format.empty()) format = opts_.backing_format;
  if (depth + 1 > opts_.max_backing_depth)
    return Status::NotSupported(path_ + ": backing chain deeper than " +
                                std::to_string(opts_.max_backing_depth) + " images");
  CBT_ASSIGN_OR_RETURN(std::shared_ptr<BlockIO> bio, opts_.open_file(resolved));
  if (format.empty()) {
    // No format recorded: only the qcow2 magic counts; anything else is raw.
    std::byte magic[4]{};
    Status s = bio->pread(magic, 0);
    format = s.ok() && LoadBE32(magic) == kMagic ? "qcow2" : "raw";
    backing_desc_ = resolved + " (" + format + ", format not recorded)";
  } else {
    backing_desc_ = resolved + " (" + format + ")";
  }
  if (format == "raw") {
    CBT_ASSIGN_OR_RETURN(uint64_t bsize, bio->size());
    backing_ = std::make_unique<RawLayer>(std::move(bio), bsize);
    return Status::OK();
  }
  if (format != "qcow2")
    return Status::NotSupported(path_ + ": backing file '" + resolved + "' has format '" + format +
                                "'; only raw and qcow2 are supported");
  VolumeOptions child;
  child.open_file = opts_.open_file;
  child.max_backing_depth = opts_.max_backing_depth;
  std::unique_ptr<Volume> v(new Volume(std::move(bio), resolved, child));
  CBT_RETURN_IF_ERROR(v->Load(depth + 1));
  if (!v->backing_desc_.empty()) backing_desc_ += " <- " + v->backing_desc_;
  backing_ = std::move(v);
  return Status::OK();
}

// --- reads (no lock held) ---

Status Volume::ReadHost(std::span<std::byte> out, uint64_t host) {
  Status s = io_->pread(out, host);
  if (!s.IsOutOfRange()) return s;
  // The last cluster of a file may be partly past its end: zeros, as QEMU.
  CBT_ASSIGN_OR_RETURN(uint64_t fsize, io_->size());
  uint64_t have = host >= fsize ? 0 : std::min<uint64_t>(out.size(), fsize - host);
  if (have) CBT_RETURN_IF_ERROR(io_->pread(out.first(have), host));
  std::memset(out.data() + have, 0, out.size() - have);
  return Status::OK();
}

Status Volume::ReadCompressed(const Mapping& m, std::span<std::byte> cluster) {
  std::vector<std::byte> in(m.csize);
  CBT_RETURN_IF_ERROR(ReadHost(in, m.host));
  return Decompress(compression_type_, in, cluster)
      .WithContext(path_ + ": cluster at host offset " + Hex(m.host));
}

Status Volume::ReadBelow(std::span<std::byte> out, uint64_t offset) {
  if (backing_) return backing_->Read(out, offset);
  std::memset(out.data(), 0, out.size());
  return Status::OK();
}

Status Volume::Read(std::span<std::byte> out, uint64_t offset) {
  // Past the end (only as a backing file): zeros.
  uint64_t have = offset >= size_ ? 0 : std::min<uint64_t>(out.size(), size_ - offset);
  std::memset(out.data() + have, 0, out.size() - have);
  uint64_t done = 0;
  std::vector<std::byte> tmp;
  while (done < have) {
    uint64_t off = offset + done;
    uint64_t gc = off / cs_, in = off % cs_;
    uint64_t n = std::min(cs_ - in, have - done);
    Pin pin;
    std::unique_lock lk(mu_);
    CBT_ASSIGN_OR_RETURN(bool dropped, LoadL2(gc / l2_entries_, lk));
    (void)dropped;  // nothing looked up before: no state to re-validate
    CBT_ASSIGN_OR_RETURN(Mapping m, Lookup(gc));
    // Extend over host-contiguous clusters: one read for a whole run.
    n = ExtendRun(m, gc, in, n, have - done, 8u << 20);
    if (m.kind == Kind::kNormal || m.kind == Kind::kCompressed) pin = TakePin();
    lk.unlock();
    auto part = out.subspan(done, n);
    switch (m.kind) {
      case Kind::kNormal:
        CBT_RETURN_IF_ERROR(ReadHost(part, m.host + in));
        break;
      case Kind::kCompressed:
        tmp.resize(cs_);
        CBT_RETURN_IF_ERROR(ReadCompressed(m, tmp));
        std::memcpy(part.data(), tmp.data() + in, n);
        break;
      case Kind::kZeroPlain:
      case Kind::kZeroAlloc:
        std::memset(part.data(), 0, n);
        break;
      case Kind::kUnallocated:
        CBT_RETURN_IF_ERROR(ReadBelow(part, off));
        break;
    }
    done += n;
  }
  return Status::OK();
}

// QEMU (qcow2_detect_metadata_preallocation, once per open image) looks at
// host holes inside data clusters only when more clusters have a refcount
// than the file has storage for (metadata preallocation, or sparse data
// clusters); otherwise a data cluster is data. We decide the same way, so
// that extents match qemu-nbd's on the same image.
Result<bool> Volume::LooksMetadataPreallocated() {
  CBT_ASSIGN_OR_RETURN(uint64_t flen, io_->size());
  CBT_ASSIGN_OR_RETURN(uint64_t real, io_->allocated_bytes());
  const uint64_t real_clusters = real / cs_;
  const uint64_t threshold = std::max(real_clusters * 10 / 9, real_clusters + 2);
  std::optional<Refcounts> own;
  Refcounts* rc = nullptr;
  std::unique_lock<std::mutex> rl;
  if (rc_) {
    rl = std::unique_lock(rc_->mu);
    rc = &*rc_->rc;
  } else {
    const Header& h = header_;
    CBT_ASSIGN_OR_RETURN(
        auto r, Refcounts::Load(io_.get(), h.cluster_bits, h.refcount_order,
                                h.refcount_table_offset, h.refcount_table_clusters, path_));
    own.emplace(std::move(r));
    rc = &*own;
  }
  uint64_t count = 0;
  const uint64_t end = DivRoundUp(flen, cs_);
  for (uint64_t i = 0; i < end && count < threshold; ++i) {
    CBT_ASSIGN_OR_RETURN(uint64_t v, rc->Get(i));
    count += v != 0;
  }
  return count >= threshold;
}

Status Volume::Extents(uint64_t offset, uint64_t len, std::vector<Extent>* out) {
  int host_holes;
  {
    // Its own lock: the probe reads the file (and, read-only, refcounts).
    std::lock_guard hl(holes_mu_);
    if (host_holes_ < 0) {
      CBT_ASSIGN_OR_RETURN(bool p, LooksMetadataPreallocated());
      host_holes_ = p ? 1 : 0;
    }
    host_holes = host_holes_;
  }
  const uint64_t end = offset + len;
  const uint64_t vend = std::min(end, size_);
  uint64_t off = offset;
  while (off < vend) {
    uint64_t gc = off / cs_, in = off % cs_;
    uint64_t n = std::min(cs_ - in, vend - off);
    Mapping m;
    {
      std::unique_lock lk(mu_);
      uint64_t l1i = gc / l2_entries_;
      CBT_ASSIGN_OR_RETURN(bool dropped, LoadL2(l1i, lk));
      (void)dropped;  // nothing looked up before: no state to re-validate
      if (!(l1_[l1i] & kL1OffsetMask) && !l2_.count(l1i)) {
        // No L2 table: the whole range it would cover is unallocated.
        n = std::min((l1i + 1) * l2_entries_ * cs_, vend) - off;
      } else {
        CBT_ASSIGN_OR_RETURN(m, Lookup(gc));
        // A run of host-contiguous normal clusters is probed at once.
        n = ExtendRun(m, gc, in, n, vend - off, UINT64_MAX);
      }
    }
    switch (m.kind) {
      case Kind::kNormal: {
        if (!host_holes) {
          AppendExtent(out, {off, n, 0});
          break;
        }
        // QEMU reports allocated clusters over host holes as zero (not hole).
        uint64_t host = m.host + in, left = n, at = off;
        while (left) {
          CBT_ASSIGN_OR_RETURN(BlockIO::Run r, io_->probe_run(host, left));
          r.length = std::clamp<uint64_t>(r.length, 1, left);
          AppendExtent(out, {at, r.length, r.hole ? kExtentZero : 0u});
          host += r.length, at += r.length, left -= r.length;
        }
        break;
      }
      case Kind::kCompressed:
        AppendExtent(out, {off, n, 0});
        break;
      case Kind::kZeroPlain:
      case Kind::kZeroAlloc:
        AppendExtent(out, {off, n, kExtentHole | kExtentZero});
        break;
      case Kind::kUnallocated:
        if (backing_)
          CBT_RETURN_IF_ERROR(backing_->Extents(off, n, out));
        else
          AppendExtent(out, {off, n, kExtentHole | kExtentZero});
        break;
    }
    off += n;
  }
  if (vend < end)
    AppendExtent(out,
                 {std::max(offset, vend), end - std::max(offset, vend), kExtentHole | kExtentZero});
  return Status::OK();
}

VolumeStats Volume::stats() const {
  std::lock_guard lk(mu_);
  return stats_;
}

}  // namespace cbt::qcow2
