// StartProgram / WaitChild / signal forwarding / WaitPidFile /
// StopDaemon for `cbt serve` (serve_process.h).
#include "server/serve_process.h"

#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <thread>

extern char** environ;

namespace cbt::cli {

namespace {

using Clock = std::chrono::steady_clock;

volatile sig_atomic_t g_forward_pid = 0;

void Forward(int sig) {
  const pid_t pid = g_forward_pid;
  if (pid > 0) ::kill(pid, sig);
}

constexpr int kForwarded[] = {SIGTERM, SIGINT, SIGHUP};

}  // namespace

void ForwardSignalsTo(pid_t pid) {
  g_forward_pid = pid;
  struct sigaction sa {};
  sa.sa_handler = pid > 0 ? Forward : SIG_DFL;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int sig : kForwarded) ::sigaction(sig, &sa, nullptr);
}

Result<pid_t> StartProgram(const std::vector<std::string>& argv) {
  if (argv.empty()) return Status::InvalidArgument("no program to run");
  std::vector<char*> a;
  a.reserve(argv.size() + 1);
  for (const std::string& s : argv) a.push_back(const_cast<char*>(s.c_str()));
  a.push_back(nullptr);
  pid_t pid = 0;
  const int err = posix_spawnp(&pid, a[0], nullptr, nullptr, a.data(), environ);
  if (err == ENOENT)
    return Status::NotFound(argv[0] + " not found in PATH; install it (Debian: apt install " +
                            argv[0] + ")");
  if (err != 0) return Status::IOError("cannot run " + argv[0] + ": " + std::strerror(err), err);
  return pid;
}

int WaitChild(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) == -1)
    if (errno != EINTR) return 1;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 1;
}

bool ChildRunning(pid_t pid) {
  siginfo_t info{};
  // WNOWAIT: looks without reaping, so WaitChild still gets the exit code.
  if (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) != 0)
    return errno == EINTR;
  return info.si_pid == 0;
}

bool ProcessAlive(pid_t pid) {
  return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM);
}

Result<pid_t> WaitPidFile(const std::string& path, std::chrono::milliseconds timeout,
                          bool (*alive)(pid_t), pid_t watch) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    std::ifstream in(path);
    std::string line;
    // nbdkit writes "PID\n": a line without its newline is still being written.
    if (in && std::getline(in, line) && !in.eof() && !line.empty() && line.size() < 12) {
      char* end = nullptr;
      const long pid = std::strtol(line.c_str(), &end, 10);
      if (*end == '\0' && pid > 1) return static_cast<pid_t>(pid);
      return Status::IOError("pid file '" + path + "' holds '" + line + "', not a pid");
    }
    if (alive != nullptr && !alive(watch))
      return Status::IOError("nbdkit exited before writing its pid file '" + path + "'");
    if (Clock::now() >= deadline)
      return Status::IOError("nbdkit wrote no pid to '" + path + "' within " +
                                 std::to_string(timeout.count() / 1000) + " s",
                             ETIMEDOUT);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

pid_t ParentOf(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  if (!std::getline(in, stat)) return -1;
  // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
  const size_t close = stat.rfind(')');
  if (close == std::string::npos) return -1;
  char state = 0;
  long ppid = -1;
  if (std::sscanf(stat.c_str() + close + 1, " %c %ld", &state, &ppid) != 2) return -1;
  return static_cast<pid_t>(ppid);
}

Status NotifyServiceManager(const std::string& state) {
  const char* path = std::getenv("NOTIFY_SOCKET");
  if (path == nullptr || *path == '\0') return Status::OK();
  sockaddr_un addr{};
  const size_t len = std::strlen(path);
  if ((path[0] != '/' && path[0] != '@') || len >= sizeof addr.sun_path)
    return Status::InvalidArgument(std::string("NOTIFY_SOCKET='") + path +
                                   "': not a unix socket path");
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path, len);
  if (path[0] == '@') addr.sun_path[0] = '\0';
  const int fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, "NOTIFY_SOCKET: socket");
  const auto addr_len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + len);
  const ssize_t n = ::sendto(fd, state.data(), state.size(), MSG_NOSIGNAL,
                             reinterpret_cast<const sockaddr*>(&addr), addr_len);
  const int err = errno;
  ::close(fd);
  if (n != static_cast<ssize_t>(state.size()))
    return Status::FromErrno(err, std::string("NOTIFY_SOCKET '") + path + "'");
  return Status::OK();
}

bool StopDaemon(pid_t pid, std::chrono::milliseconds timeout) {
  if (!ProcessAlive(pid)) return true;
  ::kill(pid, SIGTERM);
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    (void)::waitpid(pid, nullptr, WNOHANG);  // reaps it if it is our child
    if (!ProcessAlive(pid)) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

}  // namespace cbt::cli
