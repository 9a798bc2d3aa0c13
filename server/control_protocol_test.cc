#include "server/control_protocol.h"

#include <gtest/gtest.h>

#include <string>

namespace cbt::control {
namespace {

using json = nlohmann::json;

// The refusal message for `line`; the test fails if the line parses.
std::string Refusal(const std::string& line) {
  ParsedLine p = ParseRequest(line);
  EXPECT_FALSE(p.request.ok()) << line;
  if (p.request.ok()) return "";
  EXPECT_TRUE(p.request.status().IsInvalidArgument()) << p.request.status().ToString();
  return p.request.status().message();
}

Request Parse(const std::string& line) {
  ParsedLine p = ParseRequest(line);
  EXPECT_TRUE(p.request.ok()) << line << ": " << p.request.status().ToString();
  return p.request.ok() ? *p.request
                        : Request{Command::kPersist, NoArgs{}, std::nullopt, std::nullopt};
}

TEST(ControlParse, BitmapAddWithEverything) {
  Request r = Parse(R"({"execute":"bitmap-add","arguments":{"name":"b1","granularity":65536,)"
                    R"("persistent":false,"disabled":true},"id":7})");
  EXPECT_EQ(r.command, Command::kBitmapAdd);
  ASSERT_TRUE(r.id.has_value());
  EXPECT_EQ(*r.id, json(7));
  const auto& a = std::get<BitmapAddArgs>(r.args);
  EXPECT_EQ(a.name, "b1");
  EXPECT_EQ(a.granularity, 65536u);
  EXPECT_FALSE(a.persistent);
  EXPECT_TRUE(a.disabled);
}

TEST(ControlParse, DefaultsAndOptionalPieces) {
  Request r = Parse(R"({"execute":"bitmap-add","arguments":{"name":"b"}})");
  EXPECT_FALSE(r.id.has_value());
  const auto& a = std::get<BitmapAddArgs>(r.args);
  EXPECT_FALSE(a.granularity.has_value());
  EXPECT_TRUE(a.persistent);
  EXPECT_FALSE(a.disabled);
  // No "arguments" at all is an empty object.
  EXPECT_EQ(Parse(R"({"execute":"query-bitmaps"})").command, Command::kQueryBitmaps);
  EXPECT_EQ(Parse(R"({"execute":"persist","arguments":{}})").command, Command::kPersist);
}

TEST(ControlParse, EveryCommandNameRoundTrips) {
  for (int i = 0; i <= static_cast<int>(Command::kCheckpoint); ++i) {
    auto c = static_cast<Command>(i);
    EXPECT_EQ(CommandFromName(CommandName(c)), c) << CommandName(c);
  }
  EXPECT_FALSE(CommandFromName("block-dirty-bitmap-add").has_value());
}

TEST(ControlParse, IdIsAnyScalarAndEchoedOnRefusal) {
  for (const char* id : {R"("x")", "1.5", "true", "null", "-3"}) {
    Request r = Parse(std::string(R"({"execute":"persist","id":)") + id + "}");
    ASSERT_TRUE(r.id.has_value());
    EXPECT_EQ(*r.id, json::parse(id));
  }
  EXPECT_EQ(Refusal(R"({"execute":"persist","id":[1]})"),
            "id: must be a scalar (string, number, boolean or null)");
  ParsedLine p = ParseRequest(R"({"execute":"nope","id":"abc"})");
  EXPECT_FALSE(p.request.ok());
  ASSERT_TRUE(p.id.has_value());
  EXPECT_EQ(*p.id, json("abc"));
}

TEST(ControlParse, TopLevelRefusalsNameTheField) {
  EXPECT_EQ(Refusal(""), "request: not valid JSON (at byte 1)");
  EXPECT_EQ(Refusal("[1]"), "request: must be a JSON object");
  EXPECT_EQ(Refusal(R"({"execute":"persist"} x)"), "request: not valid JSON (at byte 23)");
  EXPECT_EQ(Refusal(R"({"arguments":{}})"), "execute: missing");
  EXPECT_EQ(Refusal(R"({"execute":5})"), "execute: must be a string");
  EXPECT_EQ(Refusal(R"({"execute":"frobnicate"})"), "execute: unknown command 'frobnicate'");
  EXPECT_EQ(Refusal(R"({"execute":"persist","arguments":[]})"), "arguments: must be an object");
  EXPECT_EQ(Refusal(R"({"execute":"persist","extra":1})"), "extra: unknown key");
  EXPECT_EQ(Refusal(R"({"execute":"persist","execute":"persist"})"),
            "request: duplicate key 'execute'");
  EXPECT_EQ(Refusal(R"({"execute":"persist","arguments":{"x":1}})"), "arguments.x: unknown key");
}

TEST(ControlParse, LimitsOnLengthAndDepth) {
  std::string pad(kMaxLineBytes, ' ');
  EXPECT_EQ(Refusal(R"({"execute":"persist"})" + pad), "request: longer than 65536 bytes");
  std::string deep = R"({"execute":"persist","id":1,"arguments":)";
  deep += std::string(100000 / 2, '[');  // never recursed into
  EXPECT_NE(Refusal(deep).find("request: "), std::string::npos);
  std::string nested = R"({"execute":"persist","x":[[[[[[[[[]]]]]]]]]})";
  EXPECT_EQ(Refusal(nested), "request: nested deeper than 8 levels");
}

TEST(ControlParse, NamesAreChecked) {
  EXPECT_EQ(Refusal(R"({"execute":"bitmap-remove","arguments":{}})"), "arguments.name: missing");
  EXPECT_EQ(Refusal(R"({"execute":"bitmap-remove","arguments":{"name":1}})"),
            "arguments.name: must be a string");
  EXPECT_EQ(Refusal(R"({"execute":"bitmap-clear","arguments":{"name":""}})"),
            "arguments.name: must not be empty");
  EXPECT_EQ(Refusal(R"({"execute":"bitmap-enable","arguments":{"name":"a\u0000b"}})"),
            "arguments.name: contains a NUL byte");
  std::string n1023(1023, 'n');
  EXPECT_EQ(std::get<NameArgs>(
                Parse(R"({"execute":"bitmap-disable","arguments":{"name":")" + n1023 + "\"}}").args)
                .name,
            n1023);
  EXPECT_EQ(Refusal(R"({"execute":"bitmap-disable","arguments":{"name":")" + n1023 + "x\"}}"),
            "arguments.name: longer than 1023 bytes");
  EXPECT_EQ(Refusal("{\"execute\":\"persist\",\"id\":\"\xff\"}"),
            "request: not valid JSON (at byte 28)");
}

TEST(ControlParse, Granularity) {
  auto add = [](const std::string& g) {
    return R"({"execute":"bitmap-add","arguments":{"name":"b","granularity":)" + g + "}}";
  };
  EXPECT_EQ(std::get<BitmapAddArgs>(Parse(add("512")).args).granularity, 512u);
  EXPECT_EQ(std::get<BitmapAddArgs>(Parse(add("2147483648")).args).granularity, 2147483648u);
  for (const char* bad : {"256", "4294967296", "65535", "0"})
    EXPECT_EQ(Refusal(add(bad)),
              std::string("arguments.granularity: must be a power of two from 512 to "
                          "2147483648, got ") +
                  bad);
  for (const char* bad : {"-512", "65536.0", "\"64k\"", "true"})
    EXPECT_EQ(Refusal(add(bad)), "arguments.granularity: must be a non-negative integer") << bad;
  EXPECT_EQ(Refusal(R"({"execute":"bitmap-add","arguments":{"name":"b","disabled":1}})"),
            "arguments.disabled: must be true or false");
}

TEST(ControlParse, MergeCopyRenameSetPersistent) {
  auto m = std::get<MergeArgs>(
      Parse(R"({"execute":"bitmap-merge","arguments":{"target":"t","sources":["a","b"]}})").args);
  EXPECT_EQ(m.target, "t");
  EXPECT_EQ(m.sources, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(Refusal(R"({"execute":"bitmap-merge","arguments":{"target":"t","sources":[]}})"),
            "arguments.sources: must name 1 to 64 bitmaps");
  EXPECT_EQ(Refusal(R"({"execute":"bitmap-merge","arguments":{"target":"t","sources":["a",""]}})"),
            "arguments.sources[1]: must not be empty");
  EXPECT_EQ(Refusal(R"({"execute":"bitmap-merge","arguments":{"target":"t","sources":["a","a"]}})"),
            "arguments.sources[1]: 'a' named twice");
  EXPECT_EQ(Refusal(R"({"execute":"bitmap-copy","arguments":{"source":"a","target":"a"}})"),
            "arguments.target: same as source");
  auto r = std::get<RenameArgs>(
      Parse(R"({"execute":"bitmap-rename","arguments":{"name":"a","new-name":"b"}})").args);
  EXPECT_EQ(r.new_name, "b");
  EXPECT_EQ(Refusal(R"({"execute":"bitmap-set-persistent","arguments":{"name":"a"}})"),
            "arguments.persistent: missing");
}

TEST(ControlParse, QueryBitmapExtents) {
  Request r = Parse(R"({"execute":"query-bitmap-extents","arguments":{"name":"b0"}})");
  const auto& a = std::get<ExtentsArgs>(r.args);
  EXPECT_EQ(a.name, "b0");
  EXPECT_EQ(a.offset, 0u);
  EXPECT_FALSE(a.length.has_value());
  r = Parse(
      R"({"execute":"query-bitmap-extents","arguments":{"name":"b","offset":512,"length":4096}})");
  EXPECT_EQ(std::get<ExtentsArgs>(r.args).offset, 512u);
  EXPECT_EQ(std::get<ExtentsArgs>(r.args).length, 4096u);
  EXPECT_EQ(Refusal(R"({"execute":"query-bitmap-extents","arguments":{"name":"b","offset":-1}})"),
            "arguments.offset: must be a non-negative integer");
  EXPECT_EQ(Refusal(R"({"execute":"query-bitmap-extents","arguments":{"name":"b","length":1.5}})"),
            "arguments.length: must be a non-negative integer");
  EXPECT_EQ(Refusal(R"({"execute":"query-bitmap-extents","arguments":{}})"),
            "arguments.name: missing");
  EXPECT_FALSE(AllowedInTransaction(Command::kQueryBitmapExtents));
}

TEST(ControlParse, Checkpoint) {
  auto c = std::get<CheckpointArgs>(
      Parse(R"({"execute":"checkpoint","arguments":{"freeze":"b0","new":"b1"}})").args);
  EXPECT_EQ(c.freeze, "b0");
  EXPECT_EQ(c.new_name, "b1");
  EXPECT_EQ(Refusal(R"({"execute":"checkpoint","arguments":{"freeze":"b0"}})"),
            "arguments.new: missing");
  EXPECT_EQ(Refusal(R"({"execute":"checkpoint","arguments":{"freeze":"b","new":"b"}})"),
            "arguments.new: same as freeze");
}

TEST(ControlParse, Transaction) {
  auto t = std::get<TransactionArgs>(
      Parse(R"({"execute":"transaction","arguments":{"actions":[)"
            R"({"type":"bitmap-disable","data":{"name":"b0"}},)"
            R"({"type":"bitmap-add","data":{"name":"b1","granularity":4096}}]}})")
          .args);
  ASSERT_EQ(t.actions.size(), 2u);
  EXPECT_EQ(t.actions[0].type, Command::kBitmapDisable);
  EXPECT_EQ(std::get<NameArgs>(t.actions[0].args).name, "b0");
  EXPECT_EQ(std::get<BitmapAddArgs>(t.actions[1].args).granularity, 4096u);

  auto tx = [](const std::string& actions) {
    return R"({"execute":"transaction","arguments":{"actions":)" + actions + "}}";
  };
  EXPECT_EQ(Refusal(tx("[]")), "arguments.actions: must hold 1 to 64 actions");
  EXPECT_EQ(Refusal(tx("{}")), "arguments.actions: must be a list of actions");
  EXPECT_EQ(Refusal(tx("[1]")), "arguments.actions[0]: must be an object");
  EXPECT_EQ(Refusal(tx(R"([{"data":{}}])")), "arguments.actions[0].type: missing");
  EXPECT_EQ(Refusal(tx(R"([{"type":"x","data":{}}])")),
            "arguments.actions[0].type: unknown action 'x'");
  EXPECT_EQ(Refusal(tx(R"([{"type":"persist","data":{}}])")),
            "arguments.actions[0].type: 'persist' is not allowed in a transaction");
  EXPECT_EQ(Refusal(tx(R"([{"type":"bitmap-clear"}])")), "arguments.actions[0].data: missing");
  EXPECT_EQ(Refusal(tx(R"([{"type":"bitmap-clear","data":{"name":"a"},"when":1}])")),
            "arguments.actions[0].when: unknown key");
  EXPECT_EQ(Refusal(tx(R"([{"type":"bitmap-clear","data":{"name":"a"}},)"
                       R"({"type":"bitmap-clear","data":{"nam":"a"}}])")),
            "arguments.actions[1].data.nam: unknown key");
  std::string many = "[";
  for (size_t i = 0; i <= kMaxTransactionActions; ++i)
    many += std::string(i ? "," : "") + R"({"type":"bitmap-clear","data":{"name":"a"}})";
  EXPECT_EQ(Refusal(tx(many + "]")), "arguments.actions: must hold 1 to 64 actions");
}

TEST(ControlReply, Formatting) {
  EXPECT_EQ(FormatReturn(json::object(), json(7)), R"({"id":7,"return":{}})");
  EXPECT_EQ(FormatReturn({{"a", 1}}, std::nullopt), R"({"return":{"a":1}})");
  EXPECT_EQ(FormatError(Status::NotFound("bitmap 'b0' not found"), json("x")),
            R"({"error":{"class":"NotFound","desc":"bitmap 'b0' not found"},"id":"x"})");
  // Invalid UTF-8 in a message is replaced, never thrown.
  std::string reply = FormatError(Status::IOError("bad \xff byte"), std::nullopt);
  EXPECT_NE(reply.find("GenericError"), std::string::npos);
}

TEST(ControlReply, ErrorClassPerKind) {
  EXPECT_STREQ(ErrorClass(Status::InvalidArgument("x")), "InvalidArgument");
  EXPECT_STREQ(ErrorClass(Status::NotFound("x")), "NotFound");
  EXPECT_STREQ(ErrorClass(Status::AlreadyExists("x")), "AlreadyExists");
  EXPECT_STREQ(ErrorClass(Status::Busy("x")), "Busy");
  EXPECT_STREQ(ErrorClass(Status::NotSupported("x")), "NotSupported");
  EXPECT_STREQ(ErrorClass(Status::InvalidArgument("x", EACCES)), "PermissionDenied");
  EXPECT_STREQ(ErrorClass(Status::IOError("x")), "GenericError");
  EXPECT_STREQ(ErrorClass(Status::Corruption("x")), "GenericError");
  EXPECT_STREQ(ErrorClass(Status::OutOfRange("x")), "GenericError");
}

class ScriptedHandler : public Handler {
 public:
  Result<json> Handle(const Request& r) override {
    last = r.command;
    if (r.command == Command::kBitmapRemove) return Status::NotFound("bitmap 'x' not found");
    if (r.command == Command::kQueryStats) throw std::runtime_error("boom");
    if (r.command == Command::kPersist) return json(1);
    return json{{"ok", true}};
  }
  Command last = Command::kPersist;
};

TEST(ControlReply, HandleLine) {
  ScriptedHandler h;
  EXPECT_EQ(HandleLine(R"({"execute":"query-bitmaps","id":1})", h),
            R"({"id":1,"return":{"ok":true}})");
  EXPECT_EQ(HandleLine(R"({"execute":"bitmap-remove","arguments":{"name":"x"},"id":2})", h),
            R"({"error":{"class":"NotFound","desc":"bitmap 'x' not found"},"id":2})");
  EXPECT_EQ(HandleLine(R"({"execute":"query-stats","id":3})", h),
            R"({"error":{"class":"GenericError","desc":"internal: boom"},"id":3})");
  EXPECT_EQ(
      HandleLine(R"({"execute":"persist","id":4})", h),
      R"({"error":{"class":"GenericError","desc":"internal: handler returned a non-object"},"id":4})");
  h.last = Command::kCheckpoint;
  EXPECT_EQ(HandleLine(R"({"execute":"bitmap-add","id":5})", h),
            R"({"error":{"class":"InvalidArgument","desc":"arguments.name: missing"},"id":5})");
  EXPECT_EQ(h.last, Command::kCheckpoint);  // refused requests never reach the handler
}

}  // namespace
}  // namespace cbt::control
