#include "engine/change_gate.h"

#include <string>

namespace cbt {

void ChangeGate::Enter() {
  for (;;) {
    inside_.fetch_add(1);
    if (!paused_.load()) return;  // counted before any editor can see zero
    // An editor is draining: step back out and wait until it is done.
    Leave();
    std::unique_lock lock(mu_);
    resumed_.wait(lock, [&] { return !paused_.load(); });
  }
}

void ChangeGate::Leave() {
  if (inside_.fetch_sub(1) == 1 && paused_.load()) {
    // The lock orders this notify after the editor's check of inside_ (it
    // holds mu_ from its check until it waits), so the wake-up is not lost.
    std::lock_guard lock(mu_);
    drained_.notify_all();
  }
}

Status ChangeGate::Pause(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  paused_.store(true);
  if (drained_.wait_for(lock, timeout, [&] { return inside_.load() == 0; })) return Status::OK();
  const int64_t left = inside_.load();
  paused_.store(false);
  resumed_.notify_all();
  return Status::Busy(std::to_string(left) + " change(s) still in flight after " +
                      std::to_string(timeout.count()) +
                      " ms (the disk below is slow or stuck); nothing was changed, try again");
}

void ChangeGate::Resume() {
  std::lock_guard lock(mu_);
  paused_.store(false);
  resumed_.notify_all();
}

}  // namespace cbt
