// The qemu:dirty-bitmap endpoint (backup_endpoint.h, docs/backup.md).
//
// Design note. StartEndpoint goes through these states; each failure undoes
// the ones before it, so a failed call leaves nothing:
//   checked    options valid, nothing at the carrier, socket and pid file
//   source ok  a handshake with the source gave size == disk_size
//   carrier    the carrier file exists (created O_EXCL by us: ours to remove)
//   spawned    qemu-nbd --fork runs; its parent exits 0 once the daemon
//              listens, has opened the image (so the source and the bitmap
//              are fine) and wrote the pid file; non-zero with the reason on
//              stderr (captured in an unlinked temp file). Per QEMU's source
//              any stderr output at start makes it non-zero, even a warning
//              with the daemon running: the cleanup ends such a daemon.
//   verified   the pid file names a qemu-nbd serving our socket, and a
//              handshake on the endpoint offers disk_size and the context
// What qemu-nbd 7.2 does that this relies on or works around (checked):
//   - it creates the listening socket before it opens the image, and leaves
//     the socket file behind when the open fails; it replaces an existing
//     file at -k silently (hence our refusal of an existing path);
//   - on SIGTERM it removes its socket but not its pid file;
//   - the data file named in the carrier is never opened when --image-opts
//     gives data-file.*: the placeholder need not exist;
//   - it serves a source smaller than the carrier's size with zeros past the
//     source's end (hence the size check);
//   - the daemon is reparented to init (setsid): not our child, so stopping
//     it means polling for its end, not waitpid.
// A timed-out start kills the forking parent; the daemon it may have forked
// is found by its command line (-k our socket) and ended the same way.
#include "server/backup_endpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "common/posix_file.h"
#include "engine/bitmap_store.h"
#include "qcow2/bitmap_dir.h"
#include "qcow2/image.h"
#include "server/nbd_probe.h"

extern char** environ;

namespace cbt {

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr const char* kCtx = "backup endpoint";
constexpr milliseconds kTermWait{5000};    // SIGTERM -> SIGKILL
constexpr milliseconds kKillWait{2000};    // SIGKILL -> give up
constexpr milliseconds kReapWait{5000};    // exited -> reaped by init
constexpr milliseconds kListenWait{2000};  // a dying server's socket closes
constexpr size_t kMaxStderrBytes = 4096;   // of qemu-nbd's stderr, in a Status
constexpr size_t kMaxCmdlineBytes = 65536;
constexpr size_t kMaxSocketPath = sizeof(sockaddr_un::sun_path) - 1;

std::string PidFileOf(const std::string& socket) {
  return socket + ".pid";
}

std::string Quote(const std::string& s) {
  return "'" + s + "'";
}

Status Errno(int err, const std::string& what) {
  return Status::FromErrno(err, std::string(kCtx) + ": " + what);
}

// QEMU's option syntax: a ',' inside a value is written ",,".
std::string QemuOptValue(const std::string& v) {
  std::string out;
  for (char c : v) {
    out += c;
    if (c == ',') out += ',';
  }
  return out;
}

// Percent-encodes all but RFC 3986 unreserved characters and '/'.
std::string UriEscape(const std::string& s) {
  static const char* hex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '.' || c == '_' || c == '~' || c == '/') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

bool Exists(const std::string& path) {
  struct stat st {};
  return lstat(path.c_str(), &st) == 0 || errno != ENOENT;
}

// unlink(); a missing file is fine.
Status Remove(const std::string& path, const char* what) {
  if (unlink(path.c_str()) == 0 || errno == ENOENT) return Status::OK();
  return Errno(errno, std::string("removing ") + what + " " + Quote(path));
}

std::string Absolute(const std::string& path) {
  std::error_code ec;
  std::filesystem::path p = std::filesystem::absolute(path, ec);
  return ec ? path : p.lexically_normal().string();
}

// ---- processes -----------------------------------------------------------

std::vector<std::string> ReadCmdline(int pid) {
  std::vector<std::string> argv;
  int fd = open(("/proc/" + std::to_string(pid) + "/cmdline").c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return argv;
  std::string buf(kMaxCmdlineBytes, '\0');
  size_t got = 0;
  while (got < buf.size()) {
    ssize_t n = read(fd, buf.data() + got, buf.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  close(fd);
  buf.resize(got);
  size_t start = 0;
  while (start < buf.size()) {
    size_t end = buf.find('\0', start);
    if (end == std::string::npos) end = buf.size();
    argv.push_back(buf.substr(start, end - start));
    start = end + 1;
  }
  return argv;
}

// The state letter of /proc/PID/stat ('Z' zombie, 'X' dead), 0 if gone.
char ProcState(int pid) {
  int fd = open(("/proc/" + std::to_string(pid) + "/stat").c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[512];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) return 0;
  std::string_view s(buf, static_cast<size_t>(n));
  size_t paren = s.rfind(')');  // the command name may hold spaces and ')'
  if (paren == std::string_view::npos || paren + 2 >= s.size()) return 0;
  return s[paren + 2];
}

// A qemu-nbd whose arguments serve `socket` (-k PATH, --socket PATH or
// --socket=PATH).
bool ServesSocket(const std::vector<std::string>& argv, const std::string& socket) {
  if (argv.empty()) return false;
  const std::string prog = std::filesystem::path(argv[0]).filename().string();
  if (prog.find("qemu-nbd") == std::string::npos) return false;
  for (size_t i = 1; i < argv.size(); ++i) {
    if ((argv[i] == "-k" || argv[i] == "--socket") && i + 1 < argv.size() && argv[i + 1] == socket)
      return true;
    if (argv[i] == "--socket=" + socket) return true;
  }
  return false;
}

// Alive (not a zombie) and a qemu-nbd serving socket: the only processes we
// ever signal.
bool IsOurServer(int pid, const std::string& socket) {
  if (pid <= 1) return false;
  char st = ProcState(pid);
  if (st == 0 || st == 'Z' || st == 'X') return false;
  return ServesSocket(ReadCmdline(pid), socket);
}

// Polls until pid has exited (a zombie or gone) or is no longer our server
// (the pid was reused), or `bound` passes. Returns whether it did.
bool WaitExited(int pid, const std::string& socket, milliseconds bound) {
  const auto end = Clock::now() + bound;
  milliseconds step{2};
  while (IsOurServer(pid, socket)) {
    if (Clock::now() >= end) return false;
    std::this_thread::sleep_for(step);
    step = std::min(step * 2, milliseconds{50});
  }
  return true;
}

// Best effort, bounded: waits while pid is a zombie. The daemon's parent is
// init, which reaps when it likes (1.5 to 2 s on the test machine, more
// under load); until then kill(pid, 0) still succeeds, though nothing runs.
void WaitReaped(int pid, milliseconds bound) {
  const auto end = Clock::now() + bound;
  for (char st = ProcState(pid); (st == 'Z' || st == 'X') && Clock::now() < end;
       st = ProcState(pid))
    std::this_thread::sleep_for(milliseconds{20});
}

// SIGTERM, wait, SIGKILL, wait; only while pid is our server. Then waits
// (bounded) for init to reap it.
Status TerminateServer(int pid, const std::string& socket) {
  if (!IsOurServer(pid, socket)) return Status::OK();
  if (kill(pid, SIGTERM) != 0 && errno != ESRCH)
    return Errno(errno, "SIGTERM to qemu-nbd pid " + std::to_string(pid));
  if (!WaitExited(pid, socket, kTermWait)) {
    if (IsOurServer(pid, socket) && kill(pid, SIGKILL) != 0 && errno != ESRCH)
      return Errno(errno, "SIGKILL to qemu-nbd pid " + std::to_string(pid));
    if (!WaitExited(pid, socket, kKillWait))
      return Status::IOError(std::string(kCtx) + ": qemu-nbd pid " + std::to_string(pid) +
                             " serving " + Quote(socket) + " survived SIGTERM and SIGKILL");
  }
  WaitReaped(pid, kReapWait);
  return Status::OK();
}

// Every live qemu-nbd serving socket, by a scan of /proc.
std::vector<int> FindServers(const std::string& socket) {
  std::vector<int> pids;
  DIR* d = opendir("/proc");
  if (d == nullptr) return pids;
  const int self = getpid();
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    long pid = strtol(e->d_name, &end, 10);
    if (end == e->d_name || *end != '\0' || pid <= 1 || pid == self || pid > INT32_MAX) continue;
    if (IsOurServer(static_cast<int>(pid), socket)) pids.push_back(static_cast<int>(pid));
  }
  closedir(d);
  return pids;
}

// The pid in the pid file; nullopt if there is no pid file.
Result<std::optional<int>> ReadPidFile(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    if (errno == ENOENT) return std::optional<int>();
    return Errno(errno, "opening pid file " + Quote(path));
  }
  char buf[32];
  ssize_t n = read(fd, buf, sizeof buf - 1);
  int err = errno;
  close(fd);
  if (n < 0) return Errno(err, "reading pid file " + Quote(path));
  buf[n] = '\0';
  char* end = nullptr;
  long pid = strtol(buf, &end, 10);
  while (end != nullptr && (*end == '\n' || *end == ' ')) ++end;
  if (n == 0 || end == buf || *end != '\0' || pid <= 1 || pid > INT32_MAX)
    return Status::InvalidArgument(std::string(kCtx) + ": pid file " + Quote(path) +
                                   " does not hold a process id; remove it by hand once no "
                                   "qemu-nbd serves the socket");
  return std::optional<int>(static_cast<int>(pid));
}

// Does something accept connections on the unix socket at path?
bool SocketListening(const std::string& path) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return false;
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (path.size() > kMaxSocketPath) {
    close(fd);
    return false;
  }
  std::copy(path.begin(), path.end(), a.sun_path);
  int r = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  // EAGAIN: a full backlog, still a listener.
  bool listening = r == 0 || errno == EAGAIN || errno == EINPROGRESS;
  close(fd);
  return listening;
}

// Runs argv (PATH searched) with stdin /dev/null, stdout and stderr to out_fd,
// no other descriptors, default signal dispositions and an empty mask (the
// daemon must not inherit a blocked SIGTERM from the caller).
Result<pid_t> Spawn(const std::vector<std::string>& args, int out_fd) {
  std::vector<char*> argv;
  argv.reserve(args.size() + 1);
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  posix_spawn_file_actions_init(&fa);
  posix_spawnattr_init(&attr);
  posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
  posix_spawn_file_actions_adddup2(&fa, out_fd, 2);
  posix_spawn_file_actions_addclosefrom_np(&fa, 3);
  sigset_t none, dflt;
  sigemptyset(&none);
  sigemptyset(&dflt);
  for (int s : {SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGCHLD, SIGUSR1, SIGUSR2, SIGQUIT})
    sigaddset(&dflt, s);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &dflt);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  pid_t pid = 0;
  int r = posix_spawnp(&pid, args[0].c_str(), &fa, &attr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (r == ENOENT)
    return Status::NotFound(std::string(kCtx) + ": program " + Quote(args[0]) +
                            " not found (qemu-nbd is in Debian's qemu-utils)");
  if (r != 0) return Errno(r, "running " + Quote(args[0]));
  return pid;
}

// An unlinked temporary file for a child's output.
Result<int> TempOutputFile() {
  std::error_code ec;
  std::filesystem::path dir = std::filesystem::temp_directory_path(ec);
  if (ec) dir = "/tmp";
  std::string tmpl = (dir / "cbt-qemu-nbd.XXXXXX").string();
  int fd = mkostemp(tmpl.data(), O_CLOEXEC);
  if (fd < 0) return Errno(errno, "creating a temporary file in " + Quote(dir.string()));
  unlink(tmpl.c_str());
  return fd;
}

// The first kMaxStderrBytes of the file, trimmed, newlines as "; ".
std::string ReadOutput(int fd) {
  std::string buf(kMaxStderrBytes, '\0');
  ssize_t n = pread(fd, buf.data(), buf.size(), 0);
  buf.resize(n > 0 ? static_cast<size_t>(n) : 0);
  while (!buf.empty() && (buf.back() == '\n' || buf.back() == ' ')) buf.pop_back();
  std::string out;
  for (char c : buf) {
    if (c == '\n')
      out += "; ";
    else
      out += c;
  }
  if (out.empty()) return "(no message)";
  return out;
}

milliseconds Left(Clock::time_point deadline) {
  return std::max(milliseconds{0},
                  std::chrono::duration_cast<milliseconds>(deadline - Clock::now()));
}

// ---- steps -----------------------------------------------------------------

Status CheckOptions(const EndpointOptions& o) {
  auto bad = [](const std::string& m) {
    return Status::InvalidArgument(std::string(kCtx) + ": " + m);
  };
  if (o.bitmap == nullptr) return bad("no bitmap given");
  if (o.disk_size != o.bitmap->disk_size())
    return bad("disk size " + std::to_string(o.disk_size) + " differs from the bitmap's " +
               std::to_string(o.bitmap->disk_size()));
  CBT_RETURN_IF_ERROR(ValidateEndpointGeometry(o.disk_size, o.bitmap->granularity()));
  if (Status s = qcow2::ValidateBitmapName(o.bitmap_name); !s.ok())
    return s.WithContext(std::string(kCtx) + ": bitmap name");
  if (o.export_name.empty() || o.export_name.size() > 4096 ||
      o.export_name.find('\0') != std::string::npos)
    return bad("export name must be 1 to 4096 bytes without NUL");
  if (o.source_export.size() > 4096 || o.source_export.find('\0') != std::string::npos)
    return bad("source export name must be at most 4096 bytes without NUL");
  if (o.listen_socket.empty() || o.listen_socket[0] != '/')
    return bad("listen socket " + Quote(o.listen_socket) + " must be an absolute path");
  if (o.listen_socket.size() > kMaxSocketPath)
    return bad("listen socket " + Quote(o.listen_socket) + " is too long for a unix socket (" +
               std::to_string(kMaxSocketPath) + " bytes at most)");
  if (o.source_socket.empty()) return bad("no source socket given");
  if (Absolute(o.source_socket).size() > kMaxSocketPath)
    return bad("source socket " + Quote(o.source_socket) + " is too long for a unix socket");
  if (o.carrier_path.empty()) return bad("no carrier path given");
  if (o.qemu_nbd.empty()) return bad("no qemu-nbd program given");
  if (o.start_timeout < milliseconds{1} || o.start_timeout > milliseconds{600000})
    return bad("start timeout must be 1 ms to 10 min");
  if (o.max_clients < 1 || o.max_clients > 1024) return bad("max clients must be 1 to 1024");
  const std::string hint =
      " (an endpoint left running? 'cbt backup end --socket CTL --nbd-socket PATH' stops it)";
  for (const std::string& p : {o.listen_socket, PidFileOf(o.listen_socket), o.carrier_path})
    if (Exists(p))
      return Status::AlreadyExists(std::string(kCtx) + ": " + Quote(p) + " exists" + hint);
  return Status::OK();
}

// Writes the carrier: no data clusters, identity L2 tables to the
// placeholder data file, one disabled bitmap. Removes it on failure.
Status CreateCarrier(const std::string& path, const EndpointOptions& o) {
  const std::string what = std::string(kCtx) + ": creating carrier " + Quote(path);
  Result<std::unique_ptr<PosixFile>> file =
      PosixFile::Open(path, PosixFile::Mode::kCreateExclusive);
  if (!file.ok()) return file.status().WithContext(what);
  std::shared_ptr<BlockIO> io = std::move(file).value();
  Status s = [&]() -> Status {
    qcow2::CreateOptions co;
    co.virtual_size = o.disk_size;
    co.cluster_size = kCarrierClusterSize;
    co.data_file = kCarrierPlaceholder;
    CBT_ASSIGN_OR_RETURN(std::unique_ptr<qcow2::Image> img, qcow2::Image::Create(io, co));
    // DirtyBitmapSource needs chunks of the cluster size: re-chunk a copy
    // (same granularity and size, so the union is exact).
    const DirtyBitmap* bits = o.bitmap;
    std::unique_ptr<DirtyBitmap> copy;
    if (bits->chunk_bytes() != kCarrierClusterSize) {
      CBT_ASSIGN_OR_RETURN(
          copy, DirtyBitmap::Create(o.disk_size, bits->granularity(), kCarrierClusterSize));
      copy->Merge(*bits);
      bits = copy.get();
    }
    DirtyBitmapSource src(*bits);
    qcow2::BitmapSpec spec;
    spec.name = o.bitmap_name;
    spec.granularity_bits = bits->granularity_bits();
    spec.enabled = false;  // qemu-nbd refuses to export a recording bitmap read-only
    spec.data = &src;
    spec.in_use = false;  // exact: Commit flushes before its header switch
    return img->Commit({spec});
  }();
  if (!s.ok()) {
    (void)Remove(path, "carrier");
    return s.WithContext(what);
  }
  return Status::OK();
}

// Ends whatever this start may have left: servers on the socket (pid file
// and /proc scan; repeated briefly, as a timed-out fork may still be
// producing its daemon), the socket, the pid file, the carrier.
void CleanupFailedStart(const std::string& socket, const std::string& carrier) {
  int quiet_scans = 0;
  const auto end = Clock::now() + milliseconds{1000};
  while (quiet_scans < 2 && Clock::now() < end) {
    std::vector<int> pids = FindServers(socket);
    Result<std::optional<int>> recorded = ReadPidFile(PidFileOf(socket));
    if (recorded.ok() && recorded->has_value() && IsOurServer(**recorded, socket) &&
        std::find(pids.begin(), pids.end(), **recorded) == pids.end())
      pids.push_back(**recorded);
    for (int pid : pids) (void)TerminateServer(pid, socket);
    quiet_scans = pids.empty() ? quiet_scans + 1 : 0;
    if (quiet_scans < 2) std::this_thread::sleep_for(milliseconds{20});
  }
  struct stat st {};
  // We refused an existing path, so a socket here is qemu-nbd's leftover.
  if (lstat(socket.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) (void)Remove(socket, "socket");
  (void)Remove(PidFileOf(socket), "pid file");
  (void)Remove(carrier, "carrier");
}

// Steps 4 and 5 (the carrier exists).
Result<EndpointInfo> RunServer(const EndpointOptions& o, const std::string& carrier,
                               const std::string& source, Clock::time_point deadline) {
  EndpointInfo info;
  info.pid_file = PidFileOf(o.listen_socket);
  info.context = "qemu:dirty-bitmap:" + o.bitmap_name;
  info.uri = "nbd+unix:///" + UriEscape(o.export_name) + "?socket=" + UriEscape(o.listen_socket);

  std::string image = "driver=qcow2,file.driver=file,file.filename=" + QemuOptValue(carrier) +
                      ",data-file.driver=nbd,data-file.server.type=unix,data-file.server.path=" +
                      QemuOptValue(source);
  if (!o.source_export.empty()) image += ",data-file.export=" + QemuOptValue(o.source_export);
  // --cache=writeback: the NBD data path has no cache in QEMU whatever the
  // mode; it only decides whether the carrier (L2 tables re-read when
  // qcow2's L2 cache is smaller than the disk's tables) goes through the page
  // cache. O_DIRECT (none) would add a filesystem requirement for nothing.
  const std::vector<std::string> args = {o.qemu_nbd,
                                         "--read-only",
                                         "--persistent",
                                         "--fork",
                                         "--pid-file=" + info.pid_file,
                                         "-k",
                                         o.listen_socket,
                                         "-x",
                                         o.export_name,
                                         "-B",
                                         o.bitmap_name,
                                         "-e",
                                         std::to_string(o.max_clients),
                                         "--cache=writeback",
                                         "--image-opts",
                                         image};

  CBT_ASSIGN_OR_RETURN(int out_fd, TempOutputFile());
  std::unique_ptr<int, void (*)(int*)> out_guard(&out_fd, [](int* fd) { close(*fd); });
  CBT_ASSIGN_OR_RETURN(pid_t parent, Spawn(args, out_fd));

  // The forking parent exits once the daemon serves (or failed).
  int wstatus = 0;
  milliseconds step{1};
  for (;;) {
    pid_t r = waitpid(parent, &wstatus, WNOHANG);
    if (r == parent) break;
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {  // ECHILD: the caller reaps children (SIGCHLD ignored)
      wstatus = 0;
      break;
    }
    if (Clock::now() >= deadline) {
      kill(parent, SIGKILL);
      while (waitpid(parent, &wstatus, 0) < 0 && errno == EINTR) {
      }
      return Status::IOError(std::string(kCtx) + ": qemu-nbd did not report the server running " +
                                 "within " + std::to_string(o.start_timeout.count()) +
                                 " ms; its stderr: " + ReadOutput(out_fd),
                             ETIMEDOUT);
    }
    std::this_thread::sleep_for(step);
    step = std::min(step * 2, milliseconds{20});
  }
  if (!WIFEXITED(wstatus) || WEXITSTATUS(wstatus) != 0) {
    std::string how = WIFEXITED(wstatus) ? "exit status " + std::to_string(WEXITSTATUS(wstatus))
                                         : "signal " + std::to_string(WTERMSIG(wstatus));
    return Status::IOError(std::string(kCtx) + ": qemu-nbd failed to start (" + how +
                           "): " + ReadOutput(out_fd));
  }

  CBT_ASSIGN_OR_RETURN(std::optional<int> pid, ReadPidFile(info.pid_file));
  if (!pid)
    return Status::IOError(std::string(kCtx) +
                           ": qemu-nbd reported success but wrote no pid file " +
                           Quote(info.pid_file) + ": " + ReadOutput(out_fd));
  if (!IsOurServer(*pid, o.listen_socket))
    return Status::IOError(std::string(kCtx) + ": pid file " + Quote(info.pid_file) +
                           " names pid " + std::to_string(*pid) +
                           ", which is not a qemu-nbd "
                           "serving " +
                           Quote(o.listen_socket) + ": " + ReadOutput(out_fd));
  info.pid = *pid;

  const milliseconds left = Left(deadline);
  if (left.count() == 0)
    return Status::IOError(std::string(kCtx) + ": start timeout passed before the endpoint check",
                           ETIMEDOUT);
  Result<NbdExportProbe> probe = ProbeNbdExport(o.listen_socket, o.export_name, info.context, left);
  if (!probe.ok()) return probe.status().WithContext(std::string(kCtx) + ": checking the endpoint");
  if (probe->size != o.disk_size || !probe->has_context)
    return Status::IOError(std::string(kCtx) + ": the endpoint serves " +
                           std::to_string(probe->size) + " bytes (want " +
                           std::to_string(o.disk_size) + ") and " +
                           (probe->has_context ? "offers " : "does not offer ") + info.context);
  return info;
}

}  // namespace

Status ValidateEndpointGeometry(uint64_t disk_size, uint64_t granularity) {
  auto bad = [](const std::string& m) {
    return Status::InvalidArgument(std::string(kCtx) + ": " + m);
  };
  if (disk_size == 0) return bad("disk size is 0: nothing to serve");
  if (disk_size % 512 != 0)
    return bad("disk size " + std::to_string(disk_size) +
               " is not a multiple of 512: a qcow2 carrier (and so qemu-nbd) can only serve whole "
               "512-byte sectors");
  if (disk_size > kMaxEndpointDiskSize)
    return bad("disk size " + std::to_string(disk_size) + " is over the endpoint's limit of " +
               std::to_string(kMaxEndpointDiskSize) + " bytes (64 TiB)");
  if (Status s = qcow2::ValidateGranularity(granularity); !s.ok())
    return s.WithContext(std::string(kCtx) + ": bitmap");
  uint32_t gbits = 0;
  while ((uint64_t{1} << gbits) < granularity) ++gbits;
  uint32_t cbits = 0;
  while ((uint64_t{1} << cbits) < kCarrierClusterSize) ++cbits;
  if (!qcow2::ValidateBitmapSize(disk_size, gbits, cbits).ok()) {
    // Smallest power of two g with ceil(disk_size / g) <= 2^32.
    uint32_t need = gbits;
    while (need < DirtyBitmap::kMaxGranularityBits &&
           !qcow2::ValidateBitmapSize(disk_size, need, cbits).ok())
      ++need;
    return bad("a bitmap of granularity " + std::to_string(granularity) + " on a disk of " +
               std::to_string(disk_size) +
               " bytes needs more than qcow2's 512 MiB of bitmap data (2^32 granules); use a "
               "granularity of at least " +
               std::to_string(uint64_t{1} << need));
  }
  return Status::OK();
}

Result<EndpointInfo> StartEndpoint(const EndpointOptions& opts) {
  CBT_RETURN_IF_ERROR(CheckOptions(opts));
  const auto deadline = Clock::now() + opts.start_timeout;
  const std::string carrier = Absolute(opts.carrier_path);
  const std::string source = Absolute(opts.source_socket);

  Result<NbdExportProbe> src = ProbeNbdExport(source, opts.source_export, "", opts.start_timeout);
  if (!src.ok()) return src.status().WithContext(std::string(kCtx) + ": source");
  if (src->size != opts.disk_size)
    return Status::InvalidArgument(std::string(kCtx) + ": the source " + Quote(source) +
                                   " serves " + std::to_string(src->size) + " bytes, not the " +
                                   std::to_string(opts.disk_size) +
                                   " of the bitmap (qemu-nbd would pad a shorter source with "
                                   "zeros)");

  CBT_RETURN_IF_ERROR(CreateCarrier(carrier, opts));
  Result<EndpointInfo> r = RunServer(opts, carrier, source, deadline);
  if (!r.ok()) CleanupFailedStart(opts.listen_socket, carrier);
  return r;
}

Status StopEndpoint(const std::string& listen_socket, const std::string& carrier_path) {
  const std::string pid_file = PidFileOf(listen_socket);
  CBT_ASSIGN_OR_RETURN(std::optional<int> pid, ReadPidFile(pid_file));
  if (pid) CBT_RETURN_IF_ERROR(TerminateServer(*pid, listen_socket));

  struct stat st {};
  if (lstat(listen_socket.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return Status::InvalidArgument(std::string(kCtx) + ": " + Quote(listen_socket) +
                                     " is not a socket; not removed");
    // Not ours to remove (nor the carrier it may be serving). A server that
    // just died may still listen for a moment: its thread-group leader shows
    // as a zombie while the other threads (and the socket) are torn down.
    const auto end = Clock::now() + kListenWait;
    while (SocketListening(listen_socket) && Clock::now() < end)
      std::this_thread::sleep_for(milliseconds{10});
    if (SocketListening(listen_socket))
      return Status::Busy(std::string(kCtx) + ": a server not recorded in " + Quote(pid_file) +
                          " still listens on " + Quote(listen_socket) + "; left alone");
    CBT_RETURN_IF_ERROR(Remove(listen_socket, "socket"));
  }
  CBT_RETURN_IF_ERROR(Remove(pid_file, "pid file"));

  if (!Exists(carrier_path)) return Status::OK();
  bool is_carrier = false;
  if (Result<std::unique_ptr<PosixFile>> f =
          PosixFile::Open(carrier_path, PosixFile::Mode::kReadOnly);
      f.ok()) {
    std::shared_ptr<BlockIO> io = std::move(f).value();
    Result<std::unique_ptr<qcow2::Image>> img = qcow2::Image::Open(io);
    is_carrier = img.ok() && (*img)->data_file() == kCarrierPlaceholder;
  }
  if (!is_carrier)
    return Status::InvalidArgument(std::string(kCtx) + ": " + Quote(carrier_path) +
                                   " is not an endpoint carrier (a qcow2 naming " +
                                   kCarrierPlaceholder + " as its data file); not removed");
  return Remove(carrier_path, "carrier");
}

}  // namespace cbt
