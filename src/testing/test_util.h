// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Test helpers shared by every test binary: status assertions, a seeded RNG whose seed is
// printed on failure, random inputs (never zeros), and byte snapshots of views and caches for
// "unchanged on refusal" checks.

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <ostream>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/buffer.h"
#include "kvcache/cache.h"
#include "kvcache/dtype.h"
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
  // The flag itself, not UnitTest::random_seed(), which is time-based when the flag is 0: runs
  // without the flag are reproducible.
  const int s = GTEST_FLAG_GET(random_seed);
  return s == 0 ? 20261125u : static_cast<uint32_t>(s);
}
inline std::string seed_trace(uint32_t seed) {
  return "seed " + std::to_string(seed) +
         " (rerun with --gtest_random_seed=" + std::to_string(seed) + ")";
}

// The value r holds; on an error, a test failure naming it and a value-initialized T (null for
// the unique_ptr a create() returns).
template <class T>
T value_or_fail(Result<T> r) {
  if (!r.ok()) {
    ADD_FAILURE() << r.status().to_string();
    return T();
  }
  return std::move(*r);
}

// --- random inputs ---

// [lo, hi], both included.
int64_t uniform_int(std::mt19937& rng, int64_t lo, int64_t hi);

// A random bit pattern that is a finite, non-zero value of dtype (f32, f16 or bf16), in the low
// size_of(dtype) bytes.
uint32_t random_finite_bits(DType dtype, std::mt19937& rng);

// How a RandomTensor lies in memory: row-major by default.
struct TensorLayout {
  std::vector<int> order;  // the view's axes from outermost to innermost in memory; empty: 0, 1, ..
  int64_t pad = 0;         // unused elements after every innermost run
};
// The two outer axes swapped in memory and the last one padded: not contiguous in two ways.
TensorLayout strided_layout(int rank);

// An owned CPU tensor whose every element, padding included, is random_finite_bits: a copy that
// ignores the strides or reads the padding shows. Move-only, as the view points into storage.
struct RandomTensor {
  RandomTensor() = default;
  RandomTensor(const RandomTensor&) = delete;
  RandomTensor& operator=(const RandomTensor&) = delete;
  RandomTensor(RandomTensor&&) noexcept = default;
  RandomTensor& operator=(RandomTensor&&) noexcept = default;

  std::vector<uint64_t> storage;  // uint64_t for alignment; holds any dtype
  TensorView view;
};

RandomTensor random_tensor(DType dtype, std::span<const int64_t> shape, std::mt19937& rng,
                           const TensorLayout& layout = {});
inline RandomTensor random_tensor(DType dtype, std::span<const int64_t> shape, std::mt19937& rng,
                                  bool strided) {
  return random_tensor(dtype, shape, rng,
                       strided ? strided_layout(static_cast<int>(shape.size())) : TensorLayout{});
}
inline RandomTensor random_tensor(DType dtype, std::initializer_list<int64_t> shape,
                                  std::mt19937& rng, bool strided = false) {
  return random_tensor(dtype, std::span<const int64_t>(shape.begin(), shape.size()), rng, strided);
}

// --- bytes ---

// The bytes of a (possibly strided) CPU view, in row-major element order.
std::vector<uint8_t> view_bytes(const TensorView& t);
// The bytes a buffer holds (none for an empty one).
std::vector<uint8_t> buffer_bytes(const Buffer& b);
// view_bytes of every state() view, in order. REQUIRES: no view has null data and elements.
std::vector<std::vector<uint8_t>> state_bytes(const Cache& cache);

// Everything a caller can observe of a cache: the bytes of every state() view (nullopt for a
// view with null data but elements, as a freed RecurrentCache has) and offset().
struct CacheFingerprint {
  std::vector<std::optional<std::vector<uint8_t>>> arrays;
  int64_t offset = 0;
  bool operator==(const CacheFingerprint&) const = default;
};
CacheFingerprint fingerprint(const Cache& cache);
// What gtest prints for a CacheFingerprint: the offset and each array's size.
void PrintTo(const CacheFingerprint& f, std::ostream* os);

// --- attention caches ---

// The K and V tokens fed to an attention cache's update(), per position, each [B, H, dim] bytes:
// the naive model of what the cache holds. Copyable, so a test can keep the history at a point.
class TokenHistory {
 public:
  // update()'s input pair [B, H, L, dim], owned.
  struct Input {
    RandomTensor k_tensor;
    RandomTensor v_tensor;
    TensorView k;
    TensorView v;
  };

  TokenHistory(DType dtype, int64_t batch, int64_t num_kv_heads, int64_t head_dim,
               int64_t head_dim_v);

  // `count` new random tokens, recorded; `strided` lays the input out as [B, L, H, D] in memory.
  Input next(int64_t count, std::mt19937& rng, bool strided = false);
  void truncate(int64_t n);
  [[nodiscard]] int64_t size() const { return static_cast<int64_t>(k_.size()); }
  // The tokens at `positions`: heads_first gives [B, H, n, D] (as update() returns), else
  // [B, n, H, D] (as state() and snapshots hold them).
  [[nodiscard]] std::vector<uint8_t> keys(const std::vector<int64_t>& positions,
                                          bool heads_first) const;
  [[nodiscard]] std::vector<uint8_t> values(const std::vector<int64_t>& positions,
                                            bool heads_first) const;

 private:
  [[nodiscard]] std::vector<uint8_t> gather(const std::vector<std::vector<uint8_t>>& tokens,
                                            int64_t dim, const std::vector<int64_t>& positions,
                                            bool heads_first) const;

  DType dtype_;
  int64_t batch_;
  int64_t num_kv_heads_;
  int64_t head_dim_;
  int64_t head_dim_v_;
  std::vector<std::vector<uint8_t>> k_;  // per position, [B, H, head_dim]
  std::vector<std::vector<uint8_t>> v_;  // per position, [B, H, head_dim_v]
};

}  // namespace kvcache::testing
