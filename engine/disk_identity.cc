// Disk identity records: see disk_identity.h.
#include "engine/disk_identity.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>

#include "common/endian.h"
#include "qcow2/image.h"

namespace cbt {

namespace {

constexpr size_t kHeader = 16;
constexpr size_t kDiskFixed = 40;
constexpr size_t kEntryFixed = 8;

size_t Pad8(size_t n) {
  return (n + 7) & ~size_t{7};
}

Status Bad(const std::string& what, size_t at) {
  return Status::Corruption("disk identity record: " + what + " at byte " + std::to_string(at));
}

std::string Mtime(const DiskIdentity& id) {
  char ns[16];
  std::snprintf(ns, sizeof ns, "%09u", id.mtime_nsec);
  return std::to_string(id.mtime_sec) + "." + ns;
}

bool AllZero(std::span<const std::byte> s) {
  return std::all_of(s.begin(), s.end(), [](std::byte b) { return b == std::byte{0}; });
}

}  // namespace

Result<DiskIdentity> FileIdentity(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    return Status::NotSupported(path + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode))
    return Status::NotSupported(path +
                                ": not a regular file (a block device has no modification time "
                                "that follows its writes)");
  DiskIdentity id;
  id.path = path;
  id.dev = static_cast<uint64_t>(st.st_dev);
  id.ino = static_cast<uint64_t>(st.st_ino);
  id.size = static_cast<uint64_t>(st.st_size);
  id.mtime_sec = static_cast<int64_t>(st.st_mtim.tv_sec);
  id.mtime_nsec = static_cast<uint32_t>(st.st_mtim.tv_nsec);
  return id;
}

std::string DescribeIdentity(const DiskIdentity& id) {
  return id.path + " (dev " + std::to_string(id.dev) + ", inode " + std::to_string(id.ino) + ", " +
         std::to_string(id.size) + " bytes, mtime " + Mtime(id) + ")";
}

std::string DescribeContentChange(const DiskIdentity& was, const DiskIdentity& now) {
  std::string s;
  auto add = [&](const std::string& part) { s += (s.empty() ? "" : ", ") + part; };
  if (was.size != now.size)
    add("size " + std::to_string(was.size) + " -> " + std::to_string(now.size) + " bytes");
  if (was.mtime_sec != now.mtime_sec || was.mtime_nsec != now.mtime_nsec)
    add("mtime " + Mtime(was) + " -> " + Mtime(now));
  return s;
}

std::string DescribeIdentityChange(const DiskIdentity& was, const DiskIdentity& now) {
  std::string s;
  auto add = [&](const std::string& part) { s += (s.empty() ? "" : ", ") + part; };
  if (was.path != now.path) add("path " + was.path + " -> " + now.path);
  if (was.size != now.size)
    add("size " + std::to_string(was.size) + " -> " + std::to_string(now.size) + " bytes");
  if (was.mtime_sec != now.mtime_sec || was.mtime_nsec != now.mtime_nsec)
    add("mtime " + Mtime(was) + " -> " + Mtime(now));
  if (was.dev != now.dev || was.ino != now.ino)
    add("inode " + std::to_string(was.dev) + ":" + std::to_string(was.ino) + " -> " +
        std::to_string(now.dev) + ":" + std::to_string(now.ino) + " (another file)");
  return s;
}

bool IsAnotherFile(const DiskIdentity& was, const DiskIdentity& now) {
  return was.path != now.path && (was.dev != now.dev || was.ino != now.ino);
}

Result<IdentityRecord> IdentityRecord::Parse(std::span<const std::byte> rec) {
  if (rec.size() < kHeader)
    return Bad("truncated header (" + std::to_string(rec.size()) + " bytes)", 0);
  if (std::memcmp(rec.data(), "CBTD", 4) != 0) return Bad("bad magic", 0);
  const uint32_t version = LoadBE32(rec.data() + 4);
  if (version != kVersion)
    return Status::Corruption("disk identity record: unknown version " + std::to_string(version) +
                              " (this build reads version " + std::to_string(kVersion) + ")");
  const uint32_t nd = LoadBE32(rec.data() + 8);
  const uint32_t ne = LoadBE32(rec.data() + 12);
  if (nd == 0 || nd > kMaxDisks)
    return Bad("disk count " + std::to_string(nd) + " out of range", 8);
  if (ne == 0 || ne > kMaxEntries)
    return Bad("entry count " + std::to_string(ne) + " out of range", 12);
  size_t at = kHeader;
  std::vector<DiskIdentity> disks;
  for (uint32_t i = 0; i < nd; ++i) {
    if (rec.size() - at < kDiskFixed) return Bad("truncated disk entry", at);
    const std::byte* p = rec.data() + at;
    DiskIdentity d;
    d.dev = LoadBE64(p);
    d.ino = LoadBE64(p + 8);
    d.size = LoadBE64(p + 16);
    d.mtime_sec = static_cast<int64_t>(LoadBE64(p + 24));
    d.mtime_nsec = LoadBE32(p + 32);
    const uint16_t plen = LoadBE16(p + 36);
    if (d.mtime_nsec >= 1000000000u) return Bad("mtime nanoseconds out of range", at + 32);
    if (plen == 0 || plen > kMaxPath) return Bad("path length out of range", at + 36);
    if (LoadBE16(p + 38) != 0) return Bad("reserved field not zero", at + 38);
    const size_t span = kDiskFixed + Pad8(plen);
    if (rec.size() - at < span) return Bad("truncated path", at + kDiskFixed);
    d.path.assign(reinterpret_cast<const char*>(p + kDiskFixed), plen);
    if (d.path.find('\0') != std::string::npos || d.path[0] != '/')
      return Bad("path not absolute or holds a NUL", at + kDiskFixed);
    if (!AllZero(rec.subspan(at + kDiskFixed + plen, span - kDiskFixed - plen)))
      return Bad("padding not zero", at + kDiskFixed + plen);
    disks.push_back(std::move(d));
    at += span;
  }
  IdentityRecord r;
  std::set<std::string> names;
  std::vector<bool> used(nd, false);
  for (uint32_t i = 0; i < ne; ++i) {
    if (rec.size() - at < kEntryFixed) return Bad("truncated bitmap entry", at);
    const std::byte* p = rec.data() + at;
    const uint32_t disk = LoadBE32(p);
    const uint16_t nlen = LoadBE16(p + 4);
    if (disk >= nd) return Bad("disk index " + std::to_string(disk) + " out of range", at);
    if (nlen == 0 || nlen > kMaxName) return Bad("name length out of range", at + 4);
    if (LoadBE16(p + 6) != 0) return Bad("reserved field not zero", at + 6);
    const size_t span = kEntryFixed + Pad8(nlen);
    if (rec.size() - at < span) return Bad("truncated name", at + kEntryFixed);
    std::string name(reinterpret_cast<const char*>(p + kEntryFixed), nlen);
    if (!AllZero(rec.subspan(at + kEntryFixed + nlen, span - kEntryFixed - nlen)))
      return Bad("padding not zero", at + kEntryFixed + nlen);
    if (!names.insert(name).second) return Bad("bitmap '" + name + "' named twice", at);
    used[disk] = true;
    r.entries_.push_back({std::move(name), disks[disk]});
    at += span;
  }
  if (at != rec.size()) return Bad("trailing bytes", at);
  if (std::find(used.begin(), used.end(), false) != used.end())
    return Bad("a disk entry no bitmap names", kHeader);
  return r;
}

std::vector<std::byte> IdentityRecord::Serialize() const {
  std::vector<DiskIdentity> disks;
  std::vector<uint32_t> index;
  for (const Entry& e : entries_) {
    auto it = std::find(disks.begin(), disks.end(), e.id);
    index.push_back(static_cast<uint32_t>(it - disks.begin()));
    if (it == disks.end()) disks.push_back(e.id);
  }
  std::vector<std::byte> out(kHeader);
  std::memcpy(out.data(), "CBTD", 4);
  StoreBE32(out.data() + 4, kVersion);
  StoreBE32(out.data() + 8, static_cast<uint32_t>(disks.size()));
  StoreBE32(out.data() + 12, static_cast<uint32_t>(entries_.size()));
  for (const DiskIdentity& d : disks) {
    const size_t at = out.size();
    out.resize(at + kDiskFixed + Pad8(d.path.size()));
    std::byte* p = out.data() + at;
    StoreBE64(p, d.dev);
    StoreBE64(p + 8, d.ino);
    StoreBE64(p + 16, d.size);
    StoreBE64(p + 24, static_cast<uint64_t>(d.mtime_sec));
    StoreBE32(p + 32, d.mtime_nsec);
    StoreBE16(p + 36, static_cast<uint16_t>(d.path.size()));
    std::memcpy(p + kDiskFixed, d.path.data(), d.path.size());
  }
  for (size_t i = 0; i < entries_.size(); ++i) {
    const std::string& n = entries_[i].name;
    const size_t at = out.size();
    out.resize(at + kEntryFixed + Pad8(n.size()));
    std::byte* p = out.data() + at;
    StoreBE32(p, index[i]);
    StoreBE16(p + 4, static_cast<uint16_t>(n.size()));
    std::memcpy(p + kEntryFixed, n.data(), n.size());
  }
  return out;
}

const DiskIdentity* IdentityRecord::For(std::string_view name) const {
  for (const Entry& e : entries_)
    if (e.name == name) return &e.id;
  return nullptr;
}

Status IdentityRecord::Set(std::string_view name, const DiskIdentity& id) {
  if (name.empty() || name.size() > kMaxName)
    return Status::InvalidArgument("disk identity: bitmap name length out of range");
  if (id.path.empty() || id.path.size() > kMaxPath || id.path[0] != '/' ||
      id.path.find('\0') != std::string::npos)
    return Status::InvalidArgument("disk identity: path '" + id.path +
                                   "' is not absolute or longer than " + std::to_string(kMaxPath) +
                                   " bytes");
  if (id.mtime_nsec >= 1000000000u)
    return Status::InvalidArgument("disk identity: mtime nanoseconds out of range");
  for (Entry& e : entries_) {
    if (e.name == name) {
      e.id = id;
      return Status::OK();
    }
  }
  if (entries_.size() >= kMaxEntries)
    return Status::InvalidArgument("disk identity: too many bitmaps");
  entries_.push_back({std::string(name), id});
  return Status::OK();
}

void IdentityRecord::Remove(std::string_view name) {
  std::erase_if(entries_, [&](const Entry& e) { return e.name == name; });
}

void IdentityRecord::Retain(const std::vector<std::string>& keep) {
  std::erase_if(entries_, [&](const Entry& e) {
    return std::find(keep.begin(), keep.end(), e.name) == keep.end();
  });
}

std::vector<std::string> IdentityRecord::Names() const {
  std::vector<std::string> n;
  for (const Entry& e : entries_) n.push_back(e.name);
  return n;
}

Result<IdentityRecord> LoadIdentityRecord(const qcow2::Image& img) {
  const std::vector<std::byte>* rec = img.GetExtension(kIdentityExtensionType);
  if (!rec || !img.private_record_vouched()) return IdentityRecord{};
  return IdentityRecord::Parse(*rec);
}

Status UpdateBitmapIdentity(qcow2::Image& img, std::string_view bitmap, const DiskIdentity& id) {
  auto rec = LoadIdentityRecord(img);
  IdentityRecord r = rec.ok() ? std::move(rec).value() : IdentityRecord{};  // a bad one is replaced
  CBT_RETURN_IF_ERROR(r.Set(bitmap, id));
  std::vector<std::string> names;
  for (const qcow2::BitmapInfo& b : img.Bitmaps()) names.push_back(b.name);
  r.Retain(names);
  if (r.empty()) return img.RemovePrivateRecord(kIdentityExtensionType);
  return img.SetPrivateRecord(kIdentityExtensionType, r.Serialize());
}

IdentityVerdict JudgeDiskIdentity(const IdentityRecord& rec,
                                  const std::vector<qcow2::BitmapInfo>& bitmaps,
                                  const DiskIdentity& now) {
  IdentityVerdict v;
  for (const qcow2::BitmapInfo& info : bitmaps) {
    if (!info.enabled) continue;  // frozen: records nothing, misses nothing
    const DiskIdentity* was = info.consistent ? rec.For(info.name) : nullptr;
    if (!was) {
      v.missing.push_back(info.name);
      continue;
    }
    if (DescribeContentChange(*was, now).empty()) {
      // Same size and mtime: the same disk, perhaps moved or copied to
      // another path or host (recorded anew at the next clean stop).
      if (std::string d = DescribeIdentityChange(*was, now); !d.empty() && v.moved.empty())
        v.moved = d;
      continue;
    }
    v.changed.push_back(info.name);
    if (v.what.empty()) {
      v.what = DescribeIdentityChange(*was, now);
      v.was = *was;
    }
  }
  return v;
}

std::string QuotedNames(const std::vector<std::string>& names) {
  std::string s;
  for (const std::string& n : names) s += (s.empty() ? "'" : ", '") + n + "'";
  return s;
}

std::string UnknownIdentityNote(const std::string& reason) {
  return "the disk's identity cannot be known (" + reason +
         "): changes made to it while no tracker runs cannot be detected";
}

std::string MissingIdentityNote(const IdentityVerdict& v, const DiskIdentity& now) {
  return "no disk identity recorded for bitmap(s) " + QuotedNames(v.missing) +
         " (a container from before this check, an unclean stop, or another program wrote the "
         "container): changes made to " +
         now.path + " while no tracker ran cannot be detected this time";
}

std::string MovedDiskNote(const IdentityVerdict& v) {
  return "the disk moved (" + v.moved +
         ") with its size and modification time: taken as the same disk";
}

std::string ChangedDiskRefusal(const IdentityVerdict& v, const DiskIdentity& now,
                               const std::string& container, const std::string& compare,
                               const std::string& otherwise) {
  const std::string name = v.changed.size() == 1 ? v.changed[0] : "NAME";
  const std::string recover = "'cbt recover " + container + " --bitmap " + name + " --compare " +
                              compare + "' (or --mark-all: everything dirty)" +
                              (v.changed.size() > 1 ? " for each of them" : "");
  if (v.was && IsAnotherFile(*v.was, now)) {
    // Another path and another file: most likely the wrong container
    // (recovering it would hand one disk's bitmaps to another).
    return container + ": this container was made for disk " + v.was->path + " (inode " +
           std::to_string(v.was->ino) + "), not for " + now.path + ": use " + now.path +
           "'s own container (or create one); only if " + now.path + " is " + v.was->path +
           " moved and changed since (" + DescribeContentChange(*v.was, now) +
           "), make bitmap(s) " + QuotedNames(v.changed) + " match it with " + recover;
  }
  return "disk " + now.path + " changed while no tracker ran (" + v.what + "): bitmap(s) " +
         QuotedNames(v.changed) + " in " + container +
         " would miss those changes; make them match the disk with " + recover + ", or " +
         otherwise;
}

std::optional<std::string> RecordedDiskPath(const qcow2::Image& img,
                                            const std::string& container_path,
                                            std::string_view bitmap) {
  auto rec = LoadIdentityRecord(img);
  if (rec.ok())
    if (const DiskIdentity* id = rec->For(bitmap)) return id->path;
  std::string df = img.data_file();
  if (df.empty()) return std::nullopt;
  std::filesystem::path p(df);
  if (p.is_relative()) p = std::filesystem::absolute(container_path).parent_path() / p;
  return p.lexically_normal().string();
}

}  // namespace cbt
