// `cbt ... --socket PATH`: the subcommands against a running filter's control
// socket (docs/control.md) instead of a stored container. Same output as
// offline (docs/cli.md); what only the live filter knows is added (socket,
// attached, persistent), what only the file knows is null (data-file).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "bitmap/dirty_bitmap.h"
#include "server/bitmap_args.h"
#include "server/cli.h"

namespace cbt::cli {

// One bitmap of query-bitmaps.
struct LiveBitmap {
  std::string name;
  uint64_t granularity = 0;
  bool recording = false;
  bool persistent = true;
  bool in_use = false;
  bool consistent = true;
  std::optional<uint64_t> dirty_bytes;  // nullopt: inconsistent
};

// query-bitmaps. Fields an older filter does not send (disk-size, container,
// cluster-size, consistent) are nullopt / true.
struct LiveInfo {
  bool attached = false;
  std::optional<uint64_t> disk_size;  // nullopt before attached
  std::optional<std::string> container;
  std::optional<uint64_t> cluster_size;
  std::vector<LiveBitmap> bitmaps;
  const LiveBitmap* Find(const std::string& name) const;
};

// --export NAME: sent with every SocketCall of this process (the disk
// addressed on a filter tracking several exports).
void AddExportOption(boost::program_options::options_description& desc);
const std::string& SocketExport();
void SetSocketExport(std::string name);

// One command over the socket; the Status's message is ready for Fail():
// the server's desc, with the socket named where it would not be clear
// otherwise (NotSupported, an unknown command) and a hint for NotFound.
Result<nlohmann::json> SocketCall(const std::string& socket, std::string_view command,
                                  const nlohmann::json& arguments = nlohmann::json::object());
Result<LiveInfo> QueryLive(const std::string& socket);

// The JSON of one bitmap as `cbt bitmap` prints its "result" (offline keys
// plus "persistent").
Json LiveBitmapJson(const LiveBitmap& b);

// The request for the operations of `cbt bitmap --socket`: the one command
// for one operation, else one "transaction" (all or nothing). Sets
// `command` and returns its arguments.
nlohmann::json BitmapRequest(const BitmapArgs& a, std::string& command);

// Every extent of `bitmap` over [offset, offset + length) (absent: to the
// end), all pages of query-bitmap-extents, checked to follow on from each
// other and merged across pages.
Result<std::vector<Extent>> FetchExtents(const std::string& socket, const std::string& bitmap,
                                         uint64_t offset = 0,
                                         std::optional<uint64_t> length = std::nullopt);
int RunInfoSocket(const std::string& socket, const CommonOptions& common);
int RunMapSocket(const std::string& socket, const CommonOptions& common, const std::string& bitmap,
                 uint64_t offset, std::optional<uint64_t> length);
int RunBitmapSocket(const BitmapArgs& a);

}  // namespace cbt::cli
