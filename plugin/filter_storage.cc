#include "plugin/filter_storage.h"

namespace cbt::plugin {

Storage& FilterStorage() {
  return PosixStorage();
}

}  // namespace cbt::plugin
