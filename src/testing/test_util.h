// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Test helpers shared by every test binary: status assertions, a seeded RNG whose seed is
// printed on failure, and byte snapshots of views for "unchanged on refusal" checks.

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/status.h"
#include "kvcache/tensor.h"

#define EXPECT_OK(expr)                                                       \
  do {                                                                        \
    const ::kvcache::Status kv_status_ = ::kvcache::testing::as_status(expr); \
    EXPECT_TRUE(kv_status_.ok()) << kv_status_.to_string();                   \
  } while (0)
#define ASSERT_OK(expr)                                                       \
  do {                                                                        \
    const ::kvcache::Status kv_status_ = ::kvcache::testing::as_status(expr); \
    ASSERT_TRUE(kv_status_.ok()) << kv_status_.to_string();                   \
  } while (0)

namespace kvcache::testing {

inline Status as_status(const Status& s) { return s; }
template <class T>
Status as_status(const Result<T>& r) {
  return r.status();
}

// EXPECT_TRUE(has_error(s, Code::invalid_argument, "expected num_kv_heads"))
template <class S>
::testing::AssertionResult has_error(const S& s, Code code, const std::string& fragment = "") {
  const Status st = as_status(s);
  if (st.ok()) return ::testing::AssertionFailure() << "expected an error, got OK";
  if (st.code() != code) {
    return ::testing::AssertionFailure()
           << "expected code " << code_name(code) << ", got " << st.to_string();
  }
  if (st.message().find(fragment) == std::string::npos) {
    return ::testing::AssertionFailure()
           << "message \"" << st.message() << "\" lacks \"" << fragment << "\"";
  }
  return ::testing::AssertionSuccess();
}

// The seed for randomized tests: gtest's --gtest_random_seed when given, else a fixed one.
// Tests log it with SCOPED_TRACE(seed_trace(seed)) so a failure names it.
inline uint32_t test_seed() {
  const int s = ::testing::UnitTest::GetInstance()->random_seed();
  return s == 0 ? 20261125u : static_cast<uint32_t>(s);
}
inline std::string seed_trace(uint32_t seed) {
  return "seed " + std::to_string(seed) +
         " (rerun with --gtest_random_seed=" + std::to_string(seed) + ")";
}

// The bytes of a (possibly strided) CPU view, in row-major element order.
std::vector<uint8_t> view_bytes(const TensorView& t);

}  // namespace kvcache::testing
