// Internal bitmaps: with cbt's qcow2 plugin below the filter and no
// cbt-file=, the container is the served image itself. The filter reaches
// the plugin's open image through the share it exports (qcow2_share.h) and
// gives the tracker a Storage that hands out that image's storage, plus the
// plugin's refcount allocator: one storage, one allocator, one flush.
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "engine/storage.h"
#include "engine/tracker.h"

namespace cbt::plugin {

// Whether cbt's qcow2 plugin is loaded in this process (config time).
bool Qcow2PluginLoaded();

// After the plugin's .get_ready: points opts (container_path, storage,
// shared_refcounts) at the plugin's image and tells the plugin that the
// filter records its bitmaps now. Failure: InvalidArgument (the plugin is
// from another build, or not ready).
Status UseInternalBitmaps(TrackerOptions* opts);

}  // namespace cbt::plugin
