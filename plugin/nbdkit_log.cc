#include "plugin/nbdkit_log.h"

#include <nbdkit-filter.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/spdlog.h>

#include <memory>
#include <mutex>
#include <string>

namespace cbt::plugin {

namespace {

class NbdkitSink final : public spdlog::sinks::base_sink<std::mutex> {
 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    std::string text(msg.payload.data(), msg.payload.size());
    if (msg.level >= spdlog::level::warn)
      nbdkit_error("cbt: %s", text.c_str());
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
