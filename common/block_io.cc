// Defaults of BlockIO's optional operations.
#include "common/block_io.h"

#include <string>

namespace cbt {

Status BlockIO::punch_hole(uint64_t, uint64_t) {
  return Status::NotSupported(std::string(name()) + ": cannot punch holes");
}

Result<BlockIO::Run> BlockIO::probe_run(uint64_t, uint64_t max_len) {
  return Run{false, max_len};
}

Result<uint64_t> BlockIO::allocated_bytes() {
  return size();
}

}  // namespace cbt
