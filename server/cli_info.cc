// cbt info FILE: the file's geometry and, per bitmap, what qemu-img info
// shows plus what it does not (dirty bytes, consistency).
#include <algorithm>
#include <cstdio>
#include <iostream>

#include "engine/disk_identity.h"
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
    "live dirty bytes, and whether it is persistent or transient.\n"
    "The disk identity of a bitmap (file, inode, size, modification time) is the\n"
    "one recorded at the filter's last clean stop: a start that finds the disk\n"
    "changed since is refused (docs/crash-safety.md).";

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
  if (!opened.ok()) return Fail(WithSocketHint(opened.status(), "info --socket CTL"));
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
  // The disk identity record (absent, not vouched, or unreadable: none).
  Result<IdentityRecord> ids = LoadIdentityRecord(img);
  const std::string ids_error = ids.ok() ? "" : ids.status().message();
  IdentityRecord none;
  const IdentityRecord& idr = ids.ok() ? *ids : none;
  auto IdJson = [&](const std::string& name) -> Json {
    const DiskIdentity* id = idr.For(name);
    if (!id) return Json();
    return {{"path", id->path},           {"dev", id->dev},
            {"inode", id->ino},           {"size", id->size},
            {"mtime-sec", id->mtime_sec}, {"mtime-nsec", id->mtime_nsec}};
  };

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
                         {"persistent", true},
                         {"disk-identity", IdJson(r.info.name)}});
    }
    PrintJson({{"filename", file},
               {"format", "qcow2"},
               {"virtual-size", img.virtual_size()},
               {"cluster-size", img.cluster_size()},
               {"data-file", data_file.empty() ? Json() : Json(data_file)},
               {"bitmaps", bitmaps},
               {"disk-identity-error", ids_error.empty() ? Json() : Json(ids_error)}});
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
  if (!ids_error.empty()) {
    std::cout << "disk identity: unreadable (" << ids_error << ")\n";
  } else if (idr.empty()) {
    std::cout << "disk identity: none recorded\n";
  } else {
    std::cout << "disk identity (at the last clean stop):\n";
    for (const Row& r : rows)
      if (const DiskIdentity* id = idr.For(r.info.name))
        std::cout << "  " << r.info.name << ": " << DescribeIdentity(*id) << "\n";
  }
  return kExitOk;
}

}  // namespace cbt::cli
