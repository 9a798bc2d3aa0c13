// cbt check FILE [-r leaks|all]: qcow2::Check with qemu-img check's exit
// codes: 0 clean, 1 cannot open (or check not completed), 2 corruption,
// 3 leaks only; its JSON keys mean what qemu-img check's mean.
#include <cstdio>
#include <iostream>

#include "qcow2/check.h"
#include "server/cli.h"
#include "server/guest_clusters.h"
#include "server/image_open.h"
#include "server/output.h"

namespace cbt::cli {

namespace {

constexpr char kSynopsis[] =
    "cbt check FILE [-r leaks|all | --repair] [-U] [-f qcow2] [--output=json]";
constexpr char kDescription[] =
    "Checks FILE's refcounts against every reference (header, refcount\n"
    "structures, L1/L2, bitmap directory, tables and data), as qemu-img check.\n"
    "Exit status: 0 clean, 1 FILE cannot be opened or the check not completed,\n"
    "2 corruption, 3 leaked clusters only. -r leaks frees leaked clusters.\n"
    "-r all (or --repair) also drops the bitmaps whose clusters cannot be\n"
    "trusted (shared, refcount 0, past the end of the file); either says what\n"
    "it did, and the exit status is then the repaired file's. Other corruption\n"
    "is reported, never 'fixed' by guessing. Without -r FILE is opened\n"
    "read-only; -U (--force-share) also reads a file a running server holds.";

}  // namespace

int RunCheck(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string file, mode;
  bool repair_all = false, force_share = false;
  po::options_description desc("Options");
  desc.add_options()(",r", po::value(&mode)->value_name("leaks|all"),
                     "repair: leaks frees leaked clusters; all also drops untrusted bitmaps")(
      "repair", po::bool_switch(&repair_all), "the same as -r all")(
      "force-share,U", po::bool_switch(&force_share),
      "read FILE even while another program holds it (not with -r)");
  if (ParseFileCommand(args, desc, common, file, kSynopsis, kDescription)) return kExitOk;
  if (!mode.empty() && mode != "leaks" && mode != "all")
    throw UsageError("-r " + mode + ": expecting 'leaks' or 'all'");
  if (repair_all && mode == "leaks") throw UsageError("--repair is -r all; give one of them");
  const bool repair = repair_all || !mode.empty();
  const bool leaks_only = mode == "leaks";
  if (repair && force_share)
    throw UsageError("-U/--force-share only reads; it cannot be combined with a repair");

  Result<OpenedImage> opened = OpenImage(
      file, repair ? Access::kRepair : (force_share ? Access::kForceShare : Access::kReadOnly));
  if (!opened.ok()) return Fail(opened.status());
  Result<qcow2::CheckReport> r = qcow2::Check(*opened->image, repair, leaks_only);
  if (!r.ok()) return Fail("check of " + file + " not completed: " + r.status().message());
  const qcow2::CheckReport& rep = *r;
  const int code = rep.ExitCode();
  Result<GuestClusters> guest = CountGuestClusters(*opened->image);
  if (!guest.ok()) return Fail("check of " + file + " not completed: " + guest.status().message());
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
               {"total-clusters", guest->total},
               {"allocated-clusters", guest->allocated},
               {"refcounted-clusters", rep.allocated_clusters},
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
                 "Run 'cbt check -r leaks "
              << file << "' to free them.\n";
  if (code == 0) std::cout << "No errors were found on the image.\n";
  for (const qcow2::UntrustedBitmap& u : rep.untrusted_bitmaps)
    std::cout << "Bitmap '" << u.name << "' cannot be trusted: " << u.reason << ".\n"
              << (repair && !leaks_only ? "It was not dropped (see above).\n"
                                        : "Run 'cbt check -r all " + file + "' to drop it.\n");
  for (const std::string& n : inconsistent)
    std::cout << "Bitmap '" << n << "' is inconsistent (left in use by an unclean stop): run 'cbt "
              << "recover " << file << " --bitmap " << n << "' (add --mark-all without cbt's "
              << "crash-safety record), or remove it.\n";
  // qemu-img check's line (without fragmentation figures), then ours.
  std::printf(
      "%llu/%llu = %.2f%% allocated clusters\n", static_cast<unsigned long long>(guest->allocated),
      static_cast<unsigned long long>(guest->total),
      guest->total
          ? 100.0 * static_cast<double>(guest->allocated) / static_cast<double>(guest->total)
          : 0.0);
  std::printf("%llu host clusters in use (non-zero refcount)\n",
              static_cast<unsigned long long>(rep.allocated_clusters));
  return code;
}

}  // namespace cbt::cli
