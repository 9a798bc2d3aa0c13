// Per-export paths: see export_template.h.
#include "common/export_template.h"

#include <cstdio>

namespace cbt {

namespace {

bool KeepInName(char c, bool first) {
  if (c == '.') return !first;
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-' || c == '+';
}

}  // namespace

bool IsTemplate(std::string_view value) {
  return value.find("%e") != std::string_view::npos;
}

Status CheckTemplate(std::string_view t) {
  bool has_e = false;
  for (size_t i = 0; i < t.size(); ++i) {
    if (t[i] != '%') continue;
    if (i + 1 < t.size() && t[i + 1] == '%') {
      ++i;
    } else if (i + 1 < t.size() && t[i + 1] == 'e') {
      has_e = true;
      ++i;
    } else {
      return Status::InvalidArgument(
          "a '%' in a template must be %e (the export name) or %% (a '%')");
    }
  }
  if (!has_e) return Status::InvalidArgument("a template must hold %e (the export name)");
  return Status::OK();
}

Result<std::string> ContainerFor(std::string_view t, std::string_view name) {
  if (name.empty())
    return Status::InvalidArgument(
        "the empty export name has no container in a cbt-file=...%e... template; connect to a "
        "named export");
  std::string enc;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    if (KeepInName(c, i == 0)) {
      enc += c;
    } else {
      char hex[4];
      std::snprintf(hex, sizeof hex, "%%%02X", static_cast<unsigned char>(c));
      enc += hex;
    }
  }
  std::string out;
  for (size_t i = 0; i < t.size(); ++i) {
    if (t[i] == '%' && i + 1 < t.size()) {
      out += t[i + 1] == 'e' ? enc : std::string(1, t[i + 1]);
      ++i;
    } else {
      out += t[i];
    }
  }
  return out;
}

}  // namespace cbt
