// cbt recover FILE --bitmap NAME --compare BACKUP [--compare-format raw|qcow2]
// [--disk PATH]: bitmap NAME becomes exactly the set of granules in which the
// disk differs from BACKUP (its last backup), stored like --mark-all does
// (one crash-safe Commit: name, granularity and flags kept, in-use clear).
//
// The disk: --disk PATH; else the container's data-file link; else FILE
// itself when it holds disk data (a qcow2 image with internal bitmaps). A
// raw disk is locked for reading as qemu-img does, FILE for writing (a
// running server holds it: refused), both for the whole run, so that
// neither changes while they are compared.
// BACKUP: raw, or qcow2 with its backing chain (what `cbt backup` writes).
// The format is never guessed from the content: a file starting with the
// qcow2 magic needs --compare-format.
#include "server/cli_recover_compare.h"

#include <fcntl.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <optional>

#include "bitmap/dirty_bitmap.h"
#include "common/posix_file.h"
#include "engine/bitmap_store.h"
#include "engine/compare.h"
#include "engine/disk_identity.h"
#include "engine/intent_map.h"
#include "qcow2/lock.h"
#include "qcow2/volume.h"
#include "server/backup_chain.h"
#include "server/guest_clusters.h"
#include "server/image_open.h"
#include "server/output.h"
#include "server/size_parse.h"

namespace cbt::cli {

namespace {

namespace fs = std::filesystem;

uint64_t RoundUp512(uint64_t v) {
  return (v + 511) / 512 * 512;
}

Result<bool> StartsWithQcow2Magic(PosixFile& f) {
  CBT_ASSIGN_OR_RETURN(uint64_t size, f.size());
  if (size < 4) return false;
  std::array<std::byte, 4> m{};
  CBT_RETURN_IF_ERROR(f.pread(m, 0));
  return m == std::array{std::byte{'Q'}, std::byte{'F'}, std::byte{'I'}, std::byte{0xfb}};
}

// One side opened for reading: the input, what keeps its file (and lock)
// open, and its size.
struct Side {
  std::shared_ptr<PosixFile> file;
  std::unique_ptr<CompareInput> input;
  std::string what;  // for messages: "disk PATH", "backup PATH"
};

void ReadAhead(const PosixFile& f) {
  (void)::posix_fadvise(f.fd(), 0, 0, POSIX_FADV_SEQUENTIAL);
}

Result<std::unique_ptr<CompareInput>> OpenQcow2(std::shared_ptr<BlockIO> io,
                                                const std::string& path) {
  qcow2::VolumeOptions vo;
  vo.writable = false;
  CBT_ASSIGN_OR_RETURN(std::unique_ptr<qcow2::Volume> v, qcow2::Volume::Open(io, path, vo));
  return LayerCompareInput(std::shared_ptr<qcow2::Layer>(std::move(v)));
}

// A raw file read-only, locked for reading (QEMU's locks: no writer that
// honours them may open it meanwhile).
Result<Side> OpenRaw(const std::string& path, const std::string& what) {
  CBT_ASSIGN_OR_RETURN(std::unique_ptr<PosixFile> f,
                       PosixFile::Open(path, PosixFile::Mode::kReadOnly));
  if (Status s = qcow2::LockImage(f->fd(), path, qcow2::LockMode::kReadOnly); !s.ok())
    return Status::Busy(s.message() + " (a program has the " + what +
                        " open for writing: stop it first)");
  Side side;
  side.file = std::move(f);
  side.what = what + " " + path;
  ReadAhead(*side.file);
  return side;
}

// The disk the bitmap describes.
Result<Side> OpenDisk(const OpenedImage& opened, const std::string& given) {
  qcow2::Image& img = *opened.image;
  const std::string& file = opened.path;
  std::string path = given;
  if (path.empty()) {
    path = img.data_file();
    if (!path.empty() && fs::path(path).is_relative())
      path = (fs::path(file).parent_path() / path).string();
  }
  if (path.empty() || SameFile(path, file)) {
    if (path.empty()) {
      // No link: FILE is the disk only if it holds disk data; a
      // bitmaps-only container of a raw disk reads as zeros.
      CBT_ASSIGN_OR_RETURN(GuestClusters gc, CountGuestClusters(img));
      if (gc.allocated == 0 && img.header().backing_file.empty())
        return Status::InvalidArgument(
            file +
            " has no data-file link and holds no disk data (a bitmaps-only container): name "
            "the raw disk with --disk PATH (or --disk " +
            file + " if it is itself an empty qcow2 disk)");
    }
    // A qcow2 image with internal bitmaps: its guest data, read through the
    // descriptor that holds the write lock.
    Side side;
    side.file = opened.file;
    side.what = "disk " + file;
    CBT_ASSIGN_OR_RETURN(side.input, OpenQcow2(opened.file, file));
    ReadAhead(*side.file);
    return side;
  }
  // Any other disk is raw, whatever its first bytes are (a raw disk's data
  // may start with the qcow2 magic): its size check catches a qcow2 file
  // given by mistake.
  CBT_ASSIGN_OR_RETURN(Side side, OpenRaw(path, "disk"));
  CBT_ASSIGN_OR_RETURN(uint64_t size, side.file->size());
  side.input = RawCompareInput(side.file, size);
  return side;
}

Result<Side> OpenBackup(const std::string& path, const std::string& format) {
  CBT_ASSIGN_OR_RETURN(Side side, OpenRaw(path, "backup"));
  CBT_ASSIGN_OR_RETURN(bool magic, StartsWithQcow2Magic(*side.file));
  if (format.empty() && magic)
    return Status::InvalidArgument(
        "--compare " + path +
        " starts with the qcow2 magic: say how to read it, --compare-format qcow2 (a qcow2 "
        "backup such as cbt backup's layers, its backing chain followed) or --compare-format "
        "raw (a raw image whose data starts with those bytes)");
  if (format == "qcow2") {
    auto in = OpenQcow2(side.file, path);
    if (!in.ok())
      return Status::InvalidArgument("--compare " + path +
                                     " (--compare-format qcow2): " + in.status().message());
    side.input = std::move(*in);
    return side;
  }
  CBT_ASSIGN_OR_RETURN(uint64_t size, side.file->size());
  side.input = RawCompareInput(side.file, size);
  return side;
}

}  // namespace

int RecoverByCompare(const std::string& file, const std::string& name, const CompareArgs& args,
                     const CommonOptions& common) {
  if (!args.backup_format.empty() && args.backup_format != "raw" && args.backup_format != "qcow2")
    throw UsageError("--compare-format '" + args.backup_format + "': use raw or qcow2");
  const std::string where = "bitmap '" + name + "' in " + file;

  // FILE for writing first: its lock keeps a server (and QEMU) away for
  // the whole run. Nothing is written before the Commit below.
  Result<OpenedImage> opened = OpenImage(file, Access::kRecover);
  if (!opened.ok()) return Fail(opened.status());
  qcow2::Image& img = *opened->image;
  Result<qcow2::BitmapInfo> info = img.Find(name);
  if (!info.ok())
    return Fail("bitmap '" + name + "' not found in " + file + "; list bitmaps with 'cbt info " +
                file + "'");
  const bool was_in_use = !info->consistent || info->in_use;

  Result<Side> disk = OpenDisk(*opened, args.disk);
  if (!disk.ok()) return Fail(disk.status());
  const uint64_t disk_size = disk->input->size();
  if (RoundUp512(disk_size) != img.virtual_size())
    return Fail("the " + disk->what + " has " + std::to_string(disk_size) + " bytes, " + where +
                " is for a disk of " + std::to_string(img.virtual_size()) +
                " bytes: name the disk the bitmap tracks with --disk PATH");

  if (SameFile(args.backup, disk->file->path()))
    return Fail("--compare " + args.backup + " is the disk itself: give the last backup");
  Result<Side> backup = OpenBackup(args.backup, args.backup_format);
  if (!backup.ok()) return Fail(backup.status());
  const uint64_t backup_size = backup->input->size();
  // A qcow2 backup of a disk whose size is not a multiple of 512 is up to
  // 511 bytes larger (qcow2 sizes are rounded up); those bytes are ignored.
  if (backup_size > RoundUp512(disk_size))
    return Fail("the " + backup->what + " has " + std::to_string(backup_size) +
                " bytes, more than the " + disk->what + " (" + std::to_string(disk_size) +
                "): it is not a backup of this disk");

  auto bitmap = NewBitmapLike(img, name);
  if (!bitmap.ok()) return Fail(bitmap.status());
  DirtyBitmap& b = **bitmap;
  Progress progress(disk_size, common.format() == OutputFormat::kHuman);
  CompareOptions co;
  co.progress = [&](uint64_t done) { progress.Update(done); };
  // A disk file other than FILE: the identity the bitmap is valid for once
  // stored (engine/disk_identity.h), so the filter's next start accepts it.
  // Taken before the compare and checked after it: a disk written meanwhile
  // (by a program ignoring the lock) makes the result worthless.
  std::optional<DiskIdentity> identity;
  const std::string disk_path = fs::absolute(disk->file->path()).lexically_normal().string();
  if (!SameFile(disk_path, file)) {
    if (auto id = FileIdentity(disk_path); id.ok()) identity = *id;
  }
  const auto t0 = std::chrono::steady_clock::now();
  Result<CompareStats> stats = CompareInto(*disk->input, *backup->input, b, co);
  progress.Done();
  if (!stats.ok())
    return Fail("comparing the " + disk->what + " with the " + backup->what + ": " +
                stats.status().message() + "; " + where + " is unchanged");
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  if (identity) {
    Result<DiskIdentity> after = FileIdentity(disk_path);
    if (!after.ok() || !(*after == *identity))
      return Fail(
          "the " + disk->what + " changed while it was compared (" +
          (after.ok() ? DescribeIdentityChange(*identity, *after) : after.status().message()) +
          "): stop what writes it and run again; " + where + " is unchanged");
  }

  // Stored as --mark-all stores its all-ones bitmap (cli_recover.cc).
  DirtyBitmapSource src(b);
  std::vector<qcow2::BitmapSpec> specs = img.CurrentSpecs();
  for (qcow2::BitmapSpec& s : specs) {
    if (s.name != name) continue;
    s.existing.clear();
    s.data = &src;
    s.granularity_bits = info->granularity_bits;
    s.enabled = info->enabled;
  }
  const bool stale = img.stale_bitmaps_extension();
  if (Status s = CommitChange(img, [&] { return img.Commit(specs); }); !s.ok())
    return Fail(s.message() + "; " + where + " is unchanged");
  if (stale) {
    if (Status s = img.RemovePrivateRecord(kIntentExtensionType); !s.ok()) return Fail(s);
  }
  if (identity) {
    // The bitmap is stored already: say so, so that nobody redoes it.
    if (Status s = UpdateBitmapIdentity(img, name, *identity); !s.ok())
      return Fail(where + " was recomputed and stored, but recording the disk's identity failed (" +
                  s.message() +
                  "): the filter may refuse it as changed; add cbt-trust-disk=true once (cbt "
                  "serve: -o cbt-trust-disk=true)");
  }

  if (common.format() == OutputFormat::kJson) {
    PrintJson({{"bitmap", name},
               {"method", "compare"},
               {"was-in-use", was_in_use},
               {"granules", b.granule_count()},
               {"dirty-granules", b.DirtyGranules()},
               {"dirty-bytes", b.DirtyBytes()},
               {"bytes-compared", stats->bytes_compared},
               {"seconds", seconds},
               {"disk-identity", identity ? Json(identity->path) : Json()}});
  } else {
    std::printf(
        "bitmap '%s' (%s): recomputed by comparing %s with %s: %llu of %llu granules differ "
        "(%s), %s compared in %.1f s; in-use cleared\n",
        name.c_str(), was_in_use ? "was in use" : "was not in use", disk->what.c_str(),
        backup->what.c_str(), static_cast<unsigned long long>(b.DirtyGranules()),
        static_cast<unsigned long long>(b.granule_count()), HumanSize(b.DirtyBytes()).c_str(),
        HumanSize(stats->bytes_compared).c_str(), seconds);
  }
  return kExitOk;
}

}  // namespace cbt::cli
