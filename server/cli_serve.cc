// cbt serve DISK [--format raw|qcow2] [--bitmap NAME]... ... (docs/serve.md)
//
// A qemu-nbd-like launcher: builds nbdkit's command line (the cbt filter
// over the file plugin for a raw disk, over cbt's qcow2 plugin for
// --format qcow2), runs it, waits until it completes an NBD handshake and
// prints the URI. Without --fork it stays nbdkit's parent (signals
// forwarded, nbdkit's exit code is ours; READY=1 to systemd under
// Type=notify); with --fork a supervisor in its own session is nbdkit's
// parent and we return once it serves. Processes: serve_process.cc,
// serve_supervisor.cc.
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "server/cli.h"
#include "server/cli_parse.h"
#include "server/nbd_probe.h"
#include "server/serve_process.h"
#include "server/serve_supervisor.h"

namespace cbt::cli {

namespace {

constexpr char kSynopsis[] =
    "cbt serve DISK [--format raw|qcow2] [--bitmap NAME]... [--container FILE] [--create]\n"
    "       (--socket PATH | --port N [--bind ADDR]) [--export NAME] [--read-only]\n"
    "       [--control PATH] [--durability MODE] [--fork [--log FILE]] [--pid-file FILE]\n"
    "       [--tls-creds DIR | --tls-psk FILE] [-o KEY=VALUE]... [--output=json]";
constexpr char kDescription[] =
    "Serves DISK over NBD with change tracking: runs nbdkit (from PATH) with the\n"
    "cbt filter, over nbdkit's file plugin for a raw disk (the default; DISK is\n"
    "never probed) or cbt's qcow2 plugin with --format qcow2. The bitmaps live in\n"
    "--container FILE (default for a raw disk: DISK.cbt; for a qcow2 disk: inside\n"
    "the image). Once the server completes an NBD handshake the URI is printed\n"
    "(--output=json: also the control socket and the pid). Without --fork cbt\n"
    "stays in the foreground and passes SIGTERM/SIGINT/SIGHUP on to nbdkit (a\n"
    "clean stop persists the bitmaps); the exit code is nbdkit's. See docs/serve.md.";

constexpr std::chrono::milliseconds kStartTimeout{60000};
constexpr std::chrono::milliseconds kDetachTimeout{10000};

struct ServeOptions {
  std::string disk, format = "raw", container, socket, bind = "127.0.0.1", export_name;
  std::string control, durability = "power", pid_file, tls_creds, tls_psk, log;
  std::vector<std::string> bitmaps;
  std::vector<std::string> params;  // -o KEY=VALUE: more filter/plugin parameters
  int port = 0;
  bool create = false, read_only = false, fork = false;
};

std::string Absolute(const std::string& p, const char* what) {
  std::error_code ec;
  std::string a = std::filesystem::absolute(p, ec).lexically_normal().string();
  if (ec) throw UsageError(std::string(what) + " '" + p + "': " + ec.message());
  return a;
}

// Percent-encodes all but RFC 3986's unreserved characters (and '/' if kept).
std::string UriEncode(const std::string& s, bool keep_slash) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~' ||
        (keep_slash && c == '/')) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

// The user name of the first key in a PSK file ("user:hexkey" lines).
std::string PskUser(const std::string& file) {
  std::ifstream in(file);
  std::string line;
  if (!in || !std::getline(in, line))
    throw UsageError("--tls-psk '" + file + "': cannot read it (a file of 'user:hexkey' lines)");
  const size_t colon = line.find(':');
  if (colon == 0 || colon == std::string::npos || colon > 256)
    throw UsageError("--tls-psk '" + file +
                     "': the first line is not 'user:hexkey' (make one with psktool -u USER -p " +
                     file + ")");
  return line.substr(0, colon);
}

// The URI a client uses; `probe` adds what our own readiness check needs to
// pass TLS certificate checks (we started this server).
std::string MakeUri(const ServeOptions& o, bool probe) {
  const bool tls = !o.tls_creds.empty() || !o.tls_psk.empty();
  std::string user = o.tls_psk.empty() ? "" : UriEncode(PskUser(o.tls_psk), false) + "@";
  std::string uri;
  std::string query;
  if (!o.socket.empty()) {
    uri = std::string(tls ? "nbds+unix://" : "nbd+unix://") + user + "/" +
          UriEncode(o.export_name, false);
    query = "socket=" + UriEncode(o.socket, true);
  } else {
    const bool v6 = o.bind.find(':') != std::string::npos;
    uri = std::string(tls ? "nbds://" : "nbd://") + user + (v6 ? "[" + o.bind + "]" : o.bind) +
          ":" + std::to_string(o.port) + "/" + UriEncode(o.export_name, false);
  }
  auto add = [&](const std::string& kv) { query += (query.empty() ? "" : "&") + kv; };
  if (!o.tls_psk.empty()) add("tls-psk-file=" + UriEncode(o.tls_psk, true));
  if (probe && !o.tls_creds.empty())
    add("tls-certificates=" + UriEncode(o.tls_creds, true) + "&tls-verify-peer=false");
  return query.empty() ? uri : uri + "?" + query;
}

// A module of ours: $ENV if set, else the build tree next to this cbt
// (BUILD/server/cbt -> BUILD/plugin/FILE), else `installed` (the name nbdkit
// looks up in its own filter/plugin directory).
std::string FindModule(const char* env, const char* file, const char* installed) {
  if (const char* e = std::getenv(env); e != nullptr && *e != '\0') {
    struct stat st {};
    if (::stat(e, &st) != 0 || !S_ISREG(st.st_mode))
      throw UsageError(std::string(env) + "='" + e + "' is not a file; unset it or name the .so");
    return e;
  }
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const std::filesystem::path built = self.parent_path().parent_path() / "plugin" / file;
    if (std::filesystem::is_regular_file(built, ec)) return built.string();
  }
  return installed;
}

std::vector<std::string> NbdkitArgv(const ServeOptions& o, bool verbose) {
  std::vector<std::string> a = {"nbdkit", "-f", "--exit-with-parent"};
  a.insert(a.end(), {"-P", o.pid_file});
  if (!o.socket.empty()) {
    a.insert(a.end(), {"-U", o.socket});
  } else {
    a.insert(a.end(), {"-i", o.bind, "-p", std::to_string(o.port)});
  }
  if (o.read_only) a.emplace_back("-r");
  if (!o.tls_creds.empty())
    a.insert(a.end(), {"--tls=require", "--tls-certificates=" + o.tls_creds});
  if (!o.tls_psk.empty()) a.insert(a.end(), {"--tls=require", "--tls-psk=" + o.tls_psk});
  if (verbose) a.emplace_back("-v");
  a.push_back("--filter=" + FindModule("CBT_FILTER", "nbdkit-cbt-filter.so", "cbt"));
  if (o.format == "qcow2") {
    a.push_back(FindModule("CBT_QCOW2_PLUGIN", "nbdkit-qcow2-plugin.so", "qcow2"));
  } else {
    a.emplace_back("file");
  }
  a.push_back("file=" + o.disk);
  for (const std::string& b : o.bitmaps) a.push_back("cbt-bitmap=" + b);
  if (!o.container.empty()) a.push_back("cbt-file=" + o.container);
  if (o.create) a.emplace_back("cbt-create=true");
  if (!o.control.empty()) a.push_back("cbt-control=" + o.control);
  a.push_back("cbt-durability=" + o.durability);
  for (const std::string& kv : o.params) a.push_back(kv);
  return a;
}

void Validate(ServeOptions& o, bool port_given) {
  if (o.disk.empty()) throw UsageError("missing DISK");
  for (const std::string& kv : o.params)
    if (kv.find('=') == std::string::npos || kv.front() == '=' || kv.front() == '-')
      throw UsageError("-o " + kv +
                       ": give KEY=VALUE, a filter or plugin parameter such as "
                       "cbt-trust-disk=true (docs/filter.md)");
  if (o.format != "raw" && o.format != "qcow2")
    throw UsageError("--format " + o.format + ": use --format raw (default) or --format qcow2");
  if (o.socket.empty() == !port_given)
    throw UsageError(o.socket.empty() ? "missing --socket PATH or --port N (where to listen)"
                                      : "--socket and --port together; give one");
  if (port_given && (o.port < 1 || o.port > 65535))
    throw UsageError("--port " + std::to_string(o.port) + ": a port from 1 to 65535");
  if (!o.tls_creds.empty() && !o.tls_psk.empty())
    throw UsageError("--tls-creds and --tls-psk together; give one");
  if (!o.log.empty() && !o.fork)
    throw UsageError("--log " + o.log +
                     ": only with --fork (in the foreground nbdkit's messages are on stderr)");
  if (o.durability != "power" && o.durability != "process" && o.durability != "none")
    throw UsageError("--durability " + o.durability + ": use power (default), process or none");
  if (o.bitmaps.empty()) o.bitmaps = {"b0"};
  if (o.container.find('%') != std::string::npos)
    throw UsageError("--container '" + o.container +
                     "': cbt serve serves one disk; a %e template needs nbdkit itself "
                     "(docs/filter.md)");
  o.disk = Absolute(o.disk, "DISK");
  struct stat st {};
  if (::stat(o.disk.c_str(), &st) != 0)
    throw UsageError(
        "DISK " + o.disk + ": " + std::strerror(errno) +
        (errno == ENOENT ? " (make one with qemu-img create, or name an existing disk)" : ""));
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
    throw UsageError("DISK " + o.disk + ": not a regular file or block device");
  if (o.container.empty() && o.format == "raw") o.container = o.disk + ".cbt";
  for (auto [path, what] : {std::pair{&o.container, "--container"},
                            {&o.socket, "--socket"},
                            {&o.control, "--control"},
                            {&o.pid_file, "--pid-file"},
                            {&o.log, "--log"},
                            {&o.tls_creds, "--tls-creds"},
                            {&o.tls_psk, "--tls-psk"}})
    if (!path->empty()) *path = Absolute(*path, what);
  if (!o.tls_psk.empty()) (void)PskUser(o.tls_psk);  // refused now, not after the start
}

// --pid-file FILE: its directory must exist (nbdkit would fail after the
// fork, unseen). A file left by a server that is gone is removed, so that
// the pid read after the start is the new server's; a file naming a live
// process is refused (another server's, or not a pid file at all).
void ClearStalePidFile(const std::string& path) {
  std::error_code ec;
  const std::filesystem::path dir = std::filesystem::path(path).parent_path();
  if (!std::filesystem::is_directory(dir, ec))
    throw UsageError("--pid-file " + path + ": " + dir.string() + " is not a directory");
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;
  if (!S_ISREG(st.st_mode))
    throw UsageError("--pid-file " + path + ": not a regular file; remove it or choose another");
  std::ifstream in(path);
  long pid = 0;
  if ((in >> pid) && pid > 0 && pid <= INT32_MAX && ProcessAlive(static_cast<pid_t>(pid)))
    throw UsageError("--pid-file " + path + " names a running process (pid " + std::to_string(pid) +
                     "): another server's? stop it, or choose another file");
  if (::unlink(path.c_str()) != 0)
    throw UsageError("--pid-file " + path +
                     ": cannot remove the stale file: " + std::strerror(errno));
}

// A socket file left by a server that is gone (nbdkit does not remove it)
// is removed; anything else at PATH is refused.
void ClearStaleSocket(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;
  if (!S_ISSOCK(st.st_mode))
    throw UsageError("--socket '" + path + "' exists and is not a socket; name a new path");
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path)
    throw UsageError("--socket '" + path + "': too long for a unix socket path");
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return;  // nbdkit reports what is wrong
  const bool live = ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;
  const int err = errno;
  ::close(fd);
  if (live) throw UsageError("--socket '" + path + "': a server is listening there already");
  if (err == ECONNREFUSED) ::unlink(path.c_str());
}

void PrintServing(const ServeOptions& o, pid_t pid, OutputFormat fmt) {
  const std::string uri = MakeUri(o, false);
  if (fmt == OutputFormat::kJson) {
    Json j{{"uri", uri},
           {"socket", o.socket.empty() ? Json(nullptr) : Json(o.socket)},
           {"address", o.socket.empty() ? Json(o.bind) : Json(nullptr)},
           {"port", o.socket.empty() ? Json(o.port) : Json(nullptr)},
           {"export", o.export_name},
           {"control", o.control.empty() ? Json(nullptr) : Json(o.control)},
           {"pid", pid},
           {"pid-file", o.pid_file.empty() ? Json(nullptr) : Json(o.pid_file)},
           {"container", o.container.empty() ? Json(o.disk) : Json(o.container)}};
    PrintJson(j);
  } else {
    std::cout << uri << '\n';
  }
  std::cout << std::flush;
}

// A private pid file when the user gave none: removed by the destructor.
struct TempPidFile {
  std::string dir, path;
  TempPidFile() {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl =
        std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/cbt-serve.XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr)
      throw std::runtime_error("cannot make a temporary directory for nbdkit's pid file");
    dir = tmpl;
    path = dir + "/nbdkit.pid";
  }
  ~TempPidFile() {
    ::unlink(path.c_str());
    ::rmdir(dir.c_str());
  }
  TempPidFile(const TempPidFile&) = delete;
  TempPidFile& operator=(const TempPidFile&) = delete;
};

}  // namespace

int RunServe(const std::vector<std::string>& args) {
  ServeOptions o;
  bool help = false, verbose = false;
  std::string output = "human";
  po::options_description desc("Options");
  desc.add_options()("format,f", po::value(&o.format)->value_name("FMT"),
                     "raw (default) or qcow2 (cbt's qcow2 plugin)")(
      "bitmap", po::value(&o.bitmaps)->value_name("NAME")->composing(),
      "a bitmap that records (repeatable; default b0)")(
      "container", po::value(&o.container)->value_name("FILE"),
      "qcow2 file holding the bitmaps (raw default: DISK.cbt; qcow2 default: the image)")(
      "create", po::bool_switch(&o.create), "create a missing container and missing bitmaps")(
      "socket,k", po::value(&o.socket)->value_name("PATH"), "listen on a unix socket")(
      "port,p", po::value(&o.port)->value_name("N"), "listen on TCP port N")(
      "bind,b", po::value(&o.bind)->value_name("ADDR"), "TCP address (default 127.0.0.1)")(
      "export,x", po::value(&o.export_name)->value_name("NAME"),
      "the export name clients use (default \"\")")("read-only,r", po::bool_switch(&o.read_only),
                                                    "refuse writes; the container is not written")(
      "control", po::value(&o.control)->value_name("PATH"),
      "serve the control socket at PATH (cbt --socket PATH)")(
      "durability", po::value(&o.durability)->value_name("MODE"),
      "power (default), process or none (docs/crash-safety.md)")(
      "fork", po::bool_switch(&o.fork), "run in the background once serving")(
      "log", po::value(&o.log)->value_name("FILE"),
      "with --fork: append nbdkit's messages to FILE once serving (default: syslog)")(
      "pid-file", po::value(&o.pid_file)->value_name("FILE"), "write the server's pid to FILE")(
      "tls-creds", po::value(&o.tls_creds)->value_name("DIR"),
      "require TLS with the x509 certificates in DIR")(
      "tls-psk", po::value(&o.tls_psk)->value_name("FILE"),
      "require TLS with the pre-shared keys in FILE")("help,h", po::bool_switch(&help),
                                                      "show this help and exit")(
      "verbose,v", po::bool_switch(&verbose), "nbdkit -v (debug log on stderr)")(
      "output", po::value(&output)->value_name("FMT"), "output format: human (default) or json")(
      "option,o", po::value(&o.params)->value_name("KEY=VALUE")->composing(),
      "one more filter or plugin parameter, passed as it is (repeatable), e.g. "
      "-o cbt-trust-disk=true or -o cbt-autoload=false");
  po::options_description hidden;
  hidden.add_options()("disk", po::value(&o.disk));
  po::positional_options_description pos;
  pos.add("disk", 1);
  po::variables_map vm;
  ParseCommandLine(args, desc, hidden, pos, vm);
  if (help) {
    PrintHelp(kSynopsis, kDescription, desc);
    return kExitOk;
  }
  CommonOptions common;
  common.output = output;
  common.verbose = verbose;
  ApplyCommonOptions(common);
  Validate(o, vm.count("port") > 0);

  if (!o.socket.empty()) ClearStaleSocket(o.socket);
  if (!o.pid_file.empty()) ClearStalePidFile(o.pid_file);
  std::unique_ptr<TempPidFile> temp;
  if (o.pid_file.empty()) {
    temp = std::make_unique<TempPidFile>();
    o.pid_file = temp->path;
  }
  const std::vector<std::string> argv = NbdkitArgv(o, verbose);
  // nbdkit always runs in the foreground: as our child, or with --fork as
  // the supervisor's (serve_supervisor.h), so its messages reach the user
  // until it serves.
  Supervisor sup;
  pid_t child = -1;
  if (o.fork) {
    int log_fd = -1;
    if (!o.log.empty()) {
      log_fd = ::open(o.log.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
      if (log_fd < 0) throw UsageError("--log " + o.log + ": " + std::strerror(errno));
    }
    Result<Supervisor> s = StartSupervised(argv, "cbt-serve", log_fd);
    if (log_fd >= 0) ::close(log_fd);
    if (!s.ok()) return Fail(s.status());
    sup = *s;
    child = sup.pid;
  } else {
    Result<pid_t> c = StartProgram(argv);
    if (!c.ok()) return Fail(c.status());
    child = *c;
    ForwardSignalsTo(child);
  }
  // Stops the server and waits for the child, so that everything nbdkit
  // printed is on stderr before our own last line.
  auto stop = [&](pid_t server) {
    if (server > 0) StopDaemon(server, kStartTimeout);
    if (!StopDaemon(child, kStartTimeout)) ::kill(child, SIGKILL);
    (void)WaitChild(child);
  };

  Result<pid_t> pid = WaitPidFile(o.pid_file, kStartTimeout, ChildRunning, child);
  if (!pid.ok()) {
    if (!ChildRunning(child)) return WaitChild(child);  // nbdkit's error is above
    stop(-1);
    return Fail(pid.status());
  }
  // The pid must be the nbdkit we run, not someone else's writing the file.
  if (o.fork ? ParentOf(*pid) != child : *pid != child) {
    stop(-1);
    return Fail("--pid-file " + o.pid_file + " holds pid " + std::to_string(*pid) +
                ", not the server's; stopped the server");
  }
  if (temp) o.pid_file.clear();
  Status probe = ProbeUri(MakeUri(o, true), kStartTimeout);
  if (!probe.ok()) {
    stop(*pid);
    return Fail("nbdkit (pid " + std::to_string(*pid) + ") does not serve " + MakeUri(o, false) +
                ": " + probe.message() + "; stopped it (the reason is nbdkit's message above)");
  }
  if (o.fork) {
    Status d = Detach(sup, kDetachTimeout);
    if (!d.ok()) {
      stop(*pid);
      return Fail(d);
    }
  }
  PrintServing(o, *pid, common.format());
  if (o.fork) return kExitOk;
  if (Status n = NotifyServiceManager("READY=1"); !n.ok())
    std::cerr << "cbt serve: warning: cannot tell systemd the server is ready: " << n.message()
              << '\n';
  const int rc = WaitChild(child);
  ForwardSignalsTo(0);
  return rc;
}

}  // namespace cbt::cli
