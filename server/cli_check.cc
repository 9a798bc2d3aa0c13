// cbt check FILE [--repair]: qcow2::Check with qemu-img check's exit codes:
// 0 clean, 1 cannot open (or check failed), 2 corruption, 3 leaks only.
#include <iostream>

#include "qcow2/check.h"
#include "server/cli.h"
#include "server/image_open.h"
#include "server/output.h"

namespace cbt::cli {

namespace {

constexpr char kSynopsis[] = "cbt check FILE [--repair] [--output=json]";
constexpr char kDescription[] =
    "Checks FILE's refcounts against every reference (header, refcount\n"
    "structures, L1/L2, bitmap directory, tables and data), as qemu-img check.\n"
    "Exit status: 0 clean, 1 FILE cannot be opened or checked, 2 corruption,\n"
    "3 leaked clusters only. --repair drops the bitmaps whose clusters cannot be\n"
    "trusted (shared, refcount 0, past the end of the file), frees leaked\n"
    "clusters and says what it did; the exit status is then the repaired file's.\n"
    "Other corruption is reported, never 'fixed' by guessing. Without --repair\n"
    "FILE is opened read-only.";

}  // namespace

int RunCheck(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string file;
  bool repair = false;
  po::options_description desc("Options");
  desc.add_options()("repair,r", po::bool_switch(&repair),
                     "drop untrusted bitmaps, free leaked clusters");
  if (ParseFileCommand(args, desc, common, file, kSynopsis, kDescription)) return kExitOk;

  Result<OpenedImage> opened = OpenImage(file, repair ? Access::kRepair : Access::kReadOnly);
  if (!opened.ok()) return Fail(opened.status());
  Result<qcow2::CheckReport> r = qcow2::Check(*opened->image, repair);
  if (!r.ok()) return Fail(r.status());
  const qcow2::CheckReport& rep = *r;
  const int code = rep.ExitCode();
  // Bitmaps left in use by an unclean stop: not an image error (qemu-img
  // check exits 0 too), but unusable until recovered or removed.
  std::vector<std::string> inconsistent;
  for (const qcow2::BitmapInfo& b : opened->image->Bitmaps())
    if (!b.consistent) inconsistent.push_back(b.name);

  if (common.format() == OutputFormat::kJson) {
    Json untrusted = Json::array();
    for (const qcow2::UntrustedBitmap& u : rep.untrusted_bitmaps)
      untrusted.push_back({{"name", u.name}, {"reason", u.reason}});
    PrintJson({{"filename", file},
               {"format", "qcow2"},
               {"check-errors", 0},
               {"corruptions", rep.corruptions},
               {"leaks", rep.leaks},
               {"corruptions-fixed", rep.corruptions_fixed},
               {"leaks-fixed", rep.leaks_fixed},
               {"dropped-bitmaps", rep.dropped_bitmaps},
               {"untrusted-bitmaps", untrusted},
               {"allocated-clusters", rep.allocated_clusters},
               {"messages", rep.messages},
               {"inconsistent-bitmaps", inconsistent},
               {"exit-code", code}});
    return code;
  }
  for (const std::string& m : rep.messages) std::cout << m << '\n';
  if (rep.leaks_fixed || rep.corruptions_fixed)
    std::cout << "The following inconsistencies were found and repaired:\n\n    " << rep.leaks_fixed
              << " leaked clusters\n    " << rep.corruptions_fixed << " corruptions\n\n";
  if (rep.corruptions)
    std::cout << rep.corruptions << " errors were found on the image.\n"
              << "Data may be corrupted, or further writes to the image may corrupt it.\n";
  if (rep.leaks)
    std::cout << rep.leaks
              << " leaked clusters were found on the image.\n"
                 "This means waste of disk space, but no harm to data.\n"
                 "Run 'cbt check --repair "
              << file << "' to free them.\n";
  if (code == 0) std::cout << "No errors were found on the image.\n";
  for (const qcow2::UntrustedBitmap& u : rep.untrusted_bitmaps)
    std::cout << "Bitmap '" << u.name << "' cannot be trusted: " << u.reason << ".\n"
              << (repair ? "It was not dropped (see above).\n"
                         : "Run 'cbt check --repair " + file + "' to drop it.\n");
  for (const std::string& n : inconsistent)
    std::cout << "Bitmap '" << n << "' is inconsistent (left in use by an unclean stop): run 'cbt "
              << "recover " << file << " --bitmap " << n << "' (add --mark-all without cbt's "
              << "crash-safety record), or remove it.\n";
  std::cout << rep.allocated_clusters << " clusters allocated\n";
  return code;
}

}  // namespace cbt::cli
