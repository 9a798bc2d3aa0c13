#include "common/status.h"

#include <gtest/gtest.h>

#include "common/endian.h"

namespace cbt {
namespace {

TEST(StatusTest, DefaultIsOkAndCarriesNothing) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.err(), 0);
  EXPECT_EQ(s.ToString(), "OK");
}

TEST(StatusTest, ErrnoSurvivesContext) {
  Status s = Status::IOError("write disk.cbt: No space left on device", ENOSPC);
  Status t = s.WithContext("persist b0");
  EXPECT_TRUE(t.IsIOError());
  EXPECT_EQ(t.err(), ENOSPC);
  EXPECT_EQ(t.message(), "persist b0: write disk.cbt: No space left on device");
}

TEST(StatusTest, FromErrnoNamesTheCall) {
  Status s = Status::FromErrno(EACCES, "open x");
  EXPECT_EQ(s.err(), EACCES);
  EXPECT_EQ(s.message(), "open x: Permission denied");
}

TEST(StatusTest, CopyIsDeep) {
  Status a = Status::Corruption("bad");
  Status b = a;
  EXPECT_TRUE(b.IsCorruption());
  EXPECT_EQ(b.message(), "bad");
  a = Status();
  EXPECT_EQ(b.message(), "bad");
}

Result<int> Half(int x) {
  if (x % 2) return Status::InvalidArgument("odd");
  return x / 2;
}

Status Quarter(int x, int* out) {
  CBT_ASSIGN_OR_RETURN(int h, Half(x));
  CBT_ASSIGN_OR_RETURN(*out, Half(h));
  return Status::OK();
}

TEST(ResultTest, AssignOrReturnPropagates) {
  int q = 0;
  EXPECT_TRUE(Quarter(8, &q).ok());
  EXPECT_EQ(q, 2);
  Status s = Quarter(6, &q);
  EXPECT_TRUE(s.IsInvalidArgument());
}

TEST(ResultTest, OkStatusIsNotAValue) {
  Result<int> r{Status::OK()};
  EXPECT_FALSE(r.ok());
}

TEST(EndianTest, KnownBytes) {
  std::byte b[8];
  StoreBE64(b, 0x0102030405060708ULL);
  EXPECT_EQ(std::to_integer<int>(b[0]), 1);
  EXPECT_EQ(std::to_integer<int>(b[7]), 8);
  EXPECT_EQ(LoadBE64(b), 0x0102030405060708ULL);
  EXPECT_EQ(LoadBE32(b), 0x01020304U);
  EXPECT_EQ(LoadBE16(b + 6), 0x0708);
  StoreLE64(b, 0x0102030405060708ULL);
  EXPECT_EQ(std::to_integer<int>(b[0]), 8);
  EXPECT_EQ(LoadLE64(b), 0x0102030405060708ULL);
  StoreBE32(b, 0x23852875);
  EXPECT_EQ(std::to_integer<int>(b[0]), 0x23);
  StoreBE16(b, 0xbeef);
  EXPECT_EQ(LoadBE16(b), 0xbeef);
}

}  // namespace
}  // namespace cbt
