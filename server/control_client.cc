#include "server/control_client.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <exception>

namespace cbt::control {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

std::string Where(const std::string& path) {
  return "control socket '" + path + "'";
}

std::string Seconds(std::chrono::milliseconds ms) {
  if (ms.count() % 1000 == 0) return std::to_string(ms.count() / 1000) + " s";
  return std::to_string(ms.count()) + " ms";
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

// Milliseconds left until `deadline`, at least 0, for poll().
int MsLeft(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  if (left.count() <= 0) return 0;
  return left.count() > 1000000000 ? 1000000000 : static_cast<int>(left.count());
}

// poll() for `events` until the deadline. False when the deadline passed
// first; errors (POLLERR/POLLHUP) count as ready, for the I/O to report.
Result<bool> WaitFor(int fd, short events, Clock::time_point deadline, const std::string& path) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int n = poll(&p, 1, MsLeft(deadline));
    if (n > 0) return true;
    if (n == 0) return false;
    if (errno != EINTR) return Status::FromErrno(errno, Where(path) + ": poll");
  }
}

Status ConnectError(int err, const std::string& path) {
  switch (err) {
    case ENOENT:
      return Status::NotFound("no control socket at '" + path +
                              "' (is the filter running with cbt-control=" + path + "?)");
    case ECONNREFUSED: {
      struct stat st;
      if (lstat(path.c_str(), &st) == 0 && !S_ISSOCK(st.st_mode))
        return Status::InvalidArgument(Where(path) + ": not a socket", ENOTSOCK);
      return Status::IOError(Where(path) +
                                 ": no server is listening on it (a stale socket left by a "
                                 "filter that stopped?)",
                             ECONNREFUSED);
    }
    case EACCES:
    case EPERM:
      return Status::IOError(Where(path) +
                                 ": permission denied (the socket is mode 0600: run as the "
                                 "server's user or root)",
                             err);
    case EAGAIN:
    case EINPROGRESS:
    case ETIMEDOUT:
      return Status::Busy(Where(path) + ": the server did not accept the connection in time",
                          ETIMEDOUT);
    default:
      return Status::FromErrno(err, Where(path) + ": connect");
  }
}

Result<int> Connect(const std::string& path, Clock::time_point deadline) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path))
    return Status::InvalidArgument(Where(path) + ": path must be 1 to " +
                                   std::to_string(sizeof(addr.sun_path) - 1) + " bytes");
  std::memcpy(addr.sun_path, path.data(), path.size());
  const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::FromErrno(errno, Where(path) + ": socket");
  // A blocking connect bounded by SO_SNDTIMEO: on a unix socket it only
  // waits while the listener's backlog is full.
  const int ms = std::max(MsLeft(deadline), 1);
  timeval tv{ms / 1000, (ms % 1000) * 1000};
  int rc = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  if (rc == 0) {
    do {
      rc = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    } while (rc != 0 && errno == EINTR && MsLeft(deadline) > 0);
  }
  if (rc != 0) {
    const int err = errno;
    close(fd);
    return ConnectError(err, path);
  }
  if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0) {
    const int err = errno;
    close(fd);
    return Status::FromErrno(err, Where(path) + ": fcntl");
  }
  return fd;
}

}  // namespace

Status StatusFromError(const json& error) {
  std::string cls = "GenericError", desc = "(no description)";
  if (error.is_object()) {
    if (auto it = error.find("class"); it != error.end() && it->is_string()) cls = *it;
    if (auto it = error.find("desc"); it != error.end() && it->is_string()) desc = *it;
  }
  if (cls == "NotFound") return Status::NotFound(desc);
  if (cls == "AlreadyExists") return Status::AlreadyExists(desc);
  if (cls == "InvalidArgument") return Status::InvalidArgument(desc);
  if (cls == "Busy") return Status::Busy(desc);
  if (cls == "NotSupported") return Status::NotSupported(desc);
  if (cls == "PermissionDenied") return Status::IOError(desc, EACCES);
  if (cls == "GenericError") return Status::IOError(desc);
  return Status::IOError(desc + " (error class " + cls + ")");
}

Result<std::string> Exchange(const std::string& path, std::string_view line,
                             const ClientOptions& options) {
  const Clock::time_point deadline = Clock::now() + options.timeout;
  CBT_ASSIGN_OR_RETURN(int raw_fd, Connect(path, deadline));
  Fd fd(raw_fd);

  // Send the request. A server that refuses the peer writes its one error
  // line and closes, possibly before or while we send: EPIPE/ECONNRESET
  // then only means "read what it said".
  std::string out(line);
  out += '\n';
  std::string_view rest = out;
  while (!rest.empty()) {
    const ssize_t n = send(fd.get(), rest.data(), rest.size(), MSG_NOSIGNAL);
    if (n > 0) {
      rest.remove_prefix(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EPIPE || errno == ECONNRESET)) break;
    if (n < 0 && errno == EAGAIN) {
      CBT_ASSIGN_OR_RETURN(bool ready, WaitFor(fd.get(), POLLOUT, deadline, path));
      if (!ready)
        return Status::IOError(Where(path) + ": the server did not take the request within " +
                                   Seconds(options.timeout),
                               ETIMEDOUT);
      continue;
    }
    return Status::FromErrno(errno, Where(path) + ": send");
  }

  std::string buf;
  char chunk[65536];
  size_t scanned = 0;
  for (;;) {
    if (size_t nl = buf.find('\n', scanned); nl != std::string::npos) {
      if (nl > options.max_reply_bytes) break;
      buf.resize(nl);
      return buf;
    }
    scanned = buf.size();
    if (buf.size() > options.max_reply_bytes) break;
    CBT_ASSIGN_OR_RETURN(bool ready, WaitFor(fd.get(), POLLIN, deadline, path));
    if (!ready)
      return Status::IOError(
          Where(path) + ": no reply within " + Seconds(options.timeout) +
              (buf.empty() ? std::string()
                           : " (" + std::to_string(buf.size()) + " bytes of an unfinished reply)"),
          ETIMEDOUT);
    const ssize_t n = read(fd.get(), chunk, sizeof(chunk));
    if (n > 0) {
      buf.append(chunk, static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n == 0 || errno == ECONNRESET)
      return Status::IOError(
          Where(path) + ": the server closed the connection " +
              (buf.empty() ? std::string("without replying")
                           : "in the middle of its reply (" + std::to_string(buf.size()) +
                                 " bytes, no end of line)"),
          ECONNRESET);
    return Status::FromErrno(errno, Where(path) + ": read");
  }
  return Status::IOError(Where(path) + ": reply longer than " +
                             std::to_string(options.max_reply_bytes) + " bytes; refused",
                         EMSGSIZE);
}

Result<json> Call(const std::string& path, std::string_view command, const json& arguments,
                  const ClientOptions& options) {
  // One request per connection, so any fixed id identifies our reply.
  constexpr int kId = 1;
  json request = {{"execute", std::string(command)}, {"id", kId}};
  if (!arguments.is_null() && !(arguments.is_object() && arguments.empty()))
    request["arguments"] = arguments;
  if (!options.export_name.empty()) request["export"] = options.export_name;
  CBT_ASSIGN_OR_RETURN(
      std::string line,
      Exchange(path, request.dump(-1, ' ', false, json::error_handler_t::replace), options));
  json reply;
  try {
    reply = json::parse(line);
  } catch (const std::exception&) {
    std::string shown = line.substr(0, 80);
    for (char& c : shown)
      if (static_cast<unsigned char>(c) < 0x20) c = ' ';
    return Status::IOError(Where(path) + ": the reply is not JSON: '" + shown +
                           (line.size() > 80 ? "...'" : "'") + " (is a cbt filter serving it?)");
  }
  if (!reply.is_object()) return Status::IOError(Where(path) + ": the reply is not a JSON object");
  const bool has_return = reply.contains("return"), has_error = reply.contains("error");
  if (has_return == has_error)
    return Status::IOError(
        Where(path) + ": the reply has " +
        (has_return ? "both \"return\" and \"error\"" : "neither \"return\" nor \"error\""));
  if (auto it = reply.find("id"); it != reply.end() && *it != json(kId))
    return Status::IOError(Where(path) + ": the reply is for another request (id " + it->dump() +
                           ")");
  // An error without id is the server refusing the connection itself.
  if (has_error) return StatusFromError(reply["error"]);
  if (!reply.contains("id")) return Status::IOError(Where(path) + ": the reply carries no id");
  return std::move(reply["return"]);
}

}  // namespace cbt::control
