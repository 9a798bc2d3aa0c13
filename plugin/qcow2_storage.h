// The storage the qcow2 plugin serves its image through. Defined once per
// plugin module: qcow2_storage.cc (the file itself) for
// nbdkit-qcow2-plugin.so; the crash torture links its own definition into a
// test-only build (tests/tools/volatile_qcow2_storage.cc) that puts a
// volatile cache in between. A link-time seam: no switch in the production
// module can route the image elsewhere.
#pragma once

#include <memory>

#include "common/block_io.h"
#include "common/posix_file.h"

namespace cbt::plugin {

// `file` is the opened image (read-write when `writable`); every read and
// write of the image goes through the returned BlockIO.
Result<std::shared_ptr<BlockIO>> Qcow2ImageStorage(std::shared_ptr<PosixFile> file, bool writable);

}  // namespace cbt::plugin
