// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/status.h"

#include <string>

#include <gtest/gtest.h>

#include "testing/test_util.h"

namespace kvcache {
namespace {

TEST(Status, DefaultIsOk) {
  const Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), Code::ok);
  EXPECT_EQ(s.message(), "");
  EXPECT_EQ(s.to_string(), "OK");
}

TEST(Status, FactoriesCarryCodeAndMessage) {
  const Status cases[] = {
      Status::invalid_argument("a"), Status::out_of_range("b"), Status::resource_exhausted("c"),
      Status::not_found("d"),        Status::corruption("e"),   Status::unavailable("f"),
      Status::internal("g")};
  const Code codes[] = {Code::invalid_argument, Code::out_of_range, Code::resource_exhausted,
                        Code::not_found,        Code::corruption,   Code::unavailable,
                        Code::internal};
  for (size_t i = 0; i < std::size(cases); ++i) {
    EXPECT_FALSE(cases[i].ok());
    EXPECT_EQ(cases[i].code(), codes[i]);
    EXPECT_EQ(cases[i].message(), std::string(1, static_cast<char>('a' + i)));
    EXPECT_EQ(cases[i].to_string(), std::string(code_name(codes[i])) + ": " + cases[i].message());
  }
}

TEST(Status, CopiesShareTheError) {
  const Status a = Status::not_found("page 7");
  const Status b = a;  // NOLINT: testing the copy
  EXPECT_EQ(b.code(), Code::not_found);
  EXPECT_EQ(b.message(), "page 7");
}

TEST(Result, HoldsValueOrError) {
  Result<int> good = 42;
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(*good, 42);
  EXPECT_TRUE(good.status().ok());

  Result<int> bad = Status::out_of_range("layer 9, expected < 4");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(testing::has_error(bad, Code::out_of_range, "expected < 4"));
}

TEST(Result, MovesOutMoveOnlyValues) {
  Result<std::unique_ptr<int>> r = std::make_unique<int>(7);
  std::unique_ptr<int> p = std::move(r).value();
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(*p, 7);
}

TEST(ResultDeathTest, ValueOfErrorAborts) {
  Result<int> bad = Status::internal("boom");
  EXPECT_DEATH((void)bad.value(), "boom");
}

TEST(ResultDeathTest, OkStatusWithoutValueAborts) {
  EXPECT_DEATH(
      {
        Result<int> r = Status();
        (void)r;
      },
      "OK Status");
}

}  // namespace
}  // namespace kvcache
