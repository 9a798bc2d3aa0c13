// ProbeNbdExport: libnbd's asynchronous connect driven by nbd_poll against a
// deadline, so a server that accepts but never answers cannot hang us.
#include "server/nbd_probe.h"

#include <libnbd.h>

#include <cerrno>
#include <memory>
#include <string>

namespace cbt {

namespace {

struct HandleCloser {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};

std::string LibnbdError() {
  const char* e = nbd_get_error();
  return e != nullptr ? e : "unknown libnbd error";
}

}  // namespace

Result<NbdExportProbe> ProbeNbdExport(const std::string& socket, const std::string& export_name,
                                      const std::string& context,
                                      std::chrono::milliseconds timeout) {
  using Clock = std::chrono::steady_clock;
  const std::string where = "NBD server at '" + socket + "' (export '" + export_name + "')";
  const auto deadline = Clock::now() + timeout;
  std::unique_ptr<nbd_handle, HandleCloser> h(nbd_create());
  if (!h) return Status::IOError(where + ": nbd_create: " + LibnbdError(), nbd_get_errno());
  if (nbd_set_export_name(h.get(), export_name.c_str()) == -1 ||
      (!context.empty() && nbd_add_meta_context(h.get(), context.c_str()) == -1))
    return Status::InvalidArgument(where + ": " + LibnbdError());
  // libnbd's messages name the call ("nbd_aio_connect_unix: connect: ...").
  auto failed = [&]() {
    int err = nbd_get_errno();
    std::string msg = where + ": " + LibnbdError();
    if (err == ENOENT) return Status::NotFound(msg);
    return Status::IOError(msg, err != 0 ? err : EIO);
  };
  if (nbd_aio_connect_unix(h.get(), socket.c_str()) == -1) return failed();
  while (nbd_aio_is_connecting(h.get()) == 1) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0)
      return Status::IOError(
          where + ": no handshake within " + std::to_string(timeout.count()) + " ms", ETIMEDOUT);
    if (nbd_poll(h.get(), static_cast<int>(left.count())) == -1) return failed();
  }
  if (nbd_aio_is_ready(h.get()) != 1) return failed();
  NbdExportProbe p;
  int64_t size = nbd_get_size(h.get());
  if (size < 0) return failed();
  p.size = static_cast<uint64_t>(size);
  if (!context.empty()) {
    int r = nbd_can_meta_context(h.get(), context.c_str());
    if (r == -1) return failed();
    p.has_context = r == 1;
  }
  // Polite disconnect; nbd_close() (the deleter) does not wait for a reply.
  (void)nbd_shutdown(h.get(), 0);
  return p;
}

Status ProbeUri(const std::string& uri, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::unique_ptr<nbd_handle, HandleCloser> h(nbd_create());
  if (!h) return Status::IOError("nbd_create: " + LibnbdError());
  if (nbd_set_uri_allow_local_file(h.get(), true) == -1 ||
      nbd_aio_connect_uri(h.get(), uri.c_str()) == -1)
    return Status::IOError(LibnbdError(), nbd_get_errno());
  while (nbd_aio_is_connecting(h.get()) == 1) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0)
      return Status::IOError(
          "no NBD handshake within " + std::to_string(timeout.count() / 1000) + " s", ETIMEDOUT);
    if (nbd_poll(h.get(), static_cast<int>(left.count())) == -1)
      return Status::IOError(LibnbdError(), nbd_get_errno());
  }
  if (nbd_aio_is_ready(h.get()) != 1) return Status::IOError(LibnbdError(), nbd_get_errno());
  (void)nbd_shutdown(h.get(), 0);
  return Status::OK();
}

}  // namespace cbt
