// Tracker implementation. The in_use protocol, with the crash outcome of
// each state (durability mode "none": QEMU's semantics):
//
//   state             on disk                     crash leaves
//   CLEAN             in_use=0, data == memory    an exact bitmap
//   GATE (setting)    in_use being written        CLEAN (nothing forwarded yet)
//   ACTIVE            in_use=1, durable           in_use=1: refused on restart
//   PERSIST writing   in_use=1, clusters moving   in_use=1: refused on restart
//   PERSIST clearing  in_use cleared, not synced  in_use=1 (refused) or CLEAN,
//                                                 where CLEAN holds every change
//                                                 forwarded so far
//
// Clearing in_use is only correct if every change forwarded so far is in
// the clusters just flushed. A writer marks (A), then reads in_use_durable_
// (B), then forwards. Persist stores in_use_durable_ = false (C), waits until
// no mark is in progress (D), then checks for changed chunks (E). All of
// these are sequentially consistent: if the writer read true at B, its marks
// finished before C, so either the chunk it changed was taken before the
// flush or E sees it and in_use stays set. A writer reading false waits at
// the gate for store_mu_, which Persist holds until it is done, and then sets
// in_use again before forwarding.
#include "engine/tracker.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <bit>
#include <cerrno>

#include "engine/bitmap_store.h"
#include "qcow2/check.h"

namespace cbt {

namespace {

uint64_t RoundUp512(uint64_t v) {
  return (v + 511) & ~uint64_t{511};
}

// The refusal of a bitmap left in use. Suggests the crash-safe modes only to
// a server that does not run in one already.
std::string RecoveryHint(const std::string& file, const std::string& name, Durability mode) {
  std::string s = "bitmap '" + name + "' in " + file +
                  " was not closed cleanly (in-use flag set) and cannot be trusted; make it "
                  "usable with 'cbt recover " +
                  file + " --bitmap " + name +
                  " --mark-all' (everything becomes dirty: the next incremental backup copies "
                  "the whole disk), or remove it with 'cbt bitmap " +
                  file + " " + name + " --remove'";
  if (mode == Durability::kNone)
    s += "; cbt-durability=power (the default) or process (cbt serve: --durability) survives "
         "crashes without this";
  return s;
}

Status CheckSize(const qcow2::Image& img, const std::string& where, uint64_t disk_size) {
  if (img.virtual_size() == RoundUp512(disk_size)) return Status::OK();
  return Status::InvalidArgument(
      where + ": size mismatch: the container tracks a disk of " +
      std::to_string(img.virtual_size()) + " bytes but this disk has " + std::to_string(disk_size) +
      " bytes; use the container made for this disk (or create a new one)");
}

}  // namespace

// Every container write passes here. Closed (writes refused with EROFS)
// until Attach(size): nbdkit says whether an export is read-only only when a
// client connects, so everything before that, and everything for a
// read-only export, cannot write by construction.
class Tracker::WriteGate final : public BlockIO {
 public:
  explicit WriteGate(std::shared_ptr<BlockIO> io) : io_(std::move(io)) {}
  void Open() { open_.store(true); }
  bool refused() const { return refused_.load(); }

  Status pread(std::span<std::byte> out, uint64_t offset) override {
    return io_->pread(out, offset);
  }
  Status pwrite(std::span<const std::byte> in, uint64_t offset) override {
    if (!open_.load()) return Refuse();
    return io_->pwrite(in, offset);
  }
  Status flush() override {
    if (!open_.load()) return Refuse();
    return io_->flush();
  }
  Result<uint64_t> size() override { return io_->size(); }
  Status resize(uint64_t new_size) override {
    if (!open_.load()) return Refuse();
    return io_->resize(new_size);
  }
  const char* name() const override { return io_->name(); }

 private:
  Status Refuse() {
    refused_.store(true);
    return Status::IOError(std::string(io_->name()) +
                               ": not written: the container stays read-only until a "
                               "writable client connects",
                           EROFS);
  }
  std::shared_ptr<BlockIO> io_;
  std::atomic<bool> open_{false};
  std::atomic<bool> refused_{false};
};

Result<std::unique_ptr<Tracker>> Tracker::Open(const TrackerOptions& opts, uint64_t disk_size) {
  CBT_ASSIGN_OR_RETURN(std::unique_ptr<Tracker> t, Prepare(opts));
  CBT_RETURN_IF_ERROR(t->Attach(disk_size));
  return t;
}

Result<std::unique_ptr<Tracker>> Tracker::Prepare(const TrackerOptions& opts) {
  if (opts.bitmaps.empty() && !opts.readonly)
    return Status::InvalidArgument("cbt-bitmap: at least one bitmap is required");
  std::unique_ptr<Tracker> t(new Tracker(opts));
  CBT_RETURN_IF_ERROR(t->OpenContainer());
  if (t->image_) CBT_RETURN_IF_ERROR(t->LoadContainerState());
  return t;
}

// The crash-safety record found in the open container, and the bitmaps'
// state (P4).
Status Tracker::LoadContainerState() {
  found_record_.reset();
  const std::vector<std::byte>* rec = image_->GetExtension(kIntentExtensionType);
  if (rec && image_->private_record_vouched()) {
    auto m = IntentMap::Parse(*rec);
    if (!m.ok()) return m.status().WithContext(Where());
    found_record_ = std::move(m).value();
  }
  found_identity_ = IdentityRecord{};
  if (!opts_.internal) {
    auto idr = LoadIdentityRecord(*image_);
    if (!idr.ok())
      return Status::Corruption(Where() + ": " + idr.status().message() + "; 'cbt recover " +
                                opts_.container_path + " --bitmap NAME --mark-all' rewrites it");
    found_identity_ = std::move(idr).value();
  }
  return CheckBitmaps();
}

// A crash left in_use set; our record can rebuild a superset if it was
// synced (power), or if the machine has not restarted since (process: the
// page cache survived, so every record write landed).
bool Tracker::RecordRecoverable() const {
  if (!found_record_) return false;
  return found_record_->mode() == IntentMode::kPower || found_record_->boot_id() == CurrentBootId();
}

Tracker::~Tracker() = default;

std::string Tracker::Where() const {
  return opts_.internal ? "internal bitmaps of " + opts_.container_path
                        : "cbt-file=" + opts_.container_path;
}

std::string Tracker::Label() const {
  return opts_.internal ? "internal bitmaps" : "cbt-file";
}

// Opens and locks an existing container, through the closed write gate;
// leaves image_ empty when it does not exist and may be created (Attach
// creates it).
Status Tracker::OpenContainer() {
  const std::string& path = opts_.container_path;
  bool ro = opts_.readonly;
  Storage& st = storage();
  auto file = st.Open(path, ro ? Storage::Mode::kReadOnly : Storage::Mode::kReadWrite);
  if (!file.ok() && !ro) {
    const int e = file.status().err();
    if (e == EACCES || e == EROFS || e == EPERM) {
      // We may not write it: enough for a read-only export (AttachReadOnly);
      // Attach(size) refuses it.
      auto rf = st.Open(path, Storage::Mode::kReadOnly);
      if (rf.ok()) {
        spdlog::debug("{}: not writable here ({}); opened read-only", path,
                      file.status().message());
        file = std::move(rf);
        ro = true;
        container_readonly_ = true;
      }
    }
  }
  if (!file.ok() && file.status().IsNotFound()) {
    if (!opts_.create || opts_.readonly)
      return Status::NotFound(Where() +
                              ": no such file; add cbt-create=true (cbt serve: --create) to "
                              "create it");
    // Attach creates it after nbdkit forks: find what would stop it now.
    return st.CheckCreatable(path).WithContext(Where());
  }
  if (!file.ok()) return file.status().WithContext(Label());
  qcow2::OpenOptions oo;
  oo.writable = !ro;
  oo.refcounts = opts_.shared_refcounts;
  gate_ = std::make_shared<WriteGate>(std::move(file).value());
  auto img = qcow2::Image::Open(gate_, oo);
  if (!img.ok() && oo.writable && gate_->refused()) {
    // The writable open wants to write: validate a read-only open now, and
    // open for writing in Attach(size), once we know a client may write.
    oo.writable = false;
    img = qcow2::Image::Open(gate_, oo);
    reopen_writable_ = true;
  }
  if (!img.ok()) return img.status().WithContext(Label());
  // P4: overlapping metadata or refcounts below the references would let a
  // persist allocate a cluster holding live bits (or the refcount table).
  if (!opts_.readonly) CBT_RETURN_IF_ERROR(qcow2::CheckBeforeWrite(**img).WithContext(Label()));
  image_ = std::move(img).value();
  return Status::OK();
}

// Requested bitmaps must exist (unless they may be created), and some
// bitmap must record; no enabled bitmap may be inconsistent (P4).
Status Tracker::CheckBitmaps() const {
  const std::string& path = opts_.container_path;
  for (const std::string& name : opts_.bitmaps) {
    auto info = image_->Find(name);
    if (!info.ok()) {
      if (!opts_.create || opts_.readonly)
        return Status::NotFound("cbt-bitmap=" + name + ": no such bitmap in " + path +
                                "; add cbt-create=true (cbt serve: --create) to create it");
      continue;
    }
  }
  // A named bitmap found disabled (frozen by an online checkpoint, say) is
  // fine while another one records: the container's flags are the truth
  // after online edits. With nothing recording, changes would go untracked.
  std::string recording;
  for (const qcow2::BitmapInfo& info : image_->Bitmaps())
    if (info.enabled) recording += (recording.empty() ? "'" : ", '") + info.name + "'";
  for (const std::string& name : opts_.bitmaps) {
    auto info = image_->Find(name);
    if (!info.ok()) recording += (recording.empty() ? "'" : ", '") + name + "' (new)";
  }
  for (const std::string& name : opts_.bitmaps) {
    auto info = image_->Find(name);
    if (!info.ok() || info->enabled) continue;
    if (recording.empty())
      return Status::InvalidArgument(
          "cbt-bitmap=" + name + ": the bitmap is disabled in " + path +
          " and no other bitmap records, so changes would go untracked; enable it with 'cbt "
          "bitmap " +
          path + " " + name +
          " --enable' or name a new one with cbt-create=true (cbt serve: --bitmap NEW --create)");
    spdlog::info(
        "cbt-bitmap={}: disabled in {} (frozen by a checkpoint?), so it does not record; "
        "recording: {}",
        name, path, recording);
  }
  for (const qcow2::BitmapInfo& info : image_->Bitmaps()) {
    if (info.enabled && !info.consistent && !RecordRecoverable()) {
      if (found_record_)
        return Status::Corruption(
            RecoveryHint(path, info.name, opts_.durability) +
            "; its crash-safety record was written in process mode under another boot id (the "
            "machine has restarted since, or the files were moved from another machine), so it "
            "may have lost records" +
            (opts_.durability == Durability::kPower ? ""
                                                    : " (cbt-durability=power survives that; "
                                                      "cbt serve: --durability power)"));
      return Status::Corruption(RecoveryHint(path, info.name, opts_.durability));
    }
    if (!info.enabled && !info.consistent)
      spdlog::warn("{}: disabled bitmap '{}' is inconsistent (in-use); leaving it untouched", path,
                   info.name);
  }
  return Status::OK();
}

// cbt-autoload=false: the enabled bitmaps not named stop recording. They
// could not know the changes this server forwards, so they must not look
// exact: disabled (never adopted by a crash-safety record, which covers
// enabled bitmaps only) and in use (inconsistent: QEMU and cbt refuse them)
// in one crash-safe directory switch, before the first change. Their bits
// stay; `cbt recover` and `cbt bitmap --enable` bring one back.
Status Tracker::SetAsideUnnamed() {
  std::vector<qcow2::BitmapSpec> specs = image_->CurrentSpecs();
  std::string names;
  for (qcow2::BitmapSpec& spec : specs) {
    auto info = image_->Find(spec.name);
    if (!info.ok() || !info->enabled || !info->consistent) continue;
    if (std::find(opts_.bitmaps.begin(), opts_.bitmaps.end(), spec.name) != opts_.bitmaps.end())
      continue;
    spec.enabled = false;
    spec.in_use = true;
    names += (names.empty() ? "'" : ", '") + spec.name + "'";
  }
  if (names.empty()) return Status::OK();
  CBT_RETURN_IF_ERROR(image_->Commit(specs).WithContext(Where() + ": cbt-autoload=false"));
  spdlog::warn(
      "{}: cbt-autoload=false: bitmap(s) {} do not record here, so they are now disabled and "
      "marked in use (inconsistent: they miss the changes made from now on); 'cbt recover' "
      "and 'cbt bitmap --enable' bring one back",
      opts_.container_path, names);
  return Status::OK();
}

Status Tracker::AttachReadOnly(uint64_t disk_size) {
  disk_size_ = disk_size;
  const std::string& path = opts_.container_path;
  if (!image_) {
    spdlog::info("{} does not exist and is not created for a read-only export", path);
    attached_ro_.store(true);
    return Status::OK();
  }
  CBT_RETURN_IF_ERROR(CheckSize(*image_, Where(), disk_size_));
  CBT_RETURN_IF_ERROR(CheckDiskIdentity());
  for (const qcow2::BitmapInfo& info : image_->Bitmaps())
    if (info.enabled && !info.consistent)
      spdlog::info(
          "{}: bitmap '{}' is in use from an unclean stop; left as found for the next "
          "writable server to recover",
          path, info.name);
  attached_ro_.store(true);
  return Status::OK();
}

Status Tracker::Attach(uint64_t disk_size) {
  if (opts_.readonly) return AttachReadOnly(disk_size);  // nothing will be marked or written
  const std::string& path = opts_.container_path;
  if (container_readonly_)
    return Status::IOError(
        Where() +
            ": the container is read-only here (no write permission or a "
            "read-only file system); a writable export needs a writable "
            "container, or serve the export read-only (nbdkit -r; cbt serve: -r)",
        EROFS);
  disk_size_ = disk_size;
  bool created = false;
  if (gate_) {
    gate_->Open();
    if (reopen_writable_) {
      image_.reset();
      qcow2::OpenOptions oo;
      oo.writable = true;
      oo.refcounts = opts_.shared_refcounts;
      auto img = qcow2::Image::Open(gate_, oo);
      if (!img.ok()) return img.status().WithContext(Label());
      image_ = std::move(img).value();
      reopen_writable_ = false;
      CBT_RETURN_IF_ERROR(LoadContainerState());
    }
  }
  if (!image_) {
    auto nf = storage().Open(path, Storage::Mode::kCreate);
    if (!nf.ok()) return nf.status().WithContext(Label());
    qcow2::CreateOptions co;
    co.virtual_size = disk_size_;
    co.cluster_size = opts_.cluster_size;
    auto img = qcow2::Image::Create(std::move(nf).value(), co);
    if (!img.ok()) {
      storage().Remove(path);  // we made it; leave nothing half-built behind
      return img.status().WithContext(Where() + ": create");
    }
    image_ = std::move(img).value();
    created = true;
    spdlog::info("created container {} for a disk of {} bytes", path, disk_size_);
  }

  CBT_RETURN_IF_ERROR(CheckSize(*image_, Where(), disk_size_));
  CBT_RETURN_IF_ERROR(CheckDiskIdentity());
  cluster_size_.store(image_->cluster_size());

  // Bitmaps our own crash left in_use: take them back (CheckBitmaps made
  // sure the record covers them); Recover() below makes them a superset.
  bool recovering = false;
  for (const qcow2::BitmapInfo& info : image_->Bitmaps()) {
    if (!info.enabled || info.consistent) continue;
    if (found_record_->disk_size() != disk_size_)
      return Status::Corruption(Where() + ": the crash-safety record describes another disk size");
    CBT_RETURN_IF_ERROR(image_->AdoptInconsistent(info.name));
    recovering = true;
  }

  std::vector<qcow2::BitmapSpec> specs = image_->CurrentSpecs();
  bool add = false;
  for (const std::string& name : opts_.bitmaps) {
    if (image_->Find(name).ok()) continue;
    qcow2::BitmapSpec s;
    s.name = name;
    s.granularity_bits = static_cast<uint32_t>(std::countr_zero(opts_.granularity));
    s.enabled = true;
    specs.push_back(std::move(s));
    add = true;
  }
  if (add) {
    Status s = image_->Commit(specs);
    if (!s.ok()) {
      if (created) storage().Remove(path);
      return s.WithContext(Where() + ": add bitmaps");
    }
  }

  if (!opts_.autoload) CBT_RETURN_IF_ERROR(SetAsideUnnamed());

  // Every consistent bitmap is loaded (disabled ones too: edits and queries
  // need them); recording persistent ones get their durable shadow. A
  // disabled bitmap in use on disk is inconsistent here too, also when this
  // open set the flag (SetAsideUnnamed): it is not loaded, queries say so,
  // and an edit keeps its flag (only --remove applies to it).
  std::vector<LiveBitmap> all;
  for (const qcow2::BitmapInfo& info : image_->Bitmaps()) {
    LiveBitmap lb;
    lb.name = info.name;
    lb.granularity_bits = info.granularity_bits;
    lb.recording = info.enabled;
    lb.consistent = info.consistent && !(info.in_use && !info.enabled);
    if (lb.consistent) {
      CBT_ASSIGN_OR_RETURN(std::unique_ptr<DirtyBitmap> bits,
                           LoadBitmap(*image_, info.name, disk_size_));
      lb.bits = std::move(bits);
      if (lb.recording) {
        CBT_ASSIGN_OR_RETURN(lb.durable, CopyOf(*lb.bits));
      }
      spdlog::debug("loaded bitmap '{}' (granularity {}, {} dirty bytes)", info.name,
                    info.granularity(), lb.bits->DirtyBytes());
    }
    all.push_back(std::move(lb));
  }
  Publish(BitmapSet::Make(std::move(all)));
  stored_set_ = set_;
  if (recovering) CBT_RETURN_IF_ERROR(Recover());
  CBT_RETURN_IF_ERROR(ArmRecord());
  attached_rw_.store(true);
  return Status::OK();
}

// After a crash: every granule of every recorded region becomes dirty, the
// result is persisted (in place; flushed) and in_use cleared. Until that
// flush the record stays as found, so a crash during recovery recovers again.
Status Tracker::Recover() {
  uint64_t before = 0, after = 0;
  const BitmapSet& set = *stored_set_;
  for (size_t i : set.recording) before += set.all[i].bits->DirtyGranules();
  for (auto [off, len] : found_record_->RecordedRanges())
    for (size_t i : set.recording) CBT_RETURN_IF_ERROR(set.all[i].bits->Mark(off, len).status());
  for (size_t i : set.recording) after += set.all[i].bits->DirtyGranules();
  in_use_on_disk_.store(true);
  CBT_RETURN_IF_ERROR(Persist().WithContext("crash recovery"));
  // Make the cleared in_use durable too: the record found at open is
  // replaced at the first change, and in_use must never outlive it on disk.
  CBT_RETURN_IF_ERROR(image_->io()->flush().WithContext("crash recovery"));
  AddStat(&TrackerStats::recovered_granules, after - before);
  // RecordedRanges merges adjacent regions: count the regions themselves.
  const uint64_t region = uint64_t{1} << found_record_->region_bits();
  uint64_t regions = 0;
  for (auto [off, len] : found_record_->RecordedRanges()) regions += (len + region - 1) / region;
  spdlog::warn("{}: recovered from an unclean stop: {} granules added from {} recorded region(s)",
               opts_.container_path, after - before, regions);
  return Status::OK();
}

// Prepares this session's record (process/power) in memory. It is written
// lazily, with the first change (ArmLocked), so that a server that never
// writes (nbdkit -r) never writes the container.
Status Tracker::ArmRecord() {
  if (opts_.durability == Durability::kNone) return Status::OK();
  IntentMode mode =
      opts_.durability == Durability::kPower ? IntentMode::kPower : IntentMode::kProcess;
  size_t room = std::min<size_t>(image_->cluster_size() / 2, 32768);
  CBT_ASSIGN_OR_RETURN(intents_, IntentMap::Create(disk_size_, mode, CurrentBootId(), room));
  return Status::OK();
}

// First change of the session. process/power: write a fresh record (our
// boot id and mode) vouched by the autoclear bit, in one flushed header
// switch. none: remove any record left by an earlier session, so that a
// crash is refused rather than "recovered" from a stale record.
//
// Either way the disk identity record goes in the same header switch: from
// now on the disk changes under our own writes, and after a crash the next
// start cannot tell those from another program's (docs/crash-safety.md).
// Close records it again after a clean stop.
Status Tracker::ArmLocked() {
  if (armed_) return Status::OK();
  qcow2::Image::PrivateRecordUpdate u[2];
  u[0].type = kIntentExtensionType;
  if (intents_) u[0].data = intents_->Serialize(intents_->Snapshot());
  u[1].type = kIdentityExtensionType;
  Status s = image_->UpdatePrivateRecords(u);
  if (!s.ok()) return s.WithContext(intents_ ? Where() + ": crash-safety record" : Label());
  if (intents_)
    spdlog::debug("crash-safety record armed: {} regions of {} bytes", intents_->region_count(),
                  uint64_t{1} << intents_->region_bits());
  armed_ = true;
  armed_once_.store(true);
  return Status::OK();
}

Result<Tracker::Change> Tracker::BeginChange(uint64_t offset, uint64_t length) {
  gate_changes_.Enter();
  Change change(&gate_changes_);  // leaves the gate on every return path
  if (!armed_once_.load(std::memory_order_acquire)) CBT_RETURN_IF_ERROR(DisarmIdentity());
  const BitmapSet* set = live_.load(std::memory_order_acquire);
  if (!set || set->recording.empty()) return change;  // nothing records
  // Already dirty in every recording bitmap, on disk and flushed (or, for a
  // transient bitmap, in memory): covered.
  bool covered = true;
  for (size_t i : set->recording) {
    const LiveBitmap& b = set->all[i];
    const DirtyBitmap& known = b.durable ? *b.durable : *b.bits;
    if (!known.IsDirty(offset, length)) {
      covered = false;
      break;
    }
  }
  if (covered) return change;

  // P1: in memory first, in every recording bitmap.
  change_count_.fetch_add(1, std::memory_order_relaxed);
  marks_in_progress_.fetch_add(1);
  for (size_t i : set->recording) {
    auto r = set->all[i].bits->Mark(offset, length);
    if (!r.ok()) {
      marks_in_progress_.fetch_sub(1);
      return r.status();
    }
  }
  marks_in_progress_.fetch_sub(1);
  if (set->in_use_names.empty()) return change;  // only transient bitmaps record
  if (!intents_) {
    // P2: in_use durable before the change is forwarded.
    if (in_use_durable_.load()) return change;
    CBT_RETURN_IF_ERROR(EnsureInUse(*set));
    return change;
  }
  // process/power: also the region's intent recorded before it is forwarded.
  auto [r0, r1] = intents_->Regions(offset, length);
  if (in_use_durable_.load() && intents_->AllDurable(r0, r1)) return change;
  intents_->Want(r0, r1);  // before queueing: whoever writes next takes it along
  CBT_RETURN_IF_ERROR(EnsureRecorded(*set, r0, r1));
  return change;
}

// Group commit: every writer waiting here has Want()ed its regions, so the
// first one through writes them all in one record write (and one flush).
Status Tracker::EnsureRecorded(const BitmapSet& set, uint64_t first_region, uint64_t last_region) {
  std::unique_lock lock(store_mu_);
  CBT_RETURN_IF_ERROR(WaitStored(lock, set));
  if (!image_) return Status::IOError("cbt: container already closed", ESHUTDOWN);
  intents_->Want(first_region, last_region);  // again: a persist may have cleared it
  std::vector<uint64_t> snap = intents_->Snapshot();
  const bool set_in_use = !in_use_durable_.load();
  if (!set_in_use && intents_->SnapshotIsDurable(snap)) return Status::OK();
  // Record first, then in_use: a crash between leaves in_use clear (the
  // change was not forwarded) with a harmless extra record bit.
  CBT_RETURN_IF_ERROR(ArmLocked());
  CBT_RETURN_IF_ERROR(
      image_->RewriteExtensionInPlace(kIntentExtensionType, intents_->Serialize(snap)));
  if (set_in_use) {
    CBT_RETURN_IF_ERROR(image_->SetInUse(set.in_use_names, true));
    in_use_on_disk_.store(true);
  }
  // power: record durable before the change. process: the page cache orders
  // it for kill -9; in_use is still synced, so that after a power cut the
  // bitmap is refused (boot id check), never trusted without its record.
  if (opts_.durability == Durability::kPower || set_in_use)
    CBT_RETURN_IF_ERROR(image_->io()->flush());
  intents_->SetDurable(snap);
  AddStat(&TrackerStats::intent_writes);
  if (set_in_use) AddStat(&TrackerStats::in_use_sets);
  in_use_durable_.store(true);
  return Status::OK();
}

// A change marked in a set an edit has swapped in but not stored yet waits
// for the edit's commit: in_use goes on that set's bitmaps.
Status Tracker::WaitStored(std::unique_lock<std::mutex>& lock, const BitmapSet& set) {
  committed_cv_.wait(lock, [&] {
    return !stored_set_ || stored_set_->generation >= set.generation ||
           abandoned_generation_ == set.generation;
  });
  if (stored_set_ && stored_set_->generation < set.generation)
    return Status::IOError("cbt: the online edit this change ran under failed to store");
  return Status::OK();
}

Status Tracker::EnsureInUse(const BitmapSet& set) {
  std::unique_lock lock(store_mu_);
  CBT_RETURN_IF_ERROR(WaitStored(lock, set));
  if (in_use_durable_.load()) return Status::OK();  // set by a writer we queued behind
  if (!image_) return Status::IOError("cbt: container already closed", ESHUTDOWN);
  CBT_RETURN_IF_ERROR(ArmLocked());
  CBT_RETURN_IF_ERROR(image_->SetInUse(set.in_use_names, true));
  in_use_on_disk_.store(true);  // maybe on disk now, whatever the flush says
  CBT_RETURN_IF_ERROR(image_->io()->flush());
  AddStat(&TrackerStats::in_use_sets);
  in_use_durable_.store(true);
  return Status::OK();
}

}  // namespace cbt
