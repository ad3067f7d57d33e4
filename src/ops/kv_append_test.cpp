// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/kv_append.h"

#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/thread_pool.h"

#include "ops/write_test_problems.h"
#include "reference/append.h"
#include "testing/test_util.h"

namespace kvcache {
namespace {

using testing::has_error;
using testing::seed_trace;
using testing::test_seed;

constexpr CpuIsa kIsas[] = {CpuIsa::portable, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::best};

using testing::Array;
using testing::CacheLayout;
using Case = testing::KVAppendCase;
using Fixture = testing::KVAppendFixture;

// The plan on (isa, pool) against the reference, every byte of both caches (padding and cells
// outside the written rows included).
void expect_matches_reference(const Fixture& f, CpuIsa isa, ThreadPool* pool) {
  auto plan = KVAppendPlan::select(f.desc, Device::cpu(), isa);
  ASSERT_OK(plan);
  EXPECT_STREQ(plan->sku(), "cpu.portable");
  EXPECT_TRUE(plan->precision().bit_exact);
  Array want_k = f.k_cache.clone();
  Array want_v = f.v_cache.clone();
  KVAppendArgs want = f.args();
  want.k_cache = want_k.view;
  want.v_cache = want_v.view;
  reference::kv_append(f.desc, want);
  Array got_k = f.k_cache.clone();
  Array got_v = f.v_cache.clone();
  KVAppendArgs got = f.args();
  got.k_cache = got_k.view;
  got.v_cache = got_v.view;
  ASSERT_OK(plan->run(Stream{Device::cpu(), pool}, {}, got));
  EXPECT_EQ(got_k.storage, want_k.storage);
  EXPECT_EQ(got_v.storage, want_v.storage);
  EXPECT_NE(got_k.storage, f.k_cache.storage);  // something was written
}

TEST(KVAppend, MatchesReferenceAtOddSizes) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  ThreadPool two(2);
  const Case c{3, 3, 5, 7, 11, 4};
  for (DType dtype : {DType::f32, DType::f64, DType::f16, DType::bf16}) {
    for (CacheLayout layout :
         {CacheLayout::head_major, CacheLayout::token_major, CacheLayout::padded}) {
      for (bool ragged : {false, true}) {
        for (CpuIsa isa : kIsas) {
          if (!cpu_supports(isa)) continue;
          for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &two}) {
            SCOPED_TRACE(std::string(name(dtype)) + " layout " +
                         std::to_string(static_cast<int>(layout)) + " ragged " +
                         std::to_string(ragged) + " isa " + name(isa) + (pool ? " pool" : ""));
            const Fixture f(c, dtype, layout, ragged, rng);
            expect_matches_reference(f, isa, pool);
          }
        }
      }
    }
  }
}

TEST(KVAppend, MatchesReferenceAtRealShape) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  ThreadPool two(2);
  // Llama-3-8B kv heads; 300 new tokens span two token blocks of the kernel.
  const Case c{2, 8, 128, 128, 520, 300};
  for (CacheLayout layout : {CacheLayout::head_major, CacheLayout::token_major}) {
    for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &two}) {
      const Fixture f(c, DType::bf16, layout, /*ragged=*/true, rng);
      expect_matches_reference(f, CpuIsa::best, pool);
    }
  }
  const Fixture f({1, 2, 64, 256, 40, 33}, DType::f16, CacheLayout::padded, false, rng);
  expect_matches_reference(f, CpuIsa::best, &two);
}

TEST(KVAppend, ZeroLengthSamplesWriteNothing) {
  std::mt19937 rng(test_seed());
  Fixture f({3, 3, 5, 7, 11, 4}, DType::f32, CacheLayout::head_major, true, rng);
  f.new_lens = {0, 0, 0};
  f.offsets = {11, 0, 5};  // an offset at the capacity is fine with nothing to write
  auto plan = KVAppendPlan::select(f.desc);
  ASSERT_OK(plan);
  const std::vector<uint64_t> before = f.k_cache.storage;
  ASSERT_OK(plan->run(Stream{}, {}, f.args()));
  EXPECT_EQ(f.k_cache.storage, before);
}

TEST(KVAppend, SelectRefusals) {
  const KVAppendDesc good{2, 3, 5, 0, 8, 4, DType::bf16};
  EXPECT_OK(KVAppendPlan::select(good));
  KVAppendDesc d = good;
  d.batch = 0;
  EXPECT_TRUE(has_error(KVAppendPlan::select(d), Code::invalid_argument,
                        "kv_append: batch is 0, expected > 0"));
  d = good;
  d.max_new_tokens = -1;
  EXPECT_TRUE(has_error(KVAppendPlan::select(d), Code::invalid_argument, "max_new_tokens is -1"));
  d = good;
  d.head_dim_v = -2;
  EXPECT_TRUE(has_error(KVAppendPlan::select(d), Code::invalid_argument, "head_dim_v is -2"));
  d = good;
  d.dtype = DType::int8;
  EXPECT_TRUE(has_error(KVAppendPlan::select(d), Code::invalid_argument,
                        "dtype is int8, expected one of f32, f64, f16, bf16"));
  // A GPU that is not there: unavailable in every build. cuda:0 where this machine has a GPU
  // (the CUDA tests cover that plan), else unavailable too.
  const int gpus = cuda_device_count();
  EXPECT_TRUE(
      has_error(KVAppendPlan::select(good, Device::cuda(gpus)), Code::unavailable, "kv_append: "));
  if (gpus == 0) {
    EXPECT_TRUE(
        has_error(KVAppendPlan::select(good, Device::cuda(0)), Code::unavailable, "kv_append: "));
  } else {
    EXPECT_OK(KVAppendPlan::select(good, Device::cuda(0)));
  }
  for (CpuIsa isa : kIsas) {
    if (!cpu_supports(isa)) {
      EXPECT_TRUE(has_error(KVAppendPlan::select(good, Device::cpu(), isa), Code::unavailable,
                            "not supported by this CPU"));
    }
  }
}

// Every refusal of can_implement (and of run: the stream's device), with both caches unchanged.
TEST(KVAppend, RefusalsWriteNothing) {
  std::mt19937 rng(test_seed());
  Fixture f({3, 3, 5, 7, 11, 4}, DType::bf16, CacheLayout::head_major, true, rng);
  f.offsets = {0, 0, 0};
  auto plan = KVAppendPlan::select(f.desc);
  ASSERT_OK(plan);
  ASSERT_OK(plan->can_implement(f.args()));
  Array wrong_dtype(DType::f32, {3, 3, 11, 5}, rng);
  Array short_cache(DType::bf16, {3, 3, 10, 7}, rng);
  Array gappy_new(DType::bf16, {3, 3, 4, 5}, rng, {}, 1);
  Array wide_rows(DType::bf16, {3, 3, 11, 10}, rng);
  TensorView strided_last = wide_rows.view;
  strided_last.shape[3] = 5;
  strided_last.strides[3] = 2;
  TensorView on_gpu = f.k_new.view;
  on_gpu.device = Device::cuda(0);
  TensorView null_data = f.v_cache.view;
  null_data.data = nullptr;
  TensorView inside_cache = f.k_new.view;
  inside_cache.data = f.v_cache.view.data;  // the new tokens alias the V cache
  const std::vector<int32_t> two{0, 0};
  const std::vector<int32_t> too_long{1, 5, 0};
  const std::vector<int32_t> negative{0, -1, 0};
  const std::vector<int32_t> past{0, 8, 0};

  struct Refusal {
    const char* label;
    KVAppendArgs args;
    Code code;
    const char* fragment;
  };
  std::vector<Refusal> refusals;
  auto with = [&](const char* label, Code code, const char* fragment, auto edit) {
    KVAppendArgs a = f.args();
    edit(a);
    refusals.push_back({label, a, code, fragment});
  };
  with("dtype", Code::invalid_argument, "kv_append: k_cache has dtype f32, expected bf16",
       [&](KVAppendArgs& a) { a.k_cache = wrong_dtype.view; });
  with("capacity", Code::invalid_argument, "kv_append: v_cache dim 2 (capacity) is 10, expected 11",
       [&](KVAppendArgs& a) { a.v_cache = short_cache.view; });
  with("last stride", Code::invalid_argument, "k_cache has stride 2 on head_dim, expected 1",
       [&](KVAppendArgs& a) { a.k_cache = strided_last; });
  with("new not contiguous", Code::invalid_argument, "k_new is not contiguous",
       [&](KVAppendArgs& a) { a.k_new = gappy_new.view; });
  with("head_dim_v", Code::invalid_argument, "v_new dim 3 (head_dim_v) is 5, expected 7",
       [&](KVAppendArgs& a) { a.v_new = f.k_new.view; });
  with("device", Code::invalid_argument, "k_new", [&](KVAppendArgs& a) { a.k_new = on_gpu; });
  with("null data", Code::invalid_argument, "v_cache",
       [&](KVAppendArgs& a) { a.v_cache = null_data; });
  with("overlap", Code::invalid_argument, "k_new overlaps v_cache, expected separate memory",
       [&](KVAppendArgs& a) { a.k_new = inside_cache; });
  with("offsets size", Code::invalid_argument, "offsets has 2 entries, expected batch = 3",
       [&](KVAppendArgs& a) { a.offsets = two; });
  with("new_lens size", Code::invalid_argument, "new_lens has 2 entries, expected batch = 3",
       [&](KVAppendArgs& a) { a.new_lens = two; });
  with("new_lens value", Code::invalid_argument,
       "new_lens[1] is 5, expected in [0, max_new_tokens = 4]",
       [&](KVAppendArgs& a) { a.new_lens = too_long; });
  with("negative offset", Code::out_of_range, "offsets[1] is -1, expected >= 0",
       [&](KVAppendArgs& a) { a.offsets = negative; });
  with("past capacity", Code::out_of_range,
       "offsets[1] + max_new_tokens is 8 + 4 = 12, expected <= capacity = 11",
       [&](KVAppendArgs& a) {
         a.offsets = past;
         a.new_lens = {};
       });

  const std::vector<uint64_t> k_before = f.k_cache.storage;
  const std::vector<uint64_t> v_before = f.v_cache.storage;
  for (const Refusal& r : refusals) {
    SCOPED_TRACE(r.label);
    EXPECT_TRUE(has_error(plan->can_implement(r.args), r.code, r.fragment));
    EXPECT_TRUE(has_error(plan->run(Stream{}, {}, r.args), r.code, r.fragment));
    EXPECT_EQ(f.k_cache.storage, k_before);
    EXPECT_EQ(f.v_cache.storage, v_before);
  }
  EXPECT_TRUE(has_error(plan->run(Stream{Device::cuda(0)}, {}, f.args()), Code::invalid_argument,
                        "kv_append: stream is on cuda:0, expected cpu"));
  EXPECT_EQ(f.k_cache.storage, k_before);
  EXPECT_EQ(f.v_cache.storage, v_before);
}

}  // namespace
}  // namespace kvcache
