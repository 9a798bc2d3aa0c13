#include "server/size_parse.h"

#include <gtest/gtest.h>

namespace cbt::cli {
namespace {

uint64_t Ok(std::string_view s) {
  Result<uint64_t> r = ParseSize(s, "--size");
  EXPECT_TRUE(r.ok()) << s << ": " << r.status().ToString();
  return r.ok() ? *r : 0;
}

void Bad(std::string_view s) {
  Result<uint64_t> r = ParseSize(s, "--size");
  EXPECT_FALSE(r.ok()) << s << " parsed as " << (r.ok() ? *r : 0);
  if (!r.ok()) {
    EXPECT_TRUE(r.status().IsInvalidArgument());
    EXPECT_NE(r.status().message().find("--size"), std::string::npos);
  }
}

TEST(ParseSize, PlainBytes) {
  EXPECT_EQ(Ok("0"), 0u);
  EXPECT_EQ(Ok("1000"), 1000u);
  EXPECT_EQ(Ok("67108864"), 67108864u);
}

TEST(ParseSize, SuffixesArePowersOf1024CaseInsensitive) {
  EXPECT_EQ(Ok("512K"), 512u << 10);
  EXPECT_EQ(Ok("512k"), 512u << 10);
  EXPECT_EQ(Ok("64M"), 64u << 20);
  EXPECT_EQ(Ok("64m"), 64u << 20);
  EXPECT_EQ(Ok("1G"), 1u << 30);
  EXPECT_EQ(Ok("16T"), uint64_t{16} << 40);
  EXPECT_EQ(Ok("2P"), uint64_t{2} << 50);
  EXPECT_EQ(Ok("1E"), uint64_t{1} << 60);
  EXPECT_EQ(Ok("100B"), 100u);
  EXPECT_EQ(Ok("100b"), 100u);
}

TEST(ParseSize, FractionsNeedASuffixAndRoundHalfUp) {
  EXPECT_EQ(Ok("1.5G"), (uint64_t{3} << 30) / 2);
  EXPECT_EQ(Ok("0.5K"), 512u);
  EXPECT_EQ(Ok("1.K"), 1024u);
  EXPECT_EQ(Ok("1.0009765625K"), 1025u);  // exactly 1 byte more
  EXPECT_EQ(Ok("1.0004K"), 1024u);        // 0.41 B rounds down
  EXPECT_EQ(Ok("1.0005K"), 1025u);        // 0.51 B rounds up
  Bad("1.5");
  Bad("1.5B");
}

TEST(ParseSize, Hexadecimal) {
  EXPECT_EQ(Ok("0x10000"), 65536u);
  EXPECT_EQ(Ok("0XFF"), 255u);
  Bad("0x10K");
  Bad("0x");
  Bad("0x1.5");
}

TEST(ParseSize, RejectsJunk) {
  Bad("");
  Bad("-1");
  Bad("+1");
  Bad(" 1");
  Bad("M");
  Bad("64MB");
  Bad("64MiB");
  Bad("64 M");
  Bad("64X");
  Bad("1e3");
  Bad("abc");
}

TEST(ParseSize, RejectsOverflowPastInt64) {
  EXPECT_EQ(Ok("9223372036854775807"), 9223372036854775807ull);
  Bad("9223372036854775808");
  Bad("8E");
  EXPECT_EQ(Ok("7E"), uint64_t{7} << 60);
  Bad("99999999999999999999999");
  Bad("0x8000000000000000");
}

TEST(HumanSize, ExactAndRounded) {
  EXPECT_EQ(HumanSize(0), "0 B");
  EXPECT_EQ(HumanSize(1000), "1000 B");
  EXPECT_EQ(HumanSize(64u << 20), "64 MiB");
  EXPECT_EQ(HumanSize(uint64_t{16} << 40), "16 TiB");
  EXPECT_EQ(HumanSize((uint64_t{3} << 30) / 2), "1.5 GiB");
}

}  // namespace
}  // namespace cbt::cli
