// The supervisor behind `cbt serve --fork` (serve_supervisor.h).
#include "server/serve_supervisor.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <syslog.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <string_view>

#include "server/serve_process.h"

extern char** environ;

namespace cbt::cli {

namespace {

void WriteAll(int fd, std::string_view s) {
  while (!s.empty()) {
    const ssize_t n = ::write(fd, s.data(), s.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the reader is gone: nothing to do about it
    s.remove_prefix(static_cast<size_t>(n));
  }
}

// One line of nbdkit's after Detach: to the log file (local time first,
// as "2026-12-02 02:06:27 LINE"), else to syslog.
void LogLine(int log_fd, std::string_view line) {
  if (log_fd < 0) {
    syslog(LOG_ERR, "%.*s", static_cast<int>(line.size()), line.data());
    return;
  }
  char stamp[32] = "";
  const time_t now = ::time(nullptr);
  struct tm tm {};
  if (::localtime_r(&now, &tm) != nullptr) ::strftime(stamp, sizeof stamp, "%F %T ", &tm);
  std::string out = stamp;
  out.append(line);
  out += '\n';
  WriteAll(log_fd, out);
}

// Logs every complete line of `pending` (the rest stays, unless `flush`).
void LogLines(int log_fd, std::string& pending, bool flush) {
  size_t start = 0;
  for (size_t nl; (nl = pending.find('\n', start)) != std::string::npos; start = nl + 1)
    LogLine(log_fd, std::string_view(pending).substr(start, nl - start));
  pending.erase(0, start);
  if (flush && !pending.empty()) {
    LogLine(log_fd, pending);
    pending.clear();
  }
}

// The supervisor's whole life (in the forked child; cbt is single-threaded
// when it forks, so ordinary calls are safe here).
[[noreturn]] void Supervise(const std::vector<std::string>& argv, int control,
                            const std::string& ident, int log_fd) {
  ::setsid();  // no controlling terminal: the user's Ctrl-C and hangup are not ours
  const int devnull = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (devnull >= 0) {
    ::dup2(devnull, STDIN_FILENO);
    ::dup2(devnull, STDOUT_FILENO);  // stderr stays the user's until Detach
  }
  ::signal(SIGPIPE, SIG_IGN);
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) {
    WriteAll(STDERR_FILENO, std::string("cbt serve: pipe: ") + std::strerror(errno) + "\n");
    ::_exit(1);
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&fa, out[1], STDERR_FILENO);
  std::vector<char*> a;
  a.reserve(argv.size() + 1);
  for (const std::string& s : argv) a.push_back(const_cast<char*>(s.c_str()));
  a.push_back(nullptr);
  pid_t child = 0;
  const int err = posix_spawnp(&child, a[0], &fa, nullptr, a.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(out[1]);
  if (err != 0) {
    WriteAll(STDERR_FILENO,
             "cbt serve: cannot run " + argv[0] + ": " + std::strerror(err) +
                 (err == ENOENT ? " (not in PATH; Debian: apt install nbdkit)\n" : "\n"));
    ::_exit(127);
  }
  ForwardSignalsTo(child);

  bool detached = false;
  std::string pending;
  pollfd fds[2] = {{out[0], POLLIN, 0}, {control, POLLIN, 0}};
  for (;;) {
    const nfds_t n = fds[1].fd >= 0 ? 2 : 1;
    if (::poll(fds, n, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (n == 2 && fds[1].revents != 0) {
      char c = 0;
      const ssize_t r = ::read(control, &c, 1);
      if (r < 0 && errno == EINTR) continue;
      if (r == 1 && c == 'R') {
        if (log_fd < 0) openlog(ident.c_str(), LOG_PID, LOG_DAEMON);
        detached = true;
        if (devnull >= 0) ::dup2(devnull, STDERR_FILENO);
        WriteAll(control, "A");
      } else {
        // cbt serve is gone before the server served: stop it.
        ::kill(child, SIGTERM);
      }
      ::close(control);
      fds[1].fd = -1;
    }
    if (fds[0].revents != 0) {
      char buf[4096];
      const ssize_t r = ::read(out[0], buf, sizeof buf);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;  // nbdkit closed its output: it is exiting
      if (detached) {
        pending.append(buf, static_cast<size_t>(r));
        LogLines(log_fd, pending, false);
      } else {
        WriteAll(STDERR_FILENO, std::string_view(buf, static_cast<size_t>(r)));
      }
    }
  }
  if (detached) LogLines(log_fd, pending, true);
  const int rc = WaitChild(child);
  if (detached && rc != 0)
    LogLine(log_fd, "cbt serve: nbdkit (pid " + std::to_string(child) + ") exited with code " +
                        std::to_string(rc));
  ::_exit(rc);
}

}  // namespace

Result<Supervisor> StartSupervised(const std::vector<std::string>& argv,
                                   const std::string& syslog_ident, int log_fd) {
  if (argv.empty()) return Status::InvalidArgument("no program to run");
  int sp[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) != 0)
    return Status::IOError(std::string("socketpair: ") + std::strerror(errno), errno);
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int e = errno;
    ::close(sp[0]);
    ::close(sp[1]);
    return Status::IOError(std::string("fork: ") + std::strerror(e), e);
  }
  if (pid == 0) {
    ::close(sp[0]);
    Supervise(argv, sp[1], syslog_ident, log_fd);
  }
  ::close(sp[1]);
  return Supervisor{pid, sp[0]};
}

Status Detach(Supervisor& s, std::chrono::milliseconds timeout) {
  WriteAll(s.control, "R");
  pollfd p{s.control, POLLIN, 0};
  int r = 0;
  while ((r = ::poll(&p, 1, static_cast<int>(timeout.count()))) < 0 && errno == EINTR) {
  }
  char c = 0;
  const bool acked = r == 1 && ::read(s.control, &c, 1) == 1 && c == 'A';
  ::close(s.control);
  s.control = -1;
  if (!acked)
    return Status::IOError("the supervisor (pid " + std::to_string(s.pid) +
                           ") did not take over nbdkit's output");
  return Status::OK();
}

}  // namespace cbt::cli
