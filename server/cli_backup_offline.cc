// cbt backup --disk DISK --container FILE --dir DIR: the same backup run as
// with --socket (cli_backup.cc), when no server runs. The disk cannot
// change meanwhile: the container is opened for writing (QEMU's write lock:
// a running filter or QEMU holds it, and then this refuses), and the raw
// disk is locked as qemu-img does for reading (no one may open it for
// writing while we read). The checkpoint is an offline edit of the
// container (freeze = disable, new = add, one commit); the data is read
// from the file.
//
// The bitmap read says what changed only while a tracker ran: before an
// incremental run reads it, the disk's identity recorded for it at the
// filter's last clean stop is checked as the filter checks it at attach
// (engine/disk_identity.h), and a disk written meanwhile is refused with the
// fix. The disk must be the same after the read as before it, or the layer
// is not stored. The new bitmap is recorded as valid for the disk as it was
// at the checkpoint, so the next start (filter or offline run) checks it.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <optional>

#include "common/posix_file.h"
#include "engine/bitmap_store.h"
#include "engine/disk_identity.h"
#include "qcow2/layer_writer.h"
#include "qcow2/lock.h"
#include "server/backup_chain.h"
#include "server/backup_copy.h"
#include "server/bitmap_ops.h"
#include "server/cli.h"
#include "server/image_open.h"
#include "server/output.h"
#include "server/size_parse.h"

namespace cbt::cli {

namespace fs = std::filesystem;

namespace {

void Note(const std::string& what) {
  std::fprintf(stderr, "cbt backup: note: %s\n", what.c_str());
}

uint64_t RoundUp512(uint64_t v) {
  return (v + 511) / 512 * 512;
}

// The data extents of a file (SEEK_DATA / SEEK_HOLE): what a full backup
// copies. A file system without them reports everything as data.
Result<std::vector<ByteRange>> FileDataRanges(int fd, uint64_t size) {
  std::vector<ByteRange> out;
  for (off_t pos = 0; static_cast<uint64_t>(pos) < size;) {
    off_t data = ::lseek(fd, pos, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;  // only a hole is left
      if (errno == EINVAL) return std::vector<ByteRange>{{0, size}};
      return Status::FromErrno(errno, "lseek SEEK_DATA");
    }
    off_t hole = ::lseek(fd, data, SEEK_HOLE);
    if (hole < 0) return Status::FromErrno(errno, "lseek SEEK_HOLE");
    out.push_back({static_cast<uint64_t>(data),
                   std::min<uint64_t>(size, static_cast<uint64_t>(hole)) - data});
    pos = hole;
  }
  return out;
}

Status CopyFromFile(BlockIO& disk, const std::vector<ByteRange>& ranges, qcow2::LayerWriter& w,
                    Progress& progress) {
  constexpr uint64_t kChunk = uint64_t{4} << 20;
  std::vector<std::byte> buf(kChunk);
  uint64_t done = 0;
  for (const ByteRange& r : ranges)
    for (uint64_t p = r.offset; p < r.offset + r.length; p += kChunk) {
      std::span<std::byte> piece(buf.data(), std::min(kChunk, r.offset + r.length - p));
      CBT_RETURN_IF_ERROR(disk.pread(piece, p));
      CBT_RETURN_IF_ERROR(w.WriteData(p, piece));
      progress.Update(done += piece.size());
    }
  return Status::OK();
}

}  // namespace

int BackupOffline(const std::string& disk_path, const std::string& container, const std::string& d,
                  bool force_full, bool verify, OutputFormat format) {
  Result<ChainDir> chain = OpenChainDir(d);
  if (!chain.ok()) return Fail(chain.status());
  const fs::path& dir = chain->dir;
  ChainState& st = chain->state;
  std::error_code ec;

  Result<std::unique_ptr<PosixFile>> disk = PosixFile::Open(disk_path, PosixFile::Mode::kReadOnly);
  if (!disk.ok()) return Fail(disk.status());
  if (Status s = qcow2::LockImage((*disk)->fd(), disk_path, qcow2::LockMode::kReadOnly); !s.ok())
    return Fail(s.message() +
                " (a program writes the disk: back it up through its server with "
                "--socket)");
  Result<uint64_t> size = (*disk)->size();
  if (!size.ok()) return Fail(size.status());
  const uint64_t disk_size = *size;
  Result<OpenedImage> img = OpenImage(container, Access::kWrite);
  if (!img.ok())
    return Fail(img.status().message() +
                (img.status().kind() == Status::Kind::kBusy
                     ? " (a server runs: back up through it with --socket CTL)"
                     : ""));
  qcow2::Image& image = *img->image;
  if (image.virtual_size() != RoundUp512(disk_size))
    return Fail(container + " is for a disk of " + std::to_string(image.virtual_size()) +
                " bytes, " + disk_path + " has " + std::to_string(disk_size));
  if (st.disk_size && st.disk_size != disk_size)
    return Fail("the disk has " + std::to_string(disk_size) + " bytes, the chain in " +
                dir.string() + " " + std::to_string(st.disk_size));

  std::vector<ChainBitmap> bitmaps;
  for (const qcow2::BitmapInfo& b : image.Bitmaps())
    bitmaps.push_back({b.name, b.enabled, b.consistent});
  Result<RunPlan> planned = PlanRun(st, bitmaps, force_full, dir, fs::absolute(container).string());
  if (!planned.ok()) return Fail(planned.status());
  const RunPlan plan = std::move(*planned);
  if (!plan.moved_from.empty())
    std::fprintf(
        stderr,
        "cbt backup: the container moved from %s; the chain goes on (its bitmap '%s' is there)\n",
        plan.moved_from.c_str(), plan.current.c_str());

  // The disk as it is now; it is locked for reading, so it stays so unless
  // a program ignoring the lock writes it (checked again after the read).
  const std::string disk_abs = fs::absolute(disk_path).lexically_normal().string();
  std::optional<DiskIdentity> identity;
  if (Result<DiskIdentity> id = FileIdentity(disk_abs); id.ok())
    identity = *id;
  else
    Note(UnknownIdentityNote(id.status().message()));
  Result<IdentityRecord> rec = LoadIdentityRecord(image);
  if (identity && !rec.ok()) {
    // Not replaced: the other bitmaps' entries would go with it.
    if (!plan.full)
      return Fail(container + ": " + rec.status().message() + "; 'cbt recover " + container +
                  " --bitmap " + plan.current + " --mark-all' rewrites it (nothing was changed)");
    Note(container + ": " + rec.status().message() +
         ": no identity is recorded for the new bitmap");
  }
  if (!plan.full && identity) {
    // Only changes made while a tracker ran are in the bitmap: the disk
    // must be as it was when the filter last stopped cleanly.
    std::vector<qcow2::BitmapInfo> reads;
    for (const qcow2::BitmapInfo& b : image.Bitmaps())
      if (b.name == plan.current) reads.push_back(b);
    const IdentityVerdict v = JudgeDiskIdentity(*rec, reads, *identity);
    if (!v.changed.empty()) {
      const std::string last = (dir / st.layers.back().file).string();
      return Fail(ChangedDiskRefusal(v, *identity, container,
                                     last + " --compare-format qcow2 --disk " + disk_path,
                                     "take a full backup with --full") +
                  " (nothing was changed)");
    }
    if (!v.missing.empty()) Note(MissingIdentityNote(v, *identity));
    if (!v.moved.empty()) Note(MovedDiskNote(v));
  }

  // The checkpoint: (merge what unfinished runs froze,) freeze the chain's
  // bitmap, start the next; one commit, announced first.
  st.starting = plan.new_name;
  if (Status s = SaveState(dir, st); !s.ok()) return Fail(s);
  {
    BitmapEditor ed(image);
    OpOptions none;
    Status s;
    if (!plan.full) {
      for (const std::string& p : plan.mergeable)
        if (s.ok()) s = ed.Apply(plan.current, {OpKind::kMerge, p}, none);
      for (const std::string& p : plan.pending)
        if (s.ok()) s = ed.Apply(p, {OpKind::kRemove, ""}, none);
      if (s.ok()) s = ed.Apply(plan.current, {OpKind::kDisable, ""}, none);
    }
    OpOptions add;
    add.granularity = 65536;
    if (s.ok()) s = ed.Apply(plan.new_name, {OpKind::kAdd, ""}, add);
    if (s.ok()) s = ed.Commit();
    if (!s.ok()) return Fail(s.message() + " (nothing was changed)");
    if (!plan.full) st.pending.clear();
  }
  // The new bitmap starts empty, right for the disk as it is: recorded so,
  // it is checked like the others (a kill before this leaves it without an
  // entry: noted, not checked, at the next start).
  if (identity && rec.ok())
    if (Status s = UpdateBitmapIdentity(image, plan.new_name, *identity); !s.ok())
      Fail("warning: " + s.message() + " (recording the disk's identity for bitmap '" +
           plan.new_name + "': changes made while no tracker runs cannot be detected for it)");
  const int64_t now = UnixNow();
  Started(st, plan);
  st.disk_size = disk_size;
  const fs::path part = dir / (plan.file + ".part");
  auto abort_run = [&](const Status& s) {
    fs::remove(part, ec);
    (void)SaveState(dir, st);
    return Fail(s.message() + " (no backup made; the chain in " + dir.string() +
                " is unchanged and the next run covers these changes too)");
  };
  if (Status s = SaveState(dir, st); !s.ok()) return abort_run(s);

  std::vector<ByteRange> ranges;
  uint64_t dirty_bytes = 0;
  if (plan.full) {
    Result<std::vector<ByteRange>> r = FileDataRanges((*disk)->fd(), disk_size);
    if (!r.ok()) return abort_run(r.status());
    ranges = std::move(*r);
  } else {
    Result<std::unique_ptr<DirtyBitmap>> b = LoadBitmap(image, plan.current, disk_size);
    if (!b.ok()) return abort_run(b.status());
    ranges = DirtyRanges((*b)->Extents(0, disk_size), dirty_bytes);
  }
  ranges = AlignRanges(std::move(ranges), kLayerCluster, disk_size);
  uint64_t total = 0;
  for (const ByteRange& r : ranges) total += r.length;

  auto writer = OpenLayer(part, disk_size, plan.full ? std::string() : st.layers.back().file);
  if (!writer.ok()) return abort_run(writer.status());
  Progress progress(total, format == OutputFormat::kHuman);
  const auto c0 = std::chrono::steady_clock::now();
  Status s = CopyFromFile(**disk, ranges, **writer, progress);
  progress.Done();
  if (s.ok()) s = (*writer)->Finish();
  if (!s.ok()) return abort_run(s);
  if (identity) {
    // What was read is one state of the disk only if nothing wrote it
    // meanwhile (a program that ignores the lock).
    Result<DiskIdentity> after = FileIdentity(disk_abs);
    if (!after.ok() || !(*after == *identity)) {
      fs::remove(part, ec);
      (void)SaveState(dir, st);
      return Fail(
          "disk " + disk_abs + " changed while it was read (" +
          (after.ok() ? DescribeIdentityChange(*identity, *after) : after.status().message()) +
          "): a program writes it without taking the lock; stop it; no backup made (the chain "
          "in " +
          dir.string() + " is unchanged), and bitmap '" + plan.new_name + "' in " + container +
          " now misses those changes: 'cbt recover " + container + " --bitmap " + plan.new_name +
          " --mark-all', or the next run with --full");
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
  fs::rename(part, dir / plan.file, ec);
  if (ec) return abort_run(Status::IOError("rename " + part.string() + ": " + ec.message()));
  if (Status d2 = SyncDir(dir); !d2.ok()) return abort_run(d2);
  if (verify)
    if (Status v = VerifyLayer(dir / plan.file, disk_path); !v.ok()) {
      if (v.kind() != Status::Kind::kCorruption) return abort_run(v);
      (void)SaveState(dir, st);
      return Fail(v.message() + VerifyMismatchFix(plan, st, dir, container, disk_path));
    }
  // The layer is in the chain first; then the bitmaps it covers go (a kill
  // in between leaves them frozen: the next run merges them, a superset).
  st.layers.push_back({plan.file, plan.full ? "full" : "inc", plan.full ? "" : plan.current,
                       (*writer)->data_clusters() * kLayerCluster, now});
  if (Status w = SaveState(dir, st); !w.ok())
    return Fail(w.message() + " (the layer " + plan.file + " is complete)");
  {
    BitmapEditor ed(image);
    Status r;
    std::vector<std::string> drop;
    for (const qcow2::BitmapInfo& b : image.Bitmaps())
      if (std::find(st.pending.begin(), st.pending.end(), b.name) != st.pending.end())
        drop.push_back(b.name);
    for (const std::string& b : drop)
      if (r.ok()) r = ed.Apply(b, {OpKind::kRemove, ""}, OpOptions{});
    if (r.ok() && !drop.empty()) r = ed.Commit();
    if (!r.ok()) {
      Fail("warning: " + r.message() + " (left for the next run to remove)");
    } else {
      st.pending.clear();
      if (Status w = SaveState(dir, st); !w.ok()) Fail("warning: " + w.message());
    }
  }
  const std::string out = (dir / plan.file).string();
  if (format == OutputFormat::kJson) {
    PrintJson({{"file", out},
               {"type", plan.full ? "full" : "incremental"},
               {"reason", plan.full ? Json(plan.why_full) : Json()},
               {"backing-file", plan.full ? Json() : Json(st.layers[st.layers.size() - 2].file)},
               {"bitmap", plan.new_name},
               {"frozen", plan.full ? Json() : Json(plan.current)},
               {"disk-size", disk_size},
               {"dirty-bytes", plan.full ? Json() : Json(dirty_bytes)},
               {"bytes-read", total},
               {"data-clusters", (*writer)->data_clusters()},
               {"zero-clusters", (*writer)->zero_clusters()},
               {"seconds", secs},
               {"verified", verify},
               {"offline", true}});
  } else {
    std::printf("%s: %s backup (offline%s%s), %s read in %.1f s%s\n", out.c_str(),
                plan.full ? "full" : "incremental", plan.full ? ", " : "",
                plan.full ? plan.why_full.c_str() : "", HumanSize(total).c_str(), secs,
                verify ? ", verified" : "");
  }
  return kExitOk;
}

}  // namespace cbt::cli
