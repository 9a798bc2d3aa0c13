// Disk identity: what a clean stop of tracking records about the disk, so
// that the next start can tell whether another program changed it while no
// tracker ran (docs/crash-safety.md, "Changes made while no tracker runs").
//
// For a file: device, inode, size and modification time (ns), taken after
// the last change was written, and its path. Stored in the container as a
// private qcow2 header extension (kIdentityExtensionType), vouched for by
// qcow2::kAutoclearCbtIntent like the crash-safety record; one entry per
// enabled bitmap, each naming the disk identity it is valid for, so that
// recovering one bitmap makes that one usable while the others stay refused.
//
// Record format (integers big-endian; docs/format.md):
//    0  4  magic "CBTD"
//    4  4  version (1)
//    8  4  number of disks d (1..kMaxDisks)
//   12  4  number of bitmap entries e (1..kMaxEntries)
//   16     d disk entries, each:
//            0 8 st_dev, 8 8 st_ino, 16 8 size in bytes,
//           24 8 mtime seconds (signed), 32 4 mtime nanoseconds (< 10^9),
//           36 2 path length p (1..kMaxPath), 38 2 reserved (zero),
//           40 p path (absolute, no NUL), zero-padded to a multiple of 8
//          e bitmap entries, each:
//            0 4 disk index (< d), 4 2 name length n (1..1023), 6 2 reserved,
//            8 n name, zero-padded to a multiple of 8
// Nothing may follow. Every disk is named by some entry; names are unique.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace cbt {

namespace qcow2 {
class Image;
struct BitmapInfo;
}  // namespace qcow2

inline constexpr uint32_t kIdentityExtensionType = 0x43425444;  // "CBTD"

struct DiskIdentity {
  std::string path;  // absolute
  uint64_t dev = 0;
  uint64_t ino = 0;
  uint64_t size = 0;
  int64_t mtime_sec = 0;
  uint32_t mtime_nsec = 0;
  bool operator==(const DiskIdentity&) const = default;
};

// The identity of the disk at `path`, now. The hook for every disk the
// filter can name by a path (file=, a data-file link; per export for dir=).
// NotSupported (the message says why) when it cannot be known: not a
// regular file (a block device has no stable modification time), or the
// path does not exist or cannot be inspected.
Result<DiskIdentity> FileIdentity(const std::string& path);

// What differs between a recorded identity and the current one, for
// messages: "size 1048576 -> 2097152 bytes, mtime ... -> ..., inode ...".
// Empty when equal.
// Only what says the content may differ: size and modification time.
// Empty when both match, even if the file moved (another path, device or
// inode: a disk moved or copied with its mtime, as `mv`, `cp -p`, `rsync
// -a` do, is the same disk).
std::string DescribeContentChange(const DiskIdentity& was, const DiskIdentity& now);
std::string DescribeIdentityChange(const DiskIdentity& was, const DiskIdentity& now);
// Another path and another file (device or inode): not the disk `was`
// describes, unless it was moved and copied (a container used for the
// wrong disk, most likely).
bool IsAnotherFile(const DiskIdentity& was, const DiskIdentity& now);
// "path (dev D, inode I, N bytes, mtime S.NNNNNNNNN)".
std::string DescribeIdentity(const DiskIdentity& id);

class IdentityRecord {
 public:
  static constexpr uint32_t kVersion = 1;
  static constexpr uint32_t kMaxDisks = 1024;
  static constexpr uint32_t kMaxEntries = 65535;  // qcow2's bitmap limit
  static constexpr uint32_t kMaxPath = 4095;
  static constexpr uint32_t kMaxName = 1023;

  // Corruption (what is wrong, at which offset) for anything malformed.
  static Result<IdentityRecord> Parse(std::span<const std::byte> rec);
  // REQUIRES: !empty().
  std::vector<std::byte> Serialize() const;

  bool empty() const { return entries_.empty(); }
  // The identity bitmap `name` is valid for; null if none is recorded.
  const DiskIdentity* For(std::string_view name) const;
  // Records (or replaces) name's entry. InvalidArgument if a name or path
  // is out of bounds.
  Status Set(std::string_view name, const DiskIdentity& id);
  void Remove(std::string_view name);
  // Entries whose bitmap is not in `keep` are dropped.
  void Retain(const std::vector<std::string>& keep);
  std::vector<std::string> Names() const;

 private:
  struct Entry {
    std::string name;
    DiskIdentity id;
  };
  std::vector<Entry> entries_;
};

// The identity record of an open container: empty when absent or not
// vouched for (kAutoclearCbtIntent clear: another program wrote the file).
// Corruption if present, vouched and malformed.
Result<IdentityRecord> LoadIdentityRecord(const qcow2::Image& img);

// Records `id` as the identity bitmap `bitmap` is valid for (the other
// entries are kept, if vouched), in one flushed header switch. Used by
// 'cbt recover' (--mark-all, --compare) once the bitmap matches the disk
// as it is now, so that the filter's next start accepts it.
Status UpdateBitmapIdentity(qcow2::Image& img, std::string_view bitmap, const DiskIdentity& id);

// The check made before a bitmap is trusted to describe the disk's changes
// (P4, docs/crash-safety.md): by the filter at attach (every enabled
// bitmap, engine/tracker_identity.cc) and by the offline `cbt backup` (the
// bitmap it reads, server/cli_backup_offline.cc). How the enabled ones of
// `bitmaps` stand against the disk as it is now, by their entries in `rec`.
struct IdentityVerdict {
  // No entry, or inconsistent (crash recovery: the entry went with the
  // first change): changes made while no tracker ran cannot be detected.
  std::vector<std::string> missing;
  // Recorded for the disk with another size or mtime: they would miss what
  // was written meanwhile.
  std::vector<std::string> changed;
  std::string what;                 // how, for the first changed one (DescribeIdentityChange)
  std::optional<DiskIdentity> was;  // what the first changed one was recorded for
  std::string moved;                // the same disk moved (first such bitmap's change), else empty
};
IdentityVerdict JudgeDiskIdentity(const IdentityRecord& rec,
                                  const std::vector<qcow2::BitmapInfo>& bitmaps,
                                  const DiskIdentity& now);

// The one-line texts of that check, the same wherever it runs.
// "'a', 'b'".
std::string QuotedNames(const std::vector<std::string>& names);
// The disk's identity cannot be known (reason): nothing can be detected.
std::string UnknownIdentityNote(const std::string& reason);
// For verdict.missing (REQUIRES: not empty).
std::string MissingIdentityNote(const IdentityVerdict& v, const DiskIdentity& now);
// For verdict.moved (REQUIRES: not empty).
std::string MovedDiskNote(const IdentityVerdict& v);
// The refusal for verdict.changed (REQUIRES: not empty): the disk, what
// changed, the bitmaps, and the fixes: 'cbt recover CONTAINER --bitmap NAME
// --compare COMPARE' (COMPARE: "BACKUP" or the actual arguments) or
// --mark-all, "or " + otherwise. When the disk is another file under
// another path (IsAnotherFile), it leads with the wrong container instead
// ("CONTAINER: this container was made for disk F (inode N), not for G:
// use G's own container (or create one); only if G is F moved and changed
// since ..., the recovery), without `otherwise`.
std::string ChangedDiskRefusal(const IdentityVerdict& v, const DiskIdentity& now,
                               const std::string& container, const std::string& compare,
                               const std::string& otherwise);

// The path of the disk bitmap `bitmap` was recorded for (its entry), else
// the container's data-file link resolved against container_path's
// directory; nullopt if neither is known.
std::optional<std::string> RecordedDiskPath(const qcow2::Image& img,
                                            const std::string& container_path,
                                            std::string_view bitmap);

}  // namespace cbt
