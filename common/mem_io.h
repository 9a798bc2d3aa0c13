// MemBlockIO: BlockIO in memory, for unit tests and fuzzing.
#pragma once

#include <mutex>
#include <vector>

#include "common/block_io.h"

namespace cbt {

class MemBlockIO final : public BlockIO {
 public:
  MemBlockIO() = default;
  explicit MemBlockIO(std::vector<std::byte> initial) : data_(std::move(initial)) {}

  Status pread(std::span<std::byte> out, uint64_t offset) override;
  Status pwrite(std::span<const std::byte> in, uint64_t offset) override;
  Status flush() override { return Status::OK(); }
  Result<uint64_t> size() override;
  Status resize(uint64_t new_size) override;
  const char* name() const override { return "memory"; }

  // A copy of the current contents.
  std::vector<std::byte> contents() const;

 private:
  mutable std::mutex mu_;  // guards data_
  std::vector<std::byte> data_;
};

}  // namespace cbt
