// Routes spdlog (used by engine/) into nbdkit: errors and warnings to
// nbdkit_error (stderr or syslog), everything else to nbdkit_debug (shown
// with nbdkit -v).
#pragma once

namespace cbt::plugin {

// Installs the nbdkit sink as spdlog's default logger. Call from .load.
void InstallNbdkitLogger();

}  // namespace cbt::plugin
