// cbt recover FILE --bitmap NAME [--mark-all]: make a bitmap left in use by
// an unclean stop usable again, offline.
//  - With cbt's crash-safety record (the filter ran with
//    cbt-durability=process or power): the recovery the filter runs at
//    start-up (engine/tracker.cc), for NAME only: stored bits plus every
//    recorded region, stored, in-use cleared. A superset of the changes,
//    never a miss. Other bitmaps left in use stay so (and recoverable).
//  - --mark-all (any bitmap, e.g. after cbt-durability=none or a QEMU crash):
//    every granule becomes dirty, in-use is cleared. The next incremental
//    backup then copies everything once, but the bitmap keeps its name,
//    granularity and state, and no full re-setup is needed.
//  - --compare BACKUP (any bitmap, in use or not): exactly the granules in
//    which the disk differs from its last backup (cli_recover_compare.cc).
#include <sys/stat.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <optional>

#include "bitmap/dirty_bitmap.h"
#include "engine/bitmap_store.h"
#include "engine/disk_identity.h"
#include "engine/intent_map.h"
#include "server/cli.h"
#include "server/cli_recover_compare.h"
#include "server/guest_clusters.h"
#include "server/image_open.h"

namespace cbt::cli {

namespace {

constexpr char kSynopsis[] =
    "cbt recover FILE --bitmap NAME [--mark-all | --compare BACKUP [--compare-format FMT]] "
    "[--disk PATH] [--output=json]";
constexpr char kDescription[] =
    "Makes bitmap NAME usable again after an unclean stop left it in use\n"
    "(inconsistent). Without --mark-all it uses cbt's crash-safety record\n"
    "(written by the filter in cbt-durability=process or power): the result\n"
    "covers every change. With --mark-all it marks the whole disk dirty.\n"
    "A bitmap that is not in use is left alone, unless --mark-all is given and\n"
    "the disk it was recorded for changed since the filter's last clean stop\n"
    "(the filter refuses such a bitmap): then it is marked all dirty too.\n"
    "With --compare BACKUP (the last backup: raw, or qcow2 with its chain) the\n"
    "bitmap, in use or not, becomes exactly the granules in which the disk\n"
    "differs from BACKUP.\n"
    "Every way records the disk's identity as it is now, so that the filter's next\n"
    "start refuses the bitmap if the disk changes before it (docs/crash-safety.md).\n"
    "The disk: --disk PATH, else the one recorded for NAME, else the container's\n"
    "data-file link, else FILE itself (a qcow2 image with internal bitmaps, which\n"
    "need no identity). When none is known, a warning says so: give --disk PATH.\n"
    "--disk on a bitmap that is consistent and has no identity records it.";

// The disk whose identity bitmap `name` is recorded for (engine/
// disk_identity.h) once recovered: --disk PATH, else the path recorded for
// it, else the container's data-file link. Found (and --disk checked)
// before anything is written.
struct IdentityDisk {
  std::string path;    // absolute; empty: none to record
  std::string reason;  // with no path: why (empty: internal bitmaps, none needed)
  bool given = false;  // --disk
};

Result<IdentityDisk> FindIdentityDisk(qcow2::Image& img, const std::string& file,
                                      const std::string& name, const std::string& given) {
  IdentityDisk d;
  d.given = !given.empty();
  if (d.given) {
    struct stat st {};
    if (::stat(given.c_str(), &st) != 0)
      return Status::InvalidArgument("--disk " + given + ": " + std::strerror(errno));
    // The container itself: internal bitmaps keep no identity (QEMU's
    // autoclear rule covers a qcow2 image).
    if (SameFile(given, file)) return d;
    if (S_ISREG(st.st_mode) &&
        ((static_cast<uint64_t>(st.st_size) + 511) & ~uint64_t{511}) != img.virtual_size())
      return Status::InvalidArgument("--disk " + given + " has " + std::to_string(st.st_size) +
                                     " bytes, bitmap '" + name + "' in " + file +
                                     " is for a disk of " + std::to_string(img.virtual_size()) +
                                     " bytes: name the disk the bitmap tracks");
    d.path = std::filesystem::absolute(given).lexically_normal().string();
    return d;
  }
  if (std::optional<std::string> p = RecordedDiskPath(img, file, name)) {
    d.path = *p;
    return d;
  }
  // No path: FILE is the disk (internal bitmaps) if it holds disk data.
  CBT_ASSIGN_OR_RETURN(GuestClusters gc, CountGuestClusters(img));
  if (gc.allocated == 0 && img.header().backing_file.empty())
    d.reason = file + " names no disk: no data-file link, and none recorded for '" + name + "'";
  return d;
}

// Records the identity of `disk` as the one bitmap `name` is valid for (the
// bitmap has just been stored to match the disk as it is now), so that the
// filter's next start refuses it if the disk changes before then. When it
// cannot, one warning line says so, what it means and how to record it.
// Returns the path recorded, or nullopt.
Result<std::optional<std::string>> RecordIdentity(qcow2::Image& img, const std::string& file,
                                                  const std::string& name,
                                                  const IdentityDisk& disk) {
  std::string why = disk.reason;
  if (!disk.path.empty()) {
    Result<DiskIdentity> now = FileIdentity(disk.path);
    if (now.ok()) {
      if (Status s = UpdateBitmapIdentity(img, name, *now); !s.ok())
        return s.WithContext(file + ": bitmap '" + name +
                             "' is recovered and stored, but its disk identity");
      return std::optional<std::string>(now->path);
    }
    why = now.status().message();
  }
  if (why.empty()) return std::optional<std::string>();  // internal bitmaps
  // --disk helps when no disk is known, or the one known is gone (not
  // when it cannot have an identity: a block device).
  const bool hint = !disk.given && (disk.path.empty() || !std::filesystem::exists(disk.path));
  Fail("warning: no disk identity recorded for bitmap '" + name + "' (" + why +
       "): a change made to the disk before the filter's next start would not be detected" +
       (hint ? "; record it with 'cbt recover " + file + " --bitmap " + name +
                   " --disk DISK' (DISK: the raw disk it tracks)"
             : std::string()));
  return std::optional<std::string>();
}

Json PathOrNull(const std::optional<std::string>& p) {
  return p ? Json(*p) : Json();
}

std::string IdentityNote(const std::optional<std::string>& p) {
  return p ? "; disk identity recorded (" + *p + ")" : "";
}

// --disk on a consistent bitmap: records the disk's identity if the bitmap
// has none (after a recovery that could not name the disk; never worse
// than none: without it the next start accepts any change). One recorded
// for a disk that changed since is refused: recording it anew would hide
// the change (--mark-all or --compare make the bitmap right first).
int RecordForConsistent(const std::string& file, const std::string& name,
                        const std::string& given_disk, const CommonOptions& common) {
  Result<OpenedImage> opened = OpenImage(file, Access::kWrite);
  if (!opened.ok()) return Fail(opened.status());
  qcow2::Image& img = *opened->image;
  Result<IdentityDisk> disk = FindIdentityDisk(img, file, name, given_disk);
  if (!disk.ok()) return Fail(disk.status());
  Result<IdentityRecord> rec = LoadIdentityRecord(img);
  const DiskIdentity* was = rec.ok() ? rec->For(name) : nullptr;
  if (was && !disk->path.empty()) {
    Result<DiskIdentity> now = FileIdentity(disk->path);
    if (!now.ok() || !DescribeContentChange(*was, *now).empty())
      return Fail("bitmap '" + name + "' in " + file + " was recorded for " +
                  DescribeIdentity(*was) + "; " + disk->path + " differs (" +
                  (now.ok() ? DescribeIdentityChange(*was, *now) : now.status().message()) +
                  "): make the bitmap match the disk with --compare BACKUP or --mark-all");
  }
  Result<std::optional<std::string>> recorded = RecordIdentity(img, file, name, *disk);
  if (!recorded.ok()) return Fail(recorded.status());
  if (common.format() == OutputFormat::kJson)
    PrintJson({{"bitmap", name}, {"method", "none"}, {"disk-identity", PathOrNull(*recorded)}});
  else
    std::printf("bitmap '%s' is consistent: nothing to recover%s\n", name.c_str(),
                IdentityNote(*recorded).c_str());
  return kExitOk;
}

// Was `name` recorded for a disk that has changed since (the filter would
// refuse it)? The description of the change, else empty.
std::string IdentityChanged(const qcow2::Image& img, const std::string& name) {
  auto rec = LoadIdentityRecord(img);
  if (!rec.ok()) return rec.status().message();
  const DiskIdentity* was = rec->For(name);
  if (!was) return "";
  Result<DiskIdentity> now = FileIdentity(was->path);
  if (!now.ok()) return now.status().message();
  return DescribeContentChange(*was, *now);
}

int MarkAll(const std::string& file, const std::string& name, const std::string& given_disk,
            const CommonOptions& common) {
  Result<OpenedImage> opened = OpenImage(file, Access::kRecover);
  if (!opened.ok()) return Fail(opened.status());
  qcow2::Image& img = *opened->image;
  Result<qcow2::BitmapInfo> info = img.Find(name);
  if (!info.ok()) return Fail(info.status());
  Result<IdentityDisk> disk = FindIdentityDisk(img, file, name, given_disk);
  if (!disk.ok()) return Fail(disk.status());
  auto all = DirtyBitmap::Create(img.virtual_size(), info->granularity(),
                                 static_cast<uint32_t>(img.cluster_size()));
  if (!all.ok()) return Fail(all.status());
  if (img.virtual_size()) (void)(*all)->Mark(0, img.virtual_size());
  DirtyBitmapSource src(**all);
  std::vector<qcow2::BitmapSpec> specs = img.CurrentSpecs();
  for (qcow2::BitmapSpec& s : specs) {
    if (s.name != name) continue;
    s.existing.clear();  // drop the stored (untrusted) data ...
    s.data = &src;       // ... and store all ones under the same name
    s.granularity_bits = info->granularity_bits;
    s.enabled = info->enabled;
  }
  const bool stale = img.stale_bitmaps_extension();
  if (Status s = CommitChange(img, [&] { return img.Commit(specs); }); !s.ok()) return Fail(s);
  // Every granule dirty: the bitmap is right for the disk as it is now.
  Result<std::optional<std::string>> recorded = RecordIdentity(img, file, name, *disk);
  if (!recorded.ok()) return Fail(recorded.status());
  // After a stale extension (adopted above: its other bitmaps stay in use),
  // no crash-safety record may vouch for those: only --mark-all can.
  if (stale) {
    if (Status s = img.RemovePrivateRecord(kIntentExtensionType); !s.ok()) return Fail(s);
  }
  if (common.format() == OutputFormat::kJson) {
    PrintJson({{"bitmap", name},
               {"method", "mark-all"},
               {"dirty-bytes", img.virtual_size()},
               {"disk-identity", PathOrNull(*recorded)}});
  } else {
    std::printf("bitmap '%s': every granule marked dirty, in-use cleared%s\n", name.c_str(),
                IdentityNote(*recorded).c_str());
  }
  return kExitOk;
}

// The filter's start-up recovery (engine/tracker.cc), for NAME alone:
// NAME's stored bits plus every recorded region, stored with one Commit
// (crash safe: the old set, still in use, or the new one), in-use cleared.
// Every other bitmap, in use or not, is kept exactly, and so is the record:
// it still covers the bitmaps not recovered yet.
int FromRecord(const std::string& file, const std::string& name, const std::string& given_disk,
               const CommonOptions& common) {
  Result<OpenedImage> opened = OpenImage(file, /*writable=*/true);
  if (!opened.ok()) return Fail(opened.status());
  qcow2::Image& img = *opened->image;
  const std::string where = "bitmap '" + name + "' in " + file;
  Result<IdentityDisk> id_disk = FindIdentityDisk(img, file, name, given_disk);
  if (!id_disk.ok()) return Fail(id_disk.status());
  const std::vector<std::byte>* rec = img.GetExtension(kIntentExtensionType);
  if (!rec || !img.private_record_vouched())
    return Fail(where +
                ": no valid crash-safety record (the filter ran with cbt-durability=none, or "
                "another program wrote the file since); use --mark-all");
  auto m = IntentMap::Parse(*rec);
  if (!m.ok())
    return Fail(where + ": crash-safety record: " + m.status().message() + "; use --mark-all");
  const IntentMap& record = **m;
  if (record.mode() != IntentMode::kPower && record.boot_id() != CurrentBootId())
    return Fail(where +
                ": the crash-safety record was written in process mode under another boot id (the "
                "machine has restarted since, or the files were moved from another machine), so "
                "it may have lost records; use --mark-all");
  const uint64_t disk = record.disk_size();
  if (img.virtual_size() != ((disk + 511) & ~uint64_t{511}))
    return Fail(where + ": the crash-safety record describes a disk of " + std::to_string(disk) +
                " bytes, not this one; use --mark-all");
  if (Status s = img.AdoptInconsistent(name); !s.ok()) return Fail(s);
  auto loaded = LoadBitmap(img, name, disk);
  if (!loaded.ok()) return Fail(loaded.status());
  DirtyBitmap& b = **loaded;
  const uint64_t before = b.DirtyGranules();
  const auto ranges = record.RecordedRanges();
  for (auto [off, len] : ranges)
    if (auto r = b.Mark(off, len); !r.ok()) return Fail(r.status());
  const uint64_t added = b.DirtyGranules() - before;
  DirtyBitmapSource src(b);
  std::vector<qcow2::BitmapSpec> specs = img.CurrentSpecs();
  for (qcow2::BitmapSpec& s : specs)
    if (s.name == name) s.data = &src;  // new data under the same name
  if (Status s = CommitChange(img, [&] { return img.Commit(specs); }); !s.ok())
    return Fail(s.message() + "; --mark-all always works");
  // The bitmap now covers every change up to the crash: it is right for
  // the disk as it is now (the crash dropped the identity it had).
  Result<std::optional<std::string>> recorded = RecordIdentity(img, file, name, *id_disk);
  if (!recorded.ok()) return Fail(recorded.status());
  if (common.format() == OutputFormat::kJson) {
    PrintJson({{"bitmap", name},
               {"method", "record"},
               {"recovered-granules", added},
               {"recorded-regions", ranges.size()},
               {"disk-identity", PathOrNull(*recorded)}});
  } else {
    std::printf(
        "bitmap '%s': recovered from the crash-safety record, %llu granules added from %zu "
        "recorded region(s)%s\n",
        name.c_str(), static_cast<unsigned long long>(added), ranges.size(),
        IdentityNote(*recorded).c_str());
  }
  return kExitOk;
}

}  // namespace

int RunRecover(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string file, bitmap;
  bool mark_all = false;
  CompareArgs compare;
  po::options_description desc("Options");
  desc.add_options()("bitmap,B", po::value(&bitmap)->value_name("NAME"), "the bitmap (required)")(
      "mark-all", po::bool_switch(&mark_all), "mark the whole disk dirty")(
      "compare", po::value(&compare.backup)->value_name("BACKUP"),
      "recompute: mark the granules where the disk differs from BACKUP")(
      "compare-format", po::value(&compare.backup_format)->value_name("FMT"),
      "BACKUP's format: raw or qcow2 (required when it starts with the qcow2 magic)")(
      "disk", po::value(&compare.disk)->value_name("PATH"),
      "the raw disk NAME tracks: compared with --compare, its identity recorded (default: the "
      "one recorded, the data-file link, or FILE itself)");
  if (ParseFileCommand(args, desc, common, file, kSynopsis, kDescription)) return kExitOk;
  if (bitmap.empty()) throw UsageError("missing --bitmap NAME");
  if (!compare.backup.empty()) {
    if (mark_all) throw UsageError("--mark-all and --compare together; give one");
    return RecoverByCompare(file, bitmap, compare, common);
  }
  if (!compare.backup_format.empty())
    throw UsageError("--compare-format goes with --compare BACKUP");
  // Look first (read-only; the lock is dropped before any writable open).
  bool stale = false, consistent = false;
  std::string changed, no_identity;
  {
    Result<OpenedImage> opened = OpenImage(file, /*writable=*/false);
    if (!opened.ok()) return Fail(opened.status());
    stale = opened->image->stale_bitmaps_extension();
    if (!stale) {
      Result<qcow2::BitmapInfo> info = opened->image->Find(bitmap);
      if (!info.ok())
        return Fail("bitmap '" + bitmap + "' not found in " + file +
                    "; list bitmaps with 'cbt info " + file + "'");
      consistent = info->consistent;
      // Consistent but recorded for a disk that changed since: the filter
      // refuses it; --mark-all makes it right (and records the disk now).
      if (consistent && mark_all) changed = IdentityChanged(*opened->image, bitmap);
      // Consistent and recording, but without an identity (a crash whose
      // writes all hit granules dirty already leaves it consistent, and the
      // identity dropped): say so, as the recovery paths do.
      if (consistent && info->enabled && compare.disk.empty()) {
        Result<IdentityDisk> d = FindIdentityDisk(*opened->image, file, bitmap, "");
        Result<IdentityRecord> rec = LoadIdentityRecord(*opened->image);
        if (d.ok() && !d->reason.empty() && rec.ok() && !rec->For(bitmap)) no_identity = d->reason;
      }
    }
  }
  if (stale && !mark_all) {
    // Another program wrote the file without keeping the bitmaps: no
    // record can tell what it changed.
    return Fail(file +
                ": the bitmaps extension is not vouched for by autoclear bit 0 (a program that "
                "does not know bitmaps wrote the file): only 'cbt recover " +
                file + " --bitmap " + bitmap + " --mark-all' can recover its bitmaps");
  }
  if (consistent && !changed.empty()) return MarkAll(file, bitmap, compare.disk, common);
  if (consistent && !compare.disk.empty())
    return RecordForConsistent(file, bitmap, compare.disk, common);
  if (consistent) {
    if (common.format() == OutputFormat::kJson)
      PrintJson({{"bitmap", bitmap}, {"method", "none"}});
    else
      std::printf("bitmap '%s' is consistent: nothing to recover\n", bitmap.c_str());
    if (!no_identity.empty())
      Fail("warning: no disk identity recorded for bitmap '" + bitmap + "' (" + no_identity +
           "): a change made to the disk before the filter's next start would not be detected; "
           "record it with 'cbt recover " +
           file + " --bitmap " + bitmap + " --disk DISK' (DISK: the raw disk it tracks)");
    return kExitOk;
  }
  return mark_all ? MarkAll(file, bitmap, compare.disk, common)
                  : FromRecord(file, bitmap, compare.disk, common);
}

}  // namespace cbt::cli
