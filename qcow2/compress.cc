#include "qcow2/compress.h"

#include <zlib.h>
#include <zstd.h>

#include <memory>

namespace cbt::qcow2 {
namespace {

Status Inflate(std::span<const std::byte> in, std::span<std::byte> out) {
  z_stream z{};
  // Raw deflate with a 4 KiB window, as QEMU writes it.
  if (inflateInit2(&z, -12) != Z_OK) return Status::IOError("zlib: inflateInit2 failed");
  z.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  z.avail_in = static_cast<uInt>(in.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  int r = inflate(&z, Z_FINISH);
  bool full = z.avail_out == 0;
  inflateEnd(&z);
  // The input may hold padding after the stream end, or the stream may end
  // exactly when the output is full (Z_BUF_ERROR with no output left).
  if ((r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) && full) return Status::OK();
  return Status::Corruption("compressed cluster: bad zlib data");
}

Status Unzstd(std::span<const std::byte> in, std::span<std::byte> out) {
  std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> ctx(ZSTD_createDCtx(), ZSTD_freeDCtx);
  if (!ctx) return Status::IOError("zstd: out of memory");
  ZSTD_inBuffer ib{in.data(), in.size(), 0};
  ZSTD_outBuffer ob{out.data(), out.size(), 0};
  while (ob.pos < ob.size) {
    size_t r = ZSTD_decompressStream(ctx.get(), &ob, &ib);
    if (ZSTD_isError(r))
      return Status::Corruption(std::string("compressed cluster: bad zstd data: ") +
                                ZSTD_getErrorName(r));
    if (r == 0 || ib.pos == ib.size) break;  // frame done, or input used up
  }
  if (ob.pos != ob.size) return Status::Corruption("compressed cluster: zstd data too short");
  return Status::OK();
}

}  // namespace

Status Decompress(uint32_t type, std::span<const std::byte> in, std::span<std::byte> out) {
  switch (type) {
    case kCompressionZlib:
      return Inflate(in, out);
    case kCompressionZstd:
      return Unzstd(in, out);
    default:
      return Status::NotSupported("compression type " + std::to_string(type));
  }
}

}  // namespace cbt::qcow2
