#include "server/bitmap_ops.h"

#include <gtest/gtest.h>

#include "common/mem_io.h"

namespace cbt::cli {
namespace {

#define ASSERT_OK(expr)                    \
  do {                                     \
    ::cbt::Status s_ = (expr);             \
    ASSERT_TRUE(s_.ok()) << s_.ToString(); \
  } while (0)

constexpr uint64_t kDisk = 64u << 20;

class BitmapEditorTest : public ::testing::Test {
 protected:
  void SetUp() override { NewImage(65536); }
  void NewImage(uint32_t cluster_size, uint64_t disk = kDisk) {
    io_ = std::make_shared<MemBlockIO>();
    qcow2::CreateOptions opts;
    opts.virtual_size = disk;
    opts.cluster_size = cluster_size;
    auto img = qcow2::Image::Create(io_, opts);
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    img_ = std::move(img).value();
  }
  void Reopen() {
    img_.reset();
    auto img = qcow2::Image::Open(io_, {.writable = true});
    ASSERT_TRUE(img.ok()) << img.status().ToString();
    img_ = std::move(img).value();
  }
  // Stores bitmap `name` with the given dirty ranges, directly.
  void Store(const std::string& name, uint64_t granularity,
             std::vector<std::pair<uint64_t, uint64_t>> dirty) {
    auto b = DirtyBitmap::Create(img_->virtual_size(), granularity,
                                 static_cast<uint32_t>(img_->cluster_size()));
    ASSERT_TRUE(b.ok());
    for (auto [off, len] : dirty) ASSERT_TRUE((*b)->Mark(off, len).ok());
    DirtyBitmapSource src(**b);
    auto specs = img_->CurrentSpecs();
    qcow2::BitmapSpec s;
    s.name = name;
    s.granularity_bits = (*b)->granularity_bits();
    s.data = &src;
    specs.push_back(s);
    ASSERT_OK(img_->Commit(specs));
  }
  std::vector<Extent> DirtyExtents(const std::string& name) {
    auto b = LoadBitmap(*img_, name);
    EXPECT_TRUE(b.ok()) << b.status().ToString();
    std::vector<Extent> out;
    if (!b.ok()) return out;
    for (const Extent& e : (*b)->Extents(0, kDisk))
      if (e.dirty) out.push_back(e);
    return out;
  }
  Status Apply(BitmapEditor& ed, const std::string& name, OpKind k, std::string src = {},
               OpOptions o = {}) {
    return ed.Apply(name, BitmapOp{k, std::move(src)}, o);
  }

  std::shared_ptr<MemBlockIO> io_;
  std::unique_ptr<qcow2::Image> img_;
};

TEST_F(BitmapEditorTest, AddUsesClampedClusterSizeAsDefaultGranularity) {
  EXPECT_EQ(DefaultGranularity(512), 4096u);
  EXPECT_EQ(DefaultGranularity(65536), 65536u);
  EXPECT_EQ(DefaultGranularity(2u << 20), 65536u);
  NewImage(512);
  BitmapEditor ed(*img_);
  ASSERT_OK(Apply(ed, "b0", OpKind::kAdd));
  ASSERT_OK(ed.Commit());
  auto info = img_->Find("b0");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->granularity(), 4096u);
  EXPECT_TRUE(info->enabled);
}

TEST_F(BitmapEditorTest, AddDisabledWithGranularity) {
  BitmapEditor ed(*img_);
  ASSERT_OK(Apply(ed, "b0", OpKind::kAdd, {}, {.granularity = 1u << 20, .add_disabled = true}));
  ASSERT_OK(ed.Commit());
  auto info = img_->Find("b0");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->granularity(), 1u << 20);
  EXPECT_FALSE(info->enabled);
}

TEST_F(BitmapEditorTest, AddRefusesExistingNameAndBadInput) {
  Store("b0", 65536, {});
  BitmapEditor ed(*img_);
  Status s = Apply(ed, "b0", OpKind::kAdd);
  EXPECT_TRUE(s.IsAlreadyExists()) << s.ToString();
  EXPECT_TRUE(Apply(ed, std::string(1024, 'n'), OpKind::kAdd).IsInvalidArgument());
  ASSERT_OK(Apply(ed, std::string(1023, 'n'), OpKind::kAdd));
  EXPECT_TRUE(Apply(ed, "g", OpKind::kAdd, {}, {.granularity = 256}).IsInvalidArgument());
  EXPECT_TRUE(Apply(ed, "g", OpKind::kAdd, {}, {.granularity = 3u << 10}).IsInvalidArgument());
  EXPECT_TRUE(
      Apply(ed, "g", OpKind::kAdd, {}, {.granularity = uint64_t{4} << 30}).IsInvalidArgument());
}

TEST_F(BitmapEditorTest, FailedSequenceWritesNothing) {
  Store("b0", 65536, {{0, 4096}});
  const auto before = io_->contents();
  {
    BitmapEditor ed(*img_);
    ASSERT_OK(Apply(ed, "b1", OpKind::kAdd));
    Status s = Apply(ed, "b1", OpKind::kMerge, "missing");
    EXPECT_TRUE(s.IsNotFound()) << s.ToString();
    EXPECT_NE(s.message().find("'missing' not found"), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("cbt info"), std::string::npos) << s.message();
  }
  EXPECT_EQ(io_->contents(), before);
}

TEST_F(BitmapEditorTest, AddThenMergeCopiesAcrossGranularities) {
  Store("b0", 65536, {{0, 1}, {5u << 20, 64u << 10}});
  BitmapEditor ed(*img_);
  ASSERT_OK(Apply(ed, "b1", OpKind::kAdd, {}, {.granularity = 1u << 20}));
  ASSERT_OK(Apply(ed, "b1", OpKind::kMerge, "b0"));
  ASSERT_OK(ed.Commit());
  EXPECT_EQ(DirtyExtents("b1"),
            (std::vector<Extent>{{0, 1u << 20, true}, {5u << 20, 1u << 20, true}}));
  EXPECT_EQ(DirtyExtents("b0"), (std::vector<Extent>{{0, 65536, true}, {5u << 20, 65536, true}}));
}

TEST_F(BitmapEditorTest, MergeIsAUnionWithStoredData) {
  Store("a", 65536, {{0, 65536}});
  Store("b", 65536, {{1u << 20, 65536}});
  BitmapEditor ed(*img_);
  ASSERT_OK(Apply(ed, "a", OpKind::kMerge, "b"));
  ASSERT_OK(ed.Commit());
  EXPECT_EQ(DirtyExtents("a"), (std::vector<Extent>{{0, 65536, true}, {1u << 20, 65536, true}}));
}

TEST_F(BitmapEditorTest, LaterOperationsSeeEarlierOnes) {
  Store("b0", 65536, {{0, 65536}});
  BitmapEditor ed(*img_);
  ASSERT_OK(Apply(ed, "b0", OpKind::kClear));
  ASSERT_OK(Apply(ed, "b1", OpKind::kAdd));
  ASSERT_OK(Apply(ed, "b1", OpKind::kMerge, "b0"));  // b0 is clear by now
  ASSERT_OK(Apply(ed, "b0", OpKind::kRemove));
  ASSERT_OK(Apply(ed, "b0", OpKind::kAdd, {},
                  {.granularity = std::nullopt, .add_disabled = true}));  // name free again
  ASSERT_OK(ed.Commit());
  EXPECT_TRUE(DirtyExtents("b1").empty());
  EXPECT_TRUE(DirtyExtents("b0").empty());
  EXPECT_FALSE(img_->Find("b0")->enabled);
}

TEST_F(BitmapEditorTest, ClearEnableDisableRemove) {
  Store("b0", 65536, {{0, 65536}});
  {
    BitmapEditor ed(*img_);
    ASSERT_OK(Apply(ed, "b0", OpKind::kDisable));
    ASSERT_OK(ed.Commit());
  }
  EXPECT_FALSE(img_->Find("b0")->enabled);
  EXPECT_EQ(DirtyExtents("b0").size(), 1u);  // data kept
  {
    BitmapEditor ed(*img_);
    ASSERT_OK(Apply(ed, "b0", OpKind::kEnable));
    ASSERT_OK(Apply(ed, "b0", OpKind::kClear));
    ASSERT_OK(ed.Commit());
  }
  EXPECT_TRUE(img_->Find("b0")->enabled);
  EXPECT_TRUE(DirtyExtents("b0").empty());
  {
    BitmapEditor ed(*img_);
    ASSERT_OK(Apply(ed, "b0", OpKind::kRemove));
    EXPECT_TRUE(Apply(ed, "b0", OpKind::kClear).IsNotFound());
    ASSERT_OK(ed.Commit());
  }
  EXPECT_TRUE(img_->Bitmaps().empty());
}

TEST_F(BitmapEditorTest, InconsistentBitmapOnlyAllowsRemove) {
  Store("b0", 65536, {{0, 65536}});
  Store("ok", 65536, {});
  const std::string names[] = {"b0"};
  ASSERT_OK(img_->SetInUse(names, true));
  ASSERT_OK(img_->io()->flush());
  Reopen();  // now someone else's in_use: inconsistent
  ASSERT_FALSE(img_->Find("b0")->consistent);
  BitmapEditor ed(*img_);
  for (OpKind k : {OpKind::kClear, OpKind::kEnable, OpKind::kDisable}) {
    Status s = Apply(ed, "b0", k);
    EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
    EXPECT_NE(s.message().find("inconsistent"), std::string::npos);
    EXPECT_NE(s.message().find("--remove"), std::string::npos);
  }
  EXPECT_TRUE(Apply(ed, "b0", OpKind::kMerge, "ok").IsInvalidArgument());
  EXPECT_TRUE(Apply(ed, "ok", OpKind::kMerge, "b0").IsInvalidArgument());
  EXPECT_TRUE(Apply(ed, "b0", OpKind::kAdd).IsAlreadyExists());
  ASSERT_OK(Apply(ed, "b0", OpKind::kRemove));
  ASSERT_OK(ed.Commit());
  EXPECT_FALSE(img_->Find("b0").ok());
  EXPECT_TRUE(img_->Find("ok").ok());
}

TEST_F(BitmapEditorTest, InconsistentBitmapIsKeptByOtherOperations) {
  Store("b0", 65536, {});
  const std::string names[] = {"b0"};
  ASSERT_OK(img_->SetInUse(names, true));
  Reopen();
  BitmapEditor ed(*img_);
  ASSERT_OK(Apply(ed, "b1", OpKind::kAdd));
  ASSERT_OK(ed.Commit());
  auto info = img_->Find("b0");
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->in_use);
  EXPECT_FALSE(info->consistent);
}

}  // namespace
}  // namespace cbt::cli
