// WorkerFailures: checks inside test worker threads that fail the test
// without hanging it.
//
// gtest's ASSERT_* in a std::thread only returns from the thread's lambda.
// Next to a std::barrier that is a deadlock: the failed worker never arrives
// and the others wait for it forever, so the test times out instead of
// failing (and the message is lost with the killed process). Instead:
//
//   WorkerFailures wf;
//   std::barrier sync(n);
//   ... in each worker:
//     if (!wf.Check(st.ok(), [&] { return st.ToString(); })) {
//       sync.arrive_and_drop();  // leave the barrier: the others go on
//       return;
//     }
//   ... in the main thread, after join():
//   wf.Report();  // one gtest failure per recorded check, with its message
//
// A failed check also raises stop(), which long-running workers may poll to
// finish early. Thread-safe; Report() must run on the test's main thread.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <source_location>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace cbt::testing {

class WorkerFailures {
 public:
  // Returns cond. When false, records a failure at the caller's file:line
  // with the message make_msg() returns (a callable, so that passing checks
  // in hot loops build no strings) or with msg.
  template <typename MakeMsg>
  requires std::is_invocable_r_v<std::string, MakeMsg>
  bool Check(bool cond, MakeMsg&& make_msg,
             std::source_location where = std::source_location::current()) {
    if (!cond) Record(where, std::forward<MakeMsg>(make_msg)());
    return cond;
  }
  bool Check(bool cond, std::string_view msg = "",
             std::source_location where = std::source_location::current()) {
    if (!cond) Record(where, std::string(msg));
    return cond;
  }

  // True once any check failed: long-running workers may poll it to stop.
  bool stop() const { return stop_.load(); }
  size_t count() const {
    std::lock_guard lock(mu_);
    return failures_.size();
  }
  // On the main thread, after the workers joined: one gtest failure (at the
  // check's file:line) for each recorded one.
  void Report() const {
    std::lock_guard lock(mu_);
    for (const auto& f : failures_)
      ADD_FAILURE_AT(f.file.c_str(), f.line) << "check failed in a worker thread: " << f.msg;
  }

 private:
  struct Failure {
    std::string file;
    int line;
    std::string msg;
  };
  void Record(const std::source_location& where, std::string msg) {
    std::lock_guard lock(mu_);
    failures_.push_back({where.file_name(), static_cast<int>(where.line()), std::move(msg)});
    stop_.store(true);
  }

  mutable std::mutex mu_;
  std::vector<Failure> failures_;
  std::atomic<bool> stop_{false};
};

}  // namespace cbt::testing
