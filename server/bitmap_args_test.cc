#include "server/bitmap_args.h"

#include <gtest/gtest.h>

namespace cbt::cli {
namespace {

std::vector<OpKind> Kinds(const BitmapArgs& a) {
  std::vector<OpKind> k;
  for (const auto& op : a.ops) k.push_back(op.kind);
  return k;
}

TEST(ParseBitmapArgs, OperationsKeepCommandLineOrder) {
  BitmapArgs a = ParseBitmapArgs(
      {"f.qcow2", "b1", "--add", "--merge", "b0", "--disable", "--clear", "--enable"});
  EXPECT_EQ(a.file, "f.qcow2");
  EXPECT_EQ(a.name, "b1");
  EXPECT_EQ(Kinds(a), (std::vector<OpKind>{OpKind::kAdd, OpKind::kMerge, OpKind::kDisable,
                                           OpKind::kClear, OpKind::kEnable}));
  EXPECT_EQ(a.ops[1].source, "b0");
}

TEST(ParseBitmapArgs, OrderIsNotAlphabeticalOrGroupedByOption) {
  BitmapArgs a = ParseBitmapArgs({"--remove", "f", "--merge=x", "b", "--add", "--merge", "y"});
  EXPECT_EQ(a.file, "f");
  EXPECT_EQ(a.name, "b");
  ASSERT_EQ(a.ops.size(), 4u);
  EXPECT_EQ(a.ops[0], (BitmapOp{OpKind::kRemove, {}}));
  EXPECT_EQ(a.ops[1], (BitmapOp{OpKind::kMerge, "x"}));
  EXPECT_EQ(a.ops[2], (BitmapOp{OpKind::kAdd, {}}));
  EXPECT_EQ(a.ops[3], (BitmapOp{OpKind::kMerge, "y"}));
}

TEST(ParseBitmapArgs, RepeatedSwitchesAreAllKept) {
  BitmapArgs a = ParseBitmapArgs({"f", "b", "--disable", "--enable", "--disable"});
  EXPECT_EQ(Kinds(a), (std::vector<OpKind>{OpKind::kDisable, OpKind::kEnable, OpKind::kDisable}));
}

TEST(ParseBitmapArgs, ModifiersApplyToTheWholeCall) {
  BitmapArgs a = ParseBitmapArgs({"f", "b", "-g", "1M", "--add", "--disabled", "--output=json"});
  ASSERT_TRUE(a.opts.granularity.has_value());
  EXPECT_EQ(*a.opts.granularity, 1u << 20);
  EXPECT_TRUE(a.opts.add_disabled);
  EXPECT_EQ(a.common.output, "json");
  BitmapArgs m = ParseBitmapArgs({"f", "b", "--merge", "s", "-b", "other.qcow2"});
  EXPECT_EQ(m.source_file, "other.qcow2");
}

TEST(ParseBitmapArgs, UsageErrors) {
  EXPECT_THROW(ParseBitmapArgs({}), UsageError);
  EXPECT_THROW(ParseBitmapArgs({"f"}), UsageError);
  EXPECT_THROW(ParseBitmapArgs({"f", "b"}), UsageError);  // no operation
  EXPECT_THROW(ParseBitmapArgs({"f", "b", "--clear", "-g", "64K"}), UsageError);
  EXPECT_THROW(ParseBitmapArgs({"f", "b", "--clear", "--disabled"}), UsageError);
  EXPECT_THROW(ParseBitmapArgs({"f", "b", "--clear", "-b", "x"}), UsageError);
  EXPECT_THROW(ParseBitmapArgs({"f", "b", "--add", "-g", "64Q"}), UsageError);
  EXPECT_THROW(ParseBitmapArgs({"f", "b", "--frobnicate"}), po::error);
  EXPECT_THROW(ParseBitmapArgs({"f", "b", "--merge"}), po::error);
  EXPECT_THROW(ParseBitmapArgs({"f", "b", "c", "--add"}), po::error);
  EXPECT_THROW(ParseBitmapArgs({"f", "b", "--dis"}), po::error);  // no prefix guessing
}

TEST(ParseBitmapArgs, HelpNeedsNothingElse) {
  BitmapArgs a = ParseBitmapArgs({"--help"});
  EXPECT_TRUE(a.common.help);
  EXPECT_NE(a.help.find("--merge"), std::string::npos);
}

}  // namespace
}  // namespace cbt::cli
