// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/rope.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <numbers>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/qkv_rope_write.h"
#include "kvcache/rope_shift.h"
#include "kvcache/thread_pool.h"

#include "ops/rope_table.h"
#include "reference/rope.h"
#include "testing/test_util.h"

// Every allocation of this test binary is counted, so a test can assert that a stretch of code
// allocates nothing (on any thread: the pool's workers included).
namespace {
std::atomic<int64_t> g_allocations{0};

void* counted_alloc(size_t n, size_t align) {
  g_allocations.fetch_add(1, std::memory_order_relaxed);
  if (n == 0) n = 1;
  void* p = align <= alignof(std::max_align_t)
                ? std::malloc(n)
                : std::aligned_alloc(align, (n + align - 1) / align * align);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
}  // namespace

void* operator new(size_t n) { return counted_alloc(n, 0); }
void* operator new[](size_t n) { return counted_alloc(n, 0); }
void* operator new(size_t n, std::align_val_t a) {
  return counted_alloc(n, static_cast<size_t>(a));
}
void* operator new[](size_t n, std::align_val_t a) {
  return counted_alloc(n, static_cast<size_t>(a));
}
void* operator new(size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n, 0);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n, 0);
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t, std::align_val_t) noexcept { std::free(p); }

namespace kvcache {
namespace {

using testing::has_error;

TEST(RopeConfig, Refusals) {
  auto check = [](auto edit, int64_t head_dim = 8) {
    RopeConfig c;
    edit(c);
    return check_rope_config(c, head_dim, "op");
  };
  EXPECT_OK(check([](RopeConfig&) {}));
  EXPECT_TRUE(has_error(check([](RopeConfig& c) { c.rotary_dim = 3; }), Code::invalid_argument,
                        "op: rope rotary_dim is 3, expected even and in (0, head_dim = 8]"));
  EXPECT_TRUE(has_error(check([](RopeConfig& c) { c.rotary_dim = 10; }), Code::invalid_argument,
                        "rotary_dim is 10"));
  EXPECT_TRUE(has_error(check([](RopeConfig&) {}, 5), Code::invalid_argument,
                        "rotary_dim is 0, expected even"));
  EXPECT_TRUE(has_error(check([](RopeConfig& c) { c.base = 1.0; }), Code::invalid_argument,
                        "rope base is 1, expected > 1"));
  EXPECT_TRUE(has_error(check([](RopeConfig& c) { c.max_position = 0; }), Code::invalid_argument,
                        "rope max_position is 0, expected in [1, 16777216]"));
  EXPECT_TRUE(has_error(check([](RopeConfig& c) {
                          c.scaling = RopeScaling::linear;
                          c.factor = 0.0;
                        }),
                        Code::invalid_argument, "rope linear factor is 0, expected > 0"));
  EXPECT_TRUE(has_error(check([](RopeConfig& c) {
                          c.scaling = RopeScaling::llama3;
                          c.high_freq_factor = 1.0;
                        }),
                        Code::invalid_argument,
                        "high_freq_factor is 1, expected > low_freq_factor"));
  EXPECT_TRUE(has_error(check([](RopeConfig& c) {
                          c.scaling = RopeScaling::llama3;
                          c.factor = 0.5;
                        }),
                        Code::invalid_argument, "rope llama3 factor is 0.5, expected >= 1"));
  EXPECT_TRUE(has_error(check([](RopeConfig& c) {
                          c.scaling = RopeScaling::yarn;
                          c.beta_fast = 0.5;
                        }),
                        Code::invalid_argument, "beta_fast is 0.5, expected > beta_slow"));
  EXPECT_TRUE(has_error(check([](RopeConfig& c) {
                          c.scaling = RopeScaling::yarn;
                          c.attention_factor = -1.0;
                        }),
                        Code::invalid_argument, "attention_factor is -1"));
  EXPECT_TRUE(has_error(check([](RopeConfig& c) {
                          c.scaling = RopeScaling::yarn;
                          c.original_max_position = 0;
                        }),
                        Code::invalid_argument, "original_max_position is 0"));
  EXPECT_TRUE(has_error(check([](RopeConfig& c) {
                          c.mrope_section = {2, 1, 0, 0};
                        }),
                        Code::invalid_argument,
                        "mrope_section sums to 3, expected rotary_dim / 2 = 4"));
  EXPECT_TRUE(has_error(check([](RopeConfig& c) {
                          c.mrope_section = {2, 0, 2, 0};
                        }),
                        Code::invalid_argument,
                        "mrope_section[2] is 2, expected >= 0 with the non-zero"));
  EXPECT_TRUE(has_error(check([](RopeConfig& c) {
                          c.mrope_section = {-1, 5, 0, 0};
                        }),
                        Code::invalid_argument, "mrope_section[0] is -1"));
  EXPECT_OK(check([](RopeConfig& c) { c.mrope_section = {1, 1, 1, 1}; }));
}

std::vector<RopeConfig> scaled_configs() {
  std::vector<RopeConfig> out;
  RopeConfig c;
  out.push_back(c);
  c.scaling = RopeScaling::linear;
  c.factor = 4.0;
  out.push_back(c);
  c = RopeConfig();  // Llama 3.1
  c.base = 500000.0;
  c.scaling = RopeScaling::llama3;
  c.factor = 8.0;
  out.push_back(c);
  c = RopeConfig();  // Qwen2.5 style YaRN
  c.base = 1000000.0;
  c.scaling = RopeScaling::yarn;
  c.factor = 4.0;
  c.original_max_position = 32768;
  out.push_back(c);
  c.attention_factor = 1.25;
  c.original_max_position = 4096;
  out.push_back(c);
  return out;
}

TEST(RopeConfig, InverseFrequenciesMatchReference) {
  for (const RopeConfig& c : scaled_configs()) {
    for (int64_t head_dim : {8, 64, 128}) {
      const std::vector<double> got = ops::rope_inv_freq(c, head_dim);
      const std::vector<double> ref = reference::rope_inv_freq(c, head_dim);
      ASSERT_EQ(got.size(), ref.size());
      for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_NEAR(got[i], ref[i], 1e-12 * ref[i]) << name(c.scaling) << " i " << i;
      }
      EXPECT_DOUBLE_EQ(ops::rope_attention_factor(c), reference::rope_attention_factor(c));
    }
  }
}

TEST(RopeConfig, PublishedValues) {
  const std::vector<RopeConfig> cs = scaled_configs();
  // Llama 3.1 (head_dim 128, theta 500000, factor 8, low 1, high 4, original 8192): the
  // highest frequency is kept, the lowest divided by 8, and wavelengths between 2048 and 8192
  // positions are interpolated.
  const std::vector<double> llama = ops::rope_inv_freq(cs[2], 128);
  const std::vector<double> plain = ops::rope_inv_freq(RopeConfig{.base = 500000.0}, 128);
  EXPECT_DOUBLE_EQ(llama[0], 1.0);
  EXPECT_DOUBLE_EQ(llama[63], plain[63] / 8.0);
  for (size_t i = 0; i < 64; ++i) {
    const double wavelen = 2.0 * std::numbers::pi / plain[i];
    if (wavelen < 2048.0) {
      EXPECT_DOUBLE_EQ(llama[i], plain[i]);
    }
    if (wavelen > 8192.0) {
      EXPECT_DOUBLE_EQ(llama[i], plain[i] / 8.0);
    }
    EXPECT_LE(llama[i], plain[i]);
    EXPECT_GE(llama[i], plain[i] / 8.0);
  }
  // YaRN: high frequencies extrapolate (kept), low ones interpolate (divided by factor); the
  // default attention factor is 0.1 * ln(factor) + 1.
  const std::vector<double> yarn = ops::rope_inv_freq(cs[3], 128);
  const std::vector<double> plain_y = ops::rope_inv_freq(RopeConfig{.base = 1000000.0}, 128);
  EXPECT_DOUBLE_EQ(yarn[0], plain_y[0]);
  EXPECT_NEAR(yarn[63], plain_y[63] / 4.0, 1e-18);
  EXPECT_DOUBLE_EQ(ops::rope_attention_factor(cs[3]), 0.1 * std::log(4.0) + 1.0);
  EXPECT_DOUBLE_EQ(ops::rope_attention_factor(cs[4]), 1.25);
  // Linear: every frequency divided by factor.
  EXPECT_DOUBLE_EQ(ops::rope_inv_freq(cs[1], 8)[1], std::pow(10000.0, -0.25) / 4.0);
}

TEST(RopeTableCache, SecondSelectIsAHit) {
  QkvRopeWriteDesc desc;
  desc.num_q_heads = 2;
  desc.cache.kv = {1, 16, 0, DType::bf16, DType::bf16};
  desc.cache.pages = {2, 4, PageLayout::nhd};
  desc.rope.base = 12345.5;  // a configuration no other test uses
  desc.rope.max_position = 100;
  const RopeTableCacheStats before = rope_table_cache_stats();
  Result<QkvRopeWritePlan> first = QkvRopeWritePlan::select(desc);
  ASSERT_OK(first);
  const RopeTableCacheStats after_miss = rope_table_cache_stats();
  EXPECT_EQ(after_miss.misses, before.misses + 1);
  EXPECT_EQ(after_miss.hits, before.hits);
  EXPECT_EQ(after_miss.entries, before.entries + 1);
  // cos and sin [100, 8] floats plus 8 double frequencies.
  EXPECT_EQ(after_miss.bytes, before.bytes + 2 * 100 * 8 * sizeof(float) + 8 * sizeof(double));
  Result<QkvRopeWritePlan> second = QkvRopeWritePlan::select(desc);
  ASSERT_OK(second);
  // rope_shift with the same rotation (style and sections do not change the table) shares it.
  RopeShiftDesc shift;
  shift.kv = desc.cache.kv;
  shift.rope = desc.rope;
  shift.rope.style = RopeStyle::gptj;
  shift.rope.mrope_section = {4, 4, 0, 0};
  ASSERT_OK(RopeShiftPlan::select(shift));
  const RopeTableCacheStats after_hit = rope_table_cache_stats();
  EXPECT_EQ(after_hit.hits, after_miss.hits + 2);
  EXPECT_EQ(after_hit.misses, after_miss.misses);
  EXPECT_EQ(after_hit.entries, after_miss.entries);
  EXPECT_EQ(after_hit.bytes, after_miss.bytes);
}

TEST(RopeTableCache, ConcurrentSelectsAgree) {
  RopeShiftDesc desc;
  desc.kv = {2, 32, 0, DType::f32, DType::f32};
  desc.rope.base = 777.25;
  desc.rope.max_position = 64;
  const RopeTableCacheStats before = rope_table_cache_stats();
  ThreadPool pool(2);
  std::atomic<int> ok{0};
  pool.parallel_for(8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) ok += RopeShiftPlan::select(desc).ok() ? 1 : 0;
  });
  EXPECT_EQ(ok.load(), 8);
  const RopeTableCacheStats after = rope_table_cache_stats();
  EXPECT_EQ(after.hits + after.misses, before.hits + before.misses + 8);
  EXPECT_EQ(after.entries, before.entries + 1);
}

TEST(RopeKernels, BestIsTheFastestSupported) {
  QkvRopeWriteDesc desc;
  desc.num_q_heads = 1;
  desc.cache.kv = {1, 8, 0, DType::bf16, DType::bf16};
  desc.cache.pages = {1, 4, PageLayout::nhd};
  Result<QkvRopeWritePlan> plan = QkvRopeWritePlan::select(desc);
  ASSERT_OK(plan);
  EXPECT_STREQ(plan->sku(), cpu_supports(CpuIsa::avx512) ? "cpu.avx512" : "cpu.portable");
}

// run() allocates nothing once warm: inline and over a pool, for both ops.
TEST(RopeTableCache, RunAllocatesNothing) {
  constexpr int64_t kTokens = 5, kHq = 4, kHkv = 2, kDim = 16, kPages = 3, kPage = 4;
  QkvRopeWriteDesc desc;
  desc.num_q_heads = kHq;
  desc.cache.kv = {kHkv, kDim, 0, DType::int8, DType::bf16};
  desc.cache.pages = {kPages, kPage, PageLayout::nhd};
  desc.qk_norm = true;
  desc.rope.max_position = 64;
  desc.rope.mrope_section = {4, 2, 2, 0};
  Result<QkvRopeWritePlan> plan = QkvRopeWritePlan::select(desc);
  ASSERT_OK(plan);
  const int64_t width = (kHq + 2 * kHkv) * kDim;
  std::vector<uint16_t> qkv(static_cast<size_t>(kTokens * width), 0x3f80);  // bf16 1.0
  std::vector<float> w(kDim, 1.0f);
  std::vector<int32_t> positions(3 * kTokens, 7);
  std::vector<uint16_t> q(static_cast<size_t>(kTokens * kHq * kDim));
  std::vector<int8_t> k(kPages * kPage * kHkv * kDim);
  std::vector<uint16_t> v(kPages * kPage * kHkv * kDim);
  std::vector<float> ks(kPages * kPage * kHkv);
  std::vector<int64_t> slots = {0, 1, 2, 5, 9};
  QkvRopeWriteArgs a;
  a.qkv = TensorView::contiguous(qkv.data(), DType::bf16, {kTokens, width});
  a.positions = positions;
  a.q_norm_weight = TensorView::contiguous(w.data(), DType::f32, {kDim});
  a.k_norm_weight = a.q_norm_weight;
  a.q_out = TensorView::contiguous(q.data(), DType::bf16, {kTokens, kHq, kDim});
  a.slots.slot_mapping = slots;
  a.kv.k_pages = TensorView::contiguous(k.data(), DType::int8, {kPages, kPage, kHkv, kDim});
  a.kv.v_pages = TensorView::contiguous(v.data(), DType::bf16, {kPages, kPage, kHkv, kDim});
  a.kv.k_scales = TensorView::contiguous(ks.data(), DType::f32, {kPages, kPage, kHkv});

  RopeShiftDesc sd;
  sd.kv = desc.cache.kv;
  sd.pages = desc.cache.pages;
  sd.rope = desc.rope;
  Result<RopeShiftPlan> shift = RopeShiftPlan::select(sd);
  ASSERT_OK(shift);
  std::vector<int32_t> p0 = {1}, p1 = {3}, delta = {2}, lens = {4}, indptr = {0, 1}, indices = {0};
  RopeShiftArgs sa;
  sa.p0 = p0;
  sa.p1 = p1;
  sa.delta = delta;
  sa.seq_lens = lens;
  sa.kv.k_pages = a.kv.k_pages;
  sa.kv.k_scales = a.kv.k_scales;
  sa.table = {indptr, indices};

  ThreadPool pool(2);
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
    Stream stream;
    stream.pool = p;
    ASSERT_OK(plan->run(stream, {}, a));  // warm: self-tests, the pool's first region
    ASSERT_OK(shift->run(stream, {}, sa));
    const int64_t before = g_allocations.load();
    for (int i = 0; i < 4; ++i) {
      const Status s1 = plan->run(stream, {}, a);
      const Status s2 = shift->run(stream, {}, sa);
      if (!s1.ok() || !s2.ok()) ADD_FAILURE() << s1.to_string() << " " << s2.to_string();
    }
    EXPECT_EQ(g_allocations.load() - before, 0) << (p == nullptr ? "inline" : "ThreadPool(2)");
  }
}

}  // namespace
}  // namespace kvcache
