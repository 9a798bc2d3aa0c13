// cbt info / map / bitmap --socket PATH: the subcommands over a running
// filter's control socket. Output has the offline shape (cli_info.cc,
// cli_map.cc, cli_bitmap.cc); see docs/cli.md.
#include "server/cli_socket.h"

#include <algorithm>
#include <cstdio>
#include <iostream>

#include "server/control_client.h"
#include "server/size_parse.h"

namespace cbt::cli {

namespace {

using nlohmann::json;

std::vector<std::string> Flags(const LiveBitmap& b) {
  std::vector<std::string> f;
  if (b.in_use) f.push_back("in-use");
  if (b.recording) f.push_back("auto");
  return f;
}

// A field of a reply, checked: `what` names it in the error.
Result<uint64_t> U64(const json& j, const char* key, const std::string& socket, const char* what) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_number_unsigned())
    return Status::IOError("control socket '" + socket + "': " + what + ": \"" + key +
                           "\" missing or not a number in the reply");
  return it->get<uint64_t>();
}

bool BoolOr(const json& j, const char* key, bool dflt) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : dflt;
}

}  // namespace

const LiveBitmap* LiveInfo::Find(const std::string& name) const {
  for (const LiveBitmap& b : bitmaps)
    if (b.name == name) return &b;
  return nullptr;
}

namespace {
std::string socket_export;  // --export NAME (one command line per process)
}  // namespace

void AddExportOption(po::options_description& desc) {
  desc.add_options()("export", po::value(&socket_export)->value_name("NAME"),
                     "with --socket: the export (disk) addressed, when the filter tracks "
                     "several (cbt-file=...%e...)");
}

const std::string& SocketExport() {
  return socket_export;
}
void SetSocketExport(std::string name) {
  socket_export = std::move(name);
}

Result<json> SocketCall(const std::string& socket, std::string_view command,
                        const json& arguments) {
  control::ClientOptions opt;
  opt.export_name = socket_export;
  Result<json> r = control::Call(socket, command, arguments, opt);
  if (r.ok()) {
    if (!r->is_object())
      return Status::IOError("control socket '" + socket + "': " + std::string(command) +
                             ": the reply's \"return\" is not an object");
    return r;
  }
  const Status& s = r.status();
  const std::string where = "control socket '" + socket + "': ";
  // The filter's hint about its exports names this command with a
  // placeholder for the socket ("... with query-exports (cbt exports
  // --socket SOCKET)"): name the command with the socket instead.
  if (const size_t at = s.message().rfind("; list the tracked exports"); at != std::string::npos) {
    std::string m = s.message().substr(0, at) +
                    "; list the tracked exports with 'cbt exports --socket " + socket + "'";
    return s.IsNotFound() ? Status::NotFound(std::move(m), s.err())
                          : Status::InvalidArgument(std::move(m), s.err());
  }
  if (s.IsNotSupported())
    return Status::NotSupported(where + std::string(command) + ": " + s.message());
  if (s.IsInvalidArgument() && s.message().rfind("execute: unknown command", 0) == 0)
    return Status::NotSupported(where + "the filter does not know '" + std::string(command) +
                                "' (older than this cbt?): " + s.message());
  if (s.IsNotFound() && s.err() == ENOENT && command.rfind("backup-", 0) != 0 &&
      s.message().find("cbt-control=") == std::string::npos &&
      s.message().rfind("no export is tracked", 0) != 0) {
    // The filter's hint names its protocol ("; list the bitmaps with
    // query-bitmaps"): name the command instead.
    std::string m = s.message().substr(0, s.message().find("; list"));
    return Status::NotFound(m + "; list bitmaps with 'cbt info --socket " + socket + "'");
  }
  return s;
}

Result<LiveInfo> QueryLive(const std::string& socket) {
  CBT_ASSIGN_OR_RETURN(json r, SocketCall(socket, "query-bitmaps"));
  LiveInfo info;
  info.attached = BoolOr(r, "attached", false);
  // Before attach the filter sends 0 for sizes it does not know yet.
  if (auto it = r.find("disk-size"); it != r.end() && it->is_number_unsigned() && info.attached)
    info.disk_size = it->get<uint64_t>();
  if (auto it = r.find("container"); it != r.end() && it->is_string() && !it->empty())
    info.container = it->get<std::string>();
  if (auto it = r.find("cluster-size"); it != r.end() && it->is_number_unsigned() && *it != 0)
    info.cluster_size = it->get<uint64_t>();
  auto list = r.find("bitmaps");
  if (list == r.end() || !list->is_array())
    return Status::IOError("control socket '" + socket +
                           "': query-bitmaps: no \"bitmaps\" list in the reply");
  for (const json& b : *list) {
    if (!b.is_object() || !b.contains("name") || !b["name"].is_string())
      return Status::IOError("control socket '" + socket +
                             "': query-bitmaps: a bitmap without a name in the reply");
    LiveBitmap lb;
    lb.name = b["name"].get<std::string>();
    CBT_ASSIGN_OR_RETURN(lb.granularity, U64(b, "granularity", socket, "query-bitmaps"));
    lb.recording = BoolOr(b, "recording", false);
    lb.persistent = BoolOr(b, "persistent", true);
    lb.in_use = BoolOr(b, "in-use", false);
    lb.consistent = BoolOr(b, "consistent", true);
    if (auto it = b.find("dirty-bytes"); it != b.end() && it->is_number_unsigned())
      lb.dirty_bytes = it->get<uint64_t>();
    info.bitmaps.push_back(std::move(lb));
  }
  return info;
}

Json LiveBitmapJson(const LiveBitmap& b) {
  return {{"name", b.name},         {"granularity", b.granularity}, {"flags", Flags(b)},
          {"enabled", b.recording}, {"consistent", b.consistent},   {"persistent", b.persistent}};
}

int RunInfoSocket(const std::string& socket, const CommonOptions& common) {
  Result<LiveInfo> live = QueryLive(socket);
  if (!live.ok()) return Fail(live.status());
  const LiveInfo& info = *live;
  const std::string image = info.container.value_or("");

  if (common.format() == OutputFormat::kJson) {
    Json bitmaps = Json::array();
    for (const LiveBitmap& b : info.bitmaps) {
      bitmaps.push_back({{"name", b.name},
                         {"granularity", b.granularity},
                         {"flags", Flags(b)},
                         {"in-use", b.in_use},
                         {"enabled", b.recording},
                         {"consistent", b.consistent},
                         {"dirty-bytes", b.dirty_bytes ? Json(*b.dirty_bytes) : Json()},
                         {"persistent", b.persistent}});
    }
    PrintJson({{"filename", info.container ? Json(image) : Json()},
               {"format", "qcow2"},
               {"virtual-size", info.disk_size ? Json(*info.disk_size) : Json()},
               {"cluster-size", info.cluster_size ? Json(*info.cluster_size) : Json()},
               {"data-file", Json()},
               {"bitmaps", bitmaps},
               {"socket", socket},
               {"attached", info.attached}});
    return kExitOk;
  }

  std::cout << "socket: " << socket << "\n"
            << "image: " << (info.container ? image : "unknown (not reported by the filter)")
            << "\n";
  if (!info.attached)
    std::cout << "virtual size: unknown until a writable client connects (the filter opens its "
                 "bitmaps then)\n";
  else if (!info.disk_size)
    std::cout << "virtual size: unknown (not reported by the filter)\n";
  else
    std::cout << "virtual size: " << HumanSize(*info.disk_size) << " (" << *info.disk_size
              << " bytes)\n";
  std::cout << "cluster size: "
            << (info.cluster_size ? std::to_string(*info.cluster_size) : std::string("unknown"))
            << "\n"
            << "data file: unknown (not reported over the socket)\n";
  if (info.bitmaps.empty()) {
    std::cout << (info.attached ? "bitmaps: none\n" : "bitmaps: none yet\n");
    return kExitOk;
  }
  size_t w = 4;
  for (const LiveBitmap& b : info.bitmaps) w = std::max(w, std::min<size_t>(b.name.size(), 40));
  std::printf("bitmaps:\n  %-*s  %12s  %-12s  %14s  %s\n", static_cast<int>(w), "NAME",
              "GRANULARITY", "FLAGS", "DIRTY", "STATE");
  for (const LiveBitmap& b : info.bitmaps) {
    std::string flags;
    for (const auto& f : Flags(b)) flags += (flags.empty() ? "" : ",") + f;
    if (flags.empty()) flags = "-";
    const std::string dirty = b.dirty_bytes ? HumanSize(*b.dirty_bytes) : "?";
    std::string state = !b.consistent ? "inconsistent (see cbt recover)"
                        : b.recording ? "enabled"
                                      : "disabled";
    if (!b.persistent) state += ", transient";
    std::printf("  %-*s  %12llu  %-12s  %14s  %s\n", static_cast<int>(w), b.name.c_str(),
                static_cast<unsigned long long>(b.granularity), flags.c_str(), dirty.c_str(),
                state.c_str());
  }
  return kExitOk;
}

Result<std::vector<Extent>> FetchExtents(const std::string& socket, const std::string& bitmap,
                                         uint64_t offset, std::optional<uint64_t> length) {
  // Pages of at most 65536 extents; each asks again from the last "next".
  // Extents are checked to follow on from each other and merged across page
  // boundaries, so the list has the offline shape.
  std::vector<Extent> extents;
  uint64_t at = offset;
  std::optional<uint64_t> end;
  if (length) end = *length > UINT64_MAX - offset ? UINT64_MAX : offset + *length;
  const std::string where = "control socket '" + socket + "': query-bitmap-extents";
  for (;;) {
    json args = {{"name", bitmap}, {"offset", at}};
    if (end) args["length"] = *end - at;
    Result<json> r = SocketCall(socket, "query-bitmap-extents", args);
    if (!r.ok()) return r.status();
    auto list = r->find("extents");
    if (list == r->end() || !list->is_array())
      return Status::IOError(where + ": no \"extents\" list in the reply");
    for (const json& e : *list) {
      Result<uint64_t> start = U64(e, "start", socket, "query-bitmap-extents");
      if (!start.ok()) return start.status();
      Result<uint64_t> len = U64(e, "length", socket, "query-bitmap-extents");
      if (!len.ok()) return len.status();
      auto dirty = e.find("dirty");
      if (dirty == e.end() || !dirty->is_boolean())
        return Status::IOError(where + ": an extent without \"dirty\" in the reply");
      if (*start != at || *len == 0 || *len > UINT64_MAX - at)
        return Status::IOError(where + ": extent at " + std::to_string(*start) + " (length " +
                               std::to_string(*len) + ") does not follow on from " +
                               std::to_string(at));
      if (!extents.empty() && extents.back().dirty == dirty->get<bool>())
        extents.back().length += *len;
      else
        extents.push_back({*start, *len, dirty->get<bool>()});
      at += *len;
    }
    auto next = r->find("next");
    if (next == r->end() || next->is_null()) break;
    if (!next->is_number_unsigned() || next->get<uint64_t>() != at || list->empty())
      return Status::IOError(where + ": \"next\" " + next->dump() + " does not continue from " +
                             std::to_string(at));
    if (end && at >= *end) break;
  }

  return extents;
}

int RunMapSocket(const std::string& socket, const CommonOptions& common, const std::string& bitmap,
                 uint64_t offset, std::optional<uint64_t> length) {
  Result<std::vector<Extent>> extents = FetchExtents(socket, bitmap, offset, length);
  if (!extents.ok()) return Fail(extents.status());
  uint64_t covered = 0;
  for (const Extent& e : *extents) covered += e.length;
  PrintExtents(*extents, offset, covered, common.format());
  return kExitOk;
}

json BitmapRequest(const BitmapArgs& a, std::string& command) {
  json actions = json::array();
  for (const BitmapOp& op : a.ops) {
    json data = {{"name", a.name}};
    std::string type;
    switch (op.kind) {
      case OpKind::kAdd:
        type = "bitmap-add";
        if (a.opts.granularity) data["granularity"] = *a.opts.granularity;
        if (a.opts.add_transient) data["persistent"] = false;
        if (a.opts.add_disabled) data["disabled"] = true;
        break;
      case OpKind::kRemove:
        type = "bitmap-remove";
        break;
      case OpKind::kClear:
        type = "bitmap-clear";
        break;
      case OpKind::kEnable:
        type = "bitmap-enable";
        break;
      case OpKind::kDisable:
        type = "bitmap-disable";
        break;
      case OpKind::kMerge:
        type = "bitmap-merge";
        data = {{"target", a.name}, {"sources", json::array({op.source})}};
        break;
      case OpKind::kPersistent:
      case OpKind::kTransient:
        type = "bitmap-set-persistent";
        data["persistent"] = op.kind == OpKind::kPersistent;
        break;
    }
    actions.push_back({{"type", type}, {"data", std::move(data)}});
  }
  if (actions.size() == 1) {
    command = actions[0]["type"].get<std::string>();
    return std::move(actions[0]["data"]);
  }
  command = "transaction";
  return {{"actions", std::move(actions)}};
}

int RunBitmapSocket(const BitmapArgs& a) {
  std::string command;
  const json args = BitmapRequest(a, command);
  Result<json> r = SocketCall(a.socket, command, args);
  if (!r.ok()) {
    if (a.ops.size() == 1) return Fail(r.status());
    // The server names the failed action of the transaction by its index
    // ("action 1 (bitmap-merge): ..."); the user wrote options: name that.
    std::string msg = r.status().message();
    size_t n = 0, used = 0;
    if (msg.rfind("action ", 0) == 0 &&
        std::sscanf(msg.c_str(), "action %zu (%*[^)]): %zn", &n, &used) >= 1 && used > 0 &&
        n < a.ops.size())
      msg = OpName(a.ops[n]) + ": " + msg.substr(used);
    return Fail(msg + " (nothing was changed)");
  }
  // The change is made; what follows only reports it.
  Result<LiveInfo> live = QueryLive(a.socket);
  if (!live.ok())
    Fail("warning: the change was made, but its result cannot be shown: " +
         live.status().message());
  const LiveBitmap* now = live.ok() ? live->Find(a.name) : nullptr;
  const std::string image =
      live.ok() && live->container ? *live->container : std::string("the filter");

  if (a.common.format() == OutputFormat::kJson) {
    Json ops = Json::array();
    for (const BitmapOp& op : a.ops)
      ops.push_back(op.kind == OpKind::kAdd && a.opts.add_transient ? "--add --transient"
                                                                    : OpName(op));
    PrintJson({{"filename", live.ok() && live->container ? Json(*live->container) : Json()},
               {"bitmap", a.name},
               {"operations", ops},
               {"result", now ? LiveBitmapJson(*now) : Json()},
               {"socket", a.socket}});
  } else if (now) {
    std::cout << image << ": bitmap '" << a.name << "' " << OpsDone(a.ops) << ": granularity "
              << now->granularity << ", " << (now->recording ? "enabled" : "disabled")
              << (now->persistent ? "" : ", transient") << "\n";
  } else if (live.ok()) {
    std::cout << image << ": bitmap '" << a.name << "' removed\n";
  }
  return kExitOk;
}

}  // namespace cbt::cli
