// `cbt serve --fork` (docs/serve.md): nbdkit runs in the foreground (-f)
// under a small supervisor process in its own session, so that what nbdkit
// and the filter print while the server starts (a refusal found only when
// the first client attaches, such as a container of the wrong size)
// reaches the user's terminal and the exit code, not only syslog.
//
//   cbt serve ──fork──> supervisor (setsid) ──spawn──> nbdkit -f
//       │                   │  nbdkit's stdout+stderr: a pipe to it
//       │                   │  before Detach: copied to our stderr
//       │                   │  after Detach: to syslog, or a log file
//       └── socketpair ─────┘  'R' (detach) → 'A' (done)
//
// The supervisor passes SIGTERM/SIGINT/SIGHUP on to nbdkit, waits for it,
// and exits with its exit code. If cbt serve goes away before it said
// 'R' (interrupted, killed), the supervisor stops nbdkit: an unfinished
// start leaves no daemon. nbdkit runs with --exit-with-parent, so killing
// the supervisor stops it too.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

#include "common/status.h"

namespace cbt::cli {

struct Supervisor {
  pid_t pid = -1;    // the supervisor: our child until we exit
  int control = -1;  // our end of the socketpair
};

// Forks the supervisor, which starts argv (argv[0] searched in PATH; give
// nbdkit -f). After Detach nbdkit's lines go to `log_fd` (an open file,
// each line after the local time), or with -1 to syslog as `syslog_ident`.
// Failure: IOError (fork, pipe); a missing program is the supervisor's
// exit code 127 with its message on our stderr.
Result<Supervisor> StartSupervised(const std::vector<std::string>& argv,
                                   const std::string& syslog_ident, int log_fd);

// The server serves: the supervisor sends nbdkit's output to syslog from
// now on, lets go of our stdout/stderr and says so. Failure: IOError when
// it did not answer within `timeout` (it is then gone or stuck).
Status Detach(Supervisor& s, std::chrono::milliseconds timeout);

}  // namespace cbt::cli
