// What nbdkit-qcow2-plugin.so shares with the cbt filter running over it in
// the same nbdkit process: the open image, so that the filter keeps its
// bitmaps inside it (internal bitmaps) with the same storage, the same
// refcount allocator and the same flush as the data path.
//
// nbdkit cannot hand a filter anything of its plugin, so the plugin exports
// one C function; the filter finds it with dlsym (nbdkit loads plugins with
// RTLD_GLOBAL). Both modules are built from one tree: the version and the
// sizes of the shared types must match, or the filter refuses to use it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/block_io.h"
#include "qcow2/refcount.h"

namespace cbt::plugin {

inline constexpr uint32_t kQcow2ShareVersion = 1;
inline constexpr const char* kQcow2ShareSymbol = "cbt_qcow2_share";

struct Qcow2Share {
  std::string path;             // the image (absolute)
  std::shared_ptr<BlockIO> io;  // every read and write of the image
  // Non-null when the image may be written (the file is writable): the one
  // allocator of the file.
  std::shared_ptr<qcow2::SharedRefcounts> refcounts;
  // The filter records the image's bitmaps from now on: the plugin no
  // longer marks them in use before the first write.
  std::function<void()> claim_bitmaps;
};

// The layout check both sides compute.
inline constexpr uint64_t Qcow2ShareLayout() {
  return (uint64_t{kQcow2ShareVersion} << 48) ^ (sizeof(Qcow2Share) << 24) ^
         (sizeof(qcow2::SharedRefcounts) << 8) ^ sizeof(qcow2::Refcounts);
}

// Signature of the exported function: the share once the plugin's
// .get_ready has run (null before, or when layout differs).
using Qcow2ShareFn = const Qcow2Share* (*)(uint64_t layout);

}  // namespace cbt::plugin
