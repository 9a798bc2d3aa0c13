// The unix sockets this process listens on (Linux /proc), for telling a
// backup client where the filter's nbdkit serves the point-in-time export:
// nbdkit does not tell its filters. Best effort: an empty list when /proc
// cannot say (the client then needs the address given to it).
#pragma once

#include <string>
#include <vector>

namespace cbt::control {

// Paths of the listening unix sockets among this process's descriptors
// (abstract sockets and `exclude` left out), sorted.
std::vector<std::string> ListeningUnixSockets(const std::vector<std::string>& exclude = {});

}  // namespace cbt::control
