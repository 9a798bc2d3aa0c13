#include "server/control_handler.h"

namespace cbt::control {

using nlohmann::json;

json TrackerHandler::QueryBitmaps() const {
  json out = json::object();
  json list = json::array();
  const bool attached = attached_.load();
  if (attached) {
    const bool in_use = tracker_.InUseOnDisk();
    const auto& names = tracker_.enabled_bitmaps();
    for (size_t i = 0; i < names.size(); ++i) {
      const DirtyBitmap& b = tracker_.bitmap(i);
      list.push_back({{"name", names[i]},
                      {"granularity", b.granularity()},
                      {"recording", true},
                      {"persistent", true},
                      {"in-use", in_use},
                      {"dirty-bytes", b.DirtyBytes()}});
    }
  }
  out["attached"] = attached;
  out["bitmaps"] = std::move(list);
  return out;
}

json TrackerHandler::QueryStats() const {
  const TrackerStats s = tracker_.stats();
  return {{"attached", attached_.load()},     {"persists", s.persists},
          {"bytes-written", s.bytes_written}, {"in-use-sets", s.in_use_sets},
          {"intent-writes", s.intent_writes}, {"recovered-granules", s.recovered_granules}};
}

Result<json> TrackerHandler::Handle(const Request& request) {
  switch (request.command) {
    case Command::kQueryBitmaps:
      return QueryBitmaps();
    case Command::kQueryStats:
      return QueryStats();
    case Command::kPersist:
      if (attached_.load()) {
        Status s = tracker_.Persist();
        if (!s.ok()) return s;
      }
      return json::object();
    default:
      return Status::NotSupported("not implemented yet (issue 9)");
  }
}

}  // namespace cbt::control
