// MemStorage: TEST ONLY. A Storage whose files are CrashIO devices in
// memory (testing/crash_io.h), so that engine tests run the tracker over a
// device that dies at a chosen write and then reopen what it left.
// Locks are not modelled (one tracker per storage at a time).
// Threading: one mutex around the file table.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine/storage.h"
#include "testing/crash_io.h"

namespace cbt::testing {

class MemStorage final : public Storage {
 public:
  // Installs a file with these bytes (replacing any).
  void Put(const std::string& path, std::vector<std::byte> bytes);
  // The device behind path, or null.
  std::shared_ptr<CrashIO> device(const std::string& path) const;

  Result<std::shared_ptr<BlockIO>> Open(const std::string& path, Mode mode) override;
  Status CheckCreatable(const std::string&) override { return Status::OK(); }
  void Remove(const std::string& path) override;

 private:
  mutable std::mutex mu_;  // guards files_
  std::map<std::string, std::shared_ptr<CrashIO>> files_;
};

}  // namespace cbt::testing
