// The client side of the control protocol (control_protocol.h,
// docs/control.md): one request line to a running filter's control socket,
// one reply line back. Used by `cbt --socket PATH`; no nbdkit, no tracker.
//
// Every step is bounded: connect, send and receive share one deadline
// (ClientOptions::timeout), and a reply longer than max_reply_bytes is
// refused rather than buffered. Failures are one-line Statuses that name the
// socket and the likely cause:
//   - nothing at PATH (ENOENT): "no control socket at PATH (is the filter
//     running with cbt-control=PATH?)";
//   - a socket file nobody listens on (ECONNREFUSED): a stale socket;
//   - a file that is not a socket; EACCES from the file mode;
//   - EOF before a reply, a reply that is not one JSON object with "return"
//     or "error", a reply over the size bound, the deadline.
// A server "error" reply becomes a Status of the matching kind carrying the
// server's desc verbatim (see StatusFromError).
#pragma once

#include <chrono>
#include <cstddef>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "common/status.h"

namespace cbt::control {

struct ClientOptions {
  // For the whole exchange: connect, send, and the complete reply.
  std::chrono::milliseconds timeout{30000};
  // Longest reply line accepted (query-bitmap-extents at its 65536 extents
  // per reply is a few MiB).
  size_t max_reply_bytes = size_t{64} << 20;
  // The disk addressed, sent as the request's "export" (a server tracking
  // several exports needs it); empty: none sent.
  std::string export_name;
};

// The Status for a reply's "error" object {"class", "desc"}: NotFound,
// AlreadyExists, InvalidArgument, Busy, NotSupported keep their kind;
// PermissionDenied is an IOError with errno EACCES; GenericError and any
// other class an IOError (an unknown class is named in the message). The
// message is the desc (ErrorClass() of the result gives the class back for
// every class it knows).
Status StatusFromError(const nlohmann::json& error);

// Sends `line` plus '\n' to the socket at `path` and returns the first
// reply line, without its '\n'. Transport errors only (see above).
Result<std::string> Exchange(const std::string& path, std::string_view line,
                             const ClientOptions& options = {});

// One command: sends {"execute": command, "arguments": arguments, "id": N}
// and returns the reply's "return" value, or the Status of its "error" (also
// for an error line without id: the server's refusal of the connection, such
// as a peer uid it does not serve or too many clients). A reply with another
// id, or that is not a JSON object with exactly one of "return" / "error", is
// an error naming the socket.
Result<nlohmann::json> Call(const std::string& path, std::string_view command,
                            const nlohmann::json& arguments = nlohmann::json::object(),
                            const ClientOptions& options = {});

}  // namespace cbt::control
