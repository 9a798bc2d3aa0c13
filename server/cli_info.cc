// cbt info FILE: the file's geometry and, per bitmap, what qemu-img info
// shows plus what it does not (dirty bytes, consistency).
#include <algorithm>
#include <cstdio>
#include <iostream>

#include "server/bitmap_io.h"
#include "server/cli.h"
#include "server/cli_socket.h"
#include "server/image_open.h"
#include "server/size_parse.h"

namespace cbt::cli {

namespace {

constexpr char kSynopsis[] =
    "cbt info FILE [-U] [-f qcow2] [--output=json]\n"
    "       cbt info --socket PATH [--output=json]";
constexpr char kDescription[] =
    "Shows FILE's virtual size, cluster size and data file, and for every bitmap\n"
    "its name, granularity, flags (in-use, auto), dirty bytes and whether it is\n"
    "consistent. An inconsistent bitmap (in-use left set by a program that did\n"
    "not close the file) has no trustworthy contents: only --remove and cbt recover\n"
    "work on it.\n"
    "Opens FILE read-only. -U (--force-share), as qemu-img info -U, also looks at\n"
    "a file that a running server (the cbt filter, qemu-nbd) holds for writing:\n"
    "it takes no lock that would stop that server, and the server's bitmaps then\n"
    "show as in use, their stored bits behind its memory.\n"
    "--socket PATH asks the running filter serving the control socket PATH\n"
    "(cbt-control=PATH) instead, from its memory: the same fields, each bitmap's\n"
    "live dirty bytes, and whether it is persistent or transient.";

struct Row {
  qcow2::BitmapInfo info;
  std::optional<uint64_t> dirty;  // nullopt: inconsistent
};

std::vector<std::string> Flags(const qcow2::BitmapInfo& b) {
  std::vector<std::string> f;
  if (b.in_use) f.push_back("in-use");
  if (b.enabled) f.push_back("auto");
  return f;
}

}  // namespace

int RunInfo(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string file;
  bool force_share = false;
  po::options_description desc("Options");
  std::string socket;
  desc.add_options()("force-share,U", po::bool_switch(&force_share),
                     "look at FILE even while another program holds it")(
      "socket", po::value(&socket)->value_name("PATH"),
      "ask the filter serving this control socket (cbt-control=PATH); no FILE");
  AddExportOption(desc);
  if (ParseFileCommand(args, desc, common, file, kSynopsis, kDescription, &socket)) return kExitOk;
  if (!socket.empty()) {
    if (force_share) throw UsageError("-U applies to FILE, not to --socket");
    return RunInfoSocket(socket, common);
  }

  Result<OpenedImage> opened = OpenImage(file, /*writable=*/false, force_share);
  if (!opened.ok()) return Fail(opened.status());
  qcow2::Image& img = *opened->image;
  std::vector<Row> rows;
  for (const qcow2::BitmapInfo& b : img.Bitmaps()) {
    Row r{b, std::nullopt};
    if (b.consistent) {
      Result<uint64_t> d = CountDirtyBytes(img, b.name);
      if (!d.ok()) return Fail(d.status());
      r.dirty = *d;
    }
    rows.push_back(std::move(r));
  }
  const std::string data_file = img.data_file();

  if (common.format() == OutputFormat::kJson) {
    Json bitmaps = Json::array();
    for (const Row& r : rows) {
      bitmaps.push_back({{"name", r.info.name},
                         {"granularity", r.info.granularity()},
                         {"flags", Flags(r.info)},
                         {"in-use", r.info.in_use},
                         {"enabled", r.info.enabled},
                         {"consistent", r.info.consistent},
                         {"dirty-bytes", r.dirty ? Json(*r.dirty) : Json()},
                         {"persistent", true}});
    }
    PrintJson({{"filename", file},
               {"format", "qcow2"},
               {"virtual-size", img.virtual_size()},
               {"cluster-size", img.cluster_size()},
               {"data-file", data_file.empty() ? Json() : Json(data_file)},
               {"bitmaps", bitmaps}});
    return kExitOk;
  }

  std::cout << "image: " << file << "\n"
            << "virtual size: " << HumanSize(img.virtual_size()) << " (" << img.virtual_size()
            << " bytes)\n"
            << "cluster size: " << img.cluster_size() << "\n"
            << "data file: " << (data_file.empty() ? "none" : data_file) << "\n";
  if (rows.empty()) {
    std::cout << "bitmaps: none\n";
    return kExitOk;
  }
  size_t w = 4;
  for (const Row& r : rows) w = std::max(w, std::min<size_t>(r.info.name.size(), 40));
  std::printf("bitmaps:\n  %-*s  %12s  %-12s  %14s  %s\n", static_cast<int>(w), "NAME",
              "GRANULARITY", "FLAGS", "DIRTY", "STATE");
  for (const Row& r : rows) {
    std::string flags;
    for (const auto& f : Flags(r.info)) flags += (flags.empty() ? "" : ",") + f;
    if (flags.empty()) flags = "-";
    std::string dirty = r.dirty ? HumanSize(*r.dirty) : "?";
    std::string state = !r.info.consistent ? (force_share ? "in use (or see cbt recover)"
                                                          : "inconsistent (see cbt recover)")
                        : r.info.enabled   ? "enabled"
                                           : "disabled";
    std::printf("  %-*s  %12llu  %-12s  %14s  %s\n", static_cast<int>(w), r.info.name.c_str(),
                static_cast<unsigned long long>(r.info.granularity()), flags.c_str(), dirty.c_str(),
                state.c_str());
  }
  return kExitOk;
}

}  // namespace cbt::cli
