// TEST ONLY: the storage of nbdkit-cbt-powercut-filter.so, the build of the
// cbt filter that the crash torture (tests/crash/torture.py --power-cut)
// runs: every container is opened through a volatile cache
// (testing/volatile_io.h) whose unflushed writes powercut_replay later
// drops, reorders or tears. The journal path comes from the environment
// variable CBT_TEST_VOLATILE_JOURNAL; this module is never installed.
#include <spdlog/spdlog.h>

#include <cstdlib>

#include "plugin/filter_storage.h"
#include "testing/volatile_io.h"

namespace cbt::plugin {

namespace {

class VolatileStorage final : public Storage {
 public:
  Result<std::shared_ptr<BlockIO>> Open(const std::string& path, Mode mode) override {
    CBT_ASSIGN_OR_RETURN(std::shared_ptr<BlockIO> f, PosixStorage().Open(path, mode));
    if (mode == Mode::kReadOnly) return f;
    const char* j = std::getenv("CBT_TEST_VOLATILE_JOURNAL");
    if (!j || !*j)
      return Status::InvalidArgument(
          "TEST ONLY power-cut filter: CBT_TEST_VOLATILE_JOURNAL must name the journal");
    spdlog::warn("TEST ONLY: container writes go through a volatile cache ({})", j);
    CBT_ASSIGN_OR_RETURN(std::unique_ptr<VolatileBlockIO> v, VolatileBlockIO::Wrap(f, j));
    return std::shared_ptr<BlockIO>(std::move(v));
  }
  Status CheckCreatable(const std::string& path) override {
    return PosixStorage().CheckCreatable(path);
  }
  void Remove(const std::string& path) override { PosixStorage().Remove(path); }
};

}  // namespace

Storage& FilterStorage() {
  static VolatileStorage s;
  return s;
}

}  // namespace cbt::plugin
