// StartEndpoint / StopEndpoint against the real tools: nbdkit serves a raw
// file of random bytes, the endpoint (qemu-nbd) serves it with the frozen
// bitmap, and nbdinfo, qemu-img and nbdcopy judge what clients see. Skips
// (with the reason printed) when a tool is missing. Every process a test
// starts is ended by pid in TearDown.
#include "server/backup_endpoint.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>
#include <vector>

extern char** environ;

namespace cbt {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

bool Have(const std::string& tool) {
  return std::system(("command -v " + tool + " >/dev/null 2>&1").c_str()) == 0;
}

bool Exists(const std::string& path) {
  struct stat st {};
  return lstat(path.c_str(), &st) == 0;
}

bool Alive(int pid) {
  return kill(pid, 0) == 0 || errno != ESRCH;
}

// Running: alive and not a zombie (/proc/PID/stat's state).
bool Running(int pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  size_t paren = stat.rfind(')');
  if (paren == std::string::npos || paren + 2 >= stat.size()) return false;
  return stat[paren + 2] != 'Z' && stat[paren + 2] != 'X';
}

// Gone (kill(pid, 0) fails with ESRCH) within `bound`. The endpoint's parent
// is init, which reaps when it likes; StopEndpoint waits for that, but
// boundedly (docs/backup.md).
bool GoneWithin(int pid, std::chrono::seconds bound) {
  const auto end = std::chrono::steady_clock::now() + bound;
  while (Alive(pid)) {
    if (std::chrono::steady_clock::now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

struct Output {
  int status = -1;
  std::string out;
};

// Runs a shell command (bounded by timeout(1)); stdout captured, stderr to
// err_file.
Output RunCmd(const std::string& cmd, const std::string& err_file) {
  Output o;
  FILE* p = popen(("timeout 60 " + cmd + " 2>" + err_file).c_str(), "r");
  if (p == nullptr) return o;
  char buf[65536];
  size_t n = 0;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) o.out.append(buf, n);
  o.status = pclose(p);
  return o;
}

std::string Slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// Adjacent extents of the same state merged.
std::vector<Extent> Merged(const std::vector<Extent>& in) {
  std::vector<Extent> out;
  for (const Extent& e : in) {
    if (!out.empty() && out.back().dirty == e.dirty &&
        out.back().offset + out.back().length == e.offset)
      out.back().length += e.length;
    else
      out.push_back(e);
  }
  return out;
}

std::string Show(const std::vector<Extent>& v) {
  std::string s;
  for (const Extent& e : v)
    s += "[" + std::to_string(e.offset) + "+" + std::to_string(e.length) +
         (e.dirty ? " dirty] " : " clean] ");
  return s;
}

class BackupEndpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* tool : {"nbdkit", "qemu-nbd", "nbdinfo", "qemu-img", "nbdcopy", "timeout"}) {
      if (!Have(tool)) {
        std::cout << "SKIP: " << tool << " is not installed\n";
        GTEST_SKIP() << tool << " is not installed";
      }
    }
    char tmpl[] = "/tmp/cbt-ep.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    disk_ = dir_ + "/disk.raw";
    source_ = dir_ + "/src.sock";
    listen_ = dir_ + "/ep.sock";
    carrier_ = dir_ + "/carrier.qcow2";
  }

  void TearDown() override {
    if (dir_.empty()) return;
    Status s = StopEndpoint(listen_, carrier_);
    if (!s.ok()) ADD_FAILURE() << "StopEndpoint in TearDown: " << s.ToString();
    StopSource();
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // A raw file of `size` random bytes served by nbdkit's file plugin on
  // source_ (nbdkit -f --exit-with-parent: our child, ended in TearDown).
  void StartSource(uint64_t size) {
    std::mt19937_64 rng(size);
    std::vector<uint64_t> buf((size + 7) / 8);
    for (uint64_t& w : buf) w = rng();
    {
      std::ofstream f(disk_, std::ios::binary);
      f.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(size));
    }
    const std::string log = dir_ + "/nbdkit.log";
    std::vector<std::string> args = {"nbdkit", "-f", "--exit-with-parent", "-U", source_,
                                     "file",   disk_};
    std::vector<char*> argv;
    argv.reserve(args.size() + 1);
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    posix_spawn_file_actions_adddup2(&fa, 1, 2);
    ASSERT_EQ(posix_spawnp(&nbdkit_pid_, "nbdkit", &fa, nullptr, argv.data(), environ), 0);
    posix_spawn_file_actions_destroy(&fa);
    const auto end = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!Listening(source_)) {
      int st = 0;
      ASSERT_EQ(waitpid(nbdkit_pid_, &st, WNOHANG), 0) << "nbdkit exited: " << Slurp(log);
      ASSERT_LT(std::chrono::steady_clock::now(), end) << "nbdkit did not start: " << Slurp(log);
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  void StopSource() {
    if (nbdkit_pid_ <= 0) return;
    kill(nbdkit_pid_, SIGTERM);
    int st = 0;
    for (int i = 0; i < 500 && waitpid(nbdkit_pid_, &st, WNOHANG) == 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (waitpid(nbdkit_pid_, &st, WNOHANG) == 0) {
      kill(nbdkit_pid_, SIGKILL);
      waitpid(nbdkit_pid_, &st, 0);
    }
    nbdkit_pid_ = -1;
  }

  static bool Listening(const std::string& path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    path.copy(a.sun_path, sizeof a.sun_path - 1);
    bool ok = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    close(fd);
    return ok;
  }

  EndpointOptions Options(const DirtyBitmap& b) const {
    EndpointOptions o;
    o.carrier_path = carrier_;
    o.listen_socket = listen_;
    o.source_socket = source_;
    o.bitmap_name = "frozen";
    o.disk_size = b.disk_size();
    o.bitmap = &b;
    return o;
  }

  // The bitmap as nbdinfo reads it from the endpoint.
  std::vector<Extent> NbdinfoDirtyMap(const EndpointInfo& info) {
    Output o = RunCmd("nbdinfo --json --map=" + info.context + " '" + info.uri + "'", Err());
    EXPECT_EQ(o.status, 0) << Slurp(Err());
    std::vector<Extent> v;
    for (const json& e : json::parse(o.out))
      v.push_back({e.at("offset").get<uint64_t>(), e.at("length").get<uint64_t>(),
                   (e.at("type").get<uint64_t>() & 1) != 0});
    return Merged(v);
  }

  // The bitmap as QEMU's client reads it: x-dirty-bitmap maps dirty to
  // "data": false (docs/backup.md).
  std::vector<Extent> QemuDirtyMap(const EndpointInfo& info) {
    Output o = RunCmd(
        "qemu-img map --output=json --image-opts driver=nbd,server.type=unix,"
        "server.path=" +
            listen_ + ",export=backup,x-dirty-bitmap=" + info.context,
        Err());
    EXPECT_EQ(o.status, 0) << Slurp(Err());
    std::vector<Extent> v;
    for (const json& e : json::parse(o.out))
      v.push_back({e.at("start").get<uint64_t>(), e.at("length").get<uint64_t>(),
                   !e.at("data").get<bool>()});
    return Merged(v);
  }

  // Everything a client should see, then a clean stop.
  void CheckServedAndStop(const DirtyBitmap& b, bool copy_with_qemu_img) {
    Result<EndpointInfo> info = StartEndpoint(Options(b));
    ASSERT_TRUE(info.ok()) << info.status().ToString();
    EXPECT_EQ(info->uri, "nbd+unix:///backup?socket=" + listen_);
    EXPECT_EQ(info->context, "qemu:dirty-bitmap:frozen");
    EXPECT_EQ(info->pid_file, listen_ + ".pid");
    EXPECT_GT(info->pid, 1);

    const std::vector<Extent> want = b.Extents(0, b.disk_size());
    ASSERT_GE(want.size(), 3u) << "the test bitmap should have scattered dirty ranges";
    EXPECT_EQ(NbdinfoDirtyMap(*info), want) << "want " << Show(want);
    EXPECT_EQ(QemuDirtyMap(*info), want) << "want " << Show(want);

    Output alloc = RunCmd("nbdinfo --json --map '" + info->uri + "'", Err());
    ASSERT_EQ(alloc.status, 0) << Slurp(Err());
    uint64_t covered = 0;
    for (const json& e : json::parse(alloc.out)) covered += e.at("length").get<uint64_t>();
    EXPECT_EQ(covered, b.disk_size()) << "base:allocation should cover the disk";

    const std::string out = dir_ + "/out.raw";
    Output copy =
        copy_with_qemu_img
            ? RunCmd(
                  "qemu-img convert -O raw --image-opts driver=nbd,server.type=unix,server.path=" +
                      listen_ + ",export=backup " + out,
                  Err())
            : RunCmd("nbdcopy '" + info->uri + "' " + out, Err());
    ASSERT_EQ(copy.status, 0) << Slurp(Err());
    EXPECT_TRUE(Slurp(out) == Slurp(disk_)) << "the export differs from the source file";

    ASSERT_TRUE(StopEndpoint(listen_, carrier_).ok());
    EXPECT_FALSE(Running(info->pid)) << "qemu-nbd still running";
    EXPECT_TRUE(GoneWithin(info->pid, std::chrono::seconds(20))) << "qemu-nbd never reaped";
    EXPECT_FALSE(Exists(listen_));
    EXPECT_FALSE(Exists(carrier_));
    EXPECT_FALSE(Exists(info->pid_file));
    Status again = StopEndpoint(listen_, carrier_);
    EXPECT_TRUE(again.ok()) << again.ToString();
  }

  // Nothing of a failed start is left.
  void ExpectNothingLeft() {
    EXPECT_FALSE(Exists(carrier_)) << "carrier left behind";
    EXPECT_FALSE(Exists(listen_)) << "socket left behind";
    EXPECT_FALSE(Exists(listen_ + ".pid")) << "pid file left behind";
  }

  std::string Err() const { return dir_ + "/cmd.err"; }

  std::string dir_, disk_, source_, listen_, carrier_;
  pid_t nbdkit_pid_ = -1;
};

std::unique_ptr<DirtyBitmap> NewBitmap(uint64_t size, uint64_t granularity) {
  Result<std::unique_ptr<DirtyBitmap>> b = DirtyBitmap::Create(size, granularity);
  EXPECT_TRUE(b.ok()) << b.status().ToString();
  return std::move(b).value();
}

TEST_F(BackupEndpointTest, Granularity64KServesBitmapReadsAndStopsClean) {
  // Not a multiple of 64 KiB: the last granule is partial.
  const uint64_t size = (uint64_t{64} << 20) + 12288;
  StartSource(size);
  auto b = NewBitmap(size, 65536);
  ASSERT_TRUE(b->Mark(0, 1).ok());
  ASSERT_TRUE(b->Mark((uint64_t{5} << 20) + 3, 200000).ok());
  ASSERT_TRUE(b->Mark(uint64_t{30} << 20, 65536).ok());
  ASSERT_TRUE(b->Mark(uint64_t{40} << 20, uint64_t{1} << 20).ok());
  ASSERT_TRUE(b->Mark(size - 100, 100).ok());
  CheckServedAndStop(*b, /*copy_with_qemu_img=*/false);
}

TEST_F(BackupEndpointTest, Granularity4KServesBitmapReadsAndStopsClean) {
  // Not a multiple of 4 KiB, a multiple of 512.
  const uint64_t size = (uint64_t{24} << 20) + 1536;
  StartSource(size);
  auto b = NewBitmap(size, 4096);
  ASSERT_TRUE(b->Mark(uint64_t{3} * 4096, 1).ok());
  ASSERT_TRUE(b->Mark((uint64_t{1} << 20) + 100, 10000).ok());
  ASSERT_TRUE(b->Mark(uint64_t{8} << 20, uint64_t{5} * 4096).ok());
  ASSERT_TRUE(b->Mark((uint64_t{8} << 20) + uint64_t{7} * 4096, 4096).ok());
  ASSERT_TRUE(b->Mark(size - 1, 1).ok());
  CheckServedAndStop(*b, /*copy_with_qemu_img=*/true);
}

TEST_F(BackupEndpointTest, CleanBitmapServesOneCleanExtent) {
  const uint64_t size = uint64_t{8} << 20;
  StartSource(size);
  auto b = NewBitmap(size, 65536);
  Result<EndpointInfo> info = StartEndpoint(Options(*b));
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  EXPECT_EQ(NbdinfoDirtyMap(*info), (std::vector<Extent>{{0, size, false}}));
}

TEST_F(BackupEndpointTest, DeadSourceSocketFailsAndLeavesNothing) {
  auto b = NewBitmap(uint64_t{8} << 20, 65536);
  Result<EndpointInfo> r = StartEndpoint(Options(*b));  // nothing at source_
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("source"), std::string::npos) << r.status().ToString();
  EXPECT_NE(r.status().message().find(source_), std::string::npos) << r.status().ToString();
  ExpectNothingLeft();

  // A socket file nobody listens on (a dead nbdkit's leftover).
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  source_.copy(a.sun_path, sizeof a.sun_path - 1);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  close(fd);
  r = StartEndpoint(Options(*b));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("source"), std::string::npos) << r.status().ToString();
  EXPECT_EQ(r.status().err(), ECONNREFUSED) << r.status().ToString();
  ExpectNothingLeft();
}

TEST_F(BackupEndpointTest, SilentSourceTimesOut) {
  // Listens (the kernel completes connects) but never says a word.
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  source_.copy(a.sun_path, sizeof a.sun_path - 1);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(listen(fd, 4), 0);
  auto b = NewBitmap(uint64_t{8} << 20, 65536);
  EndpointOptions o = Options(*b);
  o.start_timeout = std::chrono::milliseconds(300);
  const auto t0 = std::chrono::steady_clock::now();
  Result<EndpointInfo> r = StartEndpoint(o);
  close(fd);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().err(), ETIMEDOUT) << r.status().ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  ExpectNothingLeft();
}

TEST_F(BackupEndpointTest, SourceOfAnotherSizeIsRefused) {
  StartSource(uint64_t{8} << 20);
  auto b = NewBitmap(uint64_t{4} << 20, 65536);
  Result<EndpointInfo> r = StartEndpoint(Options(*b));
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();
  EXPECT_NE(r.status().message().find("8388608"), std::string::npos) << r.status().ToString();
  ExpectNothingLeft();
}

TEST_F(BackupEndpointTest, QemuNbdFailureCarriesItsStderr) {
  StartSource(uint64_t{8} << 20);
  auto b = NewBitmap(uint64_t{8} << 20, 65536);
  EndpointOptions o = Options(*b);
  // qemu-nbd itself fails: it cannot bind a socket in a missing directory.
  const std::string missing = dir_ + "/missing/ep.sock";
  o.listen_socket = missing;
  Result<EndpointInfo> r = StartEndpoint(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("qemu-nbd failed to start"), std::string::npos)
      << r.status().ToString();
  EXPECT_NE(r.status().message().find("Failed to bind socket"), std::string::npos)
      << r.status().ToString();
  ExpectNothingLeft();

  // A stand-in that only complains.
  const std::string fake = dir_ + "/fake-qemu-nbd";
  {
    std::ofstream f(fake);
    f << "#!/bin/sh\necho 'fake: out of luck' >&2\nexit 3\n";
  }
  chmod(fake.c_str(), 0755);
  o = Options(*b);
  o.qemu_nbd = fake;
  r = StartEndpoint(o);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("exit status 3"), std::string::npos) << r.status().ToString();
  EXPECT_NE(r.status().message().find("fake: out of luck"), std::string::npos)
      << r.status().ToString();
  ExpectNothingLeft();

  o.qemu_nbd = dir_ + "/no-such-program";
  r = StartEndpoint(o);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsNotFound()) << r.status().ToString();
  ExpectNothingLeft();
}

TEST_F(BackupEndpointTest, StartTimeoutEndsTheHungServer) {
  StartSource(uint64_t{8} << 20);
  auto b = NewBitmap(uint64_t{8} << 20, 65536);
  // A stand-in that never reports: the start gives up and ends it.
  const std::string fake = dir_ + "/slow-qemu-nbd";
  {
    std::ofstream f(fake);
    f << "#!/bin/sh\nexec sleep 30\n";
  }
  chmod(fake.c_str(), 0755);
  EndpointOptions o = Options(*b);
  o.qemu_nbd = fake;
  o.start_timeout = std::chrono::milliseconds(300);
  const auto t0 = std::chrono::steady_clock::now();
  Result<EndpointInfo> r = StartEndpoint(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().err(), ETIMEDOUT) << r.status().ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  ExpectNothingLeft();
}

TEST_F(BackupEndpointTest, BadOptionsAreRefusedAndExistingFilesKept) {
  auto b = NewBitmap(uint64_t{8} << 20, 65536);
  EndpointOptions o = Options(*b);
  o.bitmap = nullptr;
  EXPECT_TRUE(StartEndpoint(o).status().IsInvalidArgument());
  o = Options(*b);
  o.disk_size = uint64_t{4} << 20;
  EXPECT_TRUE(StartEndpoint(o).status().IsInvalidArgument());
  o = Options(*b);
  o.listen_socket = "relative.sock";
  EXPECT_TRUE(StartEndpoint(o).status().IsInvalidArgument());
  o = Options(*b);
  o.bitmap_name = "";
  EXPECT_TRUE(StartEndpoint(o).status().IsInvalidArgument());

  // Something at the socket or carrier path: refused, left as it was.
  for (const std::string& path : {listen_, carrier_}) {
    { std::ofstream(path) << "keep me"; }
    Result<EndpointInfo> r = StartEndpoint(Options(*b));
    EXPECT_TRUE(r.status().IsAlreadyExists()) << r.status().ToString();
    EXPECT_EQ(Slurp(path), "keep me");
    fs::remove(path);
  }
}

TEST_F(BackupEndpointTest, StopNeverSignalsAnotherProcessNorRemovesAnotherFile) {
  StartSource(uint64_t{8} << 20);
  // A pid file naming a live process that is not a qemu-nbd on our socket.
  { std::ofstream(listen_ + ".pid") << nbdkit_pid_ << "\n"; }
  EXPECT_TRUE(StopEndpoint(listen_, carrier_).ok());
  EXPECT_TRUE(Alive(nbdkit_pid_));
  EXPECT_FALSE(Exists(listen_ + ".pid"));
  // A carrier path that is not a carrier (here: the disk itself).
  Status s = StopEndpoint(listen_, disk_);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_TRUE(Exists(disk_));
  // A live socket not recorded in the pid file: left alone.
  s = StopEndpoint(source_, carrier_);
  EXPECT_TRUE(s.IsBusy()) << s.ToString();
  EXPECT_TRUE(Exists(source_));
  EXPECT_TRUE(Alive(nbdkit_pid_));
}

TEST_F(BackupEndpointTest, StopAfterTheServerWasKilledCleansUp) {
  const uint64_t size = uint64_t{8} << 20;
  StartSource(size);
  auto b = NewBitmap(size, 65536);
  ASSERT_TRUE(b->Mark(0, 4096).ok());
  Result<EndpointInfo> info = StartEndpoint(Options(*b));
  ASSERT_TRUE(info.ok()) << info.status().ToString();
  ASSERT_EQ(kill(info->pid, SIGKILL), 0);
  for (int i = 0; i < 500 && Running(info->pid); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_TRUE(Exists(listen_)) << "qemu-nbd killed with -9 leaves its socket";
  Status s = StopEndpoint(listen_, carrier_);
  EXPECT_TRUE(s.ok()) << s.ToString();
  ExpectNothingLeft();
}

TEST(BackupEndpointGeometry, LimitsAreQcow2s) {
  EXPECT_TRUE(ValidateEndpointGeometry(uint64_t{1} << 30, 65536).ok());
  EXPECT_TRUE(ValidateEndpointGeometry(512, 512).ok());
  // 2 TiB at 512 B: exactly 2^32 granules, 512 MiB of bitmap.
  EXPECT_TRUE(ValidateEndpointGeometry(uint64_t{2} << 40, 512).ok());
  Status s = ValidateEndpointGeometry((uint64_t{2} << 40) + 512, 512);
  EXPECT_TRUE(s.IsInvalidArgument());
  EXPECT_NE(s.message().find("at least 1024"), std::string::npos) << s.ToString();
  s = ValidateEndpointGeometry(uint64_t{64} << 40, 512);
  EXPECT_NE(s.message().find("at least 16384"), std::string::npos) << s.ToString();
  EXPECT_TRUE(ValidateEndpointGeometry(uint64_t{64} << 40, 16384).ok());
  EXPECT_TRUE(ValidateEndpointGeometry((uint64_t{64} << 40) + 512, 65536).IsInvalidArgument());
  EXPECT_TRUE(ValidateEndpointGeometry(0, 65536).IsInvalidArgument());
  EXPECT_TRUE(ValidateEndpointGeometry(1000, 65536).IsInvalidArgument());
  EXPECT_TRUE(ValidateEndpointGeometry(1 << 20, 1000).IsInvalidArgument());
  EXPECT_TRUE(ValidateEndpointGeometry(1 << 20, 256).IsInvalidArgument());
  EXPECT_TRUE(ValidateEndpointGeometry(1 << 20, uint64_t{4} << 30).IsInvalidArgument());
}

}  // namespace
}  // namespace cbt
