#include "server/bitmap_args.h"

#include <sstream>
#include <utility>

#include "server/cli_parse.h"
#include "server/size_parse.h"

namespace cbt::cli {

BitmapArgs ParseBitmapArgs(const std::vector<std::string>& args) {
  BitmapArgs out;
  po::options_description desc(
      "Operations (several may be given; they apply in order, "
      "all or none)");
  desc.add_options()("add", po::bool_switch(), "add NAME, empty and enabled")(
      "remove", po::bool_switch(), "remove NAME (also works on an inconsistent bitmap)")(
      "clear", po::bool_switch(), "make every bit of NAME clean")(
      "enable", po::bool_switch(), "make NAME record changes (flag auto)")(
      "disable", po::bool_switch(), "freeze NAME (clear flag auto)")(
      "merge", po::value<std::string>()->value_name("SRC"),
      "OR bitmap SRC (of FILE, or of -b SRCFILE) into NAME")(
      "persistent", po::bool_switch(), "--socket only: NAME is stored in the container again")(
      "transient", po::bool_switch(),
      "--socket only: NAME lives in the filter's memory only and is gone at stop (with --add: "
      "add it so)");
  po::options_description mods("Modifiers");
  mods.add_options()("granularity,g", po::value<std::string>()->value_name("SIZE"),
                     "--add: granularity, a power of two from 512 to 2G (default: the cluster size "
                     "clamped to 4K..64K)")("disabled", po::bool_switch(),
                                            "--add: create the bitmap disabled")(
      "source-file,b", po::value<std::string>()->value_name("SRCFILE"),
      "--merge: read SRC from this qcow2 file (a disk of FILE's size)")(
      "source-format,F", po::value<std::string>()->value_name("qcow2"),
      "format of SRCFILE, as qemu-img -F; only qcow2")(
      "socket", po::value<std::string>()->value_name("PATH"),
      "change NAME in the filter serving the control socket PATH (cbt-control=PATH); no FILE")(
      "export", po::value<std::string>()->value_name("NAME"),
      "with --socket: the export (disk) addressed, when the filter tracks several");
  CommonOptions& c = out.common;
  AddCommonOptions(mods, c);
  po::options_description visible;
  visible.add(desc).add(mods);
  po::options_description hidden;
  hidden.add_options()("file", po::value<std::string>())("name", po::value<std::string>());
  po::positional_options_description pos;
  pos.add("file", 1).add("name", 1);
  std::ostringstream help;
  help << visible;
  out.help = help.str();

  po::options_description all;
  all.add(visible).add(hidden);
  po::parsed_options parsed = ParseOnly(args, all, pos);
  std::string granularity, source_format;
  bool have_granularity = false;
  for (const po::option& o : parsed.options) {
    const std::string& k = o.string_key;
    const std::string v = o.value.empty() ? std::string() : o.value.front();
    if (k == "help")
      out.common.help = true;
    else if (k == "verbose")
      out.common.verbose = true;
    else if (k == "output")
      out.common.output = v;
    else if (k == "format")
      out.common.image_format = v;
    else if (k == "source-format")
      source_format = v;
    else if (k == "file")
      out.file = v;
    else if (k == "name")
      out.name = v;
    else if (k == "add")
      out.ops.push_back({OpKind::kAdd, {}});
    else if (k == "remove")
      out.ops.push_back({OpKind::kRemove, {}});
    else if (k == "clear")
      out.ops.push_back({OpKind::kClear, {}});
    else if (k == "enable")
      out.ops.push_back({OpKind::kEnable, {}});
    else if (k == "disable")
      out.ops.push_back({OpKind::kDisable, {}});
    else if (k == "merge")
      out.ops.push_back({OpKind::kMerge, v});
    else if (k == "persistent")
      out.ops.push_back({OpKind::kPersistent, {}});
    else if (k == "transient")
      out.ops.push_back({OpKind::kTransient, {}});
    else if (k == "socket")
      out.socket = v;
    else if (k == "export")
      out.export_name = v;
    else if (k == "disabled")
      out.opts.add_disabled = true;
    else if (k == "source-file")
      out.source_file = v;
    else if (k == "granularity")
      granularity = v, have_granularity = true;
    else
      throw UsageError("unexpected argument '" + k + "'");
  }
  if (out.common.help) return out;
  const bool online = !out.socket.empty();
  if (online) {
    // The one positional is NAME.
    if (!out.name.empty())
      throw UsageError(
          "FILE and --socket PATH together; give one: --socket changes a running "
          "filter's bitmaps, FILE a stored container");
    out.name = std::move(out.file);
    out.file.clear();
  }
  if (!online && out.file.empty())
    throw UsageError("missing FILE and NAME (or --socket PATH NAME)");
  if (!online && !out.export_name.empty()) throw UsageError("--export applies to --socket only");
  if (out.name.empty()) throw UsageError("missing NAME (the bitmap to work on)");
  if (out.ops.empty())
    throw UsageError(
        "no operation; give at least one of --add, --remove, --clear, --enable, "
        "--disable, --merge SRC");
  bool add = false, merge = false, persistence = false;
  for (const auto& op : out.ops) {
    add |= op.kind == OpKind::kAdd;
    merge |= op.kind == OpKind::kMerge;
    persistence |= op.kind == OpKind::kPersistent || op.kind == OpKind::kTransient;
    if (op.kind == OpKind::kMerge && op.source.empty())
      throw UsageError("--merge needs the name of the source bitmap");
  }
  if (persistence && !online)
    throw UsageError(
        "--persistent and --transient need --socket PATH: every bitmap stored in "
        "FILE is persistent");
  if (add) {
    // With --add, --transient is its modifier (as --disabled), not an operation.
    const size_t before = out.ops.size();
    std::erase_if(out.ops, [](const BitmapOp& op) { return op.kind == OpKind::kTransient; });
    out.opts.add_transient = out.ops.size() != before;
  }
  if (have_granularity) {
    if (!add) throw UsageError("-g/--granularity only applies to --add");
    Result<uint64_t> g = ParseSize(granularity, "-g");
    if (!g.ok()) throw UsageError(g.status().message());
    out.opts.granularity = *g;
  }
  if (out.opts.add_disabled && !add) throw UsageError("--disabled only applies to --add");
  if (!out.source_file.empty() && !merge)
    throw UsageError("-b/--source-file only applies to --merge");
  if (!out.source_file.empty() && online)
    throw UsageError(
        "--merge SRC -b SRCFILE cannot be used with --socket: the filter merges only "
        "the bitmaps it serves (merge from another image offline, into a FILE no "
        "server holds)");
  CheckImageFormat(out.common.image_format, "-f");
  if (!source_format.empty()) {
    if (out.source_file.empty()) throw UsageError("-F/--source-format only applies to -b");
    CheckImageFormat(source_format, "-F");
  }
  return out;
}

}  // namespace cbt::cli
