#include "engine/scheduler.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <exception>
#include <optional>
#include <string>

namespace cbt {

namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

std::chrono::milliseconds PersistScheduler::PollPeriod() const {
  if (triggers_.threshold_bytes == 0 && triggers_.idle.count() <= 0)
    return std::chrono::milliseconds{0};
  if (triggers_.idle.count() <= 0) return kMaxPoll;
  return std::clamp(triggers_.idle / 4, kMinPoll, kMaxPoll);
}

PersistSchedulerStats PersistScheduler::stats() const {
  PersistSchedulerStats s;
  s.polls = polls_.load(std::memory_order_relaxed);
  s.interval_persists = interval_.load(std::memory_order_relaxed);
  s.threshold_persists = threshold_.load(std::memory_order_relaxed);
  s.idle_persists = idle_.load(std::memory_order_relaxed);
  s.failures = failures_.load(std::memory_order_relaxed);
  return s;
}

void PersistScheduler::Start() {
  if (thread_.joinable() || !triggers_.any()) return;
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

bool PersistScheduler::PersistNow(Trigger why, uint64_t pending) {
  const char* name = "idle";
  std::atomic<uint64_t>* attempts = &idle_;
  if (why == Trigger::kInterval) {
    name = "periodic";
    attempts = &interval_;
  } else if (why == Trigger::kThreshold) {
    name = "threshold";
    attempts = &threshold_;
  }
  attempts->fetch_add(1, std::memory_order_relaxed);
  // On failure the changes stay pending; a later trigger retries. An
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
  if (s.ok()) {
    if (failures_in_a_row_)
      spdlog::warn("{} persist succeeded after {} failed attempt(s)", name, failures_in_a_row_);
    else if (why == Trigger::kThreshold)
      spdlog::debug("threshold persist done ({} bytes of bitmap data were pending)", pending);
    else
      spdlog::debug("{} persist done", name);
    failures_in_a_row_ = 0;
    unlogged_failures_ = 0;
    return true;
  }
  failures_.fetch_add(1, std::memory_order_relaxed);
  ++failures_in_a_row_;
  const auto now = Clock::now();
  if (last_log_ == Clock::time_point{} || now - last_log_ >= kLogEvery) {
    if (unlogged_failures_)
      spdlog::error("{} persist failed: {} (and {} more failure(s) not logged; retrying)", name,
                    s.message(), unlogged_failures_);
    else
      spdlog::error("{} persist failed: {} (retrying)", name, s.message());
    last_log_ = now;
    unlogged_failures_ = 0;
  } else {
    ++unlogged_failures_;
  }
  return false;
}

void PersistScheduler::Run() {
  const std::chrono::milliseconds poll = PollPeriod();
  const bool polling = poll.count() > 0;
  const bool interval_on = triggers_.interval.count() > 0;
  const bool idle_on = triggers_.idle.count() > 0;
  auto next_interval = Clock::now() + triggers_.interval;
  // Change counter as last seen, and when it was last seen to move.
  uint64_t seen = tracker_.ChangeCount();
  auto last_change = Clock::now();
  // Evaluate threshold (PendingBytes) / idle (HasPendingChanges) at the next
  // chance even if the counter did not move: at start (changes may predate
  // the thread), after a persist (a change may have raced it: counted
  // before, marked after), after a failure (still pending).
  bool threshold_recheck = true, idle_armed = true;
  auto retry_at = Clock::time_point::min();  // threshold/idle back-off
  auto backoff = kFirstBackoff;

  std::unique_lock lock(mu_);
  for (;;) {
    auto wake = Clock::time_point::max();
    if (interval_on) wake = next_interval;
    if (polling) wake = std::min(wake, Clock::now() + poll);
    if (cv_.wait_until(lock, wake, [this] { return stop_; })) return;
    lock.unlock();
    polls_.fetch_add(1, std::memory_order_relaxed);

    auto now = Clock::now();
    const uint64_t count = tracker_.ChangeCount();
    if (count != seen) {
      seen = count;
      last_change = now;
      threshold_recheck = idle_armed = true;
    }
    std::optional<Trigger> why;
    uint64_t pending = 0;
    if (interval_on && now >= next_interval) {
      next_interval = now + triggers_.interval;
      if (tracker_.HasPendingChanges()) why = Trigger::kInterval;
    }
    if (!why && polling && now >= retry_at) {
      if (triggers_.threshold_bytes && threshold_recheck) {
        threshold_recheck = false;
        pending = tracker_.PendingBytes();
        if (pending >= triggers_.threshold_bytes) why = Trigger::kThreshold;
      }
      if (!why && idle_on && idle_armed && now - last_change >= triggers_.idle) {
        idle_armed = false;  // until the next change (or the checks below)
        if (tracker_.HasPendingChanges()) why = Trigger::kIdle;
      }
    }
    if (why) {
      const bool ok = PersistNow(*why, pending);
      now = Clock::now();
      if (*why == Trigger::kInterval) next_interval = now + triggers_.interval;
      threshold_recheck = idle_armed = true;
      if (ok) {
        backoff = kFirstBackoff;
        retry_at = Clock::time_point::min();
      } else {
        retry_at = now + backoff;
        backoff = std::min(backoff * 2, kMaxBackoff);
      }
    }
    lock.lock();
  }
}

}  // namespace cbt
