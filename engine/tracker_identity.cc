// Tracker: the disk identity (engine/disk_identity.h): dropped at a
// session's first change, checked at attach, recorded at a clean stop.
#include <spdlog/spdlog.h>

#include <string>
#include <vector>

#include "engine/disk_identity.h"
#include "engine/tracker.h"

namespace cbt {

// The first change of a session that needs no mark (every granule it
// touches is dirty on disk already) still changes the disk: the identity
// record must go first.
Status Tracker::DisarmIdentity() {
  std::lock_guard lock(store_mu_);
  if (!image_) return Status::IOError("cbt: container already closed", ESHUTDOWN);
  return ArmLocked();
}

// Where the disk's identity comes from: the caller's source, else the
// container's data-file link. Null: unknown.
std::function<Result<DiskIdentity>()> Tracker::IdentitySource() const {
  if (opts_.internal) return nullptr;
  if (opts_.disk_identity) return opts_.disk_identity;
  if (!image_) return nullptr;
  std::string df = image_->data_file();
  if (df.empty()) return nullptr;
  std::optional<std::string> path = RecordedDiskPath(*image_, opts_.container_path, "");
  if (!path) return nullptr;
  return [p = *path] { return FileIdentity(p); };
}

// At attach, before the first change: every enabled bitmap recorded for
// the disk as it was at the last clean stop must find it unchanged, or it
// would miss what another program wrote meanwhile (P4).
Status Tracker::CheckDiskIdentity() {
  if (identity_checked_ || opts_.internal) return Status::OK();
  identity_checked_ = true;
  auto source = IdentitySource();
  if (!source) {
    spdlog::info(
        "{}: {}", Where(),
        UnknownIdentityNote(opts_.no_identity_reason.empty() ? "no file= and no data-file link"
                                                             : opts_.no_identity_reason));
    return Status::OK();
  }
  Result<DiskIdentity> now = source();
  if (!now.ok()) {
    spdlog::info("{}: {}", Where(), UnknownIdentityNote(now.status().message()));
    return Status::OK();
  }
  const IdentityVerdict v = JudgeDiskIdentity(found_identity_, image_->Bitmaps(), *now);
  if (!v.missing.empty()) spdlog::info("{}: {}", Where(), MissingIdentityNote(v, *now));
  if (!v.moved.empty()) spdlog::info("{}: {}", Where(), MovedDiskNote(v));
  if (v.changed.empty()) return Status::OK();
  if (opts_.trust_disk) {
    spdlog::warn(
        "{}: {} changed while no tracker ran ({}); accepted for bitmap(s) {} "
        "(cbt-trust-disk=true), recorded anew at the next clean stop",
        Where(), now->path, v.what, QuotedNames(v.changed));
    return Status::OK();
  }
  return Status::InvalidArgument(
      ChangedDiskRefusal(v, *now, opts_.container_path, "BACKUP",
                         "add cbt-trust-disk=true (cbt serve: -o cbt-trust-disk=true) if the "
                         "change was tracked elsewhere"),
      ESTALE);
}

// A clean stop: everything stored, in_use clear. Every enabled bitmap is
// now valid for the disk as it is: record that (only if it differs from
// what the container holds).
Status Tracker::RecordIdentityLocked() {
  auto source = IdentitySource();
  if (!source) return Status::OK();
  Result<DiskIdentity> now = source();
  if (!now.ok()) {
    spdlog::info("{}: the disk's identity cannot be recorded ({})", Where(),
                 now.status().message());
    return Status::OK();
  }
  IdentityRecord r;
  for (const qcow2::BitmapInfo& info : image_->Bitmaps())
    if (info.enabled && info.consistent) CBT_RETURN_IF_ERROR(r.Set(info.name, *now));
  const std::vector<std::byte>* cur = image_->GetExtension(kIdentityExtensionType);
  if (r.empty()) {
    if (!cur) return Status::OK();
    return image_->RemovePrivateRecord(kIdentityExtensionType).WithContext(Where());
  }
  std::vector<std::byte> bytes = r.Serialize();
  if (cur && *cur == bytes && image_->private_record_vouched()) return Status::OK();
  Status s = image_->SetPrivateRecord(kIdentityExtensionType, std::move(bytes));
  if (!s.ok()) return s.WithContext(Where() + ": disk identity record");
  spdlog::debug("disk identity recorded: {}", DescribeIdentity(*now));
  return Status::OK();
}

}  // namespace cbt
