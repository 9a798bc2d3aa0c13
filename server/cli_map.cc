// cbt map FILE --bitmap NAME [--offset N] [--length N]: the dirty and clean
// extents of a stored bitmap, merged, exactly covering the range (clamped to
// the disk's end). The JSON list is what `nbdinfo --map=qemu:dirty-bitmap:NAME`
// reports for the same bitmap served by qemu-nbd -B, as start/length/dirty.
#include <cstdio>

#include "engine/bitmap_store.h"
#include "server/bitmap_ops.h"
#include "server/cli.h"
#include "server/cli_socket.h"
#include "server/image_open.h"
#include "server/size_parse.h"

namespace cbt::cli {

namespace {

constexpr char kSynopsis[] =
    "cbt map FILE --bitmap NAME [--offset N] [--length N] [-U] [-f qcow2] [--output=json]\n"
    "       cbt map --socket PATH --bitmap NAME [--offset N] [--length N] [--output=json]";
constexpr char kDescription[] =
    "Lists the extents of bitmap NAME in FILE. The JSON form is a list of\n"
    "{\"start\", \"length\", \"dirty\"} exactly covering the range, adjacent extents\n"
    "of the same state merged. The human form is a table of the dirty extents\n"
    "(hexadecimal, like qemu-img map). Opens FILE read-only; -U (--force-share)\n"
    "also reads a file a running server holds (its bitmaps in use stay refused).\n"
    "--socket PATH maps the bitmap in the memory of the filter serving the control\n"
    "socket PATH (cbt-control=PATH): no FILE, no in-use problem, the same output.";

}  // namespace

int RunMap(const std::vector<std::string>& args) {
  CommonOptions common;
  std::string file, bitmap, offset_text, length_text;
  bool force_share = false;
  po::options_description desc("Options");
  desc.add_options()("bitmap,B", po::value(&bitmap)->value_name("NAME"), "the bitmap (required)")(
      "offset", po::value(&offset_text)->value_name("N"), "start of the range (default 0)")(
      "length", po::value(&length_text)->value_name("N"),
      "length of the range (default: to the end of the disk)")(
      "force-share,U", po::bool_switch(&force_share),
      "read FILE even while another program holds it");
  std::string socket;
  desc.add_options()("socket", po::value(&socket)->value_name("PATH"),
                     "map the bitmap of the filter serving this control socket; no FILE");
  AddExportOption(desc);
  if (ParseFileCommand(args, desc, common, file, kSynopsis, kDescription, &socket)) return kExitOk;
  if (!socket.empty() && force_share) throw UsageError("-U applies to FILE, not to --socket");
  if (bitmap.empty()) throw UsageError("missing --bitmap NAME");
  uint64_t offset = 0;
  std::optional<uint64_t> length;
  if (!offset_text.empty()) {
    Result<uint64_t> v = ParseSize(offset_text, "--offset");
    if (!v.ok()) return Fail(v.status());
    offset = *v;
  }
  if (!length_text.empty()) {
    Result<uint64_t> v = ParseSize(length_text, "--length");
    if (!v.ok()) return Fail(v.status());
    length = *v;
  }
  if (!socket.empty()) return RunMapSocket(socket, common, bitmap, offset, length);

  Result<OpenedImage> opened = OpenImage(file, /*writable=*/false, force_share);
  if (!opened.ok())
    return Fail(WithSocketHint(opened.status(), "map --socket CTL --bitmap " + bitmap));
  qcow2::Image& img = *opened->image;
  Result<qcow2::BitmapInfo> info = img.Find(bitmap);
  if (!info.ok())
    return Fail("bitmap '" + bitmap + "' not found in " + file + "; list bitmaps with 'cbt info " +
                file + "'");
  if (!info->consistent) return Fail(InconsistentMessage(file, bitmap, "map"));
  const uint64_t size = img.virtual_size();
  if (offset > size)
    return Fail("--offset " + std::to_string(offset) + " is past the end of the disk (" +
                std::to_string(size) + " bytes)");
  const uint64_t len = std::min(length.value_or(size - offset), size - offset);

  Result<std::unique_ptr<DirtyBitmap>> b = LoadBitmap(img, bitmap);
  if (!b.ok()) return Fail(b.status());
  std::vector<Extent> extents = (*b)->Extents(offset, len);

  PrintExtents(extents, offset, len, common.format());
  return kExitOk;
}

}  // namespace cbt::cli
