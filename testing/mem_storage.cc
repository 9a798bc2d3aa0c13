#include "testing/mem_storage.h"

namespace cbt::testing {

void MemStorage::Put(const std::string& path, std::vector<std::byte> bytes) {
  std::lock_guard lock(mu_);
  files_[path] = std::make_shared<CrashIO>(std::move(bytes));
}

std::shared_ptr<CrashIO> MemStorage::device(const std::string& path) const {
  std::lock_guard lock(mu_);
  auto it = files_.find(path);
  return it == files_.end() ? nullptr : it->second;
}

Result<std::shared_ptr<BlockIO>> MemStorage::Open(const std::string& path, Mode mode) {
  std::lock_guard lock(mu_);
  auto it = files_.find(path);
  if (mode == Mode::kCreate) {
    if (it != files_.end()) return Status::AlreadyExists(path + ": exists");
    auto dev = std::make_shared<CrashIO>(std::vector<std::byte>{});
    files_[path] = dev;
    return std::shared_ptr<BlockIO>(dev);
  }
  if (it == files_.end()) return Status::NotFound(path + ": no such file");
  return std::shared_ptr<BlockIO>(it->second);
}

void MemStorage::Remove(const std::string& path) {
  std::lock_guard lock(mu_);
  files_.erase(path);
}

}  // namespace cbt::testing
