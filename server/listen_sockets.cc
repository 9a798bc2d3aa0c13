#include "server/listen_sockets.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <system_error>

namespace cbt::control {

namespace {
// __SO_ACCEPTCON in /proc/net/unix's Flags column: a listening socket.
constexpr unsigned long kAcceptCon = 0x10000;
constexpr size_t kMaxFds = 65536;  // bound the scan
}  // namespace

std::vector<std::string> ListeningUnixSockets(const std::vector<std::string>& exclude) {
  std::set<unsigned long> inodes;
  std::error_code ec;
  size_t seen = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd", ec)) {
    if (++seen > kMaxFds) break;
    std::error_code lec;
    const std::string target = std::filesystem::read_symlink(e.path(), lec).string();
    if (lec || target.rfind("socket:[", 0) != 0) continue;
    try {
      inodes.insert(std::stoul(target.substr(8)));
    } catch (...) {
    }
  }
  std::vector<std::string> out;
  std::ifstream in("/proc/net/unix");
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string num, ref, proto, flags, type, st, path;
    unsigned long inode = 0;
    if (!(f >> num >> ref >> proto >> flags >> type >> st >> inode)) continue;
    f >> path;
    if (path.empty() || path[0] != '/' || !inodes.count(inode)) continue;
    unsigned long fl = 0;
    try {
      fl = std::stoul(flags, nullptr, 16);
    } catch (...) {
      continue;
    }
    if (!(fl & kAcceptCon)) continue;
    if (std::find(exclude.begin(), exclude.end(), path) != exclude.end()) continue;
    out.push_back(path);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace cbt::control
