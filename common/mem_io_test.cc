#include "common/mem_io.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include "common/posix_file.h"

namespace cbt {
namespace {

TEST(MemBlockIOTest, ShortReadIsOutOfRange) {
  MemBlockIO io;
  std::byte b[4] = {};
  ASSERT_TRUE(io.pwrite(b, 0).ok());
  std::byte out[8];
  EXPECT_TRUE(io.pread(out, 0).IsOutOfRange());
  EXPECT_TRUE(io.pread(std::span(out, 4), 0).ok());
}

TEST(MemBlockIOTest, WriteExtendsAndResizeZeroes) {
  MemBlockIO io;
  std::byte b[2] = {std::byte{1}, std::byte{2}};
  ASSERT_TRUE(io.pwrite(b, 10).ok());
  EXPECT_EQ(*io.size(), 12u);
  ASSERT_TRUE(io.resize(20).ok());
  std::byte out[1];
  ASSERT_TRUE(io.pread(out, 19).ok());
  EXPECT_EQ(out[0], std::byte{0});
}

TEST(PosixFileTest, RoundTripAndShortRead) {
  char tmpl[] = "/tmp/cbt-posix-XXXXXX";
  int fd = mkstemp(tmpl);
  ASSERT_GE(fd, 0);
  close(fd);
  auto f = PosixFile::Open(tmpl, PosixFile::Mode::kReadWrite);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  std::byte b[3] = {std::byte{7}, std::byte{8}, std::byte{9}};
  ASSERT_TRUE((*f)->pwrite(b, 100).ok());
  ASSERT_TRUE((*f)->flush().ok());
  EXPECT_EQ(*(*f)->size(), 103u);
  std::byte out[3];
  ASSERT_TRUE((*f)->pread(out, 100).ok());
  EXPECT_EQ(out[2], std::byte{9});
  std::byte big[8];
  EXPECT_TRUE((*f)->pread(big, 100).IsOutOfRange());
  unlink(tmpl);
}

TEST(PosixFileTest, MissingFileIsNotFound) {
  auto f = PosixFile::Open("/nonexistent/cbt/file", PosixFile::Mode::kReadOnly);
  ASSERT_FALSE(f.ok());
  EXPECT_TRUE(f.status().IsNotFound());
  EXPECT_EQ(f.status().err(), ENOENT);
}

TEST(PosixFileTest, CreateExclusiveRefusesExisting) {
  char tmpl[] = "/tmp/cbt-posix-XXXXXX";
  int fd = mkstemp(tmpl);
  ASSERT_GE(fd, 0);
  close(fd);
  auto f = PosixFile::Open(tmpl, PosixFile::Mode::kCreateExclusive);
  EXPECT_TRUE(f.status().IsAlreadyExists());
  unlink(tmpl);
}

}  // namespace
}  // namespace cbt
