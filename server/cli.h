// The `cbt` command line: one entry point per subcommand, plus what every
// subcommand shares (common options, usage errors). main.cc only dispatches.
//
// Exit codes (docs/cli.md): 0 success; 1 error (bad usage, bad input, a file
// that cannot be opened or changed); `cbt check` adds qemu-img check's
// 2 (corruption) and 3 (leaks only).
#pragma once

#include <boost/program_options.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "server/output.h"

namespace cbt::cli {

namespace po = boost::program_options;

inline constexpr int kExitOk = 0;
inline constexpr int kExitError = 1;

// A command line that cannot be run as given. main prints
// "cbt SUBCOMMAND: what; see 'cbt SUBCOMMAND --help'" and exits 1.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Options every subcommand takes: -h/--help, -v/--verbose, --output, and
// qemu-img's -f FMT (only qcow2 is accepted).
struct CommonOptions {
  bool help = false;
  bool verbose = false;
  std::string output = "human";
  std::string image_format = "qcow2";  // -f
  OutputFormat format() const;         // throws UsageError on a bad --output
};
void AddCommonOptions(po::options_description& desc, CommonOptions& common);
// Applies -v (spdlog debug level); checks --output and -f.
void ApplyCommonOptions(const CommonOptions& common);
// -f / -F FMT as qemu-img takes it: UsageError unless FMT is qcow2.
void CheckImageFormat(const std::string& fmt, const char* option);

// Adds the common options to `desc`, parses args (positionals into
// `positionals`, all of them), prints the help and returns true when -h was
// given (the caller exits 0), else applies -v/--output. `vm`, if given,
// receives the parsed options.
bool ParseCommand(const std::vector<std::string>& args, po::options_description& desc,
                  CommonOptions& common, std::vector<std::string>& positionals,
                  const char* synopsis, const char* description, po::variables_map* vm = nullptr);

// The common shape of a subcommand taking one FILE: adds the common options
// to `desc`, parses args (FILE positional), prints the help and returns true
// when -h was given (the caller exits 0), applies -v/--output, and throws
// UsageError when FILE is missing. With `socket` (a --socket PATH option the
// caller added to `desc`): exactly one of FILE and --socket is required.
bool ParseFileCommand(const std::vector<std::string>& args, po::options_description& desc,
                      CommonOptions& common, std::string& file, const char* synopsis,
                      const char* description, const std::string* socket = nullptr);

// The common shape of a subcommand that asks a running filter only: adds
// the common options to `desc`, parses args, prints the help and returns
// true when -h was given, applies -v/--output, and throws UsageError for a
// positional FILE ("NAME works on a running filter only: give --socket
// PATH, not 'FILE' (HINT)", `offline_hint(FILE)`) or a missing --socket.
bool ParseSocketCommand(const std::vector<std::string>& args, po::options_description& desc,
                        CommonOptions& common, const std::string& socket, const char* name,
                        const char* synopsis, const char* description,
                        std::string (*offline_hint)(const std::string& file));

// Prints "Usage: <synopsis>\n\n<description>\n\n<options>" to stdout.
void PrintHelp(const std::string& synopsis, const std::string& description,
               const po::options_description& desc);

// Runs argv (argv[0] searched in PATH) and waits; its stdout and stderr
// are ours. Its exit code, or -1 if it could not run (or was killed).
int RunProgram(const std::vector<std::string>& argv);

// Subcommands. `args` are the words after the subcommand name.
// Return the process exit code; throw UsageError / po::error on bad usage.
int RunCreate(const std::vector<std::string>& args);
int RunInfo(const std::vector<std::string>& args);
int RunBitmap(const std::vector<std::string>& args);
int RunMap(const std::vector<std::string>& args);
int RunCheck(const std::vector<std::string>& args);
int RunRecover(const std::vector<std::string>& args);
int RunCheckpoint(const std::vector<std::string>& args);
int RunExports(const std::vector<std::string>& args);
int RunBackup(const std::vector<std::string>& args);
int RunRestore(const std::vector<std::string>& args);
int RunServe(const std::vector<std::string>& args);

}  // namespace cbt::cli
