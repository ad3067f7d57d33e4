// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/qkv_rope_write.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/thread_pool.h"

#include "backend/cpu/rope_kernels.h"
#include "ops/quantize.h"
#include "ops/write_test_problems.h"
#include "reference/element.h"
#include "reference/rope.h"
#include "testing/test_util.h"

namespace kvcache {
namespace {

using reference::read_element;
using testing::has_error;
using testing::seed_trace;
using testing::test_seed;

using Case = testing::QkvCase;
using Problem = testing::QkvProblem;
using testing::rope_variant;
constexpr uint8_t kPoison = testing::kQkvPoison;

// The allowed |got - ref| at the plan's precision; quantized storage within one step
// (quantize.h), scale being the row's.
double tolerance(double ref, const Precision& p, DType dtype, double scale) {
  if (dtype == DType::int8) return p.abs_tol + std::ldexp(1.0, -17) * std::fabs(ref) + scale;
  if (dtype == DType::fp8_e4m3) {
    return p.abs_tol + std::ldexp(1.0, -3) * std::fabs(ref) + std::ldexp(1.0, -9) * scale;
  }
  return p.abs_tol + p.rel_tol * std::fabs(ref);
}

::testing::AssertionResult close(double got, double ref, const Precision& p, DType dtype,
                                 double scale) {
  const double tol = tolerance(ref, p, dtype, scale);
  if (std::fabs(got - ref) <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "got " << got << ", reference " << ref << ", tolerance " << tol;
}

// Reads K or V of token t, head h back from its page (dequantized) and compares it.
void expect_pool(const Problem& pr, const TensorView& pool, const TensorView& scales, DType dtype,
                 int64_t dim, const std::vector<double>& ref, const Precision& p,
                 const char* what) {
  const PageFormat& pf = pr.desc.cache.pages;
  const int64_t n = pr.args.qkv.shape[0];
  const int64_t heads = pr.desc.cache.kv.num_kv_heads;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = pr.slot_mapping[static_cast<size_t>(t)];
    const int64_t page = slot / pf.page_size;
    const int64_t in = slot % pf.page_size;
    const bool nhd = pf.layout == PageLayout::nhd;
    for (int64_t h = 0; h < heads; ++h) {
      const double scale = is_quantized(dtype) ? (nhd ? read_element(scales, {page, in, h})
                                                      : read_element(scales, {page, h, in}))
                                               : 1.0;
      for (int64_t i = 0; i < dim; ++i) {
        const double got =
            (nhd ? read_element(pool, {page, in, h, i}) : read_element(pool, {page, h, in, i})) *
            scale;
        const double r = ref[static_cast<size_t>((t * heads + h) * dim + i)];
        if (!(std::fabs(got - r) <= tolerance(r, p, dtype, scale))) {
          ASSERT_TRUE(close(got, r, p, dtype, scale))
              << what << " token " << t << " head " << h << " elem " << i;
        }
      }
    }
  }
}

std::vector<CpuIsa> isas() {
  std::vector<CpuIsa> out;
  for (CpuIsa isa : {CpuIsa::portable, CpuIsa::avx2, CpuIsa::avx512}) {
    if (cpu_supports(isa)) out.push_back(isa);
  }
  return out;
}

// Every isa, inline and over ThreadPool(2); only_best: CpuIsa::best over the pool.
void run_case(const Case& c, uint32_t seed, bool only_best = false) {
  std::mt19937 ref_rng(seed);
  const reference::QkvRopeWriteResult ref = [&] {
    Problem pr(c, ref_rng);
    return reference::qkv_rope_write(pr.desc, pr.args);
  }();
  for (CpuIsa isa : only_best ? std::vector<CpuIsa>{CpuIsa::best} : isas()) {
    for (bool threaded : {false, true}) {
      if (only_best && !threaded) continue;
      SCOPED_TRACE(std::string("isa ") + name(isa) + (threaded ? ", ThreadPool(2)" : ", inline"));
      std::mt19937 rng(seed);
      Problem pr(c, rng);
      Result<QkvRopeWritePlan> plan = QkvRopeWritePlan::select(pr.desc, Device::cpu(), isa);
      if (isa == CpuIsa::avx2) {  // no AVX2 path: refused, never a silent fallback
        EXPECT_TRUE(has_error(plan, Code::unavailable, "isa avx2"));
        continue;
      }
      ASSERT_OK(plan);
      ThreadPool pool(2);
      Stream stream;
      if (threaded) stream.pool = &pool;
      ASSERT_OK(plan->run(stream, {}, pr.args));
      const Precision p = plan->precision();
      const int64_t dim = c.head_dim;
      std::vector<float> q(ref.q.size());
      to_float(c.q, pr.args.q_out.data, q.data(), q.size());
      for (size_t i = 0; i < q.size(); ++i) {
        if (!(std::fabs(q[i] - ref.q[i]) <= tolerance(ref.q[i], p, c.q, 0.0))) {
          ASSERT_TRUE(close(q[i], ref.q[i], p, c.q, 0.0))
              << "q token " << i / static_cast<size_t>(c.num_q_heads * dim) << " element "
              << i % static_cast<size_t>(c.num_q_heads * dim);
        }
      }
      expect_pool(pr, pr.args.kv.k_pages, pr.args.kv.k_scales, c.k, dim, ref.k, p, "k");
      expect_pool(pr, pr.args.kv.v_pages, pr.args.kv.v_scales, c.v, c.head_dim_v, ref.v, p, "v");
      // The spare page (not in the table) is never written.
      const PageFormat& pf = pr.desc.cache.pages;
      const std::vector<int32_t> used(pr.indices.begin(), pr.indices.end());
      for (int32_t page = 0; page < pf.num_pages; ++page) {
        if (std::find(used.begin(), used.end(), page) != used.end()) continue;
        const size_t bytes =
            static_cast<size_t>(pf.page_size * c.num_kv_heads * dim) * size_of(c.k);
        const auto* base = static_cast<const uint8_t*>(pr.args.kv.k_pages.data) + page * bytes;
        EXPECT_TRUE(std::all_of(base, base + bytes, [](uint8_t b) { return b == kPoison; }));
      }
    }
  }
}

using DTypes = testing::QkvDTypes;
using testing::kQkvDTypes;

TEST(QkvRopeWrite, OddShapesMatchReference) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  int i = 0;
  for (const DTypes& d : kQkvDTypes) {
    for (int variant = 0; variant < 6; ++variant, ++i) {
      const Case c = testing::odd_qkv_case(i, d, variant);
      SCOPED_TRACE("case " + std::to_string(i) + " dtypes " + name(d.qkv) + "/" + name(d.q) + "/" +
                   name(d.k) + "/" + name(d.v) + " rope variant " + std::to_string(variant));
      run_case(c, seed + static_cast<uint32_t>(i));
    }
  }
}

TEST(QkvRopeWrite, RealHeadDimsMatchReference) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  int i = 0;
  for (int64_t dim : {64, 128, 256}) {
    for (const DTypes& d : {kQkvDTypes[1], kQkvDTypes[3], kQkvDTypes[4]}) {
      Case c;
      c.num_q_heads = 4;
      c.num_kv_heads = 2;
      c.head_dim = dim;
      c.head_dim_v = dim;
      c.num_tokens = 9;
      c.page_size = 16;
      c.layout = i % 2 == 0 ? PageLayout::nhd : PageLayout::hnd;
      c.qkv = d.qkv, c.q = d.q, c.k = d.k, c.v = d.v;
      c.qk_norm = i % 2 == 0;
      c.rope = rope_variant(i, dim);
      SCOPED_TRACE("head_dim " + std::to_string(dim) + " case " + std::to_string(i));
      run_case(c, seed + static_cast<uint32_t>(i));
      ++i;
    }
  }
}

// More than 4 MiB of output: the kernels stream the stores around the cache.
TEST(QkvRopeWrite, LargeChunkMatchesReference) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (const DTypes& d : {DTypes{DType::bf16, DType::bf16, DType::int8, DType::bf16}}) {
    Case c;
    c.num_q_heads = 24;
    c.num_kv_heads = 2;
    c.head_dim = 128;
    c.head_dim_v = 128;
    c.num_tokens = 700;
    c.page_size = 16;
    c.qkv = d.qkv, c.q = d.q, c.k = d.k, c.v = d.v;
    c.rope.max_position = 1024;
    SCOPED_TRACE(std::string("k ") + name(d.k));
    run_case(c, seed, /*only_best=*/true);
  }
}

TEST(QkvRopeWrite, SelectRefusals) {
  QkvRopeWriteDesc good;
  good.num_q_heads = 4;
  good.cache.kv = {2, 8, 0, DType::bf16, DType::bf16};
  good.cache.pages = {4, 16, PageLayout::nhd};
  ASSERT_OK(QkvRopeWritePlan::select(good));
  auto with = [&](auto edit) {
    QkvRopeWriteDesc d = good;
    edit(d);
    return QkvRopeWritePlan::select(d);
  };
  EXPECT_TRUE(has_error(with([](auto& d) { d.num_q_heads = 0; }), Code::invalid_argument,
                        "qkv_rope_write: num_q_heads is 0, expected > 0"));
  EXPECT_TRUE(has_error(with([](auto& d) { d.cache.kv.head_dim = 2048; }), Code::invalid_argument,
                        "head_dim is 2048, expected <= 1024"));
  EXPECT_TRUE(has_error(with([](auto& d) { d.qkv_dtype = DType::int8; }), Code::invalid_argument,
                        "qkv_dtype is int8, expected one of f32, f16, bf16"));
  EXPECT_TRUE(has_error(with([](auto& d) { d.q_dtype = DType::f64; }), Code::invalid_argument,
                        "q_dtype is f64"));
  EXPECT_TRUE(has_error(with([](auto& d) { d.cache.kv.k_dtype = DType::fp8_e5m2; }),
                        Code::invalid_argument, "k_dtype is fp8_e5m2"));
  EXPECT_TRUE(
      has_error(with([](auto& d) { d.norm_eps = -1.0f; }), Code::invalid_argument, "norm_eps"));
  EXPECT_TRUE(has_error(with([](auto& d) { d.rope.rotary_dim = 3; }), Code::invalid_argument,
                        "rope rotary_dim is 3"));
  // A GPU that is not there: unavailable in every build. cuda:0 where this machine has a GPU
  // (the CUDA tests cover that plan), else unavailable too.
  const int gpus = cuda_device_count();
  EXPECT_TRUE(has_error(QkvRopeWritePlan::select(good, Device::cuda(gpus)), Code::unavailable,
                        "qkv_rope_write: "));
  if (gpus == 0) {
    EXPECT_TRUE(has_error(QkvRopeWritePlan::select(good, Device::cuda(0)), Code::unavailable,
                          "qkv_rope_write: "));
  } else {
    EXPECT_OK(QkvRopeWritePlan::select(good, Device::cuda(0)));
  }
  if (!cpu_supports(CpuIsa::avx512)) {
    EXPECT_TRUE(has_error(QkvRopeWritePlan::select(good, Device::cpu(), CpuIsa::avx512),
                          Code::unavailable, "isa avx512"));
  }
}

TEST(QkvRopeWrite, RefusalsWriteNothing) {
  std::mt19937 rng(test_seed());
  Case c;
  c.qkv = c.q = DType::bf16;
  c.k = DType::int8;
  c.qk_norm = true;
  c.rope.max_position = 50;
  Problem pr(c, rng);
  Result<QkvRopeWritePlan> plan = QkvRopeWritePlan::select(pr.desc);
  ASSERT_OK(plan);
  const std::vector<std::vector<uint64_t>> before = pr.outputs();
  auto refused = [&](auto edit, Code code, const std::string& fragment) {
    QkvRopeWriteArgs a = pr.args;
    std::vector<int32_t> positions = pr.positions;
    std::vector<int64_t> slots = pr.slot_mapping;
    a.positions = positions;
    a.slots.slot_mapping = slots;
    edit(a, positions, slots);
    EXPECT_TRUE(has_error(plan->can_implement(a), code, fragment));
    EXPECT_TRUE(has_error(plan->run(Stream{}, {}, a), code, fragment));
    EXPECT_EQ(pr.outputs(), before) << fragment;
  };
  using P = std::vector<int32_t>;
  using S = std::vector<int64_t>;
  refused([](QkvRopeWriteArgs& a, P&, S&) { a.qkv.dtype = DType::f16; }, Code::invalid_argument,
          "qkv_rope_write: qkv has dtype f16, expected bf16");
  refused([](QkvRopeWriteArgs& a, P&, S&) { a.qkv.shape[1] -= 1; }, Code::invalid_argument,
          "qkv dim 1 (row) is 45, expected 46");
  refused([](QkvRopeWriteArgs& a, P&, S&) { a.qkv.strides[0] = 5; }, Code::invalid_argument,
          "qkv has row stride 5");
  refused([](QkvRopeWriteArgs& a, P&, S&) { a.qkv.strides[1] = 2; }, Code::invalid_argument,
          "inside a row, expected 1");
  refused([](QkvRopeWriteArgs& a, P& p, S&) { a.positions = std::span(p).first(3); },
          Code::invalid_argument, "positions has 3 entries, expected num_tokens = 7");
  refused([](QkvRopeWriteArgs&, P& p, S&) { p[2] = 50; }, Code::out_of_range,
          "positions[2] is 50, expected in [0, max_position = 50)");
  refused([](QkvRopeWriteArgs&, P& p, S&) { p[4] = -1; }, Code::out_of_range, "positions[4] is -1");
  refused([](QkvRopeWriteArgs& a, P&, S&) { a.k_norm_weight = TensorView(); },
          Code::invalid_argument, "k_norm_weight has rank 0");
  refused([](QkvRopeWriteArgs& a, P&, S&) { a.q_norm_weight.shape[0] = 3; }, Code::invalid_argument,
          "q_norm_weight dim 0 (head_dim) is 3, expected 6");
  refused([](QkvRopeWriteArgs& a, P&, S&) { a.q_out.shape[1] = 5; }, Code::invalid_argument,
          "q_out dim 1 (num_q_heads) is 5, expected 4");
  refused([](QkvRopeWriteArgs& a, P&, S&) { a.q_out.dtype = DType::f32; }, Code::invalid_argument,
          "q_out has dtype f32");
  refused([&](QkvRopeWriteArgs& a, P&, S&) { a.q_out.data = pr.qkv.data(); },
          Code::invalid_argument, "q_out overlaps qkv");
  refused([](QkvRopeWriteArgs&, P&, S& s) { s[1] = 1000; }, Code::out_of_range,
          "slot_mapping[1] is 1000");
  refused(
      [](QkvRopeWriteArgs& a, P&, S&) {
        a.slots.batch_indices = std::span<const int32_t>();
        a.slots.slot_mapping = {};
      },
      Code::invalid_argument, "neither");
  refused([](QkvRopeWriteArgs& a, P&, S&) { a.kv.k_pages.dtype = DType::bf16; },
          Code::invalid_argument, "k_pages has dtype bf16, expected int8");
  refused([](QkvRopeWriteArgs& a, P&, S&) { a.kv.k_scales = TensorView(); }, Code::invalid_argument,
          "k_scales");
  refused([](QkvRopeWriteArgs& a, P&, S&) { a.kv.v_pages.shape[0] = 1; }, Code::invalid_argument,
          "v_pages dim 0 (num_pages) is 1, expected 5");
  Stream cuda;
  cuda.device = Device::cuda(0);
  EXPECT_TRUE(has_error(plan->run(cuda, {}, pr.args), Code::invalid_argument,
                        "qkv_rope_write: stream is on cuda:0, expected cpu"));
  EXPECT_EQ(pr.outputs(), before);

  // Without qk_norm the weights must be absent.
  Case plain = c;
  plain.qk_norm = false;
  std::mt19937 rng2(test_seed());
  Problem pp(plain, rng2);
  Result<QkvRopeWritePlan> plan2 = QkvRopeWritePlan::select(pp.desc);
  ASSERT_OK(plan2);
  QkvRopeWriteArgs a = pp.args;
  a.q_norm_weight = pr.args.q_norm_weight;
  EXPECT_TRUE(has_error(plan2->can_implement(a), Code::invalid_argument,
                        "q_norm_weight is given without qk_norm, expected none"));
}

// The AVX-512 quantize and dequantize rows (qkv_rope_write's K/V, rope_shift's K) against the
// portable ones, bit for bit: smooth rows (the 64-wide clean path), rows with fp8 / int8 ties at
// inv = 1, rows with a NaN, an infinity or only denormals, and odd lengths (tails).
TEST(QkvRopeWriteRows, Avx512QuantizeMatchesPortable) {
  if (!cpu_supports(CpuIsa::avx512)) GTEST_SKIP() << "no AVX-512 on this CPU";
  const cpu::RopeKernels* fast = cpu::rope_kernels(CpuIsa::avx512);
  ASSERT_NE(fast, nullptr) << "the AVX-512 rope kernels failed their self-test";
  const cpu::RopeKernels* slow = cpu::rope_kernels(CpuIsa::portable);
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  constexpr int64_t kMax = 256;
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t n =
        trial % 3 == 0 ? 128 : (trial % 3 == 1 ? 64 : 1 + static_cast<int64_t>(rng() % kMax));
    std::vector<float> x(static_cast<size_t>(n));
    for (float& v : x) v = normal(rng) * std::ldexp(1.0f, static_cast<int>(rng() % 40) - 20);
    const auto at = static_cast<size_t>(rng() % static_cast<uint32_t>(n));
    switch (trial % 8) {
      case 1:
        x[at] = NAN;
        break;
      case 2:
        x[at] = -INFINITY;
        break;
      case 3:
        for (float& v : x) v *= 1e-39f;
        break;
      case 4:  // ties: absmax 448 or 127, halves in between
        for (size_t i = 0; i < x.size(); ++i) x[i] = std::round(x[i] * 8.0f) * 0.5f + 0.25f;
        x[at] = trial % 16 < 8 ? 448.0f : 127.0f;
        break;
      default:
        break;
    }
    for (DType d : {DType::int8, DType::fp8_e4m3}) {
      SCOPED_TRACE(std::string(name(d)) + " n " + std::to_string(n) + " trial " +
                   std::to_string(trial));
      std::vector<uint8_t> a(kMax, 0x5a), b(kMax, 0x5a);
      const float sa = slow->quantize(x.data(), d, a.data(), n, false);
      const float sb = fast->quantize(x.data(), d, b.data(), n, trial % 2 == 0);
      fast->fence();
      EXPECT_EQ(a, b);
      EXPECT_EQ(std::memcmp(&sa, &sb, sizeof sa), 0);
      for (DType src : {DType::bf16, DType::f16}) {  // V: quantized from the input dtype
        std::vector<uint16_t> row(static_cast<size_t>(n));
        slow->store(x.data(), src, row.data(), n, false);
        std::vector<uint8_t> c(kMax, 0x5a), e(kMax, 0x5a);
        const float sc = slow->quantize_from(src, row.data(), d, c.data(), n, false);
        const float se = fast->quantize_from(src, row.data(), d, e.data(), n, false);
        EXPECT_EQ(c, e) << name(src);
        EXPECT_EQ(std::memcmp(&sc, &se, sizeof sc), 0) << name(src);
      }
      std::vector<float> fa(static_cast<size_t>(n)), fb(static_cast<size_t>(n));
      slow->dequantize(d, a.data(), sa, fa.data(), n);
      fast->dequantize(d, a.data(), sa, fb.data(), n);
      EXPECT_EQ(std::memcmp(fa.data(), fb.data(), fa.size() * sizeof(float)), 0);
    }
  }
}

}  // namespace
}  // namespace kvcache
