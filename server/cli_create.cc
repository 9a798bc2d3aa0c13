// cbt create FILE --size SIZE [--cluster-size N] [--data-file RAW]
//
// Writes a new bitmaps-only qcow2 (qcow2::Image::Create). Never overwrites:
// FILE is created with O_EXCL, and removed again if creation fails after
// that (it is ours). The raw data file is only stat()ed, never opened.
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <iostream>

#include <spdlog/spdlog.h>

#include "common/posix_file.h"
#include "qcow2/image.h"
#include "server/cli.h"
#include "server/size_parse.h"

namespace cbt::cli {

namespace {

constexpr char kSynopsis[] =
    "cbt create FILE --size SIZE [--cluster-size N] [--data-file RAW] [--output=json]";
constexpr char kDescription[] =
    "Creates FILE, a qcow2 v3 file that holds only dirty bitmaps: no guest data\n"
    "clusters. SIZE is the disk's size (64M, 1G, 16T, 512K or bytes, as\n"
    "qemu-img); it is rounded up to a multiple of 512. With --data-file the file\n"
    "names the raw disk RAW as QEMU's external data file (stored as an absolute\n"
    "path; RAW itself is never written), so QEMU can open the pair as one disk;\n"
    "--size then defaults to RAW's size. FILE must not exist.";

}  // namespace

int RunCreate(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string file, size_text, cluster_text, data_file;
  po::options_description desc("Options");
  desc.add_options()
      ("size,s", po::value(&size_text)->value_name("SIZE"), "virtual disk size")
      ("cluster-size", po::value(&cluster_text)->value_name("N"),
       "cluster size, a power of two from 512 to 2M (default 64K)")
      ("data-file", po::value(&data_file)->value_name("RAW"),
       "link the raw disk RAW as external data file");
  if (ParseFileCommand(args, desc, common, file, kSynopsis, kDescription)) return kExitOk;

  qcow2::CreateOptions opts;
  if (!data_file.empty()) {
    std::error_code ec;
    opts.data_file = std::filesystem::absolute(data_file, ec).lexically_normal().string();
    if (ec) return Fail("--data-file '" + data_file + "': " + ec.message());
    struct stat st {};
    if (::stat(opts.data_file.c_str(), &st) != 0)
      return Fail("--data-file '" + data_file +
                  "' does not exist; create the raw disk first (e.g. qemu-img create -f raw " +
                  data_file + " SIZE)");
    if (size_text.empty()) opts.virtual_size = static_cast<uint64_t>(st.st_size);
    if (!size_text.empty() && S_ISREG(st.st_mode)) {
      Result<uint64_t> want = ParseSize(size_text, "--size");
      if (want.ok() && *want != static_cast<uint64_t>(st.st_size))
        spdlog::warn("--size {} differs from the size of {} ({} bytes)", *want, data_file,
                     st.st_size);
    }
  }
  if (!size_text.empty()) {
    Result<uint64_t> size = ParseSize(size_text, "--size");
    if (!size.ok()) return Fail(size.status());
    opts.virtual_size = *size;
  } else if (data_file.empty()) {
    throw UsageError("missing --size SIZE (e.g. --size 64M)");
  }
  if (opts.virtual_size == 0)
    return Fail("--size: the disk size must be at least 1 byte (e.g. --size 64M)");
  if (!cluster_text.empty()) {
    Result<uint64_t> cs = ParseSize(cluster_text, "--cluster-size");
    if (!cs.ok()) return Fail(cs.status());
    if (*cs < 512 || *cs > (2u << 20) || (*cs & (*cs - 1)))
      return Fail("--cluster-size " + cluster_text +
                  ": must be a power of two from 512 to 2M (e.g. --cluster-size 64K)");
    opts.cluster_size = static_cast<uint32_t>(*cs);
  }

  Result<std::unique_ptr<PosixFile>> f = PosixFile::Open(file, PosixFile::Mode::kCreateExclusive);
  if (!f.ok()) {
    if (f.status().IsAlreadyExists())
      return Fail(file + " already exists; cbt create never overwrites a file (pick a new name, "
                         "or remove it yourself)");
    return Fail(f.status());
  }
  std::shared_ptr<PosixFile> io = std::move(f).value();
  Result<std::unique_ptr<qcow2::Image>> img = qcow2::Image::Create(io, opts);
  if (!img.ok()) {
    io.reset();
    ::unlink(file.c_str());  // we created it above: nobody else's data
    return Fail(img.status().WithContext(file));
  }
  const qcow2::Image& image = **img;
  spdlog::debug("created {}", file);
  if (common.format() == OutputFormat::kJson) {
    Json j{{"filename", file},
                     {"virtual-size", image.virtual_size()},
                     {"cluster-size", image.cluster_size()},
                     {"data-file", opts.data_file.empty() ? Json(nullptr)
                                                          : Json(opts.data_file)}};
    PrintJson(j);
  } else {
    std::cout << "Created " << file << ": virtual size " << HumanSize(image.virtual_size())
              << " (" << image.virtual_size() << " bytes), cluster size " << image.cluster_size();
    if (!opts.data_file.empty()) std::cout << ", data file " << opts.data_file;
    std::cout << '\n';
  }
  return kExitOk;
}

}  // namespace cbt::cli
