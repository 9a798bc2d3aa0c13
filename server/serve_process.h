// The nbdkit process behind `cbt serve` (docs/serve.md): start it, wait
// until it serves, forward signals, stop it. No knowledge of the filter's
// parameters: the caller builds nbdkit's argv.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

#include "common/status.h"

namespace cbt::cli {

// Starts argv (argv[0] searched in PATH) as a child with our stdin, stdout
// and stderr. While the child runs in the foreground, SIGTERM, SIGINT and
// SIGHUP sent to us are forwarded to it (ForwardSignalsTo).
// Failure: NotFound when argv[0] is not in PATH, IOError otherwise.
Result<pid_t> StartProgram(const std::vector<std::string>& argv);

// From now on SIGTERM/SIGINT/SIGHUP received by this process are sent to
// `pid` (0: restore the default actions).
void ForwardSignalsTo(pid_t pid);

// Waits for child `pid` to exit. Its exit code, or 128 + signal number when
// a signal killed it (as a shell reports it).
int WaitChild(pid_t pid);

// Whether child `pid` still runs (an exited one is not reaped).
bool ChildRunning(pid_t pid);

// Reads the pid nbdkit writes to `path` (-P), polling until it is there or
// `timeout` passes, or `alive()` says the writer is gone.
// Failure: IOError naming the file.
Result<pid_t> WaitPidFile(const std::string& path, std::chrono::milliseconds timeout,
                          bool (*alive)(pid_t), pid_t watch);

// SIGTERM to `pid` (not our child: a daemon), then waits up to `timeout`
// for it to be gone. True when it is gone.
bool StopDaemon(pid_t pid, std::chrono::milliseconds timeout);

bool ProcessAlive(pid_t pid);

// The parent of process `pid` (from /proc), or -1.
pid_t ParentOf(pid_t pid);

// Under systemd's Type=notify ($NOTIFY_SOCKET set), sends `state` (e.g.
// "READY=1") to the service manager; without it does nothing. The
// protocol is sd_notify(3)'s: one datagram to that unix socket ('@': the
// abstract namespace). Failure: IOError (the caller logs it).
Status NotifyServiceManager(const std::string& state);

}  // namespace cbt::cli
