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

TEST(ParseBitmapArgs, SocketTakesNameOnly) {
  BitmapArgs a = ParseBitmapArgs({"--socket", "/run/c.sock", "b1", "--add", "--clear"});
  EXPECT_EQ(a.socket, "/run/c.sock");
  EXPECT_EQ(a.file, "");
  EXPECT_EQ(a.name, "b1");
  EXPECT_EQ(Kinds(a), (std::vector<OpKind>{OpKind::kAdd, OpKind::kClear}));
  // FILE and --socket together, or no NAME.
  EXPECT_THROW(ParseBitmapArgs({"--socket", "s", "f", "b1", "--add"}), UsageError);
  EXPECT_THROW(ParseBitmapArgs({"--socket", "s", "--add"}), UsageError);
  // -b reads another image: not over the socket.
  EXPECT_THROW(ParseBitmapArgs({"--socket", "s", "b1", "--merge", "b0", "-b", "x.qcow2"}),
               UsageError);
}

TEST(ParseBitmapArgs, TransientModifiesAddElseIsAnOperation) {
  BitmapArgs a = ParseBitmapArgs({"--socket", "s", "b1", "--transient", "--add", "--disabled"});
  EXPECT_EQ(Kinds(a), (std::vector<OpKind>{OpKind::kAdd}));
  EXPECT_TRUE(a.opts.add_transient);
  EXPECT_TRUE(a.opts.add_disabled);
  BitmapArgs b = ParseBitmapArgs({"--socket", "s", "b1", "--clear", "--transient", "--persistent"});
  EXPECT_EQ(Kinds(b),
            (std::vector<OpKind>{OpKind::kClear, OpKind::kTransient, OpKind::kPersistent}));
  EXPECT_FALSE(b.opts.add_transient);
  // Offline every bitmap is persistent.
  EXPECT_THROW(ParseBitmapArgs({"f", "b", "--add", "--transient"}), UsageError);
  EXPECT_THROW(ParseBitmapArgs({"f", "b", "--persistent"}), UsageError);
}

TEST(ParseBitmapArgs, HelpNeedsNothingElse) {
  BitmapArgs a = ParseBitmapArgs({"--help"});
  EXPECT_TRUE(a.common.help);
  EXPECT_NE(a.help.find("--merge"), std::string::npos);
}

}  // namespace
}  // namespace cbt::cli
