// A path template with one file per export (the filter's
// cbt-file=DIR/%e.cbt, docs/filter.md "Many exports"): "%e" is the export
// name, "%%" a '%'. No nbdkit.
#pragma once

#include <string>
#include <string_view>

#include "common/status.h"

namespace cbt {

// Whether a path is a template (holds "%e"; any other path is taken as it
// is, '%' included), and whether it is a valid one: every '%' starts %e or
// %%.
bool IsTemplate(std::string_view value);
Status CheckTemplate(std::string_view tmpl);
// The path of export `name`. The name is kept where it is [A-Za-z0-9._+-]
// (a leading '.' excepted) and written %XX otherwise, so '/' never makes a
// directory, "." and ".." never occur, and two names never give one path.
// InvalidArgument for the empty name. REQUIRES CheckTemplate(tmpl).ok().
Result<std::string> ContainerFor(std::string_view tmpl, std::string_view name);

}  // namespace cbt
