#include "server/control_protocol.h"

#include <array>
#include <bit>
#include <exception>
#include <set>
#include <utility>

namespace cbt::control {
namespace {

using json = nlohmann::json;

constexpr std::array<std::pair<Command, std::string_view>, 20> kNames{{
    {Command::kQueryBitmaps, "query-bitmaps"},
    {Command::kQueryStats, "query-stats"},
    {Command::kQueryBitmapExtents, "query-bitmap-extents"},
    {Command::kBitmapAdd, "bitmap-add"},
    {Command::kBitmapRemove, "bitmap-remove"},
    {Command::kBitmapClear, "bitmap-clear"},
    {Command::kBitmapEnable, "bitmap-enable"},
    {Command::kBitmapDisable, "bitmap-disable"},
    {Command::kBitmapMerge, "bitmap-merge"},
    {Command::kBitmapCopy, "bitmap-copy"},
    {Command::kBitmapRename, "bitmap-rename"},
    {Command::kBitmapSetPersistent, "bitmap-set-persistent"},
    {Command::kPersist, "persist"},
    {Command::kTransaction, "transaction"},
    {Command::kCheckpoint, "checkpoint"},
    {Command::kBackupBegin, "backup-begin"},
    {Command::kBackupEnd, "backup-end"},
    {Command::kQueryBackup, "query-backup"},
    {Command::kBackupSetEndpoint, "backup-set-endpoint"},
    {Command::kQueryExports, "query-exports"},
}};

// A SAX pass before building the DOM: nlohmann's SAX parser is iterative, so
// this refuses deep nesting without recursion, and it refuses duplicate keys,
// which the DOM parser would silently resolve to the last one.
class Precheck {
 public:
  using number_integer_t = json::number_integer_t;
  using number_unsigned_t = json::number_unsigned_t;
  using number_float_t = json::number_float_t;
  using string_t = json::string_t;
  using binary_t = json::binary_t;

  bool null() { return true; }
  bool boolean(bool) { return true; }
  bool number_integer(number_integer_t) { return true; }
  bool number_unsigned(number_unsigned_t) { return true; }
  bool number_float(number_float_t, const string_t&) { return true; }
  bool string(string_t&) { return true; }
  bool binary(binary_t&) { return true; }
  bool start_object(size_t) { return Push(); }
  bool start_array(size_t) { return Push(); }
  bool end_object() { return Pop(); }
  bool end_array() { return Pop(); }
  bool key(string_t& k) {
    if (!keys_.back().insert(k).second) {
      error = "duplicate key '" + k + "'";
      return false;
    }
    return true;
  }
  bool parse_error(size_t pos, const std::string&, const nlohmann::detail::exception&) {
    error = "not valid JSON (at byte " + std::to_string(pos) + ")";
    return false;
  }

  std::string error;

 private:
  // Arrays get an (unused) key set too: one stack gives the depth.
  bool Push() {
    if (keys_.size() >= static_cast<size_t>(kMaxDepth)) {
      error = "nested deeper than " + std::to_string(kMaxDepth) + " levels";
      return false;
    }
    keys_.emplace_back();
    return true;
  }
  bool Pop() {
    keys_.pop_back();
    return true;
  }
  std::vector<std::set<std::string>> keys_;
};

Status Bad(std::string_view field, std::string_view what) {
  return Status::InvalidArgument(std::string(field) + ": " + std::string(what));
}

// Checks that `obj` has only `allowed` keys; `where` prefixes field names.
Status OnlyKeys(const json& obj, std::string_view where,
                std::initializer_list<std::string_view> allowed) {
  for (const auto& [k, v] : obj.items()) {
    bool known = false;
    for (auto a : allowed) known = known || k == a;
    if (!known) return Bad(std::string(where) + k, "unknown key");
  }
  return Status::OK();
}

Result<std::string> Name(const json& obj, std::string_view where, const char* key) {
  std::string field = std::string(where) + key;
  auto it = obj.find(key);
  if (it == obj.end()) return Bad(field, "missing");
  if (!it->is_string()) return Bad(field, "must be a string");
  const std::string& s = it->get_ref<const std::string&>();
  if (s.empty()) return Bad(field, "must not be empty");
  if (s.size() > kMaxNameBytes)
    return Bad(field, "longer than " + std::to_string(kMaxNameBytes) + " bytes");
  if (s.find('\0') != std::string::npos) return Bad(field, "contains a NUL byte");
  return s;
}

// An optional boolean; absent: `def`.
Result<bool> Bool(const json& obj, std::string_view where, const char* key, bool def,
                  bool required = false) {
  auto it = obj.find(key);
  if (it == obj.end()) {
    if (required) return Bad(std::string(where) + key, "missing");
    return def;
  }
  if (!it->is_boolean()) return Bad(std::string(where) + key, "must be true or false");
  return it->get<bool>();
}

// An optional bitmap granularity.
Result<std::optional<uint64_t>> Granularity(const json& a, std::string_view w) {
  auto it = a.find("granularity");
  if (it == a.end()) return std::optional<uint64_t>{};
  std::string f = std::string(w) + "granularity";
  if (!it->is_number_unsigned()) return Bad(f, "must be a non-negative integer");
  uint64_t g = it->get<uint64_t>();
  if (g < kMinGranularity || g > kMaxGranularity || !std::has_single_bit(g))
    return Bad(f, "must be a power of two from 512 to 2147483648, got " + std::to_string(g));
  return std::optional<uint64_t>{g};
}

// A string of at most kMaxPathBytes, no NUL; absent: empty.
Result<std::string> Text(const json& obj, std::string_view where, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end()) return std::string();
  std::string field = std::string(where) + key;
  if (!it->is_string()) return Bad(field, "must be a string");
  const std::string& s = it->get_ref<const std::string&>();
  if (s.size() > kMaxPathBytes)
    return Bad(field, "longer than " + std::to_string(kMaxPathBytes) + " bytes");
  if (s.find('\0') != std::string::npos) return Bad(field, "contains a NUL byte");
  return s;
}

Result<BitmapAddArgs> ParseAdd(const json& a, std::string_view w) {
  CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {"name", "granularity", "persistent", "disabled"}));
  BitmapAddArgs r;
  CBT_ASSIGN_OR_RETURN(r.name, Name(a, w, "name"));
  CBT_ASSIGN_OR_RETURN(r.granularity, Granularity(a, w));
  CBT_ASSIGN_OR_RETURN(r.persistent, Bool(a, w, "persistent", true));
  CBT_ASSIGN_OR_RETURN(r.disabled, Bool(a, w, "disabled", false));
  return r;
}

// An optional non-negative integer.
Result<std::optional<uint64_t>> Uint(const json& obj, std::string_view where, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end()) return std::optional<uint64_t>{};
  if (!it->is_number_unsigned())
    return Bad(std::string(where) + key, "must be a non-negative integer");
  return std::optional<uint64_t>{it->get<uint64_t>()};
}

Result<ExtentsArgs> ParseExtents(const json& a, std::string_view w) {
  CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {"name", "offset", "length"}));
  ExtentsArgs r;
  CBT_ASSIGN_OR_RETURN(r.name, Name(a, w, "name"));
  CBT_ASSIGN_OR_RETURN(std::optional<uint64_t> off, Uint(a, w, "offset"));
  r.offset = off.value_or(0);
  CBT_ASSIGN_OR_RETURN(r.length, Uint(a, w, "length"));
  return r;
}

Result<MergeArgs> ParseMerge(const json& a, std::string_view w) {
  CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {"target", "sources"}));
  MergeArgs r;
  CBT_ASSIGN_OR_RETURN(r.target, Name(a, w, "target"));
  std::string f = std::string(w) + "sources";
  auto it = a.find("sources");
  if (it == a.end()) return Bad(f, "missing");
  if (!it->is_array()) return Bad(f, "must be a list of bitmap names");
  if (it->empty() || it->size() > kMaxMergeSources)
    return Bad(f, "must name 1 to " + std::to_string(kMaxMergeSources) + " bitmaps");
  std::set<std::string> seen;
  for (size_t i = 0; i < it->size(); ++i) {
    // Reuse Name() on a one-key object so the rules and messages match.
    json one = {{"s", (*it)[i]}};
    std::string fi = f + "[" + std::to_string(i) + "]";
    auto n = Name(one, "", "s");
    if (!n.ok()) return Bad(fi, n.status().message().substr(3));
    if (!seen.insert(*n).second) return Bad(fi, "'" + *n + "' named twice");
    r.sources.push_back(std::move(*n));
  }
  return r;
}

// Parses the arguments of a command (or transaction action) `c`; `w` is the
// field prefix for messages ("arguments." or "arguments.actions[2].data.").
Result<Arguments> ParseArgs(Command c, const json& a, std::string_view w);

Result<TransactionArgs> ParseTransaction(const json& a, std::string_view w) {
  CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {"actions"}));
  std::string f = std::string(w) + "actions";
  auto it = a.find("actions");
  if (it == a.end()) return Bad(f, "missing");
  if (!it->is_array()) return Bad(f, "must be a list of actions");
  if (it->empty() || it->size() > kMaxTransactionActions)
    return Bad(f, "must hold 1 to " + std::to_string(kMaxTransactionActions) + " actions");
  TransactionArgs r;
  for (size_t i = 0; i < it->size(); ++i) {
    const json& act = (*it)[i];
    std::string p = f + "[" + std::to_string(i) + "].";
    if (!act.is_object()) return Bad(p.substr(0, p.size() - 1), "must be an object");
    CBT_RETURN_IF_ERROR(OnlyKeys(act, p, {"type", "data"}));
    auto t = act.find("type");
    if (t == act.end()) return Bad(p + "type", "missing");
    if (!t->is_string()) return Bad(p + "type", "must be a string");
    auto c = CommandFromName(t->get_ref<const std::string&>());
    if (!c) return Bad(p + "type", "unknown action '" + t->get<std::string>() + "'");
    if (!AllowedInTransaction(*c))
      return Bad(p + "type", "'" + t->get<std::string>() + "' is not allowed in a transaction");
    auto d = act.find("data");
    if (d == act.end()) return Bad(p + "data", "missing");
    if (!d->is_object()) return Bad(p + "data", "must be an object");
    CBT_ASSIGN_OR_RETURN(Arguments args, ParseArgs(*c, *d, p + "data."));
    Action out{*c, {}};
    std::visit(
        [&](auto&& v) {
          using T = std::decay_t<decltype(v)>;
          if constexpr (std::is_constructible_v<ActionArgs, T>) out.args = std::move(v);
        },
        args);
    r.actions.push_back(std::move(out));
  }
  return r;
}

Result<Arguments> ParseArgs(Command c, const json& a, std::string_view w) {
  switch (c) {
    case Command::kQueryBitmaps:
    case Command::kQueryStats:
    case Command::kPersist:
    case Command::kQueryExports:
      CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {}));
      return Arguments{NoArgs{}};
    case Command::kQueryBitmapExtents: {
      CBT_ASSIGN_OR_RETURN(auto r, ParseExtents(a, w));
      return Arguments{std::move(r)};
    }
    case Command::kBitmapAdd: {
      CBT_ASSIGN_OR_RETURN(auto r, ParseAdd(a, w));
      return Arguments{std::move(r)};
    }
    case Command::kBitmapRemove:
    case Command::kBitmapClear:
    case Command::kBitmapEnable:
    case Command::kBitmapDisable: {
      CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {"name"}));
      CBT_ASSIGN_OR_RETURN(auto n, Name(a, w, "name"));
      return Arguments{NameArgs{std::move(n)}};
    }
    case Command::kBitmapMerge: {
      CBT_ASSIGN_OR_RETURN(auto r, ParseMerge(a, w));
      return Arguments{std::move(r)};
    }
    case Command::kBitmapCopy: {
      CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {"source", "target"}));
      CopyArgs r;
      CBT_ASSIGN_OR_RETURN(r.source, Name(a, w, "source"));
      CBT_ASSIGN_OR_RETURN(r.target, Name(a, w, "target"));
      if (r.source == r.target) return Bad(std::string(w) + "target", "same as source");
      return Arguments{std::move(r)};
    }
    case Command::kBitmapRename: {
      CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {"name", "new-name"}));
      RenameArgs r;
      CBT_ASSIGN_OR_RETURN(r.name, Name(a, w, "name"));
      CBT_ASSIGN_OR_RETURN(r.new_name, Name(a, w, "new-name"));
      return Arguments{std::move(r)};
    }
    case Command::kBitmapSetPersistent: {
      CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {"name", "persistent"}));
      SetPersistentArgs r;
      CBT_ASSIGN_OR_RETURN(r.name, Name(a, w, "name"));
      CBT_ASSIGN_OR_RETURN(r.persistent, Bool(a, w, "persistent", true, /*required=*/true));
      return Arguments{std::move(r)};
    }
    case Command::kCheckpoint: {
      CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {"freeze", "new"}));
      CheckpointArgs r;
      CBT_ASSIGN_OR_RETURN(r.freeze, Name(a, w, "freeze"));
      CBT_ASSIGN_OR_RETURN(r.new_name, Name(a, w, "new"));
      if (r.freeze == r.new_name) return Bad(std::string(w) + "new", "same as freeze");
      return Arguments{std::move(r)};
    }
    case Command::kTransaction: {
      CBT_ASSIGN_OR_RETURN(auto r, ParseTransaction(a, w));
      return Arguments{std::move(r)};
    }
    case Command::kQueryBackup:
      CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {}));
      return Arguments{NoArgs{}};
    case Command::kBackupBegin: {
      CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {"new", "freeze", "granularity"}));
      BackupBeginArgs r;
      CBT_ASSIGN_OR_RETURN(r.new_name, Name(a, w, "new"));
      if (a.contains("freeze")) {
        CBT_ASSIGN_OR_RETURN(r.freeze, Name(a, w, "freeze"));
        if (*r.freeze == r.new_name) return Bad(std::string(w) + "new", "same as freeze");
        if (a.contains("granularity"))
          return Bad(std::string(w) + "granularity",
                     "not with freeze (the new bitmap takes the frozen one's)");
      }
      CBT_ASSIGN_OR_RETURN(r.granularity, Granularity(a, w));
      return Arguments{std::move(r)};
    }
    case Command::kBackupEnd: {
      CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {"id"}));
      BackupEndArgs r;
      CBT_ASSIGN_OR_RETURN(r.id, Uint(a, w, "id"));
      return Arguments{std::move(r)};
    }
    case Command::kBackupSetEndpoint: {
      CBT_RETURN_IF_ERROR(OnlyKeys(a, w, {"id", "pid", "uri", "socket", "carrier", "context"}));
      EndpointArgs r;
      CBT_ASSIGN_OR_RETURN(std::optional<uint64_t> id, Uint(a, w, "id"));
      if (!id) return Bad(std::string(w) + "id", "missing");
      r.id = *id;
      CBT_ASSIGN_OR_RETURN(std::optional<uint64_t> pid, Uint(a, w, "pid"));
      r.pid = pid.value_or(0);
      CBT_ASSIGN_OR_RETURN(r.uri, Text(a, w, "uri"));
      CBT_ASSIGN_OR_RETURN(r.socket, Text(a, w, "socket"));
      CBT_ASSIGN_OR_RETURN(r.carrier, Text(a, w, "carrier"));
      CBT_ASSIGN_OR_RETURN(r.context, Text(a, w, "context"));
      return Arguments{std::move(r)};
    }
  }
  return Status::InvalidArgument("internal: unhandled command");
}

std::string Dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace

std::string_view CommandName(Command c) {
  for (const auto& [cmd, name] : kNames)
    if (cmd == c) return name;
  return "?";
}

std::optional<Command> CommandFromName(std::string_view name) {
  for (const auto& [cmd, n] : kNames)
    if (n == name) return cmd;
  return std::nullopt;
}

bool AllowedInTransaction(Command c) {
  switch (c) {
    case Command::kQueryBitmaps:
    case Command::kQueryStats:
    case Command::kQueryBitmapExtents:
    case Command::kPersist:
    case Command::kTransaction:
    case Command::kBackupBegin:
    case Command::kBackupEnd:
    case Command::kQueryBackup:
    case Command::kBackupSetEndpoint:
    case Command::kQueryExports:
      return false;
    default:
      return true;
  }
}

ParsedLine ParseRequest(std::string_view line) {
  ParsedLine out{Status::InvalidArgument("request: empty line"), std::nullopt};
  if (line.size() > kMaxLineBytes) {
    out.request = Bad("request", "longer than " + std::to_string(kMaxLineBytes) + " bytes");
    return out;
  }
  Precheck pre;
  if (!json::sax_parse(line, &pre, json::input_format_t::json, /*strict=*/true)) {
    out.request = Bad("request", pre.error.empty() ? "not valid JSON" : pre.error);
    return out;
  }
  json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) {
    out.request = Bad("request", "must be a JSON object");
    return out;
  }
  // The id first, so that every later refusal can echo it.
  if (auto it = j.find("id"); it != j.end()) {
    if (it->is_structured()) {
      out.request = Bad("id", "must be a scalar (string, number, boolean or null)");
      return out;
    }
    out.id = *it;
  }
  if (Status s = OnlyKeys(j, "", {"execute", "arguments", "id", "export"}); !s.ok()) {
    out.request = std::move(s);
    return out;
  }
  auto ex = j.find("execute");
  if (ex == j.end()) {
    out.request = Bad("execute", "missing");
    return out;
  }
  if (!ex->is_string()) {
    out.request = Bad("execute", "must be a string");
    return out;
  }
  auto cmd = CommandFromName(ex->get_ref<const std::string&>());
  if (!cmd) {
    out.request = Bad("execute", "unknown command '" + ex->get<std::string>() + "'");
    return out;
  }
  static const json kEmpty = json::object();
  const json* args = &kEmpty;
  if (auto it = j.find("arguments"); it != j.end()) {
    if (!it->is_object()) {
      out.request = Bad("arguments", "must be an object");
      return out;
    }
    args = &*it;
  }
  auto parsed = ParseArgs(*cmd, *args, "arguments.");
  if (!parsed.ok()) {
    out.request = std::move(parsed).status();
    return out;
  }
  std::optional<std::string> exp;
  if (auto it = j.find("export"); it != j.end()) {
    if (!it->is_string()) {
      out.request = Bad("export", "must be a string");
      return out;
    }
    const std::string& e = it->get_ref<const std::string&>();
    if (e.size() > kMaxExportBytes || e.find('\0') != std::string::npos) {
      out.request = Bad("export", "must be at most " + std::to_string(kMaxExportBytes) +
                                      " bytes without NUL (an NBD export name)");
      return out;
    }
    exp = e;
  }
  out.request = Request{*cmd, std::move(*parsed), out.id, std::move(exp)};
  return out;
}

const char* ErrorClass(const Status& s) {
  if (s.err() == EACCES || s.err() == EPERM) return "PermissionDenied";
  switch (s.kind()) {
    case Status::Kind::kInvalidArgument:
      return "InvalidArgument";
    case Status::Kind::kNotFound:
      return "NotFound";
    case Status::Kind::kAlreadyExists:
      return "AlreadyExists";
    case Status::Kind::kBusy:
      return "Busy";
    case Status::Kind::kNotSupported:
      return "NotSupported";
    default:
      return "GenericError";
  }
}

std::string FormatReturn(const json& value, const std::optional<json>& id) {
  json r = {{"return", value}};
  if (id) r["id"] = *id;
  return Dump(r);
}

std::string FormatError(const Status& s, const std::optional<json>& id) {
  json r = {{"error", {{"class", ErrorClass(s)}, {"desc", s.message()}}}};
  if (id) r["id"] = *id;
  return Dump(r);
}

std::string HandleLine(std::string_view line, Handler& handler) {
  ParsedLine p = ParseRequest(line);
  if (!p.request.ok()) return FormatError(p.request.status(), p.id);
  try {
    Result<json> r = handler.Handle(*p.request);
    if (!r.ok()) return FormatError(r.status(), p.id);
    if (!r->is_object())
      return FormatError(Status::IOError("internal: handler returned a non-object"), p.id);
    return FormatReturn(*r, p.id);
  } catch (const std::exception& e) {
    return FormatError(Status::IOError(std::string("internal: ") + e.what()), p.id);
  }
}

}  // namespace cbt::control
