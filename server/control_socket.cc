#include "server/control_socket.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace cbt::control {

struct ControlServer::Conn {
  int fd = -1;
  std::atomic<bool> done{false};
  std::thread thread;
};

namespace {

Status FillAddr(const std::string& path, sockaddr_un* addr) {
  std::memset(addr, 0, sizeof(*addr));
  addr->sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr->sun_path))
    return Status::InvalidArgument("control socket '" + path + "': path must be 1 to " +
                                   std::to_string(sizeof(addr->sun_path) - 1) + " bytes");
  std::memcpy(addr->sun_path, path.data(), path.size());
  return Status::OK();
}

// Best effort, for the one-line refusals sent from the accept thread: the
// socket is non-blocking and a short line fits in any socket buffer.
void SendLine(int fd, const std::string& line) {
  std::string l = line + "\n";
  (void)!send(fd, l.data(), l.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
}

// Whether something exists at path; refuses (never replaces) anything but a
// socket. Shared by CheckSocketPath and Start. Failure: AlreadyExists, or
// the errno of an lstat that fails for another reason than ENOENT.
Result<bool> ExistingSocket(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return false;
    return Status::FromErrno(errno, "control socket '" + path + "'");
  }
  if (!S_ISSOCK(st.st_mode))
    return Status::AlreadyExists("control socket '" + path +
                                 "': exists and is not a socket; not replacing it");
  return true;
}

}  // namespace

namespace {
// An existing socket at path: Busy if a server accepts on it, OK if it is
// stale (connection refused).
Status RefuseLive(const std::string& path, const sockaddr_un& addr) {
  int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (probe < 0) return Status::FromErrno(errno, "control socket: socket");
  int rc = connect(probe, reinterpret_cast<const sockaddr*>(&addr), sizeof(addr));
  int err = errno;
  close(probe);
  if (rc == 0) return Status::Busy("control socket '" + path + "': a server is listening on it");
  if (err != ECONNREFUSED) return Status::FromErrno(err, "control socket '" + path + "'");
  return Status::OK();
}
}  // namespace

Status CheckSocketPath(const std::string& path) {
  sockaddr_un addr;
  CBT_RETURN_IF_ERROR(FillAddr(path, &addr));
  CBT_ASSIGN_OR_RETURN(bool exists, ExistingSocket(path));
  // Live: refused now (Start() checks again for a server started since);
  // stale: Start() replaces it.
  if (exists) return RefuseLive(path, addr);
  struct stat st;
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? std::string(".")
                          : slash == 0               ? std::string("/")
                                                     : path.substr(0, slash);
  if (stat(dir.c_str(), &st) != 0)
    return Status::FromErrno(errno, "control socket '" + path + "': directory '" + dir + "'");
  if (!S_ISDIR(st.st_mode))
    return Status::InvalidArgument(
        "control socket '" + path + "': '" + dir + "' is not a directory", ENOTDIR);
  return Status::OK();
}

ControlServer::ControlServer(ServerOptions options, Handler& handler)
    : opt_(std::move(options)), handler_(handler) {}

ControlServer::~ControlServer() {
  Stop();
}

Status ControlServer::Start() {
  if (started_) return Status::InvalidArgument("control socket: Start() called twice");
  started_ = true;
  const std::string& path = opt_.path;
  sockaddr_un addr;
  CBT_RETURN_IF_ERROR(FillAddr(path, &addr));

  CBT_ASSIGN_OR_RETURN(bool exists, ExistingSocket(path));
  if (exists) {
    // A socket: replace it only if nobody is listening (left by a crash).
    CBT_RETURN_IF_ERROR(RefuseLive(path, addr));
    if (unlink(path.c_str()) != 0 && errno != ENOENT)
      return Status::FromErrno(errno, "control socket '" + path + "': unlink stale socket");
  }

  struct stat st;
  listen_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (listen_fd_ < 0) return Status::FromErrno(errno, "control socket: socket");
  // Linux creates the socket file with the socket inode's mode minus the
  // umask, so setting it before bind() leaves no moment at which the file is
  // wider than 0600. chmod() afterwards only undoes a stricter umask.
  if (fchmod(listen_fd_, 0600) != 0) return Status::FromErrno(errno, "control socket: fchmod");
  if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    return Status::FromErrno(errno, "control socket '" + path + "': bind");
  if (chmod(path.c_str(), 0600) != 0 || lstat(path.c_str(), &st) != 0) {
    Status s = Status::FromErrno(errno, "control socket '" + path + "'");
    unlink(path.c_str());
    return s;
  }
  dev_ = st.st_dev;
  ino_ = st.st_ino;
  if (listen(listen_fd_, 16) != 0 || pipe2(wake_, O_CLOEXEC | O_NONBLOCK) != 0) {
    Status s = Status::FromErrno(errno, "control socket '" + path + "': listen");
    unlink(path.c_str());
    return s;
  }
  acceptor_ = std::thread([this] { AcceptLoop(); });
  return Status::OK();
}

void ControlServer::Stop() {
  if (stopped_) return;
  stopped_ = true;
  if (wake_[1] >= 0) (void)!write(wake_[1], "x", 1);  // never read: wakes every poll()
  if (acceptor_.joinable()) acceptor_.join();
  {
    std::lock_guard lock(conns_mu_);
    for (auto& c : conns_) c->thread.join();
    conns_.clear();
  }
  if (listen_fd_ >= 0) {
    // Unlink only our own socket: someone may have replaced it meanwhile.
    struct stat st;
    if (lstat(opt_.path.c_str(), &st) == 0 && st.st_dev == dev_ && st.st_ino == ino_)
      unlink(opt_.path.c_str());
    close(listen_fd_);
    listen_fd_ = -1;
  }
  for (int& fd : wake_) {
    if (fd >= 0) close(fd);
    fd = -1;
  }
}

bool ControlServer::Wait(int fd, short events) {
  for (;;) {
    pollfd p[2] = {{fd, events, 0}, {wake_[0], POLLIN, 0}};
    int n = poll(p, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (p[1].revents) return false;
    // POLLHUP/POLLERR: let the read or write report it.
    if (p[0].revents) return true;
  }
}

bool ControlServer::WriteAll(int fd, std::string_view data) {
  while (!data.empty()) {
    ssize_t n = send(fd, data.data(), data.size(), MSG_NOSIGNAL);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
    } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
      if (!Wait(fd, POLLOUT)) return false;
    } else {
      return false;
    }
  }
  return true;
}

void ControlServer::ReapFinished() {
  std::lock_guard lock(conns_mu_);
  for (auto it = conns_.begin(); it != conns_.end();) {
    if ((*it)->done.load()) {
      (*it)->thread.join();
      it = conns_.erase(it);
    } else {
      ++it;
    }
  }
}

void ControlServer::AcceptLoop() {
  const uid_t self = geteuid();
  while (Wait(listen_fd_, POLLIN)) {
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      // Out of descriptors: the pending peer keeps the listener readable, so
      // back off (woken early by Stop) instead of spinning. Anything else
      // (EAGAIN, a peer gone before accept): keep serving.
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        pollfd p{wake_[0], POLLIN, 0};
        if (poll(&p, 1, 100) > 0) break;
      }
      continue;
    }
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0 ||
        (cred.uid != self && cred.uid != 0)) {
      SendLine(fd, FormatError(Status::InvalidArgument("control socket: peer uid " +
                                                           std::to_string(cred.uid) +
                                                           " is neither the server's nor root",
                                                       EACCES),
                               std::nullopt));
      close(fd);
      continue;
    }
    ReapFinished();
    std::lock_guard lock(conns_mu_);
    if (conns_.size() >= opt_.max_clients) {
      SendLine(fd, FormatError(Status::Busy("control socket: too many clients (" +
                                            std::to_string(opt_.max_clients) + ")"),
                               std::nullopt));
      close(fd);
      continue;
    }
    auto c = std::make_unique<Conn>();
    c->fd = fd;
    Conn* raw = c.get();
    c->thread = std::thread([this, raw] { Serve(raw); });
    conns_.push_back(std::move(c));
  }
}

void ControlServer::Serve(Conn* c) {
  std::string buf;
  char chunk[4096];
  bool open = true;
  while (open && Wait(c->fd, POLLIN)) {
    ssize_t n = read(c->fd, chunk, sizeof(chunk));
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (n <= 0) break;  // EOF or error: a partial line is dropped, never run
    buf.append(chunk, static_cast<size_t>(n));
    size_t start = 0;
    for (size_t nl; open && (nl = buf.find('\n', start)) != std::string::npos; start = nl + 1) {
      std::string_view line(buf.data() + start, nl - start);
      if (line.size() > opt_.max_line_bytes) break;  // refused below, with the tail
      std::string reply;
      {
        std::lock_guard lock(handler_mu_);
        reply = HandleLine(line, handler_);
      }
      open = WriteAll(c->fd, reply + "\n");
    }
    buf.erase(0, start);
    // Refuse as soon as a line is known to be too long, before buffering more.
    size_t nl = buf.find('\n');
    size_t line_len = nl == std::string::npos ? buf.size() : nl;
    if (open && line_len > opt_.max_line_bytes) {
      WriteAll(c->fd, FormatError(Status::InvalidArgument("request: longer than " +
                                                          std::to_string(opt_.max_line_bytes) +
                                                          " bytes; closing the connection"),
                                  std::nullopt) +
                          "\n");
      break;
    }
  }
  close(c->fd);
  c->done.store(true);
}

}  // namespace cbt::control
