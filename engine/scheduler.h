// PersistScheduler: a background thread that calls Tracker::Persist every
// `interval` while changes are pending (cbt-persist-interval=). Start it in
// the serving process (nbdkit .after_fork), stop it before the tracker
// closes (.cleanup). Threading: Start/Stop from one thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "engine/tracker.h"

namespace cbt {

class PersistScheduler {
 public:
  PersistScheduler(Tracker& tracker, std::chrono::milliseconds interval)
      : tracker_(tracker), interval_(interval) {}
  ~PersistScheduler() { Stop(); }
  PersistScheduler(const PersistScheduler&) = delete;
  PersistScheduler& operator=(const PersistScheduler&) = delete;

  void Start();
  // Wakes the thread and joins it. Idempotent.
  void Stop();

 private:
  void Run();
  Tracker& tracker_;
  const std::chrono::milliseconds interval_;
  std::mutex mu_;  // guards stop_
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace cbt
