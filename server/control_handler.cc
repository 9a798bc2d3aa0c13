#include "server/control_handler.h"

#include <algorithm>

namespace cbt::control {

using nlohmann::json;

namespace {

// One edit action on the working set.
Status ApplyAction(BitmapEditSet& set, Command c, const ActionArgs& args) {
  switch (c) {
    case Command::kBitmapAdd: {
      const auto& a = std::get<BitmapAddArgs>(args);
      return set.Add(a.name, a.granularity, a.persistent, a.disabled);
    }
    case Command::kBitmapRemove:
      return set.Remove(std::get<NameArgs>(args).name);
    case Command::kBitmapClear:
      return set.Clear(std::get<NameArgs>(args).name);
    case Command::kBitmapEnable:
      return set.SetRecording(std::get<NameArgs>(args).name, true);
    case Command::kBitmapDisable:
      return set.SetRecording(std::get<NameArgs>(args).name, false);
    case Command::kBitmapMerge: {
      const auto& a = std::get<MergeArgs>(args);
      return set.Merge(a.target, a.sources);
    }
    case Command::kBitmapCopy: {
      const auto& a = std::get<CopyArgs>(args);
      return set.Copy(a.source, a.target);
    }
    case Command::kBitmapRename: {
      const auto& a = std::get<RenameArgs>(args);
      return set.Rename(a.name, a.new_name);
    }
    case Command::kBitmapSetPersistent: {
      const auto& a = std::get<SetPersistentArgs>(args);
      return set.SetPersistent(a.name, a.persistent);
    }
    case Command::kCheckpoint: {
      const auto& a = std::get<CheckpointArgs>(args);
      return set.Checkpoint(a.freeze, a.new_name);
    }
    default:
      return Status::InvalidArgument("internal: not an edit command");
  }
}

// The request's arguments as one action (every edit command's Arguments
// alternative is also an ActionArgs alternative).
ActionArgs AsAction(const Arguments& args) {
  return std::visit(
      [](const auto& v) -> ActionArgs {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_constructible_v<ActionArgs, T>)
          return v;
        else
          return NameArgs{};
      },
      args);
}

}  // namespace

json TrackerHandler::QueryBitmaps() const {
  json list = json::array();
  const bool attached = attached_.load();
  if (attached) {
    for (const BitmapStatus& b : tracker_.QueryBitmaps())
      list.push_back({{"name", b.name},
                      {"granularity", b.granularity},
                      {"recording", b.recording},
                      {"persistent", b.persistent},
                      {"in-use", b.in_use},
                      {"consistent", b.consistent},
                      {"dirty-bytes", b.dirty_bytes ? json(*b.dirty_bytes) : json()}});
  }
  return {{"attached", attached},
          {"disk-size", attached ? tracker_.disk_size() : 0},
          {"container", tracker_.container_path()},
          {"cluster-size", tracker_.cluster_size()},
          {"bitmaps", std::move(list)}};
}

json TrackerHandler::QueryStats() const {
  const TrackerStats s = tracker_.stats();
  return {{"attached", attached_.load()},
          {"persists", s.persists},
          {"bytes-written", s.bytes_written},
          {"in-use-sets", s.in_use_sets},
          {"intent-writes", s.intent_writes},
          {"recovered-granules", s.recovered_granules},
          {"edits", s.edits},
          {"longest-drain-us", s.longest_drain_us},
          {"pending-bytes", attached_.load() ? tracker_.PendingBytes() : 0},
          {"changes-in-flight", tracker_.ChangesInFlight()}};
}

Result<json> TrackerHandler::QueryExtents(const ExtentsArgs& a) const {
  if (!attached_.load() && tracker_.serving_read_only())
    return Status::InvalidArgument(
        "this server serves the disk read-only (nbdkit -r or cbt serve -r, or a disk it cannot "
        "write), so it loads no bitmaps: read the stored one, which it never changes, with "
        "'cbt map -U " +
            tracker_.container_path() + " --bitmap " + a.name + "'",
        EROFS);
  if (!attached_.load())
    return Status::Busy(
        "no bitmaps loaded yet: they are loaded when the first writable client "
        "connects");
  std::shared_ptr<const BitmapSet> set = tracker_.Snapshot();
  const LiveBitmap* b = set->Find(a.name);
  if (!b) return Status::NotFound("bitmap '" + a.name + "' not found");
  if (!b->bits)
    return Status::InvalidArgument("bitmap '" + a.name +
                                   "' is inconsistent (marked in use: it may miss changes, so "
                                   "its contents cannot be trusted); see cbt recover");
  const uint64_t size = tracker_.disk_size();
  if (a.offset > size)
    return Status::InvalidArgument("offset " + std::to_string(a.offset) +
                                   " is past the end of the disk (" + std::to_string(size) +
                                   " bytes)");
  const uint64_t len = std::min(a.length.value_or(size - a.offset), size - a.offset);
  json extents = json::array();
  std::optional<uint64_t> next;
  b->bits->ForEachExtent(a.offset, len, [&](const Extent& e) {
    if (extents.size() == kMaxExtentsPerReply) {
      next = e.offset;
      return false;
    }
    extents.push_back({{"start", e.offset}, {"length", e.length}, {"dirty", e.dirty}});
    return true;
  });
  return json{{"name", a.name},
              {"granularity", uint64_t{1} << b->granularity_bits},
              {"disk-size", size},
              {"extents", std::move(extents)},
              {"next", next ? json(*next) : json()}};
}

json TrackerHandler::BackupJson(const BackupStatus& st) const {
  json j = {{"active", st.active}, {"id", st.id}};
  // Where the export is, also without a session (a client may need to
  // connect first: the bitmaps load when the first writable client does).
  j["export"] = backup_.export_name;
  j["nbd-sockets"] = backup_.sockets ? backup_.sockets() : std::vector<std::string>{};
  if (st.id == 0) return j;
  j["frozen"] = st.frozen.empty() ? json() : json(st.frozen);
  j["new"] = st.new_name;
  j["disk-size"] = st.disk_size;
  j["block-size"] = st.block_size;
  j["broken"] = st.broken ? json(*st.broken) : json();
  j["copied-blocks"] = st.stats.copied_blocks;
  j["zero-blocks"] = st.stats.zero_blocks;
  j["stored-bytes"] = st.stats.stored_bytes;
  j["view-reads"] = st.stats.view_reads;
  j["write-waits"] = st.stats.write_waits;
  if (st.endpoint)
    j["endpoint"] = {{"pid", st.endpoint->pid},
                     {"uri", st.endpoint->uri},
                     {"socket", st.endpoint->socket},
                     {"carrier", st.endpoint->carrier},
                     {"context", st.endpoint->context}};
  else
    j["endpoint"] = json();
  return j;
}

Result<json> TrackerHandler::HandleBackup(const Request& request) {
  BackupManager* m = backup_.manager;
  if (!m) return Status::NotSupported("this server has no backup export");
  switch (request.command) {
    case Command::kQueryBackup:
      return BackupJson(m->Query());
    case Command::kBackupBegin: {
      const auto& a = std::get<BackupBeginArgs>(request.args);
      CBT_ASSIGN_OR_RETURN(BackupStatus st,
                           m->Begin({a.new_name, a.freeze, a.granularity}, drain_timeout_));
      return BackupJson(st);
    }
    case Command::kBackupEnd: {
      CBT_ASSIGN_OR_RETURN(BackupStatus st,
                           m->End(std::get<BackupEndArgs>(request.args).id, drain_timeout_));
      return BackupJson(st);
    }
    case Command::kBackupSetEndpoint: {
      const auto& a = std::get<EndpointArgs>(request.args);
      CBT_RETURN_IF_ERROR(m->SetEndpoint(a.id, {a.pid, a.uri, a.socket, a.carrier, a.context}));
      return json::object();
    }
    default:
      return Status::InvalidArgument("internal: not a backup command");
  }
}

Result<json> TrackerHandler::Handle(const Request& request) {
  switch (request.command) {
    case Command::kQueryExports:
      return Status::NotSupported("query-exports: answered by the server, not by one disk");
    case Command::kQueryBackup:
    case Command::kBackupBegin:
    case Command::kBackupEnd:
    case Command::kBackupSetEndpoint:
      return HandleBackup(request);
    case Command::kQueryBitmaps:
      return QueryBitmaps();
    case Command::kQueryStats:
      return QueryStats();
    case Command::kQueryBitmapExtents:
      return QueryExtents(std::get<ExtentsArgs>(request.args));
    case Command::kPersist:
      if (attached_.load()) {
        Status s = tracker_.Persist();
        if (!s.ok()) return s;
      }
      return json::object();
    case Command::kTransaction: {
      const auto& actions = std::get<TransactionArgs>(request.args).actions;
      Status s = tracker_.Edit(
          [&](BitmapEditSet& set) {
            for (size_t i = 0; i < actions.size(); ++i) {
              Status a = ApplyAction(set, actions[i].type, actions[i].args);
              if (!a.ok())
                return a.WithContext("action " + std::to_string(i) + " (" +
                                     std::string(CommandName(actions[i].type)) + ")");
            }
            return Status::OK();
          },
          drain_timeout_);
      if (!s.ok()) return s;
      return json::object();
    }
    default: {
      const ActionArgs action = AsAction(request.args);
      Status s = tracker_.Edit(
          [&](BitmapEditSet& set) { return ApplyAction(set, request.command, action); },
          drain_timeout_);
      if (!s.ok()) return s;
      return json::object();
    }
  }
}

Result<json> ExportRouter::Handle(const Request& request) {
  if (request.command == Command::kQueryExports) return json{{"exports", list_()}};
  CBT_ASSIGN_OR_RETURN(Handler * h, resolve_(request.export_name));
  return h->Handle(request);
}

}  // namespace cbt::control
