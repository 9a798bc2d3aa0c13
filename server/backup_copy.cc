#include "server/backup_copy.h"

#include <libnbd.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <memory>
#include <span>

namespace cbt::cli {

namespace {

struct NbdCloser {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};
using Nbd = std::unique_ptr<nbd_handle, NbdCloser>;

Status NbdError(const std::string& what) {
  const int e = nbd_get_errno();
  const char* m = nbd_get_error();
  return Status::IOError(what + ": " + (m ? m : "unknown NBD error"), e > 0 ? e : EIO);
}

Result<Nbd> Connect(const std::string& uri, uint64_t disk_size, bool allocation) {
  Nbd h(nbd_create());
  if (!h) return NbdError("nbd_create");
  if (allocation && nbd_add_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION) == -1)
    return NbdError("nbd_add_meta_context");
  if (nbd_connect_uri(h.get(), uri.c_str()) == -1) return NbdError("connecting to " + uri);
  const int64_t size = nbd_get_size(h.get());
  if (size < 0) return NbdError(uri);
  if (static_cast<uint64_t>(size) != disk_size)
    return Status::InvalidArgument(uri + " has " + std::to_string(size) + " bytes, the disk " +
                                   std::to_string(disk_size));
  return h;
}

}  // namespace

std::vector<ByteRange> AlignRanges(std::vector<ByteRange> ranges, uint64_t align,
                                   uint64_t disk_size) {
  std::vector<ByteRange> out;
  for (ByteRange& r : ranges) {
    if (r.length == 0 || r.offset >= disk_size) continue;
    const uint64_t end = std::min(disk_size, r.offset + r.length);
    const uint64_t s = r.offset / align * align;
    const uint64_t e = std::min(disk_size, (end + align - 1) / align * align);
    r = {s, e - s};
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const ByteRange& a, const ByteRange& b) { return a.offset < b.offset; });
  for (const ByteRange& r : ranges) {
    if (r.length == 0 || r.offset >= disk_size) continue;
    if (!out.empty() && out.back().offset + out.back().length >= r.offset)
      out.back().length =
          std::max(out.back().offset + out.back().length, r.offset + r.length) - out.back().offset;
    else
      out.push_back(r);
  }
  return out;
}

std::vector<ByteRange> DirtyRanges(const std::vector<Extent>& extents, uint64_t& dirty_bytes) {
  std::vector<ByteRange> out;
  dirty_bytes = 0;
  for (const Extent& e : extents)
    if (e.dirty) {
      out.push_back({e.offset, e.length});
      dirty_bytes += e.length;
    }
  return out;
}

Status TouchExport(const std::string& uri) {
  Nbd h(nbd_create());
  if (!h) return NbdError("nbd_create");
  if (nbd_connect_uri(h.get(), uri.c_str()) == -1) return NbdError("connecting to " + uri);
  if (nbd_shutdown(h.get(), 0) == -1) return NbdError("disconnecting from " + uri);
  return Status::OK();
}

Result<std::vector<ByteRange>> AllocatedRanges(const std::string& uri, uint64_t disk_size) {
  CBT_ASSIGN_OR_RETURN(Nbd h, Connect(uri, disk_size, true));
  std::vector<ByteRange> out;
  if (nbd_can_meta_context(h.get(), LIBNBD_CONTEXT_BASE_ALLOCATION) != 1) {
    // No allocation information: everything is data.
    out.push_back({0, disk_size});
    return out;
  }
  struct Ctx {
    std::vector<ByteRange>* out;
    uint64_t pos;
  };
  for (uint64_t pos = 0; pos < disk_size;) {
    const uint64_t want = std::min<uint64_t>(disk_size - pos, uint64_t{1} << 30);
    Ctx c{&out, pos};
    nbd_extent_callback cb = {.callback = [](void* ud, const char* ctx, uint64_t off, uint32_t* e,
                                             size_t n, int*) -> int {
                                auto* c = static_cast<Ctx*>(ud);
                                if (std::string_view(ctx) != LIBNBD_CONTEXT_BASE_ALLOCATION)
                                  return 0;
                                uint64_t p = off;
                                for (size_t i = 0; i + 1 < n; i += 2) {
                                  const uint64_t len = e[i];
                                  if (len == 0) break;
                                  // Holes and zeros read as zeros in a new image: skip them.
                                  if (!(e[i + 1] & (LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO)))
                                    c->out->push_back({p, len});
                                  p += len;
                                }
                                c->pos = p;
                                return 0;
                              },
                              .user_data = &c,
                              .free = nullptr};
    if (nbd_block_status(h.get(), want, pos, cb, 0) == -1) return NbdError("block status");
    if (c.pos <= pos) return Status::IOError(uri + ": block status made no progress");
    pos = std::min(c.pos, disk_size);
  }
  return AlignRanges(std::move(out), 1, disk_size);
}

Status CopyRanges(const std::string& uri, uint64_t disk_size, const std::vector<ByteRange>& ranges,
                  qcow2::LayerWriter& w, const CopyOptions& o) {
  // Declared before the handle: callbacks of reads still in flight when it
  // closes (on an error return) may touch them.
  Status first_error;
  uint64_t done = 0;
  CBT_ASSIGN_OR_RETURN(Nbd h, Connect(uri, disk_size, false));
  struct Req {
    uint64_t offset;
    uint64_t length;
    std::unique_ptr<std::byte[]> buf;  // filled by the read: not zeroed first
    qcow2::LayerWriter* w;
    Status* first_error;
    uint64_t* done;
  };
  std::deque<ByteRange> todo;
  for (const ByteRange& r : ranges)
    for (uint64_t p = r.offset; p < r.offset + r.length; p += o.request_bytes)
      todo.push_back({p, std::min(o.request_bytes, r.offset + r.length - p)});
  auto on_done = [](void* ud, int* error) -> int {
    std::unique_ptr<Req> r(static_cast<Req*>(ud));
    if (!r->first_error->ok()) return 1;
    if (*error) {
      *r->first_error =
          Status::IOError("reading " + std::to_string(r->length) + " bytes at " +
                              std::to_string(r->offset) + ": " + std::strerror(*error),
                          *error);
      return 1;
    }
    Status s = r->w->WriteData(r->offset, std::span<const std::byte>(r->buf.get(), r->length));
    if (!s.ok()) *r->first_error = s;
    *r->done += r->length;
    return 1;
  };
  uint64_t reported = 0;
  while ((!todo.empty() && first_error.ok()) || nbd_aio_in_flight(h.get()) > 0) {
    while (!todo.empty() && first_error.ok() &&
           nbd_aio_in_flight(h.get()) < static_cast<int>(o.in_flight)) {
      ByteRange r = todo.front();
      todo.pop_front();
      auto req = std::make_unique<Req>(Req{r.offset, r.length,
                                           std::unique_ptr<std::byte[]>(new std::byte[r.length]),
                                           &w, &first_error, &done});
      void* buf = req->buf.get();
      nbd_completion_callback cb = {.callback = on_done, .user_data = req.get(), .free = nullptr};
      if (nbd_aio_pread(h.get(), buf, r.length, r.offset, cb, 0) == -1)
        return NbdError("read at " + std::to_string(r.offset));
      (void)req.release();  // the callback owns it now
    }
    if (nbd_aio_in_flight(h.get()) > 0 && nbd_poll(h.get(), -1) == -1)
      return NbdError("waiting for reads");
    if (o.progress && done != reported) {
      reported = done;
      o.progress(done);
    }
  }
  if (first_error.ok() && nbd_shutdown(h.get(), 0) == -1) return NbdError("disconnecting");
  return first_error;
}

}  // namespace cbt::cli
