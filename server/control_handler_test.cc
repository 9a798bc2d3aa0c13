#include "server/control_handler.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "engine/tracker.h"
#include "server/control_protocol.h"

namespace cbt::control {
namespace {

using nlohmann::json;

constexpr uint64_t MiB = 1024 * 1024;

class ControlHandlerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cbt-ctlhandler-XXXXXX";
    dir_ = mkdtemp(tmpl);
    opts_.container_path = dir_ + "/disk.cbt";
    opts_.bitmaps = {"b0"};
    opts_.create = true;
    opts_.durability = Durability::kNone;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  static json Call(Handler& h, const std::string& line) { return json::parse(HandleLine(line, h)); }

  std::string dir_;
  TrackerOptions opts_;
};

TEST_F(ControlHandlerTest, BeforeAttachQueriesSayNotAttachedAndPersistDoesNothing) {
  auto t = Tracker::Prepare(opts_);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  std::atomic<bool> attached{false};
  TrackerHandler h(**t, attached);
  EXPECT_EQ(Call(h, R"({"execute":"query-bitmaps","id":1})"),
            json::parse(R"({"id":1,"return":{"attached":false,"bitmaps":[]}})"));
  EXPECT_EQ(Call(h, R"({"execute":"persist","id":2})"), json::parse(R"({"id":2,"return":{}})"));
  json s = Call(h, R"({"execute":"query-stats"})");
  EXPECT_EQ(s["return"]["attached"], false);
  EXPECT_EQ(s["return"]["persists"], 0);
}

TEST_F(ControlHandlerTest, QueryBitmapsReportsMemoryAndInUseAndPersistClearsIt) {
  auto t = Tracker::Open(opts_, 64 * MiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  std::atomic<bool> attached{true};
  TrackerHandler h(**t, attached);
  // Granules 0, 16 and 17 (64K granularity).
  ASSERT_TRUE((*t)->BeforeChange(0, 1).ok());
  ASSERT_TRUE((*t)->BeforeChange(1 * MiB, 100 * 1024).ok());

  json r = Call(h, R"({"execute":"query-bitmaps","id":"a"})");
  const json want =
      json::parse(R"({"id":"a","return":{"attached":true,"bitmaps":[)"
                  R"({"name":"b0","granularity":65536,"recording":true,"persistent":true,)"
                  R"("in-use":true,"dirty-bytes":196608}]}})");
  EXPECT_EQ(r, want);

  EXPECT_EQ(Call(h, R"({"execute":"persist"})"), json::parse(R"({"return":{}})"));
  r = Call(h, R"({"execute":"query-bitmaps"})");
  EXPECT_EQ(r["return"]["bitmaps"][0]["in-use"], false);
  EXPECT_EQ(r["return"]["bitmaps"][0]["dirty-bytes"], 196608);

  json s = Call(h, R"({"execute":"query-stats"})")["return"];
  EXPECT_EQ(s["attached"], true);
  EXPECT_EQ(s["persists"], 1);
  EXPECT_GT(s["bytes-written"].get<uint64_t>(), 0u);
  EXPECT_EQ(s["in-use-sets"], 1);
  EXPECT_EQ(s["intent-writes"], 0);
  EXPECT_EQ(s["recovered-granules"], 0);
}

TEST_F(ControlHandlerTest, PersistErrorKeepsItsClass) {
  auto t = Tracker::Open(opts_, 64 * MiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ASSERT_TRUE((*t)->Close().ok());
  std::atomic<bool> attached{true};
  TrackerHandler h(**t, attached);
  json r = Call(h, R"({"execute":"persist","id":3})");
  EXPECT_EQ(r["error"]["class"], "GenericError") << r.dump();
  EXPECT_EQ(r["id"], 3);
}

TEST_F(ControlHandlerTest, EveryOtherCommandIsNotSupportedYet) {
  auto t = Tracker::Open(opts_, 64 * MiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  std::atomic<bool> attached{true};
  TrackerHandler h(**t, attached);
  const json want = {
      {"error", {{"class", "NotSupported"}, {"desc", "not implemented yet (issue 9)"}}}, {"id", 1}};
  const char* lines[] = {
      R"({"execute":"bitmap-add","arguments":{"name":"x"},"id":1})",
      R"({"execute":"bitmap-remove","arguments":{"name":"b0"},"id":1})",
      R"({"execute":"checkpoint","arguments":{"freeze":"b0","new":"b1"},"id":1})",
      R"({"execute":"transaction","arguments":{"actions":[)"
      R"({"type":"bitmap-clear","data":{"name":"b0"}}]},"id":1})",
  };
  for (const char* line : lines) EXPECT_EQ(Call(h, line), want) << line;
  // Nothing changed.
  EXPECT_EQ(Call(h, R"({"execute":"query-bitmaps"})")["return"]["bitmaps"][0]["dirty-bytes"], 0);
}

}  // namespace
}  // namespace cbt::control
