// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/thread_pool.h"

#include "backend/cpu/attention_kernels.h"
#include "ops/quantize.h"
#include "reference/attention.h"
#include "reference/element.h"
#include "testing/attention_problem.h"
#include "testing/test_util.h"

namespace kvcache {
namespace {

using testing::Config;
using testing::expect_close;
using testing::has_error;
using testing::nonzero_uniform;
using testing::Problem;
using testing::reference_of;
using testing::seed_trace;
using testing::store_row;
using testing::test_seed;

// The ISAs this CPU runs for attention: portable, and avx2 / avx512 when usable.
std::vector<CpuIsa> isas() {
  std::vector<CpuIsa> out = {CpuIsa::portable};
  AttentionDesc d;
  d.num_q_heads = 1;
  d.kv = KVFormat{1, 4};
  d.max_seq_len = 1;
  for (CpuIsa isa : {CpuIsa::avx2, CpuIsa::avx512}) {
    if (cpu_supports(isa) && DecodeAttentionPlan::select(d, Device::cpu(), isa).ok()) {
      out.push_back(isa);
    }
  }
  return out;
}

// Runs the problem (poisoned outputs) with the plan for its desc; fills got with o and lse.
template <class Plan>
Status run_problem(Problem& p, CpuIsa isa, ThreadPool* pool, std::vector<double>* got) {
  Result<Plan> plan = Plan::select(p.desc(), Device::cpu(), isa);
  if (!plan.ok()) return plan.status();
  std::vector<std::byte> ws(plan->workspace_size());
  p.poison();
  Stream stream;
  stream.pool = pool;
  if (Status s = plan->run(stream, ws, p.args()); !s.ok()) return s;
  got->clear();
  for (size_t i = 0; i < p.o_size(); ++i) got->push_back(p.o_at(i));
  const AttentionArgs a = p.args();
  for (int64_t i = 0; i < a.lse.numel(); ++i) got->push_back(p.lse_at(static_cast<size_t>(i)));
  return Status();
}

Status run_any(Problem& p, CpuIsa isa, ThreadPool* pool, std::vector<double>* got) {
  return p.config().q_counts.empty() ? run_problem<DecodeAttentionPlan>(p, isa, pool, got)
                                     : run_problem<ExtendAttentionPlan>(p, isa, pool, got);
}

// The stated precision of the plan run_any runs for this isa.
Precision precision_of(const Problem& p, CpuIsa isa) {
  return DecodeAttentionPlan::select(p.desc(), Device::cpu(), isa).value().precision();
}

// Every ISA, with and without a pool of 2, against the reference.
void check_problem(const Config& cfg, uint32_t seed, const std::string& what) {
  std::mt19937 rng(seed);
  Problem p(cfg, rng);
  const std::vector<double> want = reference_of(p);
  ThreadPool pool(2);
  for (CpuIsa isa : isas()) {
    const Precision prec = precision_of(p, isa);
    for (ThreadPool* tp : {static_cast<ThreadPool*>(nullptr), &pool}) {
      std::vector<double> got;
      ASSERT_OK(run_any(p, isa, tp, &got));
      expect_close(got, want, prec.abs_tol, prec.rel_tol,
                   what + " isa " + name(isa) + (tp ? " pool 2" : " inline"));
    }
  }
}

TEST(Attention, DecodeMatchesReferenceAcrossDTypes) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  const std::pair<DType, DType> kv[] = {
      {DType::f32, DType::f32},           {DType::f16, DType::f16},
      {DType::bf16, DType::bf16},         {DType::int8, DType::int8},
      {DType::fp8_e4m3, DType::fp8_e4m3}, {DType::int8, DType::bf16},
      {DType::bf16, DType::fp8_e4m3},     {DType::fp8_e4m3, DType::f16}};
  for (auto [k, v] : kv) {
    Config cfg;
    cfg.k = k;
    cfg.v = v;
    cfg.dim = 33;
    cfg.dim_v = 5;
    check_problem(cfg, seed, std::string("k ") + name(k) + " v " + name(v));
  }
  const DType io[] = {DType::f32, DType::f16, DType::bf16};
  for (DType q : io) {
    for (DType o : io) {
      Config cfg;
      cfg.q = q;
      cfg.o = o;
      check_problem(cfg, seed, std::string("q ") + name(q) + " o " + name(o));
    }
  }
}

TEST(Attention, HeadDimsAndGqaRatios) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (int64_t dim : {5, 64, 128, 256}) {
    Config cfg;
    cfg.dim = dim;
    cfg.seq_lens = {9, 2};
    check_problem(cfg, seed, "head_dim " + std::to_string(dim));
  }
  for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{3, 3}, {8, 2}, {7, 1}, {40, 1}}) {
    Config cfg;
    cfg.hq = hq;
    cfg.hkv = hkv;
    cfg.page_size = 3;
    check_problem(cfg, seed, "heads " + std::to_string(hq) + "/" + std::to_string(hkv));
  }
}

TEST(Attention, PagedEqualsContiguousEqualsReference) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (DType dt : {DType::bf16, DType::int8}) {
    for (int64_t page : {16, 3}) {
      for (PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
        Config cfg;
        cfg.k = cfg.v = dt;
        cfg.dim = 64;
        cfg.seq_lens = {40, 7, 1};
        cfg.page_size = page;
        cfg.layout = layout;
        cfg.token_major = layout == PageLayout::nhd;
        std::mt19937 rng(seed);
        Problem p(cfg, rng);  // holds the same rows in its pool and its contiguous cache
        const std::vector<double> want = reference_of(p);
        p.use_pages(false);
        EXPECT_EQ(want, reference_of(p));
        for (CpuIsa isa : isas()) {
          const Precision prec = precision_of(p, isa);
          std::vector<double> a, b;
          p.use_pages(true);
          ASSERT_OK(run_any(p, isa, nullptr, &a));
          p.use_pages(false);
          ASSERT_OK(run_any(p, isa, nullptr, &b));
          const std::string what = std::string(name(dt)) + " page " + std::to_string(page) + " " +
                                   name(layout) + " " + name(isa);
          expect_close(a, want, prec.abs_tol, prec.rel_tol, what + " paged");
          expect_close(b, want, prec.abs_tol, prec.rel_tol, what + " contiguous");
        }
      }
    }
  }
}

// Decode over pages hands one work item several kv heads when there are enough chunks (all 8
// heads at group 4; 4 + 1 at group 8, 5 kv heads), walking each page head by head.
TEST(Attention, PagedDecodeWithSeveralKvHeadsPerItem) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{32, 8}, {40, 5}, {12, 6}}) {
    for (DType dt : {DType::bf16, DType::int8}) {
      for (PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
        Config cfg;
        cfg.hq = hq;
        cfg.hkv = hkv;
        cfg.dim = 64;
        cfg.k = cfg.v = dt;
        cfg.q = cfg.o = DType::bf16;
        cfg.seq_lens = {40, 33, 70, 5};
        cfg.page_size = hkv == 6 ? 3 : 16;
        cfg.layout = layout;
        cfg.chunk = hkv == 6 ? 15 : 16;  // 12 chunks (13 at 15)
        check_problem(cfg, seed,
                      "heads " + std::to_string(hq) + "/" + std::to_string(hkv) + " " + name(dt) +
                          " " + name(layout));
      }
    }
  }
}

TEST(Attention, SplitContextEqualsUnsplitAndThreadCountDoesNotMatter) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  Config cfg;
  cfg.hq = 8;
  cfg.dim = 64;
  cfg.seq_lens = {300, 45, 129};
  cfg.page_size = 16;
  cfg.sinks = true;
  std::mt19937 rng(seed);
  Problem whole(cfg, rng);
  cfg.chunk = 32;  // a multiple of the page
  std::mt19937 rng2(seed);
  Problem split32(cfg, rng2);
  cfg.chunk = 7;  // runs end at pages and chunks
  std::mt19937 rng3(seed);
  Problem split7(cfg, rng3);
  const std::vector<double> want = reference_of(whole);
  ThreadPool pool(2);
  for (CpuIsa isa : isas()) {
    const Precision prec = precision_of(whole, isa);
    std::vector<double> a, b, c, b2;
    ASSERT_OK(run_any(whole, isa, nullptr, &a));
    ASSERT_OK(run_any(split32, isa, nullptr, &b));
    ASSERT_OK(run_any(split7, isa, nullptr, &c));
    ASSERT_OK(run_any(split32, isa, &pool, &b2));
    expect_close(a, want, prec.abs_tol, prec.rel_tol, std::string("unsplit ") + name(isa));
    // Split vs unsplit differ by float rounding of the merge only (f32 output).
    expect_close(b, a, 1e-6, 1e-6, std::string("chunk 32 vs unsplit ") + name(isa));
    expect_close(c, a, 1e-6, 1e-6, std::string("chunk 7 vs unsplit ") + name(isa));
    EXPECT_EQ(b, b2) << "the pool changed the result";
  }
}

TEST(Attention, WindowSoftCapAndSinksEachMatchReference) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (int option = 0; option < 6; ++option) {
    for (bool extend : {false, true}) {
      Config cfg;
      cfg.dim = 64;
      cfg.hq = 6;
      cfg.seq_lens = {70, 12, 33};
      cfg.page_size = 16;
      cfg.chunk = 16;
      if (extend) cfg.q_counts = {5, 12, 1};
      if (option == 0) cfg.window = 9;
      if (option == 1) cfg.window = 1;
      if (option == 2) {
        cfg.scale = 1.0f;  // logits ~ +-3: a cap of 2 bends most of them
        cfg.soft_cap = 2.0f;
      }
      if (option == 3) cfg.sinks = true;
      if (option == 4) {  // StreamingLLM: 3 sink tokens stay visible beside a window of 9
        cfg.window = 9;
        cfg.sink_tokens = 3;
      }
      if (option == 5) {  // sinks past a chunk boundary, a window of 1
        cfg.window = 1;
        cfg.sink_tokens = 20;
      }
      check_problem(cfg, seed,
                    "option " + std::to_string(option) + (extend ? " extend" : " decode"));
    }
  }
}

TEST(Attention, ExtendRaggedCausal) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (int64_t page : {0, 3}) {
    Config cfg;
    cfg.hq = 7;
    cfg.hkv = 1;
    cfg.dim = 33;
    cfg.q = DType::bf16;
    cfg.o = DType::bf16;
    cfg.seq_lens = {11, 4, 0, 40};
    cfg.q_counts = {3, 4, 0, 9};  // a whole prompt, an empty sequence, a long tail
    cfg.page_size = page;
    cfg.chunk = 8;
    check_problem(cfg, seed, "page " + std::to_string(page));
  }
}

TEST(Attention, LongContextSplitsAcrossThreads) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  Config cfg;
  cfg.hq = 8;
  cfg.dim = 64;
  cfg.seq_lens = {2500};
  cfg.page_size = 16;
  cfg.max_seq_len = 4096;  // auto chunk 512: five chunks
  check_problem(cfg, seed, "2500 keys");
}

// 8-bit K or V at head dims the AVX-512 dot-product loops take (multiples of 64), contiguous and
// paged, several 64-key segments and chunks: every isa within its plan's stated precision. On a
// CPU with the instructions the avx512 plan must pick those loops and state their rounding.
TEST(Attention, EightBitRowsAtDotProductDims) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  const std::pair<DType, DType> kv[] = {{DType::int8, DType::int8},
                                        {DType::fp8_e4m3, DType::fp8_e4m3},
                                        {DType::int8, DType::bf16},
                                        {DType::bf16, DType::fp8_e4m3}};
  for (auto [k, v] : kv) {
    for (int64_t dim : {128, 192}) {
      for (int64_t page : {0, 16}) {
        Config cfg;
        cfg.k = k;
        cfg.v = v;
        cfg.dim = dim;
        cfg.hq = 8;
        cfg.hkv = 2;
        cfg.q = DType::bf16;  // o stays f32: no output rounding hides the loops' own
        cfg.seq_lens = {300, 45, 129};
        cfg.page_size = page;
        cfg.layout = dim == 128 ? PageLayout::nhd : PageLayout::hnd;
        cfg.chunk = 112;
        check_problem(cfg, seed,
                      std::string("k ") + name(k) + " v " + name(v) + " dim " +
                          std::to_string(dim) + " page " + std::to_string(page));
      }
    }
  }
  AttentionDesc d;
  d.num_q_heads = 32;
  d.kv = KVFormat{8, 128, 128, DType::int8, DType::int8};
  d.max_seq_len = 4096;
  if (!cpu_supports(CpuIsa::avx512)) GTEST_SKIP() << "no AVX-512";
  const DecodeAttentionPlan plan =
      DecodeAttentionPlan::select(d, Device::cpu(), CpuIsa::avx512).value();
  if (cpu::cpu_has_dot8()) {
    EXPECT_STREQ(plan.sku(), "cpu.avx512.dot8");
    EXPECT_EQ(plan.precision().abs_tol, 0x1p-9);
    EXPECT_NE(plan.precision().note.find("int16"), std::string::npos) << plan.precision().note;
    d.kv.k_dtype = d.kv.v_dtype = DType::fp8_e4m3;
    EXPECT_STREQ(DecodeAttentionPlan::select(d, Device::cpu(), CpuIsa::avx512)->sku(),
                 "cpu.avx512.dot8");
    EXPECT_EQ(DecodeAttentionPlan::select(d, Device::cpu(), CpuIsa::avx512)->precision().abs_tol,
              0x1p-7);
  } else {
    EXPECT_STREQ(plan.sku(), "cpu.avx512");
  }
  EXPECT_EQ(DecodeAttentionPlan::select(d, Device::cpu(), CpuIsa::portable)->precision().abs_tol,
            2e-5);
  d.kv.k_dtype = d.kv.v_dtype = DType::bf16;
  EXPECT_STREQ(DecodeAttentionPlan::select(d, Device::cpu(), CpuIsa::avx512)->sku(), "cpu.avx512");
  d.kv = KVFormat{8, 96, 96, DType::int8, DType::int8};  // not a multiple of 64
  EXPECT_STREQ(DecodeAttentionPlan::select(d, Device::cpu(), CpuIsa::avx512)->sku(), "cpu.avx512");
}

// K/V of each dtype at head_dim 128 over shuffled pages of each size (0: a contiguous cache) with
// poisoned unused cells, both layouts; page sizes that do not divide runs of 64 keys, so runs
// start and end mid-page; chunks that are not multiples of 64 keys; windows and sinks that start
// runs anywhere; decode and extend.
void check_runs_over_pages(std::initializer_list<DType> dtypes,
                           std::initializer_list<int64_t> pages) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (const DType dt : dtypes) {
    for (const int64_t page : pages) {
      for (const PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
        if (page == 0 && layout == PageLayout::hnd) continue;  // contiguous: once
        for (int option = 0; option < 3; ++option) {
          Config cfg;
          cfg.k = cfg.v = dt;
          cfg.dim = 128;
          cfg.hq = 12;
          cfg.hkv = 3;
          cfg.q = DType::bf16;
          cfg.seq_lens = {301, 45, 130};
          cfg.page_size = page;
          cfg.layout = layout;
          cfg.chunk = page == 0 ? 70 : page * (page == 1 ? 100 : 7);
          if (option == 1) cfg.window = 77;
          if (option == 2) {
            cfg.window = 40;
            cfg.sink_tokens = 5;
            cfg.q_counts = {3, 1, 7};
          }
          check_problem(cfg, seed,
                        std::string(name(dt)) + " page " + std::to_string(page) + " " +
                            name(layout) + " option " + std::to_string(option));
        }
      }
    }
  }
}

// Paged 8-bit K/V at a dot-product dim walk each run of up to 64 keys over its pages in one call
// per kv head (listed rows).
TEST(Attention, EightBitRunsOverOddPages) {
  check_runs_over_pages({DType::int8, DType::fp8_e4m3}, {1, 3, 17});
}

// 16-bit K/V rows (the AVX-512 loops prefetch them into L2 in every layout; past a page's end they
// prefetch into the next page, K or V).
TEST(Attention, SixteenBitRowsOverOddPages) {
  check_runs_over_pages({DType::bf16, DType::f16}, {0, 1, 3, 17});
}

// Quantized storage vs the same data in float: the error the storage adds, for |x| <= 1,
// head_dim 128 and 200 keys. Stated bounds: int8 0.005, fp8_e4m3 0.03 (max abs on o; measured
// ~0.0015 and ~0.009).
TEST(Attention, QuantizationErrorBound) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (auto [dt, bound] : {std::pair{DType::int8, 0.005}, std::pair{DType::fp8_e4m3, 0.03}}) {
    Config cfg;
    cfg.dim = 128;
    cfg.seq_lens = {200, 31};
    cfg.k = cfg.v = dt;
    std::mt19937 rng(seed);
    Problem quant(cfg, rng);
    cfg.k = cfg.v = DType::f32;
    std::mt19937 rng2(seed);
    Problem exact(cfg, rng2);
    ASSERT_EQ(quant.originals(0), exact.originals(0));
    std::vector<double> got;
    ASSERT_OK(run_any(quant, CpuIsa::best, nullptr, &got));
    std::vector<double> want = reference_of(exact);
    got.resize(quant.o_size());
    want.resize(quant.o_size());
    expect_close(got, want, bound, 0.0, name(dt));
  }
}

// --- refusals ---

TEST(Attention, SelectRefusesBadDescriptors) {
  AttentionDesc good;
  good.num_q_heads = 4;
  good.kv = KVFormat{2, 8};
  good.max_seq_len = 16;
  good.max_q_tokens = 4;
  ASSERT_OK(DecodeAttentionPlan::select(good));
  ASSERT_OK(ExtendAttentionPlan::select(good));
  struct Case {
    std::function<void(AttentionDesc&)> mutate;
    const char* fragment;
  };
  const Case cases[] = {
      {[](AttentionDesc& d) { d.num_q_heads = 5; },
       "num_q_heads is 5, expected a positive multiple of num_kv_heads = 2"},
      {[](AttentionDesc& d) { d.kv.num_kv_heads = 0; }, "num_kv_heads is 0"},
      {[](AttentionDesc& d) { d.kv.head_dim = 513; },
       "head_dim 513 / head_dim_v 513 is not supported, expected each in [1, 512]"},
      {[](AttentionDesc& d) { d.kv.head_dim_v = 600; },
       "head_dim 8 / head_dim_v 600 is not supported"},
      {[](AttentionDesc& d) { d.kv.k_dtype = DType::fp8_e5m2; }, "k_dtype is fp8_e5m2"},
      {[](AttentionDesc& d) { d.q_dtype = DType::int8; }, "q_dtype is int8, expected one of f32"},
      {[](AttentionDesc& d) { d.o_dtype = DType::f64; }, "o_dtype is f64"},
      {[](AttentionDesc& d) { d.scale = -1.0f; }, "scale is"},
      {[](AttentionDesc& d) { d.scale = std::nanf(""); }, "scale is"},
      {[](AttentionDesc& d) { d.soft_cap = -2.0f; }, "soft_cap is"},
      {[](AttentionDesc& d) { d.window = -1; }, "window is -1"},
      {[](AttentionDesc& d) { d.sink_tokens = 2; },
       "sink_tokens is 2, expected 0, or > 0 together"},
      {[](AttentionDesc& d) { d.max_batch = 0; }, "max_batch is 0"},
      {[](AttentionDesc& d) { d.max_seq_len = 0; }, "max_seq_len is 0"},
      {[](AttentionDesc& d) { d.chunk_size = -3; }, "chunk_size is -3"},
      {[](AttentionDesc& d) {
         d.pages = PageFormat{0, 16};
       },
       "num_pages is 0"},
      {[](AttentionDesc& d) {
         d.pages = PageFormat{4, 0};
       },
       "page_size is 0"},
  };
  for (const Case& c : cases) {
    AttentionDesc d = good;
    c.mutate(d);
    EXPECT_TRUE(has_error(DecodeAttentionPlan::select(d), Code::invalid_argument,
                          std::string("decode_attention: ") + c.fragment));
    EXPECT_TRUE(has_error(ExtendAttentionPlan::select(d), Code::invalid_argument,
                          std::string("extend_attention: ") + c.fragment));
  }
  AttentionDesc d = good;
  d.max_q_tokens = 0;
  EXPECT_OK(DecodeAttentionPlan::select(d));
  EXPECT_TRUE(
      has_error(ExtendAttentionPlan::select(d), Code::invalid_argument, "max_q_tokens is 0"));
  // A GPU this machine lacks (CI has none; cuda_tests covers the CUDA plans where one exists).
  EXPECT_TRUE(has_error(DecodeAttentionPlan::select(good, Device::cuda(cuda_device_count())),
                        Code::unavailable, "decode_attention: "));
  if (!cpu_supports(CpuIsa::avx2)) {
    EXPECT_TRUE(has_error(DecodeAttentionPlan::select(good, Device::cpu(), CpuIsa::avx2),
                          Code::unavailable, "isa avx2"));
  }
  if (!cpu_supports(CpuIsa::avx512)) {
    EXPECT_TRUE(has_error(DecodeAttentionPlan::select(good, Device::cpu(), CpuIsa::avx512),
                          Code::unavailable, "isa avx512"));
  }
}

struct Refusal {
  const char* what;
  std::function<void(AttentionArgs&)> mutate;
  Code code;
  const char* fragment;
};

// can_implement and run refuse each case with its code and message; nothing is written.
template <class Plan>
void expect_refusals(Problem& p, std::span<const Refusal> cases) {
  const Plan plan = Plan::select(p.desc()).value();
  std::vector<std::byte> ws(plan.workspace_size());
  for (const Refusal& c : cases) {
    SCOPED_TRACE(c.what);
    AttentionArgs a = p.args();
    c.mutate(a);
    p.poison();
    const std::vector<uint8_t> before = p.output_bytes();
    EXPECT_TRUE(has_error(plan.can_implement(a), c.code, c.fragment));
    EXPECT_TRUE(has_error(plan.run(Stream{}, ws, a), c.code, c.fragment));
    EXPECT_EQ(p.output_bytes(), before);
  }
  // The unchanged arguments run.
  EXPECT_OK(plan.run(Stream{}, ws, p.args()));
}

TEST(Attention, DecodeRefusals) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  Config cfg;
  cfg.q = cfg.o = DType::f32;
  cfg.k = DType::int8;
  cfg.seq_lens = {5, 17, 1};
  cfg.page_size = 3;
  cfg.sinks = true;
  cfg.max_seq_len = 40;  // past the contiguous capacity (19) and the pages (21)
  Problem p(cfg, rng);
  const std::vector<int32_t> too_many = {5, 17, 1, 1};
  const std::vector<int32_t> zero_len = {5, 0, 1};
  const std::vector<int32_t> past_max = {5, 41, 1};
  const std::vector<int32_t> past_room = {5, 22, 1};
  const std::vector<int32_t> past_cap = {5, 20, 1};
  const std::vector<int32_t> indptr = {0, 1, 2, 3};
  const std::vector<int32_t> short_indptr = {0, 1, 2};
  std::vector<int32_t> bad_pages;
  std::vector<float> lse_small(2);
  const Refusal common[] = {
      {"batch > max_batch", [&](AttentionArgs& a) { a.seq_lens = too_many; },
       Code::invalid_argument,
       "decode_attention: batch (seq_lens entries) is 4, expected <= max_batch = 3"},
      {"empty sequence", [&](AttentionArgs& a) { a.seq_lens = zero_len; }, Code::invalid_argument,
       "seq_lens[1] is 0, expected >= 1 (a query sees at least itself)"},
      {"past max_seq_len", [&](AttentionArgs& a) { a.seq_lens = past_max; }, Code::invalid_argument,
       "seq_lens[1] is 41, expected <= max_seq_len = 40"},
      {"q_indptr in decode", [&](AttentionArgs& a) { a.q_indptr = indptr; }, Code::invalid_argument,
       "q_indptr has 4 entries, expected none for decode"},
      {"q dtype", [](AttentionArgs& a) { a.q.dtype = DType::bf16; }, Code::invalid_argument,
       "q has dtype bf16, expected f32"},
      {"q heads", [](AttentionArgs& a) { a.q.shape[1] = 3; }, Code::invalid_argument,
       "q dim 1 (num_q_heads) is 3, expected 4"},
      {"o head_dim", [](AttentionArgs& a) { a.o.shape[2] = 9; }, Code::invalid_argument,
       "o dim 2 (head_dim_v) is 9, expected 8"},
      {"o strided dim", [](AttentionArgs& a) { a.o.strides[2] = 2; }, Code::invalid_argument,
       "o has stride 2 on its last axis, expected 1"},
      {"o overlaps q", [](AttentionArgs& a) { a.o.data = a.q.data; }, Code::invalid_argument,
       "o overlaps q"},
      {"lse shape",
       [&](AttentionArgs& a) { a.lse = TensorView::contiguous(lse_small.data(), DType::f32, {2}); },
       Code::invalid_argument,
       "lse has rank 1 (shape [2]), expected rank 2 [batch=3, num_q_heads=4]"},
      {"lse overlaps o", [](AttentionArgs& a) { a.lse.data = a.o.data; }, Code::invalid_argument,
       "lse overlaps q or o"},
      {"missing sinks", [](AttentionArgs& a) { a.sinks = TensorView(); }, Code::invalid_argument,
       "sinks has rank 0 (shape []), expected rank 1 [num_q_heads=4]"},
      {"sinks dtype", [](AttentionArgs& a) { a.sinks.dtype = DType::f16; }, Code::invalid_argument,
       "sinks has dtype f16"},
  };
  const Refusal paged[] = {
      {"past pages", [&](AttentionArgs& a) { a.seq_lens = past_room; }, Code::out_of_range,
       "seq_lens[1] is 22, expected <= 21"},
      {"page out of range",
       [&](AttentionArgs& a) {
         bad_pages.assign(a.page_table.indices.begin(), a.page_table.indices.end());
         bad_pages[3] = static_cast<int32_t>(p.desc().pages->num_pages);
         a.page_table.indices = bad_pages;
       },
       Code::out_of_range, "page_indices[3] is"},
      {"page table size", [&](AttentionArgs& a) { a.page_table.indptr = short_indptr; },
       Code::invalid_argument, "page_indptr has 3 entries, expected batch + 1 = 4"},
      {"pool dtype", [](AttentionArgs& a) { a.paged.v_pages.dtype = DType::f16; },
       Code::invalid_argument, "v_pages has dtype f16"},
      {"missing scales", [](AttentionArgs& a) { a.paged.k_scales = TensorView(); },
       Code::invalid_argument, "k_scales"},
  };
  const Refusal contiguous[] = {
      {"past capacity", [&](AttentionArgs& a) { a.seq_lens = past_cap; }, Code::out_of_range,
       "seq_lens[1] is 20, expected <= 19 (the caches' capacity)"},
      {"cache heads", [](AttentionArgs& a) { a.contiguous.v.shape[1] = 1; }, Code::invalid_argument,
       "v dim 1 (num_kv_heads) is 1, expected 2"},
      {"scales for bf16", [](AttentionArgs& a) { a.contiguous.v_scales = a.contiguous.k_scales; },
       Code::invalid_argument, "v_scales is given for bf16 storage"},
  };
  expect_refusals<DecodeAttentionPlan>(p, common);
  expect_refusals<DecodeAttentionPlan>(p, paged);
  p.use_pages(false);
  expect_refusals<DecodeAttentionPlan>(p, common);
  expect_refusals<DecodeAttentionPlan>(p, contiguous);
}

TEST(Attention, ExtendRefusals) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  Config cfg;
  cfg.seq_lens = {5, 17};
  cfg.q_counts = {2, 3};
  Problem p(cfg, rng);
  const std::vector<int32_t> short_indptr = {0, 2};
  const std::vector<int32_t> nonzero = {1, 2, 5};
  const std::vector<int32_t> decreasing = {0, 3, 2};
  const std::vector<int32_t> too_many_q = {0, 6, 6};
  const std::vector<int32_t> lens = {5, 17};
  const std::vector<int32_t> short_seq = {1, 17};
  std::vector<float> sinks(4, 1.0f);
  const Refusal cases[] = {
      {"q_indptr size", [&](AttentionArgs& a) { a.q_indptr = short_indptr; },
       Code::invalid_argument, "extend_attention: q_indptr has 2 entries, expected batch + 1 = 3"},
      {"q_indptr[0]", [&](AttentionArgs& a) { a.q_indptr = nonzero; }, Code::invalid_argument,
       "q_indptr[0] is 1, expected 0"},
      {"q_indptr decreasing", [&](AttentionArgs& a) { a.q_indptr = decreasing; },
       Code::invalid_argument, "q_indptr decreases at 2"},
      {"more queries than tokens", [&](AttentionArgs& a) { a.q_indptr = too_many_q; },
       Code::invalid_argument, "seq_lens[0] is 5, expected >= its 6 queries"},
      {"q rows vs q_indptr", [&](AttentionArgs& a) { a.seq_lens = short_seq; },
       Code::invalid_argument, "seq_lens[0] is 1, expected >= its 2 queries"},
      {"total_q vs q", [](AttentionArgs& a) { a.q.shape[0] = 4; }, Code::invalid_argument,
       "q dim 0 (total_q) is 4, expected 5"},
      {"sinks without has_sinks",
       [&](AttentionArgs& a) { a.sinks = TensorView::contiguous(sinks.data(), DType::f32, {4}); },
       Code::invalid_argument, "sinks is given, expected none"},
  };
  expect_refusals<ExtendAttentionPlan>(p, cases);
  // total_q past the plan's bound.
  AttentionDesc d = p.desc();
  d.max_q_tokens = 4;
  const ExtendAttentionPlan plan = ExtendAttentionPlan::select(d).value();
  EXPECT_TRUE(has_error(plan.can_implement(p.args()), Code::invalid_argument,
                        "total_q (q_indptr[batch]) is 5, expected <= max_q_tokens = 4"));
}

TEST(Attention, RunRefusesSmallWorkspaceAndOtherDevices) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  Config cfg;
  cfg.seq_lens = {40, 3};
  cfg.chunk = 8;  // split: the workspace holds partials
  Problem p(cfg, rng);
  const DecodeAttentionPlan plan = DecodeAttentionPlan::select(p.desc()).value();
  ASSERT_GT(plan.workspace_size(), 0u);
  std::vector<std::byte> ws(plan.workspace_size() - 1);
  const std::vector<uint8_t> before = p.output_bytes();
  EXPECT_TRUE(has_error(plan.run(Stream{}, ws, p.args()), Code::resource_exhausted,
                        "decode_attention: workspace has"));
  Stream gpu;
  gpu.device = Device::cuda(0);
  ws.resize(plan.workspace_size());
  EXPECT_TRUE(
      has_error(plan.run(gpu, ws, p.args()), Code::invalid_argument, "stream is on cuda:0"));
  AttentionArgs on_gpu = p.args();
  on_gpu.q.device = Device::cuda(0);
  EXPECT_TRUE(has_error(plan.run(Stream{}, ws, on_gpu), Code::invalid_argument, "q"));
  EXPECT_EQ(p.output_bytes(), before);
  EXPECT_EQ(std::string(plan.sku()).rfind("cpu.", 0), 0u) << plan.sku();
}

}  // namespace
}  // namespace kvcache
