// The filter's disks (filter_state.h): which container tracks which export,
// and attaching a connection's export to it. nbdkit adapter only.
//
// One container (cbt-file=PATH, or internal bitmaps): the server tracks one
// export; the first connection names it and other exports are refused.
// A template (cbt-file= holding %e): every export gets its own container,
// the path with %e replaced by the export name (encoded, below), opened and
// attached by the first connection to that export (the plugin's size is
// known only per export). docs/filter.md says why one file per disk.
#pragma once

#include <nbdkit-filter.h>

#include <optional>
#include <string>
#include <string_view>

#include "common/export_template.h"
#include "common/status.h"
#include "plugin/filter_state.h"

namespace cbt::plugin {

// get_ready: opens, locks and validates the one container (not per export);
// -1 after nbdkit_error.
int DisksGetReady();
// after_fork: starts the control socket, if any; -1 after nbdkit_error.
int StartControl();
// .prepare of a live connection to export `name`: its disk, attached for
// writing unless the connection is read-only. Null after nbdkit_error (a
// failure of the one container's attach also shuts the server down).
Disk* AttachExport(nbdkit_next* next, const char* name, bool readonly_export);
// The disk tracking export `name`, if any (a point-in-time view's disk).
Disk* FindDisk(std::string_view name);
// .cleanup: stops the control socket, then persists and closes every disk.
void CloseDisks();

}  // namespace cbt::plugin
