// cbt restore DIR [--point N] --to FILE: the disk as it was at backup N of a
// chain made by `cbt backup` (docs/backup.md), written as a raw file with
// qemu-img convert and checked with qemu-img compare. The plain way is the
// same two qemu-img commands.
#include <filesystem>
#include <optional>

#include "server/backup_chain.h"
#include "server/cli.h"
#include "server/cli_parse.h"
#include "server/output.h"

namespace cbt::cli {

namespace {

namespace fs = std::filesystem;

constexpr char kSynopsis[] = "cbt restore DIR [--point N] --to FILE [--output=json]";
constexpr char kDescription[] =
    "Writes the disk as it was at backup N (default: the last) of the chain in DIR\n"
    "to FILE (raw; it must not exist), then compares the two. The same by hand:\n"
    "  qemu-img convert -f qcow2 -O raw DIR/NNN-xxx.qcow2 FILE\n"
    "  qemu-img compare -f qcow2 -F raw DIR/NNN-xxx.qcow2 FILE\n"
    "Needs qemu-img (package qemu-utils).";

}  // namespace

int RunRestore(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string dir, to;
  std::optional<long> point;
  po::options_description desc("Options");
  desc.add_options()("to", po::value(&to)->value_name("FILE"), "the raw file to write (required)")(
      "point", po::value<long>()->value_name("N")->notifier([&](long v) { point = v; }),
      "which backup: 0 is the full one (default: the last)");
  if (ParseFileCommand(args, desc, common, dir, kSynopsis, kDescription)) return kExitOk;
  if (to.empty()) throw UsageError("missing --to FILE");
  std::error_code ec;
  if (!fs::exists(fs::path(dir) / "cbt-backup.json", ec))
    return Fail(dir + ": no backup chain here (no cbt-backup.json)");
  Result<ChainState> st = LoadState(dir);
  if (!st.ok()) return Fail(st.status());
  const std::vector<Layer>& layers = st->layers;
  if (layers.empty()) return Fail(dir + ": the chain has no backup yet");
  if (point && (*point < 0 || *point >= static_cast<long>(layers.size())))
    throw UsageError("--point must be from 0 to " + std::to_string(layers.size() - 1));
  const size_t n = point ? static_cast<size_t>(*point) : layers.size() - 1;
  const std::string layer = (fs::path(dir) / layers[n].file).string();
  if (fs::exists(to, ec)) return Fail(to + ": exists; restore writes a new file");
  int rc = RunProgram({"qemu-img", "convert", "-f", "qcow2", "-O", "raw", layer, to});
  if (rc != 0)
    return Fail(rc == -1
                    ? "restore needs qemu-img (package qemu-utils)"
                    : "qemu-img convert " + layer + " failed (exit " + std::to_string(rc) + ")");
  rc = RunProgram({"qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", layer, to});
  if (rc != 0)
    return Fail(to + ": differs from " + layer + " after the copy (qemu-img compare exit " +
                std::to_string(rc) + ")");
  if (common.format() == OutputFormat::kJson)
    PrintJson({{"file", to}, {"layer", layer}, {"point", n}, {"verified", true}});
  else
    std::printf("%s: the disk at backup %zu (%s), verified\n", to.c_str(), n, layer.c_str());
  return kExitOk;
}

}  // namespace cbt::cli
