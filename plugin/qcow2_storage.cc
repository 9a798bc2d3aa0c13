#include "plugin/qcow2_storage.h"

namespace cbt::plugin {

Result<std::shared_ptr<BlockIO>> Qcow2ImageStorage(std::shared_ptr<PosixFile> file,
                                                   bool /*writable*/) {
  return std::shared_ptr<BlockIO>(std::move(file));
}

}  // namespace cbt::plugin
