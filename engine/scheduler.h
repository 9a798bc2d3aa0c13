// PersistScheduler: one background thread that calls Tracker::Persist when
// one of three triggers fires (the filter's cbt-persist-* parameters):
//
//   interval   every `interval` while changes are pending
//              (cbt-persist-interval=SEC)
//   threshold  once Tracker::PendingBytes() >= `threshold_bytes`: that much
//              bitmap data would be written (cbt-persist-threshold=SIZE)
//   idle       changes are pending and Tracker::ChangeCount() has not moved
//              for `idle` (cbt-persist-idle=MS)
//
// The data path is not touched: threshold and idle are evaluated by polling,
// every PollPeriod() (min(idle/4, 50 ms), at least 5 ms), one relaxed load of
// the change counter per poll; PendingBytes (a scan of one bit per bitmap
// cluster) only when that counter moved, after a persist, or when a retry is
// due; HasPendingChanges once per quiet period. See docs/perf.md.
//
// A failed persist is logged (at most one line per 10 s, with the count of
// failures since) and retried: by the interval trigger at its next round, by
// threshold and idle once they fire again after a back-off (1 s, doubling to
// 30 s, reset by the next successful persist of this thread).
//
// Start it in the serving process once the tracker is attached for writing,
// stop it before the tracker closes. Threading: Start/Stop from one thread;
// stats() from any.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>

#include "engine/tracker.h"

namespace cbt {

struct PersistTriggers {
  std::chrono::milliseconds interval{0};  // 0: off
  uint64_t threshold_bytes = 0;           // 0: off
  std::chrono::milliseconds idle{0};      // 0: off
  bool any() const { return interval.count() > 0 || threshold_bytes > 0 || idle.count() > 0; }
};

struct PersistSchedulerStats {
  uint64_t polls = 0;  // rounds the thread woke up and looked (any trigger)
  uint64_t interval_persists = 0, threshold_persists = 0, idle_persists = 0;  // attempts
  uint64_t failures = 0;  // attempts that failed
};

class PersistScheduler {
 public:
  PersistScheduler(Tracker& tracker, PersistTriggers triggers)
      : tracker_(tracker), triggers_(triggers) {}
  ~PersistScheduler() { Stop(); }
  PersistScheduler(const PersistScheduler&) = delete;
  PersistScheduler& operator=(const PersistScheduler&) = delete;

  // Starts the thread (none when every trigger is off). Idempotent.
  void Start();
  // Wakes the thread and joins it; no final persist (the caller's Close
  // does that). Idempotent.
  void Stop();

  // How often threshold and idle are evaluated; zero when both are off.
  std::chrono::milliseconds PollPeriod() const;
  PersistSchedulerStats stats() const;

  static constexpr std::chrono::milliseconds kMaxPoll{50}, kMinPoll{5};
  static constexpr std::chrono::milliseconds kFirstBackoff{1000}, kMaxBackoff{30000};
  static constexpr std::chrono::seconds kLogEvery{10};

 private:
  enum class Trigger { kInterval, kThreshold, kIdle };
  void Run();
  // Persists (outside mu_), counts and logs; true on success.
  bool PersistNow(Trigger why, uint64_t pending);

  Tracker& tracker_;
  const PersistTriggers triggers_;
  std::mutex mu_;  // guards stop_
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;

  // Written by the thread only; read by stats().
  std::atomic<uint64_t> polls_{0}, interval_{0}, threshold_{0}, idle_{0}, failures_{0};
  // Failure log rate limit (thread only).
  std::chrono::steady_clock::time_point last_log_{};
  uint64_t unlogged_failures_ = 0;
  uint64_t failures_in_a_row_ = 0;
};

}  // namespace cbt
