// Real-socket tests of ControlServer. Every wait is bounded (kWaitMs) so a
// bug shows as a failure, not a hang; nothing asserts on elapsed time.
#include "server/control_socket.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>

namespace cbt::control {
namespace {

using json = nlohmann::json;
constexpr int kWaitMs = 30000;

class EchoHandler : public Handler {
 public:
  Result<json> Handle(const Request& r) override {
    ++calls;
    return json{{"command", std::string(CommandName(r.command))}};
  }
  std::atomic<int> calls{0};
};

class Client {
 public:
  explicit Client(const std::string& path) {
    fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof(a.sun_path) - 1);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  }
  ~Client() { Close(); }
  void Close() {
    if (fd_ >= 0) close(fd_);
    fd_ = -1;
  }
  bool connected() const { return connected_; }
  int fd() const { return fd_; }
  bool Send(const std::string& s) {
    return send(fd_, s.data(), s.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(s.size());
  }
  // The next line without '\n'; nullopt on EOF, error or kWaitMs of silence.
  std::optional<std::string> ReadLine() {
    for (;;) {
      if (size_t nl = buf_.find('\n'); nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return line;
      }
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, kWaitMs) != 1) return std::nullopt;
      char c[4096];
      ssize_t n = read(fd_, c, sizeof(c));
      if (n <= 0) return std::nullopt;
      buf_.append(c, static_cast<size_t>(n));
    }
  }
  // True if the server closed the connection (EOF) within kWaitMs.
  bool SeesEof() {
    pollfd p{fd_, POLLIN, 0};
    if (poll(&p, 1, kWaitMs) != 1) return false;
    char c;
    return read(fd_, &c, 1) == 0 || errno == ECONNRESET;
  }

 private:
  int fd_ = -1;
  bool connected_ = false;
  std::string buf_;
};

class ControlSocketTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cbt-control-test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/ctl.sock";
  }
  void TearDown() override {
    server_.reset();
    (void)!system(("rm -rf '" + dir_ + "'").c_str());
  }
  void StartServer(size_t max_clients = 16, size_t max_line = kMaxLineBytes) {
    server_ =
        std::make_unique<ControlServer>(ServerOptions{path_, max_clients, max_line}, handler_);
    Status s = server_->Start();
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  std::string dir_, path_;
  EchoHandler handler_;
  std::unique_ptr<ControlServer> server_;
};

TEST_F(ControlSocketTest, RoundTripInOrder) {
  StartServer();
  Client c(path_);
  ASSERT_TRUE(c.connected());
  // Two requests in one write, and a third split over two writes.
  ASSERT_TRUE(c.Send(R"({"execute":"query-bitmaps","id":1})"
                     "\n"
                     R"({"execute":"nope","id":2})"
                     "\n"
                     R"({"execute":"checkpoint","arguments":)"));
  ASSERT_TRUE(c.Send(R"({"freeze":"a","new":"b"},"id":"three"})"
                     "\n"));
  EXPECT_EQ(c.ReadLine(), R"({"id":1,"return":{"command":"query-bitmaps"}})");
  EXPECT_EQ(
      c.ReadLine(),
      R"({"error":{"class":"InvalidArgument","desc":"execute: unknown command 'nope'"},"id":2})");
  EXPECT_EQ(c.ReadLine(), R"({"id":"three","return":{"command":"checkpoint"}})");
  EXPECT_EQ(handler_.calls.load(), 2);
}

TEST_F(ControlSocketTest, Mode0600WhateverTheUmask) {
  for (mode_t mask : {mode_t{0}, mode_t{0277}}) {
    mode_t old = umask(mask);
    StartServer();
    umask(old);
    struct stat st;
    ASSERT_EQ(lstat(path_.c_str(), &st), 0);
    EXPECT_TRUE(S_ISSOCK(st.st_mode));
    EXPECT_EQ(st.st_mode & 07777, 0600u) << "umask " << mask;
    server_.reset();
    EXPECT_NE(access(path_.c_str(), F_OK), 0) << "Stop() unlinks the socket";
  }
}

TEST_F(ControlSocketTest, NonSocketFileRefusedAndLeftIntact) {
  { std::ofstream(path_) << "precious"; }
  ControlServer s(ServerOptions{path_}, handler_);
  Status st = s.Start();
  EXPECT_TRUE(st.IsAlreadyExists()) << st.ToString();
  EXPECT_NE(st.message().find("not a socket"), std::string::npos) << st.message();
  s.Stop();
  std::stringstream got;
  got << std::ifstream(path_).rdbuf();
  EXPECT_EQ(got.str(), "precious");
}

TEST_F(ControlSocketTest, CheckSocketPathSeesWhatStartWouldRefuse) {
  EXPECT_TRUE(CheckSocketPath(path_).ok()) << "absent, in an existing directory";
  { std::ofstream(path_) << "precious"; }
  Status st = CheckSocketPath(path_);
  EXPECT_TRUE(st.IsAlreadyExists()) << st.ToString();
  EXPECT_NE(st.message().find("not a socket"), std::string::npos) << st.message();
  std::stringstream got;
  got << std::ifstream(path_).rdbuf();
  EXPECT_EQ(got.str(), "precious");

  st = CheckSocketPath(dir_ + "/missing/ctl.sock");
  EXPECT_EQ(st.err(), ENOENT) << st.ToString();
  st = CheckSocketPath(path_ + "/ctl.sock");  // the parent is a regular file
  EXPECT_EQ(st.err(), ENOTDIR) << st.ToString();
  st = CheckSocketPath(dir_ + "/" + std::string(200, 'x'));
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_FALSE(CheckSocketPath("").ok());

  // A stale socket (bound, nobody listening) passes: Start() replaces it.
  ASSERT_EQ(unlink(path_.c_str()), 0);
  {
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path_.c_str(), sizeof(a.sun_path) - 1);
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    close(fd);
  }
  EXPECT_TRUE(CheckSocketPath(path_).ok());
  // A live one is refused already here (a daemonised nbdkit reports it).
  ASSERT_EQ(unlink(path_.c_str()), 0);
  StartServer();
  st = CheckSocketPath(path_);
  EXPECT_TRUE(st.IsBusy()) << st.ToString();
  EXPECT_NE(st.message().find("a server is listening on it"), std::string::npos) << st.message();
}

TEST_F(ControlSocketTest, StaleSocketReplacedLiveOneRefused) {
  // A bound socket that nobody listens on: what a crashed server leaves.
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path_.c_str(), sizeof(a.sun_path) - 1);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  close(fd);
  StartServer();
  Client c(path_);
  ASSERT_TRUE(c.Send("{\"execute\":\"persist\"}\n"));
  EXPECT_EQ(c.ReadLine(), R"({"return":{"command":"persist"}})");

  ControlServer second(ServerOptions{path_}, handler_);
  Status st = second.Start();
  EXPECT_TRUE(st.IsBusy()) << st.ToString();
  second.Stop();
  EXPECT_EQ(access(path_.c_str(), F_OK), 0) << "the refused server leaves the live socket";
}

TEST_F(ControlSocketTest, OversizedLineClosesOnlyThatClient) {
  StartServer(16, 1024);
  Client other(path_);
  ASSERT_TRUE(other.Send(R"({"execute":"persist","id":1})"
                         "\n"));
  ASSERT_EQ(other.ReadLine(), R"({"id":1,"return":{"command":"persist"}})");
  // The other client now sits on half a request while the big one is refused.
  ASSERT_TRUE(other.Send(R"({"execute":"query-stats",)"));

  Client big(path_);
  big.Send(R"({"execute":"persist","id":9,"x":")" + std::string(4000, 'a'));
  auto reply = big.ReadLine();
  ASSERT_TRUE(reply.has_value());
  json j = json::parse(*reply);
  EXPECT_EQ(j["error"]["class"], "InvalidArgument");
  EXPECT_EQ(j["error"]["desc"], "request: longer than 1024 bytes; closing the connection");
  EXPECT_TRUE(big.SeesEof());

  ASSERT_TRUE(other.Send(R"("id":2})"
                         "\n"));
  EXPECT_EQ(other.ReadLine(), R"({"id":2,"return":{"command":"query-stats"}})");
  EXPECT_EQ(handler_.calls.load(), 2);
}

// A client that sends without ever reading fills both socket buffers; its
// connection thread then waits to write, and nobody else may notice.
TEST_F(ControlSocketTest, ClientThatNeverReadsBlocksOnlyItself) {
  StartServer();
  Client hog(path_);
  ASSERT_TRUE(hog.connected());
  const std::string req = "{\"execute\":\"persist\"}\n";
  std::string burst;
  for (int i = 0; i < 1000; ++i) burst += req;
  // Non-blocking sends until the kernel refuses more: the server has stopped
  // reading, i.e. it is stuck writing replies the hog never reads.
  bool full = false;
  for (int i = 0; i < 10000 && !full; ++i)
    full = send(hog.fd(), burst.data(), burst.size(), MSG_DONTWAIT | MSG_NOSIGNAL) < 0 &&
           errno == EAGAIN;
  ASSERT_TRUE(full);
  Client other(path_);
  ASSERT_TRUE(other.Send("{\"execute\":\"query-stats\",\"id\":1}\n"));
  EXPECT_EQ(other.ReadLine(), R"({"id":1,"return":{"command":"query-stats"}})");
  server_->Stop();  // must not wait for the hog to read
  EXPECT_NE(access(path_.c_str(), F_OK), 0);
}

TEST_F(ControlSocketTest, DisconnectMidLineRunsNothing) {
  StartServer();
  {
    Client c(path_);
    ASSERT_TRUE(c.Send(R"({"execute":"bitmap-remove","arguments":{"name":"b0"})"));
  }  // closed without the '\n'
  Client d(path_);
  ASSERT_TRUE(d.Send(R"({"execute":"persist","id":1})"
                     "\n"));
  EXPECT_EQ(d.ReadLine(), R"({"id":1,"return":{"command":"persist"}})");
  EXPECT_EQ(handler_.calls.load(), 1) << "the unfinished request must never run";
}

TEST_F(ControlSocketTest, ClientCountIsBounded) {
  StartServer(1);
  Client a(path_);
  ASSERT_TRUE(a.Send(R"({"execute":"persist"})"
                     "\n"));
  ASSERT_TRUE(a.ReadLine().has_value());  // a is being served
  Client b(path_);
  auto r = b.ReadLine();
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(json::parse(*r)["error"]["class"], "Busy");
  EXPECT_TRUE(b.SeesEof());
  a.Close();
  // a's slot frees once its thread sees EOF; retry (bounded) until served.
  bool served = false;
  for (int i = 0; i < 300 && !served; ++i) {
    Client c(path_);
    c.Send(R"({"execute":"persist"})"
           "\n");
    auto line = c.ReadLine();
    served = line && line->find("return") != std::string::npos;
    if (!served) usleep(100 * 1000);
  }
  EXPECT_TRUE(served);
}

TEST_F(ControlSocketTest, StopWithSilentClientsConnected) {
  StartServer();
  Client a(path_), b(path_);
  ASSERT_TRUE(b.Send("{\"execute\":"));  // half a request, then silence
  ASSERT_TRUE(a.Send("{\"execute\":\"persist\"}\n"));
  ASSERT_TRUE(a.ReadLine().has_value());
  server_->Stop();  // must not wait for either client
  EXPECT_TRUE(a.SeesEof());
  EXPECT_TRUE(b.SeesEof());
  EXPECT_NE(access(path_.c_str(), F_OK), 0);
}

// Another uid is refused twice over: the 0600 file stops connect(), and when
// the file is opened up (as a misconfiguration might), SO_PEERCRED does.
TEST_F(ControlSocketTest, OtherUidRefused) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to run a client as uid 65534";
  if (system("command -v setpriv >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "setpriv or python3 not found";
  ASSERT_EQ(chmod(dir_.c_str(), 0755), 0);
  StartServer();
  std::string out = dir_ + "/out";
  std::string cmd =
      "setpriv --reuid=65534 --regid=65534 --clear-groups timeout 30 python3 -c '"
      "import socket,sys\n"
      "s=socket.socket(socket.AF_UNIX)\n"
      "try:\n"
      "  s.connect(sys.argv[1])\n"
      "except OSError as e:\n"
      "  print(\"connect:\", e.errno); sys.exit(0)\n"
      // The refusal arrives unasked; sending first could race with EOF.
      "print(s.makefile().readline().strip())\n"
      "' '" +
      path_ + "' > '" + out + "' 2>&1";
  auto run = [&] {
    int rc = system(cmd.c_str());
    std::stringstream got;
    got << std::ifstream(out).rdbuf();
    EXPECT_EQ(rc, 0) << got.str();
    return got.str();
  };
  EXPECT_EQ(run(), "connect: 13\n");  // EACCES from the file mode
  ASSERT_EQ(chmod(path_.c_str(), 0666), 0);
  std::string refused = run();
  ASSERT_FALSE(refused.empty());
  json j = json::parse(refused);
  EXPECT_EQ(j["error"]["class"], "PermissionDenied");
  EXPECT_EQ(j["error"]["desc"], "control socket: peer uid 65534 is neither the server's nor root");
  EXPECT_EQ(handler_.calls.load(), 0);
}

}  // namespace
}  // namespace cbt::control
