// Size arguments as qemu-img reads them (QEMU's qemu_strtosz, util/cutils.c).
//
//   1073741824   plain decimal bytes
//   0x40000000   hexadecimal bytes (no suffix, no fraction)
//   64M  1G  16T  512K  1.5G   one suffix letter, case-insensitive:
//                 B=1, K=2^10, M=2^20, G=2^30, T=2^40, P=2^50, E=2^60
//   A fraction needs a suffix other than B; it is rounded to the nearest
//   byte (half up). No "KiB"/"MB", no sign, no exponent, nothing after the
//   suffix; the result must fit in a signed 64-bit integer.
// Pure functions; safe from any thread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace cbt::cli {

// Parses `text` as a size. `what` names the argument in the message
// ("--size", "granularity"). Failure: InvalidArgument "what: 'text' is not
// a size; use bytes or a K, M, G, T, P or E suffix (e.g. 64M)".
Result<uint64_t> ParseSize(std::string_view text, std::string_view what);

// "64 MiB", "1.5 GiB", "512 B": for human output.
std::string HumanSize(uint64_t bytes);

}  // namespace cbt::cli
