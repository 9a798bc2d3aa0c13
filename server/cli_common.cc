// What every subcommand shares: common options, help text, argument parsing.
#include <spawn.h>
#include <spdlog/spdlog.h>
#include <sys/wait.h>

#include <cerrno>
#include <iostream>

#include "server/cli.h"
#include "server/cli_parse.h"

extern char** environ;

namespace cbt::cli {

OutputFormat CommonOptions::format() const {
  if (output == "human") return OutputFormat::kHuman;
  if (output == "json") return OutputFormat::kJson;
  throw UsageError("--output '" + output +
                   "' is not a format; use --output=human or --output=json");
}

void AddCommonOptions(po::options_description& desc, CommonOptions& common) {
  desc.add_options()("help,h", po::bool_switch(&common.help), "show this help and exit")(
      "verbose,v", po::bool_switch(&common.verbose), "debug logging on stderr")(
      "output", po::value(&common.output)->value_name("FMT"),
      "output format: human (default) or json")(
      "format,f", po::value(&common.image_format)->value_name("qcow2"),
      "image format, as qemu-img -f; only qcow2");
}

void CheckImageFormat(const std::string& fmt, const char* option) {
  if (fmt == "qcow2") return;
  throw UsageError(std::string(option) + " " + fmt +
                   ": cbt works on qcow2 files only (the bitmaps live in a qcow2 file; a raw "
                   "disk is linked with 'cbt create --data-file')");
}

void ApplyCommonOptions(const CommonOptions& common) {
  if (common.verbose) spdlog::set_level(spdlog::level::debug);
  (void)common.format();
  CheckImageFormat(common.image_format, "-f");
}

void PrintHelp(const std::string& synopsis, const std::string& description,
               const po::options_description& desc) {
  std::cout << "Usage: " << synopsis << "\n\n" << description << "\n\n" << desc << std::flush;
}

po::parsed_options ParseOnly(const std::vector<std::string>& args,
                             const po::options_description& all,
                             const po::positional_options_description& positional) {
  return po::command_line_parser(args)
      .options(all)
      .positional(positional)
      .style(po::command_line_style::default_style & ~po::command_line_style::allow_guessing)
      .run();
}

void ParseCommandLine(const std::vector<std::string>& args, const po::options_description& visible,
                      const po::options_description& hidden,
                      const po::positional_options_description& positional, po::variables_map& vm) {
  po::options_description all;
  all.add(visible).add(hidden);
  // store() reads the descriptions the parsed options point to: `all` must
  // still be alive here.
  po::store(ParseOnly(args, all, positional), vm);
  po::notify(vm);
}

bool ParseCommand(const std::vector<std::string>& args, po::options_description& desc,
                  CommonOptions& common, std::vector<std::string>& positionals,
                  const char* synopsis, const char* description, po::variables_map* vm) {
  AddCommonOptions(desc, common);
  po::options_description hidden;
  hidden.add_options()("file", po::value(&positionals));
  po::positional_options_description pos;
  pos.add("file", -1);
  po::variables_map local;
  ParseCommandLine(args, desc, hidden, pos, vm != nullptr ? *vm : local);
  if (common.help) {
    PrintHelp(synopsis, description, desc);
    return true;
  }
  ApplyCommonOptions(common);
  return false;
}

bool ParseSocketCommand(const std::vector<std::string>& args, po::options_description& desc,
                        CommonOptions& common, const std::string& socket, const char* name,
                        const char* synopsis, const char* description,
                        std::string (*offline_hint)(const std::string& file)) {
  std::vector<std::string> files;  // only to refuse them clearly
  if (ParseCommand(args, desc, common, files, synopsis, description)) return true;
  if (!files.empty())
    throw UsageError(std::string(name) +
                     " works on a running filter only: give --socket PATH, not '" + files[0] +
                     "' (" + offline_hint(files[0]) + ")");
  if (socket.empty())
    throw UsageError("missing --socket PATH (" + std::string(name) +
                     " works on a running filter only)");
  return false;
}

bool ParseFileCommand(const std::vector<std::string>& args, po::options_description& desc,
                      CommonOptions& common, std::string& file, const char* synopsis,
                      const char* description, const std::string* socket) {
  std::vector<std::string> files;
  if (ParseCommand(args, desc, common, files, synopsis, description)) return true;
  if (files.size() > 1) throw UsageError("unexpected argument '" + files[1] + "'");
  if (!files.empty()) file = files[0];
  if (socket && !socket->empty()) {
    if (!file.empty())
      throw UsageError(
          "FILE and --socket PATH together; give one: --socket asks a running "
          "filter, FILE reads a stored container");
    return false;
  }
  if (file.empty()) throw UsageError(socket ? "missing FILE (or --socket PATH)" : "missing FILE");
  return false;
}

int RunProgram(const std::vector<std::string>& argv) {
  std::vector<char*> a;
  for (const std::string& s : argv) a.push_back(const_cast<char*>(s.c_str()));
  a.push_back(nullptr);
  pid_t pid;
  if (a.size() < 2 || posix_spawnp(&pid, a[0], nullptr, nullptr, a.data(), environ) != 0) return -1;
  int status = 0;
  while (waitpid(pid, &status, 0) == -1)
    if (errno != EINTR) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace cbt::cli
