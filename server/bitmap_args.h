// The command line of `cbt bitmap`, parsed in command-line order.
#pragma once

#include <string>
#include <vector>

#include "server/bitmap_ops.h"
#include "server/cli.h"

namespace cbt::cli {

struct BitmapArgs {
  CommonOptions common;
  std::string file;         // "" with --socket
  std::string socket;       // --socket PATH: a running filter's control socket
  std::string export_name;  // --export NAME: the disk addressed there
  std::string name;
  std::vector<BitmapOp> ops;  // in the order given
  OpOptions opts;             // -g, --disabled, --transient (with --add)
  std::string source_file;    // -b: where --merge reads SRC ("" = FILE)
  std::string help;           // the rendered option list, for --help
};

// Parses `cbt bitmap` arguments. Operations may repeat and keep their order
// (Boost's parsed options, not a variables_map, which would sort and merge
// them). Throws po::error for unknown options or missing values and
// UsageError for: missing FILE or NAME, no operation, -g without --add,
// --disabled without --add, -b without --merge, a bad -g size.
// With --socket PATH the only positional is NAME (FILE as well is an error),
// -b is refused (the filter merges only bitmaps it serves), and --persistent
// and --transient are allowed: --transient is the modifier of every --add
// when the call has one (bitmap-add "persistent": false), else, like
// --persistent, an operation in command-line order (bitmap-set-persistent).
// Without --socket both are refused. With --help nothing but `common.help`
// and `help` is guaranteed.
BitmapArgs ParseBitmapArgs(const std::vector<std::string>& args);

}  // namespace cbt::cli
