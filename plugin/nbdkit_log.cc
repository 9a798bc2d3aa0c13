#include "plugin/nbdkit_log.h"

#include <nbdkit-filter.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <syslog.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <mutex>
#include <string>

namespace cbt::plugin {

namespace {

// True when stderr goes nowhere (/dev/null): a daemonized nbdkit, which
// logs to syslog.
bool StderrIsDevNull() {
  struct stat st;
  return fstat(STDERR_FILENO, &st) == 0 && S_ISCHR(st.st_mode) && st.st_rdev == makedev(1, 3);
}

// nbdkit 1.32 has only nbdkit_error and nbdkit_debug (shown with -v). A
// warning is no error: it goes to stderr in nbdkit's format, or to syslog
// where nbdkit's own messages go when it runs as a daemon.
void Warning(const std::string& text) {
  if (StderrIsDevNull()) {
    syslog(LOG_WARNING, "cbt: warning: %s", text.c_str());
    return;
  }
  flockfile(stderr);
  fprintf(stderr, "nbdkit: cbt: warning: %s\n", text.c_str());
  funlockfile(stderr);
}

class NbdkitSink final : public spdlog::sinks::base_sink<std::mutex> {
 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    std::string text(msg.payload.data(), msg.payload.size());
    if (msg.level >= spdlog::level::err)
      nbdkit_error("cbt: %s", text.c_str());
    else if (msg.level == spdlog::level::warn)
      Warning(text);
    else
      nbdkit_debug("cbt: %s", text.c_str());
  }
  void flush_() override {}
};

}  // namespace

void InstallNbdkitLogger() {
  auto logger = std::make_shared<spdlog::logger>("cbt", std::make_shared<NbdkitSink>());
  logger->set_level(spdlog::level::debug);  // nbdkit decides what -v shows
  spdlog::set_default_logger(std::move(logger));
}

}  // namespace cbt::plugin
