// TEST ONLY: the storage of nbdkit-qcow2-powercut-plugin.so, the build of
// the qcow2 plugin that the qcow2 crash torture (tests/crash/qcow2_torture.py
// --power-cut) runs. A writable image is served through a volatile cache
// (testing/volatile_io.h): its writes stay in memory and in a journal until
// the plugin flushes, and powercut_replay later applies what a power cut may
// leave of them (any subset, reordered, torn at 512-byte sectors). The
// journal path comes from the environment variable
// CBT_TEST_VOLATILE_JOURNAL. This module is never installed.
#include <cstdio>
#include <cstdlib>

#include "plugin/qcow2_storage.h"
#include "testing/volatile_io.h"

namespace cbt::plugin {

Result<std::shared_ptr<BlockIO>> Qcow2ImageStorage(std::shared_ptr<PosixFile> file, bool writable) {
  if (!writable) return std::shared_ptr<BlockIO>(std::move(file));
  const char* j = std::getenv("CBT_TEST_VOLATILE_JOURNAL");
  if (!j || !*j)
    return Status::InvalidArgument(
        "TEST ONLY power-cut qcow2 plugin: CBT_TEST_VOLATILE_JOURNAL must name the journal");
  fprintf(stderr, "TEST ONLY: image writes go through a volatile cache (%s)\n", j);
  CBT_ASSIGN_OR_RETURN(std::unique_ptr<VolatileBlockIO> v,
                       VolatileBlockIO::Wrap(std::move(file), j));
  return std::shared_ptr<BlockIO>(std::move(v));
}

}  // namespace cbt::plugin
