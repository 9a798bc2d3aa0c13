// cbt exports --socket PATH: the exports (disks) a running filter tracks,
// from the control protocol's query-exports (docs/control.md). Online only:
// a stored container tracks one disk, and `cbt info FILE` shows it.
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <vector>

#include "server/cli_parse.h"
#include "server/cli_socket.h"
#include "server/size_parse.h"

namespace cbt::cli {

namespace {

constexpr char kSynopsis[] = "cbt exports --socket PATH [--output=json]";
constexpr char kDescription[] =
    "Lists the exports (disks) that the filter serving the control socket PATH\n"
    "(nbdkit ... cbt-control=PATH) tracks now: each export's name, its container,\n"
    "whether it is attached for writing (a writable client has connected: its\n"
    "bitmaps record) or read-only, and the disk's size. A filter with a per-export\n"
    "template (cbt-file=...%e...) tracks an export from the first connection to\n"
    "it; name one with --export NAME in the other --socket subcommands. A filter\n"
    "with one container lists its one export once a client has connected.";

struct ExportRow {
  std::string name;
  std::string container;
  bool attached = false;
  bool read_only = false;
  uint64_t disk_size = 0;
};

Result<std::vector<ExportRow>> QueryExports(const std::string& socket) {
  CBT_ASSIGN_OR_RETURN(nlohmann::json r, SocketCall(socket, "query-exports"));
  const std::string where = "control socket '" + socket + "': query-exports: ";
  auto list = r.find("exports");
  if (list == r.end() || !list->is_array())
    return Status::IOError(where + "no \"exports\" list in the reply");
  std::vector<ExportRow> rows;
  for (const nlohmann::json& e : *list) {
    if (!e.is_object() || !e.contains("name") || !e["name"].is_string())
      return Status::IOError(where + "an export without a name in the reply");
    ExportRow row;
    row.name = e["name"].get<std::string>();
    if (auto it = e.find("container"); it != e.end() && it->is_string())
      row.container = it->get<std::string>();
    if (auto it = e.find("attached"); it != e.end() && it->is_boolean())
      row.attached = it->get<bool>();
    if (auto it = e.find("read-only"); it != e.end() && it->is_boolean())
      row.read_only = it->get<bool>();
    auto size = e.find("disk-size");
    if (size == e.end() || !size->is_number_unsigned())
      return Status::IOError(where + "export '" + row.name +
                             "': \"disk-size\" missing or not a number in the reply");
    row.disk_size = size->get<uint64_t>();
    rows.push_back(std::move(row));
  }
  return rows;
}

std::string State(const ExportRow& e) {
  return e.attached ? "attached" : e.read_only ? "read-only" : "not attached";
}

}  // namespace

int RunExports(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string socket;
  po::options_description desc("Options");
  desc.add_options()("socket", po::value(&socket)->value_name("PATH"),
                     "the filter's control socket (cbt-control=PATH; required)");
  if (ParseSocketCommand(args, desc, common, socket, "exports", kSynopsis, kDescription,
                         [](const std::string& file) {
                           return "a stored container tracks one disk: 'cbt info " + file + "'";
                         }))
    return kExitOk;

  Result<std::vector<ExportRow>> rows = QueryExports(socket);
  if (!rows.ok()) return Fail(rows.status());

  if (common.format() == OutputFormat::kJson) {
    Json list = Json::array();
    for (const ExportRow& e : *rows)
      list.push_back({{"name", e.name},
                      {"container", e.container},
                      {"attached", e.attached},
                      {"read-only", e.read_only},
                      {"disk-size", e.disk_size}});
    PrintJson({{"socket", socket}, {"exports", std::move(list)}});
    return kExitOk;
  }

  std::cout << "socket: " << socket << "\n";
  if (rows->empty()) {
    std::cout << "exports: none yet (an export is tracked from the first connection to it)\n";
    return kExitOk;
  }
  size_t w = 4;
  for (const ExportRow& e : *rows) w = std::max(w, std::min<size_t>(e.name.size(), 40));
  std::printf("exports:\n  %-*s  %12s  %-12s  %s\n", static_cast<int>(w), "NAME", "DISK SIZE",
              "STATE", "CONTAINER");
  for (const ExportRow& e : *rows)
    std::printf("  %-*s  %12s  %-12s  %s\n", static_cast<int>(w),
                e.name.empty() ? "\"\"" : e.name.c_str(), HumanSize(e.disk_size).c_str(),
                State(e).c_str(), e.container.c_str());
  return kExitOk;
}

}  // namespace cbt::cli
