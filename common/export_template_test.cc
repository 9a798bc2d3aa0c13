// Per-export container paths (export_template.h).
#include "common/export_template.h"

#include <gtest/gtest.h>

#include <set>
#include <string>

namespace cbt {
namespace {

TEST(ExportTemplate, OnlyPercentEMakesATemplate) {
  EXPECT_TRUE(IsTemplate("/var/lib/cbt/%e.cbt"));
  EXPECT_FALSE(IsTemplate("/var/lib/cbt/disk.cbt"));
  EXPECT_FALSE(IsTemplate("/data/50%/disk.cbt"));  // a single path, as it is
}

TEST(ExportTemplate, CheckRefusesOtherPercentSequences) {
  EXPECT_TRUE(CheckTemplate("/d/%e.cbt").ok());
  EXPECT_TRUE(CheckTemplate("/d/%e-%%.cbt").ok());
  EXPECT_TRUE(CheckTemplate("%e/%e").ok());
  EXPECT_FALSE(CheckTemplate("/d/%e-%x.cbt").ok());
  EXPECT_FALSE(CheckTemplate("/d/%e%").ok());  // a trailing '%'
  EXPECT_FALSE(CheckTemplate("/d/%%e.cbt").ok());  // "%%e" is "%e" literally: no export
}

TEST(ExportTemplate, NamesAreKeptOrEncoded) {
  auto p = [](std::string_view t, std::string_view n) {
    Result<std::string> r = ContainerFor(t, n);
    EXPECT_TRUE(r.ok()) << n;
    return r.ok() ? *r : std::string();
  };
  EXPECT_EQ(p("/d/%e.cbt", "vm1.img"), "/d/vm1.img.cbt");
  EXPECT_EQ(p("/d/%e.cbt", "A-z_0+9"), "/d/A-z_0+9.cbt");
  EXPECT_EQ(p("/d/%e.cbt", "c d"), "/d/c%20d.cbt");
  EXPECT_EQ(p("/d/%e.cbt", "../etc/x"), "/d/%2E.%2Fetc%2Fx.cbt");
  EXPECT_EQ(p("/d/%e.cbt", "."), "/d/%2E.cbt");
  EXPECT_EQ(p("/d/%e.cbt", "a%b"), "/d/a%25b.cbt");
  EXPECT_EQ(p("/d/%e.cbt", "\xc3\xa9"), "/d/%C3%A9.cbt");
  EXPECT_EQ(p("/d/%e-%%.cbt", "x"), "/d/x-%.cbt");
  EXPECT_EQ(p("/%e/%e", "x"), "/x/x");
}

TEST(ExportTemplate, DistinctNamesGiveDistinctPaths) {
  // The encoding is injective: an encoded '%' never looks like a kept byte.
  const char* names[] = {"a b", "a%20b", "a+b", "a.b", ".ab", "%2Eab", "a/b", "a%2Fb"};
  std::set<std::string> seen;
  for (const char* n : names) {
    Result<std::string> r = ContainerFor("/d/%e", n);
    ASSERT_TRUE(r.ok());
    EXPECT_TRUE(seen.insert(*r).second) << n << " -> " << *r;
  }
}

TEST(ExportTemplate, EmptyNameIsRefused) {
  Result<std::string> r = ContainerFor("/d/%e.cbt", "");
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument());
  EXPECT_NE(r.status().message().find("empty export name"), std::string::npos);
}

}  // namespace
}  // namespace cbt
