// Human and JSON output of the cbt tool, and its one-line errors.
//
// stdout carries results only (a table, or one JSON document); stderr
// carries errors ("cbt: ..." one line each) and -v logging (spdlog).
// JSON keys are part of the interface (docs/cli.md): lower-case, words
// joined by '-', as in `qemu-img info --output=json`.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "bitmap/dirty_bitmap.h"
#include "common/status.h"

namespace cbt::cli {

enum class OutputFormat { kHuman, kJson };

// Keys print in the order they were inserted (start, length, dirty).
using Json = nlohmann::ordered_json;

// Prints "cbt: <message>" on stderr. Returns `code` so callers can write
// `return Fail(...)`.
int Fail(std::string_view message, int code = 1);
// Prints a Status as one line ("cbt: " + message; the libraries' messages
// already name the file and the fix). Returns `code`.
int Fail(const Status& s, int code = 1);

// Writes j to stdout, indented by 4 like qemu-img, and a newline.
void PrintJson(const Json& j);

// "0x10000": offsets and lengths in human tables, as qemu-img map.
std::string Hex(uint64_t v);

// `cbt map`'s output (offline and --socket): extents exactly covering
// [offset, offset + length): the JSON list of {"start", "length", "dirty"},
// or the human table of the dirty ones and a summary line.
void PrintExtents(const std::vector<Extent>& extents, uint64_t offset, uint64_t length,
                  OutputFormat format);

}  // namespace cbt::cli
