// VolatileBlockIO: a TEST-ONLY BlockIO decorator that simulates a disk cache
// lost in a power cut, for the crash torture (tests/crash/).
//
// Writes are not passed down until flush(): they are kept in memory (reads
// see them, in order) and appended to a journal file. flush() applies them
// in order, flushes the file and empties the journal. After the process is
// killed, tests/tools/powercut_replay.cc applies an arbitrary subset of the
// journal (reordered, torn at 512-byte sectors) to the real file: what a
// power cut may leave of writes that no flush covered.
//
// Used only by the torture's test build of the filter
// (tests/tools/volatile_storage.cc, nbdkit-cbt-powercut-filter.so), whose
// storage wraps every container in it; never in the filter users run.
// Journal: "CBTJCONT" then records [u64 offset][u64 length][data], little
// endian. Threading: one mutex around everything.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/block_io.h"

namespace cbt {

class VolatileBlockIO final : public BlockIO {
 public:
  // Failure: IOError creating the journal.
  static Result<std::unique_ptr<VolatileBlockIO>> Wrap(std::shared_ptr<BlockIO> inner,
                                                       const std::string& journal);
  ~VolatileBlockIO() override;

  Status pread(std::span<std::byte> out, uint64_t offset) override;
  Status pwrite(std::span<const std::byte> in, uint64_t offset) override;
  Status flush() override;
  Result<uint64_t> size() override;
  Status resize(uint64_t new_size) override;
  // Kept like a write of zeros (lost in a power cut unless flushed): what
  // a punched range may read as after the cut is its old content or zeros.
  Status punch_hole(uint64_t offset, uint64_t len) override;
  const char* name() const override { return inner_->name(); }

 private:
  VolatileBlockIO(std::shared_ptr<BlockIO> inner, int fd) : inner_(std::move(inner)), fd_(fd) {}
  Status ApplyLocked();
  struct Pending {
    uint64_t offset;
    std::vector<std::byte> data;
  };
  std::mutex mu_;  // guards everything below
  std::shared_ptr<BlockIO> inner_;
  int fd_;
  std::vector<Pending> pending_;
};

}  // namespace cbt
