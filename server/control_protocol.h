// The control protocol of a running filter (issue 9, docs/control.md): one
// JSON object per line, QMP-like.
//
//   request  {"execute": "bitmap-add", "arguments": {"name": "b1"}, "id": 7}
//   success  {"return": {...}, "id": 7}
//   failure  {"error": {"class": "NotFound", "desc": "..."}, "id": 7}
//
// This layer only parses and validates requests into plain structs and
// formats replies; it knows nothing of nbdkit or the tracker. The parser
// refuses rather than guesses: unknown commands, unknown or duplicate keys,
// wrong types, floats where an integer is due, too deep or too long input are
// all errors that name the offending field. Everything a Handler receives has
// been checked against the limits below.
#pragma once

#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "common/status.h"

namespace cbt::control {

// Longest request line, without its '\n'. The socket reader enforces it
// before any parsing (a client cannot make the server buffer more).
inline constexpr size_t kMaxLineBytes = size_t{64} * 1024;
// Deepest nesting of arrays/objects in a request (a transaction needs 4).
inline constexpr int kMaxDepth = 8;
inline constexpr size_t kMaxTransactionActions = 64;
inline constexpr size_t kMaxMergeSources = 64;
// Bitmap names: 1..1023 bytes (the qcow2 limit), no NUL.
inline constexpr size_t kMaxNameBytes = 1023;
inline constexpr uint64_t kMinGranularity = 512;
inline constexpr uint64_t kMaxGranularity = uint64_t{1} << 31;

enum class Command {
  kQueryBitmaps,
  kQueryStats,
  kQueryBitmapExtents,
  kBitmapAdd,
  kBitmapRemove,
  kBitmapClear,
  kBitmapEnable,
  kBitmapDisable,
  kBitmapMerge,
  kBitmapCopy,
  kBitmapRename,
  kBitmapSetPersistent,
  kPersist,
  kTransaction,
  kCheckpoint,
  kBackupBegin,
  kBackupEnd,
  kQueryBackup,
  kBackupSetEndpoint,
  kQueryExports,
};

// "bitmap-add" etc.; the wire name is also the transaction action "type".
std::string_view CommandName(Command c);
std::optional<Command> CommandFromName(std::string_view name);
// Commands allowed as transaction actions: the bitmap edits and checkpoint
// (not queries, persist, backup sessions or a nested transaction).
bool AllowedInTransaction(Command c);

// query-bitmaps, query-stats, persist, query-exports.
struct NoArgs {};
// query-bitmap-extents: the extents of bitmap `name` from memory, from
// `offset` for `length` bytes (absent: to the disk's end). The reply holds at
// most kMaxExtentsPerReply extents and the offset to ask from next.
struct ExtentsArgs {
  std::string name;
  uint64_t offset = 0;
  std::optional<uint64_t> length;
};
inline constexpr size_t kMaxExtentsPerReply = 65536;
// bitmap-add. granularity absent: the handler's default.
struct BitmapAddArgs {
  std::string name;
  std::optional<uint64_t> granularity;
  bool persistent = true;
  bool disabled = false;
};
// bitmap-remove, bitmap-clear, bitmap-enable, bitmap-disable: {"name"}.
struct NameArgs {
  std::string name;
};
// bitmap-merge: target |= every source (1..kMaxMergeSources, distinct).
struct MergeArgs {
  std::string target;
  std::vector<std::string> sources;
};
// bitmap-copy: a new bitmap `target` with `source`'s bits and granularity.
struct CopyArgs {
  std::string source;
  std::string target;
};
// bitmap-rename: {"name", "new-name"}.
struct RenameArgs {
  std::string name;
  std::string new_name;
};
// bitmap-set-persistent: {"name", "persistent"}.
struct SetPersistentArgs {
  std::string name;
  bool persistent = true;
};
// checkpoint: in one atomic step disable `freeze` and start `new_name`
// recording (JSON "new"). The two must differ.
struct CheckpointArgs {
  std::string freeze;
  std::string new_name;
};

// backup-begin: a backup session (docs/backup.md) starting atomically with
// a checkpoint: `freeze` (if given) stops recording and `new_name` (JSON
// "new") starts; without `freeze`, `new_name` is added (granularity absent:
// the handler's default). The point-in-time view is that moment.
struct BackupBeginArgs {
  std::string new_name;
  std::optional<std::string> freeze;
  std::optional<uint64_t> granularity;
};
// backup-end: ends the open session (`id`, if given, must name it).
struct BackupEndArgs {
  std::optional<uint64_t> id;
};
// backup-set-endpoint: what `cbt backup begin` started for session `id`
// (the qemu:dirty-bitmap endpoint), kept for query-backup and backup-end.
// Strings are at most kMaxPathBytes.
inline constexpr size_t kMaxPathBytes = 4096;
struct EndpointArgs {
  uint64_t id = 0;
  uint64_t pid = 0;
  std::string uri, socket, carrier, context;
};

using ActionArgs = std::variant<BitmapAddArgs, NameArgs, MergeArgs, CopyArgs, RenameArgs,
                                SetPersistentArgs, CheckpointArgs>;
// One transaction action: {"type": "bitmap-add", "data": {...}}.
struct Action {
  Command type;
  ActionArgs args;
};
// transaction: 1..kMaxTransactionActions actions, all or nothing.
struct TransactionArgs {
  std::vector<Action> actions;
};

using Arguments = std::variant<NoArgs, ExtentsArgs, BitmapAddArgs, NameArgs, MergeArgs, CopyArgs,
                               RenameArgs, SetPersistentArgs, CheckpointArgs, TransactionArgs,
                               BackupBeginArgs, BackupEndArgs, EndpointArgs>;

// Export names (the request's "export"): at most NBD's 4096 bytes, no NUL.
inline constexpr size_t kMaxExportBytes = 4096;

struct Request {
  Command command;
  Arguments args;
  // Echoed in the reply; any JSON scalar. nullopt: the request had no "id".
  std::optional<nlohmann::json> id;
  // The disk addressed ("export" beside "execute"): a server tracking
  // several exports needs it; nullopt: the one it tracks.
  std::optional<std::string> export_name;
};

// Parsing one line gives a request, or the error to reply with. `id` is the
// request's id whenever the line was a JSON object with a scalar "id", also
// when something else in it was refused, so the client can match the error.
struct ParsedLine {
  Result<Request> request;
  std::optional<nlohmann::json> id;
};
ParsedLine ParseRequest(std::string_view line);

// The QMP-style error class for a Status: "InvalidArgument", "NotFound",
// "AlreadyExists", "Busy", "NotSupported", "PermissionDenied" (errno EACCES
// or EPERM, whatever the kind), else "GenericError".
const char* ErrorClass(const Status& s);

// Reply lines, without the trailing '\n'. Never throw: text that is not valid
// UTF-8 is replaced, not refused.
std::string FormatReturn(const nlohmann::json& value, const std::optional<nlohmann::json>& id);
// REQUIRES: !s.ok()
std::string FormatError(const Status& s, const std::optional<nlohmann::json>& id);

// What the filter implements. Handle() gets only validated requests and
// returns the "return" object ({} when there is nothing to report). The
// socket server calls it from one thread at a time.
class Handler {
 public:
  virtual ~Handler() = default;
  virtual Result<nlohmann::json> Handle(const Request& request) = 0;
};

// Parse, dispatch, format: the reply line for one request line. A handler
// that throws or returns a non-object becomes a GenericError reply.
std::string HandleLine(std::string_view line, Handler& handler);

}  // namespace cbt::control
