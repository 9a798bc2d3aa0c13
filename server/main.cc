// cbt: management of the dirty bitmaps stored in qcow2 files, offline, and
// online through a running filter's control socket (--socket PATH).
// This file only dispatches to a subcommand (cli_*.cc) and turns exceptions
// into one line on stderr; see docs/cli.md.
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "server/cli.h"

#ifndef CBT_VERSION
#define CBT_VERSION "unknown"
#endif

namespace {

using cbt::cli::kExitError;

struct Command {
  const char* name;
  int (*run)(const std::vector<std::string>&);
  const char* summary;
};

constexpr Command kCommands[] = {
    {"create", cbt::cli::RunCreate, "create a qcow2 file to hold bitmaps (of a raw disk)"},
    {"info", cbt::cli::RunInfo, "show a qcow2 file's (or a running filter's) size and bitmaps"},
    {"bitmap", cbt::cli::RunBitmap,
     "add, remove, clear, enable, disable or merge bitmaps (as qemu-img bitmap)"},
    {"map", cbt::cli::RunMap, "list the dirty extents of a bitmap (stored, or live with --socket)"},
    {"check", cbt::cli::RunCheck, "check (and repair) a qcow2 file (as qemu-img check)"},
    {"recover", cbt::cli::RunRecover, "make a bitmap left in use by a crash usable again"},
    {"checkpoint", cbt::cli::RunCheckpoint,
     "freeze one bitmap and start another, atomically, in a running filter"},
    {"exports", cbt::cli::RunExports, "list the exports (disks) a running filter tracks"},
    {"backup", cbt::cli::RunBackup,
     "back up a running filter's disk: full, then incremental qcow2 layers"},
    {"restore", cbt::cli::RunRestore, "write the disk as it was at a backup of a chain"},
    {"serve", cbt::cli::RunServe, "serve a disk over NBD with change tracking (runs nbdkit)"},
};

void PrintUsage(FILE* out) {
  std::fprintf(out,
               "Usage: cbt [-v] SUBCOMMAND [OPTIONS] ...\n\n"
               "Changed block tracking: manage the dirty bitmaps stored in qcow2 files,\n"
               "offline, the way qemu-img bitmap does, and (info, map, bitmap, checkpoint,\n"
               "exports with --socket PATH) online, in a running filter with\n"
               "cbt-control=PATH.\n\n"
               "Subcommands:\n");
  for (const Command& c : kCommands) std::fprintf(out, "  %-10s %s\n", c.name, c.summary);
  std::fprintf(out,
               "\n'cbt SUBCOMMAND --help' shows a subcommand's options. "
               "Every subcommand takes\n-v (debug log on stderr) and --output=json. "
               "See docs/cli.md.\n");
}

std::string CommandList() {
  std::string s;
  for (const Command& c : kCommands) s += std::string(s.empty() ? "" : ", ") + c.name;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  auto logger = spdlog::stderr_logger_st("cbt");
  logger->set_pattern("cbt: %l: %v");
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::warn);

  std::vector<std::string> args(argv + 1, argv + argc);
  // Global options before the subcommand: -v (passed on), -h, --version.
  std::vector<std::string> pass_on;
  size_t i = 0;
  for (; i < args.size() && !args[i].empty() && args[i][0] == '-'; ++i) {
    const std::string& a = args[i];
    if (a == "-h" || a == "--help") {
      PrintUsage(stdout);
      return 0;
    }
    if (a == "--version") {
      // Says what this cbt is: Google's Bigtable client has the same name.
      std::printf("cbt %s (changed block tracking for nbdkit)\n", CBT_VERSION);
      return 0;
    }
    if (a == "-v" || a == "--verbose") {
      pass_on.push_back(a);
      continue;
    }
    std::fprintf(stderr, "cbt: unknown option '%s' before the subcommand; see 'cbt --help'\n",
                 a.c_str());
    return kExitError;
  }
  if (i == args.size()) {
    std::fprintf(stderr, "cbt: missing subcommand; one of %s (see 'cbt --help')\n",
                 CommandList().c_str());
    return kExitError;
  }
  const std::string sub = args[i];
  const Command* cmd = nullptr;
  for (const Command& c : kCommands)
    if (sub == c.name) cmd = &c;
  if (!cmd) {
    std::fprintf(stderr, "cbt: unknown subcommand '%s'; use one of %s (see 'cbt --help')\n",
                 sub.c_str(), CommandList().c_str());
    return kExitError;
  }
  pass_on.insert(pass_on.end(), args.begin() + static_cast<long>(i) + 1, args.end());
  try {
    return cmd->run(pass_on);
  } catch (const cbt::cli::UsageError& e) {
    std::fprintf(stderr, "cbt %s: %s; see 'cbt %s --help'\n", cmd->name, e.what(), cmd->name);
  } catch (const boost::program_options::error& e) {
    std::fprintf(stderr, "cbt %s: %s; see 'cbt %s --help'\n", cmd->name, e.what(), cmd->name);
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "cbt %s: out of memory\n", cmd->name);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cbt %s: internal error: %s\n", cmd->name, e.what());
  }
  return kExitError;
}
