// A bounded NBD handshake over a unix socket (libnbd): what an export offers,
// without reading data. Used to check a backup endpoint's source and the
// endpoint itself (backup_endpoint.cc). Threading: any thread; no state.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "common/status.h"

namespace cbt {

struct NbdExportProbe {
  uint64_t size = 0;
  bool has_context = false;  // the requested meta context was negotiated
};

// Connects to the NBD server on unix socket `socket`, export `export_name`
// ("" = the default export), asking for meta context `context` if not
// empty; disconnects after the handshake. Bounded: the whole exchange gives
// up after `timeout`.
// Failure: NotFound (no socket file), IOError with libnbd's message (refused,
// handshake failed, unknown export), IOError ETIMEDOUT; the message names
// the socket and export.
Result<NbdExportProbe> ProbeNbdExport(const std::string& socket, const std::string& export_name,
                                      const std::string& context,
                                      std::chrono::milliseconds timeout);

// A full NBD handshake with the server named by `uri` (libnbd, local files
// allowed in the URI: tls-psk-file=, tls-certificates=), then a polite
// disconnect; bounded by `timeout`. Failure: IOError with libnbd's message.
Status ProbeUri(const std::string& uri, std::chrono::milliseconds timeout);

}  // namespace cbt
