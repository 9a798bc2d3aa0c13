// ChangeGate: counts the changes in flight (from before a change is marked
// until it has been forwarded and answered) and lets one editor pause new
// ones and wait for those in flight to finish: the drain that makes an online
// bitmap edit atomic with respect to writes (the pause filter's idea).
//
// A writer calls Enter() before marking and Leave() after forwarding. An
// editor calls Pause(timeout): from then on Enter() blocks; Pause returns
// once nothing is in flight (OK), or after `timeout` with Busy (and the gate
// open again). Resume() lets the blocked writers go.
//
// Cost on the data path when no editor is waiting: one atomic increment and
// one atomic load in Enter, one atomic decrement and one load in Leave; no
// lock. Writers and the editor follow the Dekker pattern on inside_ and
// paused_ (both sequentially consistent): a writer that saw paused_ false
// was counted before the editor could see zero.
//
// Threading: Enter/Leave from any thread; Pause/Resume from one editor at a
// time (the tracker serialises editors).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>

#include "common/status.h"

namespace cbt {

class ChangeGate {
 public:
  void Enter();
  void Leave();

  // REQUIRES: not paused. Busy (naming how many changes were still in
  // flight) when they did not drain in time; the gate is then open.
  Status Pause(std::chrono::milliseconds timeout);
  void Resume();

  int64_t in_flight() const { return inside_.load(); }

 private:
  std::atomic<int64_t> inside_{0};
  std::atomic<bool> paused_{false};
  std::mutex mu_;
  std::condition_variable drained_;  // Leave -> Pause: inside_ may be 0
  std::condition_variable resumed_;  // Resume -> Enter
};

}  // namespace cbt
