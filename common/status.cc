#include "common/status.h"

#include <cstring>

namespace cbt {

namespace {
const std::string kEmpty;
}

Status Status::FromErrno(int err, std::string_view context) {
  std::string msg(context);
  msg += ": ";
  // strerrordesc_np: the English text without gettext. strerror() takes
  // glibc's locale lock, which deadlocked nbdkit's exit under an
  // LD_PRELOADed ASan runtime; messages are English anyway.
  const char* d = strerrordesc_np(err);
  msg += d ? d : ("errno " + std::to_string(err));
  return IOError(std::move(msg), err);
}

const std::string& Status::message() const noexcept {
  return rep_ ? rep_->msg : kEmpty;
}

Status Status::WithContext(std::string_view context) const {
  if (ok()) return Status();
  std::string msg(context);
  msg += ": ";
  msg += rep_->msg;
  return Status(rep_->kind, rep_->err, std::move(msg));
}

const char* Status::KindName(Kind k) noexcept {
  switch (k) {
    case Kind::kOk:
      return "OK";
    case Kind::kInvalidArgument:
      return "invalid argument";
    case Kind::kNotFound:
      return "not found";
    case Kind::kAlreadyExists:
      return "already exists";
    case Kind::kCorruption:
      return "corruption";
    case Kind::kNotSupported:
      return "not supported";
    case Kind::kIOError:
      return "I/O error";
    case Kind::kBusy:
      return "busy";
    case Kind::kOutOfRange:
      return "out of range";
  }
  return "unknown";
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  std::string s = KindName(rep_->kind);
  s += ": ";
  s += rep_->msg;
  return s;
}

}  // namespace cbt
