#include "plugin/internal_bitmaps.h"

#include <dlfcn.h>

#include <cerrno>

#include "plugin/qcow2_share.h"

namespace cbt::plugin {

namespace {

Qcow2ShareFn FindShare() {
  return reinterpret_cast<Qcow2ShareFn>(dlsym(RTLD_DEFAULT, kQcow2ShareSymbol));
}

// The image the plugin serves, as the one file the tracker may open.
class SharedImageStorage final : public Storage {
 public:
  explicit SharedImageStorage(const Qcow2Share& s) : share_(s) {}
  Result<std::shared_ptr<BlockIO>> Open(const std::string& path, Mode mode) override {
    if (path != share_.path)
      return Status::InvalidArgument(path + ": internal bitmaps live in " + share_.path);
    if (mode == Mode::kCreate)
      return Status::AlreadyExists(path + ": the image exists (internal bitmaps)");
    if (mode == Mode::kReadWrite && !share_.refcounts)
      return Status::IOError(path + ": the image is not writable here", EROFS);
    return share_.io;
  }
  Status CheckCreatable(const std::string& path) override {
    return Status::InvalidArgument(path + ": internal bitmaps are kept in an existing image");
  }
  void Remove(const std::string&) override {}  // never created here

 private:
  const Qcow2Share& share_;
};

}  // namespace

bool Qcow2PluginLoaded() {
  return FindShare() != nullptr;
}

Status UseInternalBitmaps(TrackerOptions* opts) {
  Qcow2ShareFn fn = FindShare();
  if (!fn) return Status::InvalidArgument("cbt's qcow2 plugin is not loaded");
  const Qcow2Share* share = fn(Qcow2ShareLayout());
  if (!share)
    return Status::InvalidArgument(
        "the qcow2 plugin below comes from another cbt build (or is not ready): use the "
        "filter and plugin of one build, or give cbt-file=");
  static SharedImageStorage storage(*share);  // one image per process
  opts->container_path = share->path;
  opts->storage = &storage;
  opts->shared_refcounts = share->refcounts;
  opts->internal = true;
  if (share->claim_bitmaps) share->claim_bitmaps();
  return Status::OK();
}

}  // namespace cbt::plugin
