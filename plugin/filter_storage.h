// The storage the filter opens its containers through. Defined once per
// filter module: filter_storage.cc (real files) for nbdkit-cbt-filter.so;
// the crash torture links its own definition into a test-only build of the
// filter (tests/tools/volatile_storage.cc). A link-time seam, so that no
// switch in the production module can route it elsewhere.
#pragma once

#include "engine/storage.h"

namespace cbt::plugin {

Storage& FilterStorage();

}  // namespace cbt::plugin
