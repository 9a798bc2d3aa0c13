// cbt create FILE --size SIZE [--cluster-size N] [--data-file RAW]
//
// Writes a new bitmaps-only qcow2 (qcow2::Image::Create). Never overwrites:
// FILE is created with O_EXCL, and removed again if creation fails after
// that (it is ours). The raw data file is only checked (type, first 4 bytes
// not qcow2's magic, size), never written.
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <iostream>

#include "common/endian.h"
#include "common/posix_file.h"
#include "qcow2/format.h"
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

// The raw disk named by --data-file: a regular file or block device that
// is not a qcow2 file. Reads its first 4 bytes only, never guesses another
// format. Returns its size. Failure: InvalidArgument naming --data-file.
Result<uint64_t> CheckRawDisk(const std::string& given, const std::string& path) {
  const std::string what = "--data-file '" + given + "'";
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    return Status::InvalidArgument(what +
                                   " does not exist; create the raw disk first (e.g. qemu-img "
                                   "create -f raw " +
                                   given + " SIZE)");
  if (S_ISDIR(st.st_mode))
    return Status::InvalidArgument(what + " is a directory; name the raw disk file itself");
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
    return Status::InvalidArgument(what + " is not a regular file or block device");
  // Opening a regular file or block device read-only has no side effects.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return Status::InvalidArgument(
        what + ": cannot read it to check that it is a raw disk: " + std::strerror(errno));
  unsigned char magic[4] = {};
  const ssize_t got = ::pread(fd, magic, sizeof magic, 0);
  const off_t end = ::lseek(fd, 0, SEEK_END);  // st_size is 0 for a block device
  const int err = errno;
  ::close(fd);
  if (got < 0 || end < 0)
    return Status::InvalidArgument(what + ": cannot read it: " + std::strerror(err));
  if (got == 4 && LoadBE32(reinterpret_cast<const std::byte*>(magic)) == qcow2::kMagic)
    return Status::InvalidArgument(
        what +
        " starts with the qcow2 magic 'QFI\\xfb': it is a qcow2 image or a cbt container, not "
        "a raw disk. QEMU would show its metadata to the guest as disk data and write the "
        "guest's data over it; name the raw disk itself");
  return static_cast<uint64_t>(end);
}

}  // namespace

int RunCreate(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string file, size_text, cluster_text, data_file;
  po::options_description desc("Options");
  desc.add_options()("size,s", po::value(&size_text)->value_name("SIZE"), "virtual disk size")(
      "cluster-size", po::value(&cluster_text)->value_name("N"),
      "cluster size, a power of two from 512 to 2M (default 64K)")(
      "data-file", po::value(&data_file)->value_name("RAW"),
      "link the raw disk RAW as external data file");
  if (ParseFileCommand(args, desc, common, file, kSynopsis, kDescription)) return kExitOk;

  qcow2::CreateOptions opts;
  if (!data_file.empty()) {
    std::error_code ec;
    opts.data_file = std::filesystem::absolute(data_file, ec).lexically_normal().string();
    if (ec) return Fail("--data-file '" + data_file + "': " + ec.message());
    Result<uint64_t> raw_size = CheckRawDisk(data_file, opts.data_file);
    if (!raw_size.ok()) return Fail(raw_size.status());
    if (size_text.empty()) opts.virtual_size = *raw_size;
    if (!size_text.empty()) {
      Result<uint64_t> want = ParseSize(size_text, "--size");
      if (want.ok() && *want != *raw_size)
        spdlog::warn("--size {} differs from the size of {} ({} bytes)", *want, data_file,
                     *raw_size);
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
      return Fail(file +
                  " already exists; cbt create never overwrites a file (pick a new name, "
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
           {"data-file", opts.data_file.empty() ? Json(nullptr) : Json(opts.data_file)}};
    PrintJson(j);
  } else {
    std::cout << "Created " << file << ": virtual size " << HumanSize(image.virtual_size()) << " ("
              << image.virtual_size() << " bytes), cluster size " << image.cluster_size();
    if (!opts.data_file.empty()) std::cout << ", data file " << opts.data_file;
    std::cout << '\n';
  }
  return kExitOk;
}

}  // namespace cbt::cli
