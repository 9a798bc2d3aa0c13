// cbt::Status and cbt::Result<T>: the one error type of the core libraries.
//
// A Status is either OK (no allocation; the happy path costs one pointer
// compare) or carries a kind, a positive errno and a one-line message in the
// form "context: detail". The kind lets a caller choose between "refuse and
// explain" (Corruption, NotSupported, InvalidArgument) and "fail this
// request" (IOError); the errno is what an nbdkit callback puts in *err and is
// never replaced on the way up: ENOSPC from a pwrite stays ENOSPC.
//
// Exceptions never cross the nbdkit C boundary; core code returns Status.
#pragma once

#include <cerrno>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace cbt {

class [[nodiscard]] Status {
 public:
  enum class Kind : uint8_t {
    kOk = 0,
    kInvalidArgument,  // bad parameter or request from the user
    kNotFound,         // named thing does not exist
    kAlreadyExists,    // named thing exists already
    kCorruption,       // stored data cannot be trusted
    kNotSupported,     // valid, but a feature we do not implement
    kIOError,          // the OS or the layer below failed
    kBusy,             // someone else holds the resource (a lock)
    kOutOfRange,       // read or write past the end (short read)
  };

  Status() noexcept = default;  // OK
  Status(const Status& o) : rep_(o.rep_ ? std::make_unique<Rep>(*o.rep_) : nullptr) {}
  Status& operator=(const Status& o) {
    if (this != &o) rep_ = o.rep_ ? std::make_unique<Rep>(*o.rep_) : nullptr;
    return *this;
  }
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

  static Status OK() { return Status(); }
  static Status InvalidArgument(std::string msg, int err = EINVAL) {
    return Status(Kind::kInvalidArgument, err, std::move(msg));
  }
  static Status NotFound(std::string msg, int err = ENOENT) {
    return Status(Kind::kNotFound, err, std::move(msg));
  }
  static Status AlreadyExists(std::string msg, int err = EEXIST) {
    return Status(Kind::kAlreadyExists, err, std::move(msg));
  }
  static Status Corruption(std::string msg, int err = EIO) {
    return Status(Kind::kCorruption, err, std::move(msg));
  }
  static Status NotSupported(std::string msg, int err = ENOTSUP) {
    return Status(Kind::kNotSupported, err, std::move(msg));
  }
  static Status IOError(std::string msg, int err = EIO) {
    return Status(Kind::kIOError, err ? err : EIO, std::move(msg));
  }
  static Status Busy(std::string msg, int err = EBUSY) {
    return Status(Kind::kBusy, err, std::move(msg));
  }
  static Status OutOfRange(std::string msg, int err = EIO) {
    return Status(Kind::kOutOfRange, err, std::move(msg));
  }
  // An IOError for a failed system call: "context: strerror(err)".
  static Status FromErrno(int err, std::string_view context);

  bool ok() const noexcept { return rep_ == nullptr; }
  Kind kind() const noexcept { return rep_ ? rep_->kind : Kind::kOk; }
  // Positive errno; 0 when OK.
  int err() const noexcept { return rep_ ? rep_->err : 0; }
  // The message without the kind; empty when OK.
  const std::string& message() const noexcept;

  bool IsInvalidArgument() const noexcept { return kind() == Kind::kInvalidArgument; }
  bool IsNotFound() const noexcept { return kind() == Kind::kNotFound; }
  bool IsAlreadyExists() const noexcept { return kind() == Kind::kAlreadyExists; }
  bool IsCorruption() const noexcept { return kind() == Kind::kCorruption; }
  bool IsNotSupported() const noexcept { return kind() == Kind::kNotSupported; }
  bool IsIOError() const noexcept { return kind() == Kind::kIOError; }
  bool IsBusy() const noexcept { return kind() == Kind::kBusy; }
  bool IsOutOfRange() const noexcept { return kind() == Kind::kOutOfRange; }

  // Same kind and errno, message "context: old message".
  Status WithContext(std::string_view context) const;
  // "OK" or "<kind>: <message>".
  std::string ToString() const;
  static const char* KindName(Kind k) noexcept;

 private:
  struct Rep {
    Kind kind;
    int err;
    std::string msg;
  };
  Status(Kind k, int err, std::string msg)
      : rep_(std::make_unique<Rep>(Rep{k, err, std::move(msg)})) {}
  std::unique_ptr<Rep> rep_;
};

// A value or a non-OK Status.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  // REQUIRES: !s.ok()
  Result(Status s) : status_(std::move(s)) {  // NOLINT(google-explicit-constructor)
    if (status_.ok()) status_ = Status::IOError("internal: Result built from OK status");
  }

  bool ok() const noexcept { return value_.has_value(); }
  const Status& status() const& noexcept { return status_; }
  Status status() && { return std::move(status_); }

  // REQUIRES: ok()
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T& operator*() & { return *value_; }
  const T& operator*() const& { return *value_; }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }

 private:
  std::optional<T> value_;
  Status status_;
};

}  // namespace cbt

#define CBT_CONCAT_INNER_(a, b) a##b
#define CBT_CONCAT_(a, b) CBT_CONCAT_INNER_(a, b)

// Returns the Status of `expr` from the enclosing function if it is not OK.
#define CBT_RETURN_IF_ERROR(expr)              \
  do {                                         \
    ::cbt::Status cbt_status_ = (expr);        \
    if (!cbt_status_.ok()) return cbt_status_; \
  } while (0)

// `lhs = value of expr`, or returns its Status from the enclosing function.
#define CBT_ASSIGN_OR_RETURN(lhs, expr) \
  CBT_ASSIGN_OR_RETURN_IMPL_(CBT_CONCAT_(cbt_result_, __LINE__), lhs, expr)
// `lhs` may be a declaration ("int x"), so it cannot be parenthesised.
// NOLINTBEGIN(bugprone-macro-parentheses)
#define CBT_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return std::move(tmp).status();   \
  lhs = std::move(tmp).value()
// NOLINTEND(bugprone-macro-parentheses)
