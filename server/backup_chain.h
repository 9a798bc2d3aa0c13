// A backup chain's directory (docs/backup.md), shared by the online and the
// offline `cbt backup`: the state file, the directory lock, the chain's own
// bitmaps and the plan of one run, the layer names, the progress line.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "qcow2/layer_writer.h"
#include "server/output.h"

namespace cbt::cli {

// Every layer's cluster size.
inline constexpr uint32_t kLayerCluster = 65536;

struct Layer {
  std::string file;    // NNN-full.qcow2 / NNN-inc.qcow2, in the directory
  std::string type;    // "full" or "inc"
  std::string bitmap;  // the bitmap frozen at this backup ("" for a full one)
  uint64_t bytes = 0;  // data stored
  int64_t time = 0;    // unix seconds of the checkpoint
};

// DIR/cbt-backup.json. The chain owns exactly the bitmaps it names: the
// one recording since the last layer, those frozen by runs that did not
// finish, and the one a run is starting. Bitmaps of another chain (or of a
// copy of this directory that went its own way) are never touched.
struct ChainState {
  std::string chain;       // hex id: the chain's bitmaps are cbt-backup-<chain>-<seq>
  uint64_t disk_size = 0;  // 0 until the first backup
  std::string container;   // the disk's container (absolute), set by the first backup
  uint64_t next_seq = 0;
  std::vector<Layer> layers;
  std::string recording;             // the chain's bitmap recording since the last layer
  std::vector<std::string> pending;  // frozen by runs that did not finish
  std::string starting;              // set while a run's checkpoint is under way
  // The session an online run has open (0: none): a run killed while it
  // copied leaves it, and the next run ends it.
  uint64_t session = 0;
};

// The state in dir, or a new chain (random id) when there is none.
// Corruption for a file that is not one, naming it and the way out.
Result<ChainState> LoadState(const std::filesystem::path& dir);
// Written to a temporary name, flushed, renamed, directory flushed.
Status SaveState(const std::filesystem::path& dir, const ChainState& st);
Status SyncDir(const std::filesystem::path& dir);

// One run per directory at a time: an flock on DIR/cbt-backup.lock, held
// while the object lives. Busy when another run holds it.
class DirLock {
 public:
  static Result<DirLock> Take(const std::filesystem::path& dir);
  DirLock(DirLock&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  DirLock& operator=(DirLock&&) = delete;
  ~DirLock();

 private:
  explicit DirLock(int fd) : fd_(fd) {}
  int fd_;
};

// A run's directory: created if missing (not its parents), locked, its
// state loaded.
struct ChainDir {
  std::filesystem::path dir;  // absolute
  DirLock lock;
  ChainState state;
};
Result<ChainDir> OpenChainDir(const std::string& dir);

// A bitmap of the disk, as the chain sees it.
struct ChainBitmap {
  std::string name;
  bool recording = false;
  bool consistent = true;
};

// What one run does.
struct RunPlan {
  bool full = false;
  std::string why_full;  // why a full backup ("first backup", "--full", ...)
  std::string current;   // the chain's recording bitmap, to freeze (empty: none)
  // Frozen by runs that did not finish: merged into `current` before an
  // incremental, dropped once this run succeeds.
  std::vector<std::string> pending;
  std::vector<std::string> mergeable;  // the consistent ones of `pending`
  std::string new_name;                // the bitmap this run starts
  std::string file;                    // the layer this run writes
  // The container's path in the chain before this run, when it moved (the
  // chain's recording bitmap is in the container at the new path).
  std::string moved_from;
};

// Reads the chain's bitmaps among `bitmaps` and decides, updating st: a
// checkpoint that a killed run made is adopted; a chain whose bitmap is gone
// (used up by a copy of this directory, or removed) starts again with a full
// backup under a new chain id, leaving the old id's bitmaps alone.
// InvalidArgument when DIR belongs to another disk (container).
Result<RunPlan> PlanRun(ChainState& st, const std::vector<ChainBitmap>& bitmaps, bool force_full,
                        const std::filesystem::path& dir, const std::string& container);

// Before the checkpoint: st.starting = plan.new_name, saved. After it:
// the new bitmap records, what was frozen or replaced is pending, saved.
// After the run: nothing pending.
void Started(ChainState& st, const RunPlan& plan);

// A progress line on stderr when it is a terminal: bytes, rate, ETA.
class Progress {
 public:
  Progress(uint64_t total, bool enabled);
  void Update(uint64_t done);
  void Done();

 private:
  const uint64_t total_;
  const bool on_;
  const int64_t start_ns_;
  int64_t last_ns_ = 0;
};

int64_t UnixNow();

// A new layer at `part` (replacing a leftover one) for a disk of disk_size
// bytes; backing: the previous layer's file name (relative), empty for a
// full backup.
Result<std::unique_ptr<qcow2::LayerWriter>> OpenLayer(const std::filesystem::path& part,
                                                      uint64_t disk_size,
                                                      const std::string& backing);
// --verify: qemu-img compare of the chain ending at `layer` with `against`
// (a raw file or an NBD URI). On a difference (Corruption) or a failure of
// qemu-img (IOError, NotFound) the layer is removed.
Status VerifyLayer(const std::filesystem::path& layer, const std::string& against);

// After VerifyLayer found a difference (st as left by Started): what it
// means and the fix, to follow its message. The layer copied what the
// bitmap recorded, so the difference is a change it never recorded
// (written while no tracker ran, or accepted with cbt-trust-disk=true): the
// next run would miss it again. disk: the raw disk offline, "" online.
std::string VerifyMismatchFix(const RunPlan& plan, const ChainState& st,
                              const std::filesystem::path& dir, const std::string& container,
                              const std::string& disk);

// The offline run (cli_backup_offline.cc): `cbt backup --disk DISK
// --container FILE --dir DIR`. Exit code.
int BackupOffline(const std::string& disk, const std::string& container, const std::string& dir,
                  bool force_full, bool verify, OutputFormat format);

}  // namespace cbt::cli
