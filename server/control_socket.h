// ControlServer: serves the control protocol (control_protocol.h) on a unix
// socket. See docs/control.md.
//
//  - The socket file is created mode 0600 whatever the umask, with no moment
//    at which it is wider. An existing file at the path that is not a socket
//    is an error and left alone; a stale socket (nobody listening) is
//    replaced; a live one is an error (Busy).
//  - Every peer is checked with SO_PEERCRED: only the server's effective uid
//    and root are served; others get one PermissionDenied line and EOF.
//  - One thread per connection, at most max_clients at once (more get a Busy
//    line and EOF). All socket I/O is non-blocking behind poll() with a wake
//    pipe, so a slow, silent, malformed or oversized client only ever holds
//    its own thread, and Stop() never waits on a client.
//  - Handler::Handle runs on one thread at a time (a mutex held only around
//    the call, never across socket I/O).
//
// Construction does nothing; Start() creates the socket and threads, so it
// can be called after nbdkit forks into the background.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common/status.h"
#include "server/control_protocol.h"

namespace cbt::control {

struct ServerOptions {
  std::string path;
  size_t max_clients = 16;
  size_t max_line_bytes = kMaxLineBytes;  // tests lower it
};

// What Start() would refuse about `path` that can be seen without creating
// anything: a length that does not fit sun_path, a parent that is not an
// existing directory, an existing file that is not a socket, a socket a
// server is listening on (Busy). For checking a configured path early
// (before nbdkit forks, so a daemonised nbdkit still reports it); Start()
// checks again.
Status CheckSocketPath(const std::string& path);

class ControlServer {
 public:
  // `handler` is not owned and must outlive the server.
  ControlServer(ServerOptions options, Handler& handler);
  ~ControlServer();  // Stop()
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

  // Creates the socket and starts accepting. Once only.
  Status Start();
  // Wakes and joins every thread, closes every connection, unlinks the socket
  // file if it is still the one Start() created. Idempotent.
  void Stop();

  const std::string& path() const { return opt_.path; }

 private:
  struct Conn;
  void AcceptLoop();
  void Serve(Conn* c);
  void ReapFinished();
  // Writes all of `data` unless the peer stalls past Stop() or fails.
  bool WriteAll(int fd, std::string_view data);
  // Waits for `events` on fd, or for Stop(). False on Stop or error.
  bool Wait(int fd, short events);

  ServerOptions opt_;
  Handler& handler_;
  std::mutex handler_mu_;
  int listen_fd_ = -1;
  int wake_[2] = {-1, -1};  // Stop() writes wake_[1]; every poll() watches wake_[0]
  dev_t dev_ = 0;           // identity of the socket file we created
  ino_t ino_ = 0;
  bool started_ = false;
  bool stopped_ = false;
  std::thread acceptor_;
  std::mutex conns_mu_;
  std::list<std::unique_ptr<Conn>> conns_;
};

}  // namespace cbt::control
