// libFuzzer target for the control protocol parser (server/control_protocol.h):
// one input = one request line. ParseRequest must refuse bad input with a
// Status (never crash, leak, hang or recurse on nesting), every accepted
// request must respect the documented limits, and formatting any reply,
// including ones quoting the input, must never throw.
//
// Build and run: fuzz/control_run.sh SECONDS. See docs/control.md ("Limits").
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <variant>

#include "server/control_protocol.h"

namespace {

using namespace cbt::control;

void CheckName(const std::string& n) {
  if (n.empty() || n.size() > kMaxNameBytes || n.find('\0') != std::string::npos) abort();
}

void CheckAction(const ActionArgs& a) {
  std::visit(
      [](const auto& v) {
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, BitmapAddArgs>) {
          CheckName(v.name);
          if (v.granularity &&
              (*v.granularity < kMinGranularity || *v.granularity > kMaxGranularity ||
               (*v.granularity & (*v.granularity - 1))))
            abort();
        } else if constexpr (std::is_same_v<T, NameArgs>) {
          CheckName(v.name);
        } else if constexpr (std::is_same_v<T, MergeArgs>) {
          CheckName(v.target);
          if (v.sources.empty() || v.sources.size() > kMaxMergeSources) abort();
          for (const auto& s : v.sources) CheckName(s);
        } else if constexpr (std::is_same_v<T, CheckpointArgs>) {
          CheckName(v.freeze);
          CheckName(v.new_name);
          if (v.freeze == v.new_name) abort();
        }
      },
      a);
}

class NullHandler : public Handler {
 public:
  cbt::Result<nlohmann::json> Handle(const Request&) override {
    return cbt::Status::NotFound("fuzz");
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view line(reinterpret_cast<const char*>(data), size);
  ParsedLine p = ParseRequest(line);
  if (p.id && p.id->is_structured()) abort();
  if (p.request.ok()) {
    if (size > kMaxLineBytes) abort();
    const Request& r = *p.request;
    if (auto* t = std::get_if<TransactionArgs>(&r.args)) {
      if (t->actions.empty() || t->actions.size() > kMaxTransactionActions) abort();
      for (const auto& a : t->actions) {
        if (!AllowedInTransaction(a.type)) abort();
        CheckAction(a.args);
      }
    }
    (void)FormatReturn(nlohmann::json::object(), r.id);
  } else {
    (void)FormatError(p.request.status(), p.id);
  }
  NullHandler h;
  (void)HandleLine(line, h);
  return 0;
}
