#include "server/size_parse.h"

#include <cstdio>
#include <limits>

namespace cbt::cli {

namespace {

// The multiplier of a suffix letter, or 0 if `c` is not one.
uint64_t SuffixMultiplier(char c) {
  switch (c) {
    case 'b':
    case 'B':
      return 1;
    case 'k':
    case 'K':
      return uint64_t{1} << 10;
    case 'm':
    case 'M':
      return uint64_t{1} << 20;
    case 'g':
    case 'G':
      return uint64_t{1} << 30;
    case 't':
    case 'T':
      return uint64_t{1} << 40;
    case 'p':
    case 'P':
      return uint64_t{1} << 50;
    case 'e':
    case 'E':
      return uint64_t{1} << 60;
    default:
      return 0;
  }
}

bool IsDigit(char c) {
  return c >= '0' && c <= '9';
}
bool IsHexDigit(char c) {
  return IsDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}
int HexValue(char c) {
  if (IsDigit(c)) return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return c - 'A' + 10;
}

}  // namespace

Result<uint64_t> ParseSize(std::string_view text, std::string_view what) {
  auto bad = [&](std::string_view why = {}) {
    std::string msg = std::string(what) + ": '" + std::string(text) + "' is not a size";
    if (!why.empty()) msg += " (" + std::string(why) + ")";
    msg += "; use bytes or a K, M, G, T, P or E suffix (e.g. 64M)";
    return Status::InvalidArgument(std::move(msg));
  };
  using u128 = unsigned __int128;
  constexpr u128 kMax = static_cast<u128>(std::numeric_limits<int64_t>::max());
  size_t i = 0;
  const size_t n = text.size();
  if (n == 0 || !IsDigit(text[0])) return bad();

  // Hexadecimal: "0x..." with no fraction and no suffix.
  if (n > 2 && text[0] == '0' && (text[1] == 'x' || text[1] == 'X')) {
    u128 v = 0;
    for (i = 2; i < n; ++i) {
      if (!IsHexDigit(text[i])) return bad("hexadecimal sizes take no suffix");
      v = v * 16 + static_cast<u128>(HexValue(text[i]));
      if (v > kMax) return bad("too large");
    }
    return static_cast<uint64_t>(v);
  }

  u128 whole = 0;
  for (; i < n && IsDigit(text[i]); ++i) {
    whole = whole * 10 + static_cast<u128>(text[i] - '0');
    if (whole > kMax) return bad("too large");
  }
  // Fraction as numerator / 10^digits; digits past 18 cannot change the
  // rounded result of any representable size and are ignored.
  u128 frac_num = 0, frac_den = 1;
  bool has_fraction = false;
  if (i < n && text[i] == '.') {
    has_fraction = true;
    ++i;
    int digits = 0;
    for (; i < n && IsDigit(text[i]); ++i) {
      if (digits < 18) {
        frac_num = frac_num * 10 + static_cast<u128>(text[i] - '0');
        frac_den *= 10;
        ++digits;
      }
    }
  }
  uint64_t mul = 1;
  bool has_suffix = false;
  if (i < n) {
    mul = SuffixMultiplier(text[i]);
    if (mul == 0) return bad("unknown suffix");
    has_suffix = true;
    ++i;
  }
  if (i != n) return bad("trailing characters");
  if (has_fraction && (!has_suffix || mul == 1) && frac_num != 0)
    return bad("a fraction needs a K, M, G, T, P or E suffix");
  u128 v = whole * mul;
  if (v > kMax) return bad("too large");
  if (frac_num) {
    u128 f = frac_num * mul;  // < 10^18 * 2^60 < 2^120: no overflow
    v += (f + frac_den / 2) / frac_den;
    if (v > kMax) return bad("too large");
  }
  return static_cast<uint64_t>(v);
}

std::string HumanSize(uint64_t bytes) {
  static const char* const kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  double v = static_cast<double>(bytes);
  while (v >= 1024 && u < 6) {
    v /= 1024;
    ++u;
  }
  char buf[64];
  if (u == 0)
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  else if (bytes % (uint64_t{1} << (10 * u)) == 0)
    std::snprintf(buf, sizeof buf, "%.0f %s", v, kUnits[u]);
  else
    std::snprintf(buf, sizeof buf, "%.3g %s", v, kUnits[u]);
  return buf;
}

}  // namespace cbt::cli
