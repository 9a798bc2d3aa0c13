#include "server/backup_chain.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "common/posix_file.h"
#include "server/cli.h"
#include "server/size_parse.h"

namespace cbt::cli {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr char kStateFile[] = "cbt-backup.json";

std::string Prefix(const std::string& chain) {
  return "cbt-backup-" + chain + "-";
}

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

int64_t UnixNow() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Result<ChainState> LoadState(const fs::path& dir) {
  ChainState st;
  const fs::path p = dir / kStateFile;
  std::error_code ec;
  if (!fs::exists(p, ec)) {
    std::random_device rd;
    char id[9];
    std::snprintf(id, sizeof id, "%08x", static_cast<unsigned>(rd()));
    st.chain = id;
    return st;
  }
  // A state file is a few hundred bytes per layer: refuse what cannot be one.
  if (fs::file_size(p, ec) > (uint64_t{16} << 20))
    return Status::Corruption(p.string() + ": larger than 16 MiB: not a cbt backup state file");
  std::ifstream in(p);
  json j = json::parse(in, nullptr, false);
  try {
    if (j.is_discarded() || !j.is_object()) throw std::runtime_error("not a JSON object");
    st.chain = j.at("chain").get<std::string>();
    st.disk_size = j.at("disk-size").get<uint64_t>();
    st.next_seq = j.at("next-seq").get<uint64_t>();
    st.session = j.value("session", uint64_t{0});
    for (const json& l : j.at("layers"))
      st.layers.push_back({l.at("file").get<std::string>(), l.at("type").get<std::string>(),
                           l.at("bitmap").get<std::string>(), l.at("bytes").get<uint64_t>(),
                           l.at("time").get<int64_t>()});
    if (st.chain.empty() || st.chain.size() > 64 ||
        st.chain.find_first_not_of("0123456789abcdef") != std::string::npos)
      throw std::runtime_error("bad chain id");
    for (const Layer& l : st.layers)
      if (l.file.find('/') != std::string::npos || l.file.empty())
        throw std::runtime_error("bad layer file name '" + l.file + "'");
  } catch (const std::exception& e) {
    return Status::Corruption(p.string() + ": not a cbt backup state file (" + e.what() +
                              "); move it away to start a new chain in this directory");
  }
  return st;
}

Status SyncDir(const fs::path& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno(errno, "open " + dir.string());
  int r = ::fsync(fd);
  ::close(fd);
  return r == 0 ? Status::OK() : Status::FromErrno(errno, "fsync " + dir.string());
}

Status SaveState(const fs::path& dir, const ChainState& st) {
  json layers = json::array();
  for (const Layer& l : st.layers)
    layers.push_back({{"file", l.file},
                      {"type", l.type},
                      {"bitmap", l.bitmap},
                      {"bytes", l.bytes},
                      {"time", l.time}});
  json j = {{"chain", st.chain},
            {"disk-size", st.disk_size},
            {"next-seq", st.next_seq},
            {"session", st.session},
            {"layers", std::move(layers)}};
  const fs::path tmp = dir / (std::string(kStateFile) + ".tmp");
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << j.dump(2) << "\n";
    out.flush();
    if (!out) return Status::IOError("writing " + tmp.string());
  }
  {
    CBT_ASSIGN_OR_RETURN(auto f, PosixFile::Open(tmp.string(), PosixFile::Mode::kReadWrite));
    CBT_RETURN_IF_ERROR(f->flush());
  }
  std::error_code ec;
  fs::rename(tmp, dir / kStateFile, ec);
  if (ec) return Status::IOError("rename " + tmp.string() + ": " + ec.message());
  return SyncDir(dir);
}

Result<DirLock> DirLock::Take(const fs::path& dir) {
  const std::string path = (dir / "cbt-backup.lock").string();
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno(errno, "open " + path);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int e = errno;
    ::close(fd);
    if (e == EWOULDBLOCK) return Status::Busy(path + ": another cbt backup runs in this directory");
    return Status::FromErrno(e, "lock " + path);
  }
  return DirLock(fd);
}

DirLock::~DirLock() {
  if (fd_ >= 0) ::close(fd_);
}

RunPlan PlanRun(ChainState& st, const std::vector<ChainBitmap>& bitmaps, bool force_full,
                const fs::path& dir) {
  RunPlan p;
  const std::string prefix = Prefix(st.chain);
  uint64_t current_seq = 0;
  for (const ChainBitmap& b : bitmaps) {
    if (b.name.rfind(prefix, 0) != 0) continue;
    const std::string tail = b.name.substr(prefix.size());
    if (tail.empty() || tail.size() > 19 ||
        tail.find_first_not_of("0123456789") != std::string::npos)
      continue;
    const uint64_t seq = std::stoull(tail);
    st.next_seq = std::max(st.next_seq, seq + 1);
    if (b.consistent && b.recording && (p.current.empty() || seq > current_seq)) {
      if (!p.current.empty()) {
        p.pending.push_back(p.current);
        p.mergeable.push_back(p.current);
      }
      p.current = b.name;
      current_seq = seq;
    } else {
      p.pending.push_back(b.name);
      if (b.consistent) p.mergeable.push_back(b.name);
    }
  }
  std::error_code ec;
  if (force_full)
    p.why_full = "--full";
  else if (st.layers.empty())
    p.why_full = "first backup";
  else if (p.current.empty())
    p.why_full = "no bitmap of this chain records any more";
  else if (!fs::exists(dir / st.layers.back().file, ec))
    p.why_full = "the last layer " + st.layers.back().file + " is missing";
  p.full = !p.why_full.empty();
  p.new_name = prefix + std::to_string(st.next_seq);
  char name[64];
  std::snprintf(name, sizeof name, "%03zu-%s.qcow2", st.layers.size(), p.full ? "full" : "inc");
  p.file = name;
  return p;
}

Progress::Progress(uint64_t total, bool enabled)
    : total_(total), on_(enabled && isatty(STDERR_FILENO)), start_ns_(NowNs()) {}

void Progress::Update(uint64_t done) {
  if (!on_) return;
  const int64_t now = NowNs();
  if (done < total_ && now - last_ns_ < 200'000'000) return;
  last_ns_ = now;
  const double s = (now - start_ns_) / 1e9;
  const double rate = s > 0 ? done / s : 0;
  const double eta = rate > 0 ? (total_ - done) / rate : 0;
  std::fprintf(stderr, "\r  %3.0f%%  %s / %s  %s/s  ETA %02d:%02d   ",
               total_ ? 100.0 * done / total_ : 100.0, HumanSize(done).c_str(),
               HumanSize(total_).c_str(), HumanSize(static_cast<uint64_t>(rate)).c_str(),
               static_cast<int>(eta) / 60, static_cast<int>(eta) % 60);
}

void Progress::Done() {
  if (on_) std::fprintf(stderr, "\n");
}

Result<std::unique_ptr<qcow2::LayerWriter>> OpenLayer(const fs::path& part, uint64_t disk_size,
                                                      const std::string& backing) {
  std::error_code ec;
  fs::remove(part, ec);
  CBT_ASSIGN_OR_RETURN(std::unique_ptr<PosixFile> io,
                       PosixFile::Open(part.string(), PosixFile::Mode::kCreateExclusive));
  qcow2::LayerOptions lo;
  lo.virtual_size = disk_size;
  lo.cluster_size = kLayerCluster;
  if (!backing.empty()) {
    lo.backing_file = backing;  // relative: the chain moves as one directory
    lo.backing_format = "qcow2";
  }
  return qcow2::LayerWriter::Create(std::shared_ptr<BlockIO>(std::move(io)), lo);
}

Status VerifyLayer(const fs::path& layer, const std::string& against) {
  // -U: the disk may be locked by this run (offline) or served (online).
  const int rc = RunProgram(
      {"qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F", "raw", layer.string(), against});
  if (rc == 0) return Status::OK();
  std::error_code ec;
  fs::remove(layer, ec);
  if (rc == -1) return Status::NotFound("--verify needs qemu-img (package qemu-utils)");
  return Status::IOError("--verify: qemu-img compare found the layer chain different from " +
                         against + " (exit " + std::to_string(rc) + "); the layer was removed");
}

}  // namespace cbt::cli
