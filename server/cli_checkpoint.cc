// cbt checkpoint --socket PATH --freeze OLD --new NEW: in one atomic step of
// a running filter, stop OLD recording and start NEW (the control protocol's
// "checkpoint"). Every write acknowledged before is in OLD, every write sent
// after it returns is in NEW. Online only: offline, `cbt bitmap FILE NEW
// --add` and `cbt bitmap FILE OLD --disable` do the same, since nothing
// writes meanwhile.
#include <iostream>
#include <vector>

#include "server/cli_parse.h"
#include "server/cli_socket.h"
#include "server/size_parse.h"

namespace cbt::cli {

namespace {

constexpr char kSynopsis[] = "cbt checkpoint --socket PATH --freeze OLD --new NEW [--output=json]";
constexpr char kDescription[] =
    "In one atomic step of the filter serving the control socket PATH\n"
    "(nbdkit ... cbt-control=PATH), freezes bitmap OLD (it stops recording) and\n"
    "adds bitmap NEW, recording, with OLD's granularity and persistence: every\n"
    "write completed before is in OLD, every write started after it returns is in\n"
    "NEW. Back up what OLD says changed, then remove it. If either step cannot be\n"
    "done (OLD missing, NEW taken), nothing changes.";

}  // namespace

int RunCheckpoint(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string socket, freeze, new_name;
  po::options_description desc("Options");
  desc.add_options()("socket", po::value(&socket)->value_name("PATH"),
                     "the filter's control socket (cbt-control=PATH; required)")(
      "freeze", po::value(&freeze)->value_name("OLD"), "the bitmap to stop (required)")(
      "new", po::value(&new_name)->value_name("NEW"), "the bitmap to start (required)");
  AddExportOption(desc);
  if (ParseSocketCommand(args, desc, common, socket, "checkpoint", kSynopsis, kDescription,
                         [](const std::string&) {
                           return std::string(
                               "offline: 'cbt bitmap FILE OLD --disable', then 'cbt bitmap FILE "
                               "NEW --add'");
                         }))
    return kExitOk;
  if (freeze.empty()) throw UsageError("missing --freeze OLD");
  if (new_name.empty()) throw UsageError("missing --new NEW");
  if (freeze == new_name) throw UsageError("--freeze and --new name the same bitmap");

  Result<nlohmann::json> r =
      SocketCall(socket, "checkpoint", {{"freeze", freeze}, {"new", new_name}});
  if (!r.ok()) return Fail(r.status().message() + " (nothing was changed)");

  Result<LiveInfo> live = QueryLive(socket);
  if (!live.ok())
    Fail("warning: the checkpoint was made, but its result cannot be shown: " +
         live.status().message());
  const LiveBitmap* frozen = live.ok() ? live->Find(freeze) : nullptr;
  const LiveBitmap* started = live.ok() ? live->Find(new_name) : nullptr;
  if (common.format() == OutputFormat::kJson) {
    Json frozen_json = frozen ? LiveBitmapJson(*frozen) : Json();
    // What the backup that follows will read.
    if (frozen)
      frozen_json["dirty-bytes"] = frozen->dirty_bytes ? Json(*frozen->dirty_bytes) : Json();
    PrintJson({{"filename", live.ok() && live->container ? Json(*live->container) : Json()},
               {"frozen", std::move(frozen_json)},
               {"new", started ? LiveBitmapJson(*started) : Json()},
               {"socket", socket}});
    return kExitOk;
  }
  const std::string image =
      live.ok() && live->container ? *live->container : std::string("the filter");
  std::cout << image << ": checkpoint: bitmap '" << freeze << "' frozen";
  if (frozen && frozen->dirty_bytes)
    std::cout << " (" << HumanSize(*frozen->dirty_bytes) << " dirty)";
  std::cout << ", bitmap '" << new_name << "' recording";
  if (started) std::cout << " (granularity " << started->granularity << ")";
  std::cout << "\n";
  return kExitOk;
}

}  // namespace cbt::cli
