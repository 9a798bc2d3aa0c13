// The control client (control_client.h) against a real ControlServer with a
// small handler, and against raw sockets that misbehave in one way each: no
// socket, a stale socket, EOF, garbage, an oversized or missing reply, a
// refusal line. Every wait is bounded; nothing asserts on elapsed time
// beyond "returned before the generous test timeout".
#include "server/control_client.h"

#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <thread>

#include "server/control_socket.h"

namespace cbt::control {
namespace {

using json = nlohmann::json;

// Answers query-stats with {"ok": true}, echoes a bitmap-add's name, and
// fails every other command with the Status the test chose.
class ScriptedHandler : public Handler {
 public:
  Result<json> Handle(const Request& r) override {
    if (r.command == Command::kQueryStats) return json{{"ok", true}};
    if (r.command == Command::kBitmapAdd)
      return json{{"added", std::get<BitmapAddArgs>(r.args).name}};
    return fail;
  }
  Status fail = Status::NotFound("bitmap 'nope' not found");
};

// A listening socket whose one connection is handled by `serve` on a thread.
class RawServer {
 public:
  RawServer(const std::string& path, std::function<void(int)> serve) {
    fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof(a.sun_path) - 1);
    ok_ = bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 && listen(fd_, 4) == 0;
    if (!ok_) return;
    thread_ = std::thread([this, serve] {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 30000) != 1) return;
      int c = accept(fd_, nullptr, nullptr);
      if (c < 0) return;
      serve(c);
      close(c);
    });
  }
  ~RawServer() {
    if (thread_.joinable()) thread_.join();
    close(fd_);
  }
  bool ok() const { return ok_; }

 private:
  int fd_ = -1;
  bool ok_ = false;
  std::thread thread_;
};

// Reads up to one request line (bounded), so replies come after the request.
void ReadRequest(int fd) {
  char c;
  for (int i = 0; i < 65536; ++i) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 30000) != 1 || read(fd, &c, 1) != 1 || c == '\n') return;
  }
}
void Write(int fd, const std::string& s) {
  (void)!send(fd, s.data(), s.size(), MSG_NOSIGNAL);
}

class ControlClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cbt-control-client-test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/ctl.sock";
  }
  void TearDown() override {
    server_.reset();
    (void)!system(("rm -rf '" + dir_ + "'").c_str());
  }
  void StartServer() {
    server_ = std::make_unique<ControlServer>(ServerOptions{path_}, handler_);
    Status s = server_->Start();
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  static ClientOptions Short() {
    ClientOptions o;
    o.timeout = std::chrono::milliseconds(300);
    return o;
  }
  std::string dir_, path_;
  ScriptedHandler handler_;
  std::unique_ptr<ControlServer> server_;
};

TEST_F(ControlClientTest, ReturnsTheReturnValue) {
  StartServer();
  Result<json> r = Call(path_, "query-stats");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, (json{{"ok", true}}));
  r = Call(path_, "bitmap-add", {{"name", "b1"}, {"granularity", 65536}});
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(*r, (json{{"added", "b1"}}));
}

TEST_F(ControlClientTest, ErrorClassesMapToStatusKinds) {
  StartServer();
  struct Case {
    Status sent;
    Status::Kind kind;
    int err;
  };
  const Case cases[] = {
      {Status::NotFound("bitmap 'nope' not found"), Status::Kind::kNotFound, ENOENT},
      {Status::AlreadyExists("bitmap 'b0' exists"), Status::Kind::kAlreadyExists, EEXIST},
      {Status::InvalidArgument("bad"), Status::Kind::kInvalidArgument, EINVAL},
      {Status::Busy("held"), Status::Kind::kBusy, EBUSY},
      {Status::NotSupported("not yet"), Status::Kind::kNotSupported, ENOTSUP},
      {Status::IOError("no access", EACCES), Status::Kind::kIOError, EACCES},
      {Status::Corruption("bad cluster"), Status::Kind::kIOError, EIO},
      {Status::IOError("disk full", ENOSPC), Status::Kind::kIOError, EIO},
  };
  for (const Case& c : cases) {
    handler_.fail = c.sent;
    Result<json> r = Call(path_, "bitmap-remove", {{"name", "x"}});
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().kind(), c.kind) << c.sent.ToString() << " -> " << r.status().ToString();
    EXPECT_EQ(r.status().err(), c.err) << c.sent.ToString();
    EXPECT_EQ(r.status().message(), c.sent.message());
    // The class survives the round trip.
    EXPECT_STREQ(ErrorClass(r.status()), ErrorClass(c.sent));
  }
}

TEST_F(ControlClientTest, UnknownClassIsGenericAndNamed) {
  Status s = StatusFromError({{"class", "Frobnicated"}, {"desc", "it broke"}});
  EXPECT_TRUE(s.IsIOError());
  EXPECT_EQ(s.message(), "it broke (error class Frobnicated)");
  s = StatusFromError(json::array());
  EXPECT_TRUE(s.IsIOError());
}

TEST_F(ControlClientTest, UnknownCommandRefusedByTheServer) {
  StartServer();
  Result<json> r = Call(path_, "no-such-command");
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();
  EXPECT_EQ(r.status().message(), "execute: unknown command 'no-such-command'");
}

TEST_F(ControlClientTest, MissingSocketNamesTheParameter) {
  Result<json> r = Call(path_, "query-bitmaps");
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsNotFound());
  EXPECT_EQ(r.status().message(), "no control socket at '" + path_ +
                                      "' (is the filter running with cbt-control=" + path_ + "?)");
}

TEST_F(ControlClientTest, StaleSocketHasNoListener) {
  // A socket file whose server is gone: bound, then closed without unlink.
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path_.c_str(), sizeof(a.sun_path) - 1);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  close(fd);
  Result<json> r = Call(path_, "query-bitmaps");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().err(), ECONNREFUSED);
  EXPECT_NE(r.status().message().find("no server is listening on it"), std::string::npos)
      << r.status().message();
}

TEST_F(ControlClientTest, RegularFileIsNotASocket) {
  std::ofstream(path_) << "x";
  Result<json> r = Call(path_, "query-bitmaps");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "control socket '" + path_ + "': not a socket");
}

TEST_F(ControlClientTest, TooLongPath) {
  Result<json> r = Call("/tmp/" + std::string(200, 'x'), "query-bitmaps");
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument());
}

TEST_F(ControlClientTest, EofWithoutReply) {
  RawServer s(path_, [](int fd) { ReadRequest(fd); });
  ASSERT_TRUE(s.ok());
  Result<json> r = Call(path_, "query-bitmaps");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(),
            "control socket '" + path_ + "': the server closed the connection without replying");
}

TEST_F(ControlClientTest, EofMidReply) {
  RawServer s(path_, [](int fd) {
    ReadRequest(fd);
    Write(fd, R"({"return":)");
  });
  ASSERT_TRUE(s.ok());
  Result<json> r = Call(path_, "query-bitmaps");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("in the middle of its reply (10 bytes"), std::string::npos)
      << r.status().message();
}

TEST_F(ControlClientTest, GarbageReply) {
  RawServer s(path_, [](int fd) {
    ReadRequest(fd);
    Write(fd, "SSH-2.0-OpenSSH_9.2\r\n");
  });
  ASSERT_TRUE(s.ok());
  Result<json> r = Call(path_, "query-bitmaps");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "control socket '" + path_ +
                                      "': the reply is not JSON: 'SSH-2.0-OpenSSH_9.2 ' (is a cbt "
                                      "filter serving it?)");
}

TEST_F(ControlClientTest, JsonThatIsNoReply) {
  for (const char* reply : {"[1]\n", "{\"id\":1}\n", "{\"id\":2,\"return\":{}}\n",
                            "{\"return\":{}}\n", "{\"id\":1,\"return\":{},\"error\":{}}\n"}) {
    RawServer s(path_, [reply](int fd) {
      ReadRequest(fd);
      Write(fd, reply);
    });
    ASSERT_TRUE(s.ok());
    Result<json> r = Call(path_, "query-bitmaps");
    EXPECT_FALSE(r.ok()) << reply;
    EXPECT_EQ(r.status().message().rfind("control socket '" + path_ + "': the reply ", 0), 0)
        << r.status().message();
    unlink(path_.c_str());
  }
}

TEST_F(ControlClientTest, OversizedReplyRefused) {
  RawServer s(path_, [](int fd) {
    ReadRequest(fd);
    Write(fd, "{\"return\":\"" + std::string(8192, 'a') + "\"}\n");
  });
  ASSERT_TRUE(s.ok());
  ClientOptions o;
  o.max_reply_bytes = 1024;
  Result<std::string> r = Exchange(path_, R"({"execute":"query-bitmaps"})", o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(),
            "control socket '" + path_ + "': reply longer than 1024 bytes; refused");
}

TEST_F(ControlClientTest, SilentServerTimesOut) {
  RawServer s(path_, [](int fd) {
    ReadRequest(fd);
    // Hold the connection open past the client's deadline.
    pollfd p{fd, POLLIN, 0};
    (void)poll(&p, 1, 5000);
  });
  ASSERT_TRUE(s.ok());
  Result<std::string> r = Exchange(path_, R"({"execute":"query-bitmaps"})", Short());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "control socket '" + path_ + "': no reply within 300 ms");
  // The client is gone: the server's poll sees EOF, and the thread ends.
}

// The refusal a ControlServer sends to a peer it does not serve: one error
// line without id, then close, without reading the request.
TEST_F(ControlClientTest, RefusalLineWithoutId) {
  RawServer s(path_, [](int fd) {
    Write(
        fd,
        R"({"error":{"class":"PermissionDenied","desc":"control socket: peer uid 65534 is neither the server's nor root"}})"
        "\n");
  });
  ASSERT_TRUE(s.ok());
  Result<json> r = Call(path_, "query-bitmaps");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().err(), EACCES);
  EXPECT_STREQ(ErrorClass(r.status()), "PermissionDenied");
  EXPECT_EQ(r.status().message(),
            "control socket: peer uid 65534 is neither the server's nor root");
}

// The real server refusing another uid, the client running as uid 65534 in a
// child process (root only).
TEST_F(ControlClientTest, OtherUidRefusedByTheRealServer) {
  if (geteuid() != 0) GTEST_SKIP() << "needs root to run a client as uid 65534";
  ASSERT_EQ(chmod(dir_.c_str(), 0755), 0);
  StartServer();
  auto in_child = [&](const char* what) {
    int p[2];
    EXPECT_EQ(pipe(p), 0);
    pid_t pid = fork();
    if (pid == 0) {
      close(p[0]);
      if (setresgid(65534, 65534, 65534) != 0 || setresuid(65534, 65534, 65534) != 0) _exit(2);
      Result<json> r = Call(path_, "query-stats");
      std::string m = r.ok() ? "ok" : std::to_string(r.status().err()) + " " + r.status().message();
      (void)!write(p[1], m.data(), m.size());
      _exit(0);
    }
    close(p[1]);
    std::string got;
    char buf[512];
    for (ssize_t n; (n = read(p[0], buf, sizeof buf)) > 0;) got.append(buf, static_cast<size_t>(n));
    close(p[0]);
    int st = 0;
    EXPECT_EQ(waitpid(pid, &st, 0), pid);
    EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << what;
    return got;
  };
  // The 0600 file stops connect(); opened up, SO_PEERCRED does.
  EXPECT_EQ(in_child("mode 0600"),
            "13 control socket '" + path_ +
                "': permission denied (the socket is mode 0600: run as the server's user or root)");
  ASSERT_EQ(chmod(path_.c_str(), 0666), 0);
  EXPECT_EQ(in_child("mode 0666"),
            "13 control socket: peer uid 65534 is neither the server's nor root");
}

}  // namespace
}  // namespace cbt::control
