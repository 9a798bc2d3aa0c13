// What `cbt bitmap --socket` sends: one command for one operation, one
// transaction for several (all or nothing, as offline), in command-line order.
#include "server/cli_socket.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <vector>

#include "server/bitmap_args.h"
#include "server/control_protocol.h"
#include "server/control_socket.h"

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

// A fake filter: query-bitmaps in the current shape, and the extents of a
// 1000-byte disk [0,100) dirty, [100,300) clean, [300,1000) dirty, served
// in pages of at most two extents with the dirty run at 300 split over two
// pages, so the client must page through "next" and merge across pages.
class FakeFilter : public control::Handler {
 public:
  Result<json> Handle(const control::Request& r) override {
    if (r.command == control::Command::kQueryBitmaps)
      return json{{"attached", true},
                  {"disk-size", 1000},
                  {"container", "/x/disk.cbt"},
                  {"cluster-size", 65536},
                  {"bitmaps",
                   {{{"name", "b0"},
                     {"granularity", 512},
                     {"recording", true},
                     {"persistent", false},
                     {"in-use", true},
                     {"consistent", true},
                     {"dirty-bytes", 800}}}}};
    if (r.command == control::Command::kBitmapClear)
      return Status::NotFound("bitmap 'x' not found; list the bitmaps with query-bitmaps");
    if (r.command != control::Command::kQueryBitmapExtents) return Status::NotSupported("not here");
    const auto& a = std::get<control::ExtentsArgs>(r.args);
    asked.push_back(a.offset);
    const std::vector<std::pair<uint64_t, bool>> cuts = {
        {0, true}, {100, false}, {300, true}, {600, true}, {1000, false}};
    const uint64_t end = a.length ? std::min<uint64_t>(1000, a.offset + *a.length) : 1000;
    json ext = json::array();
    uint64_t at = a.offset;
    for (size_t i = 0; i + 1 < cuts.size() && ext.size() < 2 && at < end; ++i) {
      if (cuts[i + 1].first <= at) continue;
      const uint64_t stop = std::min(cuts[i + 1].first, end);
      ext.push_back({{"start", at}, {"length", stop - at}, {"dirty", cuts[i].second}});
      at = stop;
    }
    return json{{"name", a.name},
                {"granularity", 512},
                {"disk-size", 1000},
                {"extents", ext},
                {"next", at < end ? json(at) : json()}};
  }
  std::vector<uint64_t> asked;
};

class CliSocketTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/cbt-cli-socket-test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/ctl.sock";
    server_ = std::make_unique<control::ControlServer>(control::ServerOptions{path_}, handler_);
    Status s = server_->Start();
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  void TearDown() override {
    server_.reset();
    (void)!system(("rm -rf '" + dir_ + "'").c_str());
  }
  // Runs a subcommand, returns its stdout; the exit code in *rc.
  std::string Run(int (*fn)(const std::vector<std::string>&), std::vector<std::string> args,
                  int* rc) {
    testing::internal::CaptureStdout();
    *rc = fn(args);
    std::fflush(stdout);
    return testing::internal::GetCapturedStdout();
  }
  std::string dir_, path_;
  FakeFilter handler_;
  std::unique_ptr<control::ControlServer> server_;
};

TEST_F(CliSocketTest, MapPagesThroughNextAndMergesAcrossPages) {
  int rc = -1;
  json got = json::parse(Run(RunMap, {"--socket", path_, "-B", "b0", "--output=json"}, &rc));
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(got, json::parse(R"([{"start":0,"length":100,"dirty":true},
                                 {"start":100,"length":200,"dirty":false},
                                 {"start":300,"length":700,"dirty":true}])"));
  EXPECT_EQ(handler_.asked, (std::vector<uint64_t>{0, 300}));
  // A range: offset, and length up to the end (clipped by the filter).
  handler_.asked.clear();
  got = json::parse(Run(
      RunMap,
      {"--socket", path_, "-B", "b0", "--offset", "50", "--length", "5000", "--output=json"}, &rc));
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(got, json::parse(R"([{"start":50,"length":50,"dirty":true},
                                 {"start":100,"length":200,"dirty":false},
                                 {"start":300,"length":700,"dirty":true}])"));
  EXPECT_EQ(handler_.asked, (std::vector<uint64_t>{50, 300}));
  std::string human = Run(RunMap, {"--socket", path_, "-B", "b0"}, &rc);
  EXPECT_NE(human.find("800 B dirty in 2 extents (of 1000 B from 0x0)"), std::string::npos)
      << human;
}

TEST_F(CliSocketTest, InfoHasTheOfflineKeysPlusLiveOnes) {
  int rc = -1;
  json got = json::parse(Run(RunInfo, {"--socket", path_, "--output=json"}, &rc));
  EXPECT_EQ(rc, 0);
  EXPECT_EQ(got, json::parse(R"({"filename": "/x/disk.cbt", "format": "qcow2",
      "virtual-size": 1000, "cluster-size": 65536, "data-file": null,
      "socket": ")" + path_ + R"(", "attached": true,
      "bitmaps": [{"name": "b0", "granularity": 512, "flags": ["in-use", "auto"],
                   "in-use": true, "enabled": true, "consistent": true,
                   "dirty-bytes": 800, "persistent": false}]})"));
  std::string human = Run(RunInfo, {"--socket", path_}, &rc);
  EXPECT_NE(human.find("image: /x/disk.cbt\nvirtual size: 1000 B (1000 bytes)\n"),
            std::string::npos)
      << human;
  EXPECT_NE(human.find("enabled, transient"), std::string::npos) << human;
}

TEST_F(CliSocketTest, NotSupportedNamesTheSocketAndCommand) {
  int rc = -1;
  testing::internal::CaptureStderr();
  Run(RunCheckpoint, {"--socket", path_, "--freeze", "b0", "--new", "b1"}, &rc);
  std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(rc, 1);
  EXPECT_EQ(err,
            "cbt: control socket '" + path_ + "': checkpoint: not here (nothing was changed)\n");
}

TEST_F(CliSocketTest, NotFoundPointsAtCbtInfoSocket) {
  int rc = -1;
  testing::internal::CaptureStderr();
  Run(RunBitmap, {"--socket", path_, "x", "--clear"}, &rc);
  std::string err = testing::internal::GetCapturedStderr();
  EXPECT_EQ(rc, 1);
  EXPECT_EQ(err,
            "cbt: bitmap 'x' not found; list bitmaps with 'cbt info --socket " + path_ + "'\n");
}

}  // namespace
}  // namespace cbt::cli
