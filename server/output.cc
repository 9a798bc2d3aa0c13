#include "server/output.h"

#include <cstdio>
#include <iostream>

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

}  // namespace cbt::cli
