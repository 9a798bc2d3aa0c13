// cbt bitmap FILE NAME OPERATION... : qemu-img bitmap's operations, applied
// in order in memory (BitmapEditor) and stored with one commit, so the call
// changes everything it was asked to or nothing.
#include <spdlog/spdlog.h>

#include <iostream>

#include "server/bitmap_args.h"
#include "server/bitmap_ops.h"
#include "server/cli.h"
#include "server/cli_socket.h"
#include "server/image_open.h"

namespace cbt::cli {

namespace {

constexpr char kSynopsis[] =
    "cbt bitmap FILE NAME (--add [-g SIZE] [--disabled] | --remove | --clear |\n"
    "       --enable | --disable | --merge SRC [-b SRCFILE])... [--output=json]\n"
    "       cbt bitmap --socket PATH NAME (--add [-g SIZE] [--disabled] [--transient] |\n"
    "       --remove | --clear | --enable | --disable | --merge SRC | --persistent |\n"
    "       --transient)... [--output=json]";
constexpr char kDescription[] =
    "Changes bitmap NAME of the qcow2 file FILE, as 'qemu-img bitmap' does.\n"
    "Several operations apply in the order given, atomically: if one fails,\n"
    "FILE is left exactly as it was. Example: --add --merge b0 creates NAME as a\n"
    "copy of b0. An inconsistent bitmap (see 'cbt info') only allows --remove.\n"
    "--socket PATH changes NAME in the filter serving the control socket PATH\n"
    "(cbt-control=PATH) while it runs, several operations as one transaction (all\n"
    "or nothing, atomic with respect to writes). Online a bitmap can also be\n"
    "transient (in memory only, gone at stop): --add --transient, or --transient /\n"
    "--persistent as operations. -b is offline only.";

Json BitmapJson(const qcow2::BitmapInfo& b) {
  std::vector<std::string> flags;
  if (b.in_use) flags.push_back("in-use");
  if (b.enabled) flags.push_back("auto");
  return {{"name", b.name},       {"granularity", b.granularity()}, {"flags", flags},
          {"enabled", b.enabled}, {"consistent", b.consistent},     {"persistent", true}};
}

}  // namespace

int RunBitmap(const std::vector<std::string>& args) {
  BitmapArgs a = ParseBitmapArgs(args);
  if (a.common.help) {
    std::cout << "Usage: " << kSynopsis << "\n\n" << kDescription << "\n\n" << a.help << std::flush;
    return kExitOk;
  }
  ApplyCommonOptions(a.common);
  if (!a.socket.empty()) {
    SetSocketExport(a.export_name);
    return RunBitmapSocket(a);
  }

  Result<OpenedImage> opened = OpenImage(a.file, /*writable=*/true);
  if (!opened.ok())
    return Fail(WithSocketHint(opened.status(), "bitmap --socket CTL " + a.name + " ..."));
  qcow2::Image& img = *opened->image;

  // -b naming FILE itself reads from the working set, like no -b at all
  // (and a second open would conflict with our own lock).
  std::optional<OpenedImage> source;
  if (!a.source_file.empty() && !SameFile(a.source_file, a.file)) {
    Result<OpenedImage> s = OpenImage(a.source_file, /*writable=*/false);
    if (!s.ok()) return Fail(s.status().WithContext("-b"));
    source = std::move(s).value();
  }

  BitmapEditor editor(img);
  for (const BitmapOp& op : a.ops) {
    spdlog::debug("{}: bitmap '{}': {}", a.file, a.name, OpName(op));
    Status s = editor.Apply(a.name, op, a.opts, source ? source->image.get() : nullptr);
    if (!s.ok()) {
      std::string prefix = a.ops.size() > 1 ? OpName(op) + ": " : std::string();
      std::string suffix = a.ops.size() > 1 ? " (nothing was changed)" : std::string();
      return Fail(prefix + s.message() + suffix);
    }
  }
  if (Status s = CommitChange(img, [&] { return editor.Commit(); }); !s.ok()) return Fail(s);

  Result<qcow2::BitmapInfo> now = img.Find(a.name);
  if (a.common.format() == OutputFormat::kJson) {
    Json ops = Json::array();
    for (const BitmapOp& op : a.ops) ops.push_back(OpName(op));
    PrintJson({{"filename", a.file},
               {"bitmap", a.name},
               {"operations", ops},
               {"result", now.ok() ? BitmapJson(*now) : Json()}});
  } else if (now.ok()) {
    std::cout << a.file << ": bitmap '" << a.name << "' " << OpsDone(a.ops) << ": granularity "
              << now->granularity() << ", " << (now->enabled ? "enabled" : "disabled") << "\n";
  } else {
    std::cout << a.file << ": bitmap '" << a.name << "' removed\n";
  }
  return kExitOk;
}

}  // namespace cbt::cli
