// cbt recover FILE --bitmap NAME --compare BACKUP: recompute a bitmap by
// comparing the disk with its last backup (cli_recover_compare.cc).
#pragma once

#include <string>

#include "server/cli.h"

namespace cbt::cli {

struct CompareArgs {
  std::string backup;         // --compare BACKUP
  std::string backup_format;  // --compare-format raw|qcow2, "" = not given
  std::string disk;           // --disk PATH, "" = not given
};

// Runs the recompute; returns the exit code. Throws UsageError for a bad
// --compare-format.
int RecoverByCompare(const std::string& file, const std::string& name, const CompareArgs& args,
                     const CommonOptions& common);

}  // namespace cbt::cli
