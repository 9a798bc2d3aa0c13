#include "server/output.h"

#include <cstdio>
#include <iostream>

#include "server/size_parse.h"

namespace cbt::cli {

int Fail(std::string_view message, int code) {
  std::fflush(stdout);
  std::string line = "cbt: ";
  line += message;
  // One line, whatever the message carried.
  for (char& c : line)
    if (c == '\n') c = ' ';
  std::fprintf(stderr, "%s\n", line.c_str());
  return code;
}

int Fail(const Status& s, int code) {
  return Fail(s.message(), code);
}

void PrintJson(const Json& j) {
  std::cout << j.dump(4) << '\n' << std::flush;
}

std::string Hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

void PrintExtents(const std::vector<Extent>& extents, uint64_t offset, uint64_t length,
                  OutputFormat format) {
  if (format == OutputFormat::kJson) {
    Json j = Json::array();
    for (const Extent& e : extents)
      j.push_back({{"start", e.offset}, {"length", e.length}, {"dirty", e.dirty}});
    PrintJson(j);
    return;
  }
  std::printf("%-20s%-20s%s\n", "Offset", "Length", "Dirty");
  uint64_t dirty = 0, count = 0;
  for (const Extent& e : extents) {
    if (!e.dirty) continue;
    std::printf("%-20s%-20s%s\n", Hex(e.offset).c_str(), Hex(e.length).c_str(), "yes");
    dirty += e.length;
    ++count;
  }
  std::printf("%s dirty in %llu extent%s (of %s from %s)\n", HumanSize(dirty).c_str(),
              static_cast<unsigned long long>(count), count == 1 ? "" : "s",
              HumanSize(length).c_str(), Hex(offset).c_str());
}

}  // namespace cbt::cli
