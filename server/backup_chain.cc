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

namespace {

std::string NewChainId() {
  std::random_device rd;
  char id[9];
  std::snprintf(id, sizeof id, "%08x", static_cast<unsigned>(rd()));
  return id;
}

}  // namespace

Result<ChainState> LoadState(const fs::path& dir) {
  ChainState st;
  const fs::path p = dir / kStateFile;
  std::error_code ec;
  if (!fs::exists(p, ec)) {
    st.chain = NewChainId();
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
    st.container = j.value("container", std::string());
    st.recording = j.value("recording", std::string());
    st.starting = j.value("starting", std::string());
    for (const json& n : j.value("pending", json::array()))
      st.pending.push_back(n.get<std::string>());
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
  json j = {{"chain", st.chain},     {"disk-size", st.disk_size}, {"next-seq", st.next_seq},
            {"session", st.session}, {"container", st.container}, {"recording", st.recording},
            {"pending", st.pending}, {"starting", st.starting},   {"layers", std::move(layers)}};
  const fs::path tmp = dir / (std::string(kStateFile) + ".tmp");
  std::error_code ec;
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << j.dump(2) << "\n";
    out.flush();
    if (!out) {
      fs::remove(tmp, ec);
      return Status::IOError("writing " + tmp.string() + " (file system full?)", ENOSPC);
    }
  }
  {
    CBT_ASSIGN_OR_RETURN(auto f, PosixFile::Open(tmp.string(), PosixFile::Mode::kReadWrite));
    CBT_RETURN_IF_ERROR(f->flush());
  }
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

Result<ChainDir> OpenChainDir(const std::string& d) {
  const fs::path dir = fs::absolute(d);
  std::error_code ec;
  fs::create_directory(dir, ec);  // not its parents: a typo is an error
  if (ec) return Status::IOError("--dir " + dir.string() + ": " + ec.message(), ec.value());
  CBT_ASSIGN_OR_RETURN(DirLock lock, DirLock::Take(dir));
  CBT_ASSIGN_OR_RETURN(ChainState st, LoadState(dir));
  return ChainDir{dir, std::move(lock), std::move(st)};
}

Result<RunPlan> PlanRun(ChainState& st, const std::vector<ChainBitmap>& bitmaps, bool force_full,
                        const fs::path& dir, const std::string& container_path) {
  // One spelling per file: symlinks, "." and ".." resolved.
  std::error_code cec;
  std::string container = container_path;
  if (!container.empty()) {
    fs::path c = fs::weakly_canonical(container_path, cec);
    if (!cec) container = c.string();
  }
  auto find = [&](const std::string& n) -> const ChainBitmap* {
    for (const ChainBitmap& b : bitmaps)
      if (b.name == n) return &b;
    return nullptr;
  };
  auto usable = [](const ChainBitmap* b) { return b && b->consistent; };
  RunPlan p;
  if (!st.container.empty() && !container.empty() && st.container != container) {
    // Another path: the same container moved (another host, another
    // directory) if it holds the chain's recording bitmap, whose name
    // carries the chain's random id; otherwise another disk's.
    const ChainBitmap* rec = st.recording.empty() ? nullptr : find(st.recording);
    if (!usable(rec) || !rec->recording)
      return Status::InvalidArgument(
          dir.string() + " holds the backups of the disk whose bitmaps are in " + st.container +
          ", not " + container +
          (st.recording.empty() ? std::string()
                                : " (which has no recording bitmap '" + st.recording + "')") +
          ": use another directory for this disk (if the container was moved and lost that "
          "bitmap, put its new path in \"container\" in " +
          (dir / kStateFile).string() + " to start the chain again with a full backup)");
    p.moved_from = st.container;
  }
  // A checkpoint made by a run killed before it could say so: its new
  // bitmap records, the one it froze is pending.
  if (!st.starting.empty()) {
    const ChainBitmap* started = find(st.starting);
    const ChainBitmap* old = st.recording.empty() ? nullptr : find(st.recording);
    if (usable(started) && started->recording) {
      // Frozen (incremental) or replaced (full): covered by a later run.
      if (old) st.pending.push_back(st.recording);
      st.recording = st.starting;
    }
    st.starting.clear();
  }
  for (const std::string& n : st.pending)
    if (const ChainBitmap* b = find(n)) {
      p.pending.push_back(n);
      if (b->consistent) p.mergeable.push_back(n);
    }
  std::error_code ec;
  const ChainBitmap* cur = st.recording.empty() ? nullptr : find(st.recording);
  if (usable(cur) && cur->recording) p.current = st.recording;
  if (force_full) {
    p.why_full = "--full";
  } else if (st.layers.empty()) {
    p.why_full = "first backup";
  } else if (p.current.empty()) {
    p.why_full = "the chain's bitmap " +
                 (st.recording.empty() ? std::string("(none)") : st.recording) +
                 (cur ? " does not record (or is inconsistent)"
                      : " is gone (removed, or used up by a copy of this directory)") +
                 ": starting again under a new chain id";
  } else {
    for (const Layer& l : st.layers)
      if (!fs::exists(dir / l.file, ec)) {
        p.why_full = "the layer " + l.file + " is missing: the chain is broken";
        break;
      }
  }
  p.full = !p.why_full.empty();
  if (p.full && p.current.empty() && !st.recording.empty()) {
    // Nothing of the old id is ours for sure any more: leave it alone.
    st.chain = NewChainId();
    st.recording.clear();
    st.pending.clear();
    p.pending.clear();
    p.mergeable.clear();
  }
  if (!container.empty()) st.container = container;
  const std::string prefix = Prefix(st.chain);
  for (;;) {  // a name no bitmap has
    p.new_name = prefix + std::to_string(st.next_seq);
    if (!find(p.new_name)) break;
    ++st.next_seq;
  }
  char name[64];
  std::snprintf(name, sizeof name, "%03zu-%s.qcow2", st.layers.size(), p.full ? "full" : "inc");
  p.file = name;
  return p;
}

void Started(ChainState& st, const RunPlan& plan) {
  // What this run froze (incremental) or replaces (full) is covered once it
  // succeeds: pending until then.
  if (!plan.current.empty()) st.pending.push_back(plan.current);
  st.recording = plan.new_name;
  st.starting.clear();
  ++st.next_seq;
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
  if (rc != 1)
    return Status::IOError("--verify: qemu-img compare of the layer chain with " + against +
                           " failed (exit " + std::to_string(rc) + "); the layer was removed");
  return Status::Corruption("--verify: qemu-img compare found the layer chain different from " +
                            against + "; the layer was removed");
}

std::string VerifyMismatchFix(const RunPlan& plan, const ChainState& st, const fs::path& dir,
                              const std::string& container, const std::string& disk) {
  const std::string unchanged = "no backup made; the chain in " + dir.string() + " is unchanged";
  if (plan.full || st.layers.empty())
    return ": what was read is not what the disk holds (written while it was read, or a read "
           "error); " +
           unchanged + ": run again with --full";
  const std::string last = (dir / st.layers.back().file).string();
  return ": the disk differs from the chain outside what bitmap '" + plan.current +
         "' recorded (changes made while no tracker ran), so the next run would miss them "
         "again; " +
         unchanged + "; make bitmap '" + st.recording + "' cover them with 'cbt recover " +
         container + " --bitmap " + st.recording + " --compare " + last +
         " --compare-format qcow2 --disk " + (disk.empty() ? "DISK" : disk) + "'" +
         (disk.empty() ? " (with the server stopped)" : "") + ", or take a full backup with --full";
}

}  // namespace cbt::cli
