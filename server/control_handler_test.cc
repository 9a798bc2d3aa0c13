#include "server/control_handler.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "engine/storage.h"
#include "engine/tracker.h"
#include "qcow2/image.h"
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
            json({{"id", 1},
                  {"return",
                   {{"attached", false},
                    {"disk-size", 0},
                    {"container", opts_.container_path},
                    {"cluster-size", 0},
                    {"bitmaps", json::array()}}}}));
  json e = Call(h, R"({"execute":"bitmap-add","arguments":{"name":"x"},"id":4})");
  EXPECT_EQ(e["error"]["class"], "Busy") << e.dump();
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
  ASSERT_TRUE((*t)->BeginChange(0, 1).ok());
  ASSERT_TRUE((*t)->BeginChange(1 * MiB, 100 * 1024).ok());

  json r = Call(h, R"({"execute":"query-bitmaps","id":"a"})");
  const json want = json::parse(R"({"id":"a","return":{"attached":true,"disk-size":67108864,)"
                                R"("container":")" +
                                opts_.container_path +
                                R"(","cluster-size":65536,"bitmaps":[)"
                                R"({"name":"b0","granularity":65536,"recording":true,)"
                                R"("persistent":true,"in-use":true,"consistent":true,)"
                                R"("dirty-bytes":196608}]}})");
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

// The container as QEMU would see it after the server stopped.
std::vector<qcow2::BitmapInfo> Stored(const std::string& path) {
  auto f = PosixStorage().Open(path, Storage::Mode::kReadOnly);
  EXPECT_TRUE(f.ok());
  auto img = qcow2::Image::Open(std::move(f).value());
  EXPECT_TRUE(img.ok()) << img.status().ToString();
  return (*img)->Bitmaps();
}

json Names(const json& bitmaps) {
  json out = json::array();
  for (const auto& b : bitmaps)
    out.push_back({b["name"], b["recording"], b["persistent"], b["dirty-bytes"]});
  return out;
}

TEST_F(ControlHandlerTest, EveryEditCommandChangesMemoryAndContainer) {
  auto t = Tracker::Open(opts_, 64 * MiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  std::atomic<bool> attached{true};
  TrackerHandler h(**t, attached);
  auto ok = [&](const std::string& line) {
    json r = Call(h, line);
    EXPECT_TRUE(r.contains("return")) << line << " -> " << r.dump();
  };
  ASSERT_TRUE((*t)->BeginChange(0, 1).ok());  // b0: granule 0
  ok(R"({"execute":"checkpoint","arguments":{"freeze":"b0","new":"b1"}})");
  ASSERT_TRUE((*t)->BeginChange(1 * MiB, 1).ok());  // b1 only (b0 frozen)
  ok(R"({"execute":"bitmap-add","arguments":{"name":"t","persistent":false,"granularity":4096}})");
  ASSERT_TRUE((*t)->BeginChange(2 * MiB, 1).ok());  // b1 and t
  ok(R"({"execute":"bitmap-copy","arguments":{"source":"b1","target":"c"}})");
  ok(R"({"execute":"bitmap-merge","arguments":{"target":"c","sources":["b0","t"]}})");
  ok(R"({"execute":"bitmap-rename","arguments":{"name":"c","new-name":"all"}})");
  ok(R"({"execute":"bitmap-set-persistent","arguments":{"name":"t","persistent":true}})");
  ok(R"({"execute":"bitmap-disable","arguments":{"name":"t"}})");
  ok(R"({"execute":"bitmap-enable","arguments":{"name":"b0"}})");
  ok(R"({"execute":"bitmap-clear","arguments":{"name":"b0"}})");
  ASSERT_TRUE((*t)->BeginChange(3 * MiB, 1).ok());  // b0 and b1
  json q = Call(h, R"({"execute":"query-bitmaps"})")["return"]["bitmaps"];
  EXPECT_EQ(Names(q), json::parse(R"([["b0",true,true,65536],["b1",true,true,196608],)"
                                  R"(["t",false,true,4096],["all",false,true,196608]])"))
      << q.dump();
  ok(R"({"execute":"transaction","arguments":{"actions":[)"
     R"({"type":"bitmap-remove","data":{"name":"all"}},)"
     R"({"type":"bitmap-set-persistent","data":{"name":"b1","persistent":false}}]}})");
  q = Call(h, R"({"execute":"query-bitmaps"})")["return"]["bitmaps"];
  EXPECT_EQ(Names(q), json::parse(R"([["b0",true,true,65536],["b1",true,false,196608],)"
                                  R"(["t",false,true,4096]])"))
      << q.dump();
  json x =
      Call(h, R"({"execute":"query-bitmap-extents","arguments":{"name":"b1","length":4194304}})");
  EXPECT_EQ(x["return"]["extents"],
            json::parse(R"([{"start":0,"length":1048576,"dirty":false},)"
                        R"({"start":1048576,"length":65536,"dirty":true},)"
                        R"({"start":1114112,"length":983040,"dirty":false},)"
                        R"({"start":2097152,"length":65536,"dirty":true},)"
                        R"({"start":2162688,"length":983040,"dirty":false},)"
                        R"({"start":3145728,"length":65536,"dirty":true},)"
                        R"({"start":3211264,"length":983040,"dirty":false}])"))
      << x.dump();
  EXPECT_TRUE(x["return"]["next"].is_null());
  ASSERT_TRUE((*t)->Close().ok());
  // On disk: the persistent ones, in_use clear, with their bits.
  std::vector<qcow2::BitmapInfo> s = Stored(opts_.container_path);
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].name, "b0");
  EXPECT_TRUE(s[0].enabled);
  EXPECT_FALSE(s[0].in_use);
  EXPECT_EQ(s[1].name, "t");
  EXPECT_FALSE(s[1].enabled);
  EXPECT_EQ(s[1].granularity(), 4096u);
}

TEST_F(ControlHandlerTest, RefusedEditsChangeNothing) {
  auto t = Tracker::Open(opts_, 64 * MiB);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  std::atomic<bool> attached{true};
  TrackerHandler h(**t, attached);
  ASSERT_TRUE((*t)->BeginChange(0, 1).ok());
  auto cls = [&](const std::string& line) { return Call(h, line)["error"]["class"]; };
  EXPECT_EQ(cls(R"({"execute":"bitmap-remove","arguments":{"name":"nope"}})"), "NotFound");
  EXPECT_EQ(cls(R"({"execute":"bitmap-add","arguments":{"name":"b0"}})"), "AlreadyExists");
  EXPECT_EQ(cls(R"({"execute":"checkpoint","arguments":{"freeze":"nope","new":"b1"}})"),
            "NotFound");
  // The second action fails: the first (clear b0) must not happen.
  EXPECT_EQ(cls(R"({"execute":"transaction","arguments":{"actions":[)"
                R"({"type":"bitmap-clear","data":{"name":"b0"}},)"
                R"({"type":"bitmap-merge","data":{"target":"b0","sources":["zz"]}}]}})"),
            "NotFound");
  json d = Call(h, R"({"execute":"transaction","arguments":{"actions":[)"
                   R"({"type":"bitmap-clear","data":{"name":"b0"}},)"
                   R"({"type":"bitmap-add","data":{"name":"b0"}}]}})");
  EXPECT_EQ(d["error"]["class"], "AlreadyExists");
  EXPECT_NE(d["error"]["desc"].get<std::string>().find("action 1 (bitmap-add)"), std::string::npos)
      << d.dump();
  EXPECT_EQ(Call(h, R"({"execute":"bitmap-disable","arguments":{"name":"b0"}})").count("return"),
            1u);
  EXPECT_EQ(cls(R"({"execute":"checkpoint","arguments":{"freeze":"b0","new":"b1"}})"),
            "InvalidArgument");  // not recording
  json q = Call(h, R"({"execute":"query-bitmaps"})")["return"]["bitmaps"];
  EXPECT_EQ(Names(q), json::parse(R"([["b0",false,true,65536]])")) << q.dump();
}

// The router of a server tracking several exports: query-exports from its
// list, every other command to the handler of the request's "export", the
// resolver's refusal as the reply.
TEST_F(ControlHandlerTest, ExportRouterSendsEachRequestToItsDisk) {
  opts_.container_path = dir_ + "/a.cbt";
  auto a = Tracker::Open(opts_, 1 * MiB);
  ASSERT_TRUE(a.ok()) << a.status().message();
  opts_.container_path = dir_ + "/b.cbt";
  auto b = Tracker::Open(opts_, 2 * MiB);
  ASSERT_TRUE(b.ok()) << b.status().message();
  std::atomic<bool> yes{true};
  TrackerHandler ha(**a, yes), hb(**b, yes);
  std::vector<std::optional<std::string>> asked;
  ExportRouter router(
      [&](const std::optional<std::string>& name) -> Result<Handler*> {
        asked.push_back(name);
        if (!name) return Status::InvalidArgument("name one");
        if (*name == "a") return static_cast<Handler*>(&ha);
        if (*name == "b") return static_cast<Handler*>(&hb);
        return Status::NotFound("export '" + *name + "' is not tracked");
      },
      [] {
        return json::array({{{"name", "a"}}, {{"name", "b"}}});
      });

  json r = Call(router, R"({"execute":"query-exports"})");
  EXPECT_EQ(r["return"]["exports"].size(), 2u) << r;
  EXPECT_TRUE(asked.empty());  // no disk is asked for the list
  r = Call(router, R"({"execute":"query-bitmaps","export":"b"})");
  EXPECT_EQ(r["return"]["disk-size"], 2 * MiB) << r;
  r = Call(router, R"({"execute":"query-bitmaps","export":"a"})");
  EXPECT_EQ(r["return"]["disk-size"], 1 * MiB) << r;
  r = Call(router, R"({"execute":"query-bitmaps"})");
  EXPECT_EQ(r["error"]["class"], "InvalidArgument") << r;
  r = Call(router, R"({"execute":"bitmap-add","export":"zz","arguments":{"name":"x"}})");
  EXPECT_EQ(r["error"]["class"], "NotFound") << r;
  ASSERT_EQ(asked.size(), 4u);
  EXPECT_EQ(asked[0], "b");
  EXPECT_EQ(asked[2], std::nullopt);
  // An edit through the router reaches only its disk.
  r = Call(router, R"({"execute":"bitmap-add","export":"a","arguments":{"name":"x"}})");
  EXPECT_TRUE(r.contains("return")) << r;
  EXPECT_TRUE((*a)->Bitmap("x"));
  EXPECT_FALSE((*b)->Bitmap("x"));
  r = Call(router, R"({"execute":"query-bitmaps","export":7})");
  EXPECT_EQ(r["error"]["class"], "InvalidArgument") << r;  // the parser: a string
}

}  // namespace
}  // namespace cbt::control
