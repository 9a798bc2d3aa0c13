// What `cbt bitmap --socket` sends: one command for one operation, one
// transaction for several (all or nothing, as offline), in command-line order.
#include "server/cli_socket.h"

#include <gtest/gtest.h>

#include "server/bitmap_args.h"
#include "server/control_protocol.h"

namespace cbt::cli {
namespace {

using nlohmann::json;

json Request(const std::vector<std::string>& args, std::string& command) {
  return BitmapRequest(ParseBitmapArgs(args), command);
}

TEST(BitmapRequest, OneOperationIsOneCommand) {
  std::string cmd;
  EXPECT_EQ(Request({"--socket", "s", "b1", "--add", "-g", "1M", "--transient"}, cmd),
            (json{{"name", "b1"}, {"granularity", 1048576}, {"persistent", false}}));
  EXPECT_EQ(cmd, "bitmap-add");
  EXPECT_EQ(Request({"--socket", "s", "b1", "--merge", "b0"}, cmd),
            (json{{"target", "b1"}, {"sources", {"b0"}}}));
  EXPECT_EQ(cmd, "bitmap-merge");
  EXPECT_EQ(Request({"--socket", "s", "b1", "--persistent"}, cmd),
            (json{{"name", "b1"}, {"persistent", true}}));
  EXPECT_EQ(cmd, "bitmap-set-persistent");
}

TEST(BitmapRequest, SeveralOperationsAreOneTransactionInOrder) {
  std::string cmd;
  json args = Request({"--socket", "s", "b1", "--add", "--disabled", "--merge", "b0", "--clear",
                       "--enable", "--disable", "--remove", "--transient"},
                      cmd);
  EXPECT_EQ(cmd, "transaction");
  json want = {{"actions",
                {{{"type", "bitmap-add"}, {"data", {{"name", "b1"}, {"disabled", true}}}},
                 {{"type", "bitmap-merge"}, {"data", {{"target", "b1"}, {"sources", {"b0"}}}}},
                 {{"type", "bitmap-clear"}, {"data", {{"name", "b1"}}}},
                 {{"type", "bitmap-enable"}, {"data", {{"name", "b1"}}}},
                 {{"type", "bitmap-disable"}, {"data", {{"name", "b1"}}}},
                 {{"type", "bitmap-remove"}, {"data", {{"name", "b1"}}}}}}};
  // --transient with --add in the call modifies the add (persistent false).
  want["actions"][0]["data"]["persistent"] = false;
  EXPECT_EQ(args, want);
  // And the server's parser accepts it as it is.
  control::ParsedLine p =
      control::ParseRequest(json{{"execute", cmd}, {"arguments", args}, {"id", 1}}.dump());
  ASSERT_TRUE(p.request.ok()) << p.request.status().ToString();
  EXPECT_EQ(std::get<control::TransactionArgs>(p.request->args).actions.size(), 6u);
}

}  // namespace
}  // namespace cbt::cli
