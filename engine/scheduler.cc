#include "engine/scheduler.h"

#include <spdlog/spdlog.h>

namespace cbt {

void PersistScheduler::Start() {
  if (thread_.joinable()) return;
  stop_ = false;
  thread_ = std::thread([this] { Run(); });
}

void PersistScheduler::Stop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void PersistScheduler::Run() {
  std::unique_lock lock(mu_);
  while (!cv_.wait_for(lock, interval_, [this] { return stop_; })) {
    if (!tracker_.HasPendingChanges()) continue;
    lock.unlock();
    // On failure the changes stay pending; the next round retries. An
    // exception (bad_alloc) must not escape the thread: std::terminate would
    // take nbdkit down without its final persist.
    Status s;
    try {
      s = tracker_.Persist();
    } catch (const std::exception& e) {
      s = Status::IOError(std::string("exception: ") + e.what(), ENOMEM);
    } catch (...) {
      s = Status::IOError("unknown exception", EIO);
    }
    if (s.ok())
      spdlog::debug("periodic persist done");
    else
      spdlog::error("periodic persist failed: {}", s.message());
    lock.lock();
  }
}

}  // namespace cbt
