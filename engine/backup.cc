// BackupManager: backup sessions over a live tracker (backup.h).
#include "engine/backup.h"

#include <spdlog/spdlog.h>

namespace cbt {

BackupManager::BackupManager(Tracker& tracker, BackupOptions opts)
    : tracker_(tracker), opts_(std::move(opts)) {}

BackupManager::~BackupManager() {
  Shutdown();
}

// The copy unit: 64 KiB (QEMU's), doubled for very large disks so that the
// per-block state stays within 32 MiB.
uint32_t BackupManager::BlockSize() const {
  uint64_t bs = 65536;
  while (tracker_.disk_size() / bs >= (uint64_t{1} << 25) && bs < (16u << 20)) bs *= 2;
  return static_cast<uint32_t>(bs);
}

BackupStatus BackupManager::StatusLocked() const {
  BackupStatus st;
  if (!session_) return st;
  st.active = true;
  st.id = id_;
  st.frozen = frozen_;
  st.new_name = new_name_;
  st.disk_size = session_->options().disk_size;
  st.block_size = session_->options().block_size;
  st.broken = session_->broken();
  st.stats = session_->stats();
  st.endpoint = endpoint_;
  return st;
}

BackupStatus BackupManager::Query() const {
  std::lock_guard lock(mu_);
  return StatusLocked();
}

std::shared_ptr<Fleece> BackupManager::Current(uint64_t* id) const {
  std::lock_guard lock(mu_);
  if (id) *id = id_;
  return session_;
}

Result<BackupStatus> BackupManager::Begin(const BackupBeginRequest& r,
                                          std::chrono::milliseconds drain) {
  std::lock_guard lock(mu_);
  if (session_)
    return Status::Busy("backup session " + std::to_string(id_) +
                        " is open: another backup is running, or one was left open (end it "
                        "with backup-end / 'cbt backup end' only if no backup runs)");
  if (!tracker_.attached_for_writing())
    return Status::Busy(
        "no writable client yet: the bitmaps are loaded when the first one connects");
  std::shared_ptr<BlockIO> store;
  if (opts_.make_store) {
    CBT_ASSIGN_OR_RETURN(store, opts_.make_store());
  } else {
    auto made = CreateFleeceFile(opts_.dir);
    if (!made.ok())
      return made.status().WithContext("the fleece store (cbt-fleece-dir=" + opts_.dir + ")");
    store = std::move(*made);
  }
  FleeceOptions fo;
  fo.disk_size = tracker_.disk_size();
  fo.block_size = BlockSize();
  fo.max_bytes = opts_.max_bytes;
  fo.on_error = opts_.on_error;
  CBT_ASSIGN_OR_RETURN(std::unique_ptr<Fleece> made, Fleece::Create(std::move(store), fo));
  std::shared_ptr<Fleece> f = std::move(made);

  bool installed = false;
  Status s = tracker_.Edit(
      [&](BitmapEditSet& set) {
        if (r.freeze) return set.Checkpoint(*r.freeze, r.new_name);
        return set.Add(r.new_name, r.granularity, /*persistent=*/true, /*disabled=*/false);
      },
      drain,
      [&] {
        live_.store(f.get(), std::memory_order_release);
        installed = true;
      });
  if (!s.ok()) {
    if (installed) {
      // The edit was swapped in but its store failed (and was rolled
      // back): take the session out again. Unbounded, as the rollback.
      while (
          !tracker_.Quiesce([&] { live_.store(nullptr); }, std::chrono::milliseconds(60000)).ok())
        spdlog::warn("ending a failed backup-begin: still waiting for changes in flight");
      f->End();
    }
    return s;
  }
  session_ = std::move(f);
  id_ = ++last_id_;
  frozen_ = r.freeze.value_or("");
  new_name_ = r.new_name;
  endpoint_.reset();
  spdlog::info("backup session {} begun ({}{}, copy unit {} bytes)", id_,
               frozen_.empty() ? "no bitmap frozen" : "froze " + frozen_,
               ", recording " + new_name_, fo.block_size);
  return StatusLocked();
}

Result<BackupStatus> BackupManager::End(std::optional<uint64_t> id,
                                        std::chrono::milliseconds drain) {
  std::lock_guard lock(mu_);
  if (!session_) return Status::NotFound("no backup session is open");
  if (id && *id != id_)
    return Status::NotFound("backup session " + std::to_string(*id) +
                            " is not open (the open one is " + std::to_string(id_) + ")");
  CBT_RETURN_IF_ERROR(tracker_.Quiesce([&] { live_.store(nullptr); }, drain));
  BackupStatus st = StatusLocked();
  st.active = false;
  session_->End();
  session_.reset();
  endpoint_.reset();
  spdlog::info("backup session {} ended ({} blocks copied, {} bytes stored{})", st.id,
               st.stats.copied_blocks, st.stats.stored_bytes, st.broken ? ", broken" : "");
  return st;
}

Status BackupManager::SetEndpoint(uint64_t id, BackupEndpoint e) {
  std::lock_guard lock(mu_);
  if (!session_ || id != id_)
    return Status::NotFound("backup session " + std::to_string(id) + " is not open");
  endpoint_ = std::move(e);
  return Status::OK();
}

void BackupManager::Shutdown() {
  std::lock_guard lock(mu_);
  live_.store(nullptr);
  if (session_) session_->End();
  session_.reset();
}

}  // namespace cbt
