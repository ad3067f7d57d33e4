// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// decode_attention / extend_attention on the GPU against the float64 reference: every K/V dtype
// and every pair of different K and V dtypes (CUDA cores), head dims, GQA ratios (padded and split
// into sub-groups), NHD / HND / contiguous (head- and token-major), odd page sizes and lengths,
// windows with sink tokens, soft-cap, sink logits, schedules with and without splits; bad device
// entries counted and reported; a CUDA graph replay; refusals. Skipped without a GPU.
#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/attention.h"
#include "kvcache/device.h"

#include "backend/cuda_attention_ops.h"
#include "backend/cuda_bench.h"
#include "testing/attention_problem.h"
#include "testing/gpu_test.h"
#include "testing/test_util.h"

namespace kvcache {
namespace {

using testing::Config;
using testing::expect_close;
using testing::has_error;
using testing::Problem;
using testing::reference_of;
using testing::seed_trace;
using testing::test_seed;

// Llama-like paged problems: hq query heads over hkv kv heads of head_dim dim, pages of page_size.
Config paged_config(int64_t hq, int64_t hkv, int64_t dim, int64_t page_size,
                    std::vector<int32_t> seq_lens) {
  Config c;
  c.hq = hq;
  c.hkv = hkv;
  c.dim = dim;
  c.seq_lens = std::move(seq_lens);
  c.page_size = page_size;
  return c;
}

class CudaAttention : public testing::GpuTest {
 protected:
  // The problem's arguments with every array copied to the GPU (o and lse poisoned).
  AttentionArgs upload_args(Problem& p) {
    p.poison();
    const AttentionArgs h = p.args();
    AttentionArgs d = h;
    d.q = upload(h.q);
    d.o = upload(h.o);
    d.lse = upload(h.lse);
    d.sinks = upload(h.sinks);
    d.q_indptr = upload(h.q_indptr);
    d.seq_lens = upload(h.seq_lens);
    d.contiguous = {upload(h.contiguous.k), upload(h.contiguous.v), upload(h.contiguous.k_scales),
                    upload(h.contiguous.v_scales)};
    d.paged = {upload(h.paged.k_pages), upload(h.paged.v_pages), upload(h.paged.k_scales),
               upload(h.paged.v_scales)};
    d.page_table = PageTable{upload(h.page_table.indptr), upload(h.page_table.indices)};
    return d;
  }

  // A device workspace of the plan's size, filled with garbage (the op must not need zeros).
  template <class Plan>
  std::span<std::byte> workspace(const Plan& plan) {
    const size_t n = plan.workspace_size();
    return {static_cast<std::byte*>(upload_bytes(std::vector<uint8_t>(n, 0xab).data(), n)), n};
  }

  // Copies the GPU's o and lse back into the problem and returns them as doubles (o then lse).
  std::vector<double> outputs(Problem& p, const AttentionArgs& d) {
    const AttentionArgs h = p.args();
    const std::vector<uint8_t> o = download(d.o);
    const std::vector<uint8_t> lse = download(d.lse);
    std::memcpy(h.o.data, o.data(), o.size());
    std::memcpy(h.lse.data, lse.data(), lse.size());
    std::vector<double> got;
    for (size_t i = 0; i < p.o_size(); ++i) got.push_back(p.o_at(i));
    for (int64_t i = 0; i < h.lse.numel(); ++i) got.push_back(p.lse_at(static_cast<size_t>(i)));
    return got;
  }

  // Runs the problem on the GPU with `schedule` (nullopt: the plan's default); returns o and lse.
  template <class Plan>
  std::vector<double> run_on_gpu(Problem& p, std::optional<AttentionSchedule> schedule) {
    Result<Plan> plan = Plan::select(p.desc(), gpu());
    EXPECT_TRUE(plan.ok()) << plan.status().to_string();
    if (!plan.ok()) return {};
    const KVFormat& kv = p.desc().kv;
    EXPECT_EQ(std::string(plan->sku()),
              backend::cuda_attention_has_mma(kv.k_dtype, kv.v_dtype, kv.head_dim)
                  ? "cuda.sm90.mma"
                  : "cuda.sm90.simt");
    AttentionArgs d = upload_args(p);
    d.schedule = schedule;
    const Status s = plan->run(stream(), workspace(*plan), d);
    EXPECT_TRUE(s.ok()) << s.to_string();
    const Status errors = check_device_errors(stream());
    EXPECT_TRUE(errors.ok()) << errors.to_string();
    return outputs(p, d);
  }

  std::vector<double> run_any(Problem& p, std::optional<AttentionSchedule> schedule = {}) {
    return p.config().q_counts.empty() ? run_on_gpu<DecodeAttentionPlan>(p, schedule)
                                       : run_on_gpu<ExtendAttentionPlan>(p, schedule);
  }

  // The problem against the reference with the plan's default schedule, no split and a split
  // into chunks of 32 keys; paged problems in the pool and in the contiguous cache.
  void check(const Config& cfg, uint32_t seed, const std::string& what) {
    std::mt19937 rng(seed);
    Problem p(cfg, rng);
    const int64_t longest = *std::max_element(cfg.seq_lens.begin(), cfg.seq_lens.end());
    const std::vector<std::optional<AttentionSchedule>> schedules = {
        std::nullopt, AttentionSchedule{longest, 1}, AttentionSchedule{32, (longest + 31) / 32}};
    for (bool paged : {true, false}) {
      if (paged && cfg.page_size == 0) continue;
      p.use_pages(paged);
      const std::vector<double> want = reference_of(p);
      const Precision prec = DecodeAttentionPlan::select(p.desc(), gpu()).value().precision();
      for (size_t s = 0; s < schedules.size(); ++s) {
        const std::vector<double> got = run_any(p, schedules[s]);
        expect_close(got, want, prec.abs_tol, prec.rel_tol,
                     what + (paged ? " paged" : " contiguous") + " schedule " + std::to_string(s) +
                         " " + seed_trace(seed));
      }
    }
  }
};

TEST_F(CudaAttention, DecodeEveryKVDTypeAndHeadDim) {
  const uint32_t seed = test_seed();
  for (DType kv : {DType::f32, DType::f16, DType::bf16, DType::int8, DType::fp8_e4m3}) {
    for (int64_t dim : {16, 64, 128, 256}) {
      Config c;
      c.hq = 8;
      c.hkv = 2;
      c.dim = dim;
      c.k = c.v = kv;
      c.q = DType::bf16;
      c.o = DType::bf16;
      c.seq_lens = {1, 54, 97, 300};
      c.page_size = 16;
      check(c, seed, std::string(name(kv)) + " dim " + std::to_string(dim));
    }
  }
}

// K and V of different storage dtypes (-ctk / -ctv chosen apart): every ordered pair runs on the
// CUDA-core kernel with K and V read, converted and scaled each by its own type. head_dim 128 (the
// tensor cores would take equal types), a padded GQA group of 3, odd lengths, NHD and HND pages
// and both contiguous layouts; decode and a ragged extend.
TEST_F(CudaAttention, MixedKVDTypesRunOnCudaCores) {
  const uint32_t seed = test_seed();
  const DType types[] = {DType::f32, DType::f16, DType::bf16, DType::int8, DType::fp8_e4m3};
  int pair = 0;
  for (DType k : types) {
    for (DType v : types) {
      if (k == v) continue;
      Config c = paged_config(12, 4, 128, pair % 2 == 0 ? 16 : 5, {1, 97, 300});
      c.k = k;
      c.v = v;
      c.q = DType::bf16;
      c.o = pair % 3 == 0 ? DType::f32 : DType::bf16;
      c.layout = pair % 2 == 0 ? PageLayout::nhd : PageLayout::hnd;
      c.token_major = pair % 4 < 2;
      const std::string what = std::string("K ") + name(k) + " V " + name(v);
      {
        std::mt19937 rng(seed);
        Problem p(c, rng);
        const DecodeAttentionPlan plan = DecodeAttentionPlan::select(p.desc(), gpu()).value();
        EXPECT_STREQ(plan.sku(), "cuda.sm90.simt") << what;
        EXPECT_NE(plan.precision().note.find("CUDA cores"), std::string::npos) << what;
      }
      check(c, seed, what + " decode");
      c.seq_lens = {9, 130, 33};
      c.q_counts = {9, 4, 17};
      check(c, seed, what + " extend");
      ++pair;
    }
  }
}

TEST_F(CudaAttention, GqaRatiosLayoutsAndOddPages) {
  const uint32_t seed = test_seed();
  struct Case {
    int64_t hq, hkv, page;
    PageLayout layout;
    bool token_major;
  };
  const Case cases[] = {{3, 3, 1, PageLayout::nhd, false},   {6, 2, 7, PageLayout::hnd, true},
                        {12, 2, 16, PageLayout::nhd, true},  {24, 2, 5, PageLayout::hnd, false},
                        {20, 4, 16, PageLayout::hnd, false}, {7, 1, 3, PageLayout::nhd, false}};
  for (const Case& k : cases) {
    for (DType q : {DType::f32, DType::f16, DType::bf16}) {
      Config c;
      c.hq = k.hq;
      c.hkv = k.hkv;
      c.dim = 32;
      c.q = q;
      c.o = q == DType::f32 ? DType::bf16 : DType::f32;
      c.seq_lens = {33, 2, 129};
      c.page_size = k.page;
      c.layout = k.layout;
      c.token_major = k.token_major;
      check(c, seed,
            "hq " + std::to_string(k.hq) + " hkv " + std::to_string(k.hkv) + " page " +
                std::to_string(k.page) + " q " + name(q));
    }
  }
}

TEST_F(CudaAttention, WindowSinkTokensSoftCapAndSinks) {
  const uint32_t seed = test_seed();
  for (int variant = 0; variant < 5; ++variant) {
    Config c;
    c.hq = 8;
    c.hkv = 2;
    c.dim = 64;
    c.seq_lens = {40, 300, 1, 77};
    c.page_size = 16;
    c.scale = variant == 4 ? 0.3f : 0.0f;
    c.window = variant == 0 || variant == 3 ? 50 : 0;
    c.sink_tokens = variant == 3 ? 4 : 0;
    c.soft_cap = variant == 1 || variant == 3 ? 5.0f : 0.0f;
    c.sinks = variant == 2 || variant == 3;
    for (DType kv : {DType::bf16, DType::fp8_e4m3}) {
      c.k = c.v = kv;
      check(c, seed, "variant " + std::to_string(variant) + " " + name(kv));
    }
  }
}

TEST_F(CudaAttention, ExtendRaggedCausal) {
  const uint32_t seed = test_seed();
  for (int64_t window : {0, 20}) {
    for (DType kv : {DType::bf16, DType::int8}) {
      Config c;
      c.hq = 8;
      c.hkv = 2;
      c.dim = 128;
      c.k = c.v = kv;
      c.seq_lens = {17, 200, 5, 64};
      c.q_counts = {17, 9, 1, 30};
      c.page_size = 16;
      c.window = window;
      c.sink_tokens = window > 0 ? 2 : 0;
      c.sinks = window > 0;
      check(c, seed, "extend window " + std::to_string(window) + " " + name(kv));
    }
  }
}

// Extend with the host schedule: tensor cores pack several query tokens of a sequence into one
// work item (their K/V read once) and mask each token's causal limit.
TEST_F(CudaAttention, ExtendPacksQueryTokensWithHostSchedule) {
  const uint32_t seed = test_seed();
  struct Case {
    int64_t hq, hkv, dim;
    DType kv;
  };
  const Case cases[] = {{32, 8, 128, DType::bf16},     // 4 tokens x 4 heads
                        {6, 2, 64, DType::f16},        // 5 tokens x 3 heads (15 of 16 rows)
                        {4, 4, 128, DType::fp8_e4m3},  // 16 tokens x 1 head
                        {8, 4, 256, DType::int8}};     // 8 tokens x 2 heads
  for (const Case& k : cases) {
    std::mt19937 rng(seed);
    Config c;
    c.hq = k.hq;
    c.hkv = k.hkv;
    c.dim = k.dim;
    c.k = c.v = k.kv;
    c.seq_lens = {40, 300, 5, 64, 129};
    c.q_counts = {17, 64, 1, 30, 129};
    c.page_size = 16;
    c.sinks = true;
    Problem p(c, rng);
    const ExtendAttentionPlan plan = ExtendAttentionPlan::select(p.desc(), gpu()).value();
    std::vector<int32_t> q_indptr = {0};
    for (int32_t n : c.q_counts) q_indptr.push_back(q_indptr.back() + n);
    const AttentionSchedule sched = plan.schedule(c.seq_lens, q_indptr).value();
    EXPECT_GT(sched.max_query_blocks, 0) << "hq " << k.hq;
    const std::vector<double> want = reference_of(p);
    expect_close(
        run_any(p, sched), want, plan.precision().abs_tol, plan.precision().rel_tol,
        "packed extend hq " + std::to_string(k.hq) + " " + name(k.kv) + " " + seed_trace(seed));
    // Fewer blocks than the longest sequence needs: its last queries are reported, not dropped.
    AttentionSchedule short_sched = sched;
    short_sched.max_query_blocks = 1;
    const AttentionArgs d = upload_args(p);
    AttentionArgs with_short = d;
    with_short.schedule = short_sched;
    const std::span<std::byte> ws = workspace(plan);
    ASSERT_OK(plan.run(stream(), ws, with_short));
    EXPECT_TRUE(has_error(check_device_errors(stream()), Code::out_of_range, "q_indptr["));
  }
}

// The host schedule for one long sequence splits it over the GPU; the result matches.
TEST_F(CudaAttention, LongContextWithHostSchedule) {
  const uint32_t seed = test_seed();
  std::mt19937 rng(seed);
  const Config c = paged_config(32, 8, 128, 16, {5000});
  Problem p(c, rng);
  const DecodeAttentionPlan plan = DecodeAttentionPlan::select(p.desc(), gpu()).value();
  const AttentionSchedule sched = plan.schedule(c.seq_lens).value();
  EXPECT_GT(sched.max_chunks, 8);
  EXPECT_GE(sched.chunk_size * sched.max_chunks, 5000);
  const std::vector<double> want = reference_of(p);
  expect_close(run_any(p, sched), want, plan.precision().abs_tol, plan.precision().rel_tol,
               "1 x 5000 " + seed_trace(seed));
}

// The tensor-core kernel runs 8-warp CTAs when the grid fits one CTA per multiprocessor and its
// chunks are at least 512 keys long, else 4-warp CTAs: grids of exactly the multiprocessor count
// and of twice it, unsplit rows of 512-700 keys, for every K/V type and head_dim that has both
// (head_dim 256 always runs 4: DecodeEveryKVDTypeAndHeadDim).
TEST_F(CudaAttention, EightAndFourWarpCtasAroundOnePerMultiprocessor) {
  const uint32_t seed = test_seed();
  const int sms = backend::cuda_multiprocessor_count(gpu()).value();
  for (DType kv : {DType::f16, DType::bf16, DType::int8, DType::fp8_e4m3}) {
    for (int64_t dim : {64, 128}) {
      if (dim == 64 && size_of(kv) == 1) continue;  // 8-bit tensor cores start at 128
      for (int ctas_per_sm : {1, 2}) {
        std::mt19937 rng(seed);
        Config c = paged_config(8, 2, dim, 16, {});  // 2 kv heads: 2 CTAs per row
        c.k = c.v = kv;
        for (int b = 0; b < sms * ctas_per_sm / 2; ++b) {
          c.seq_lens.push_back(static_cast<int32_t>(512 + rng() % 189));
        }
        Problem p(c, rng);
        const int64_t longest = *std::max_element(c.seq_lens.begin(), c.seq_lens.end());
        const Precision prec = DecodeAttentionPlan::select(p.desc(), gpu()).value().precision();
        expect_close(
            run_any(p, AttentionSchedule{longest, 1}), reference_of(p), prec.abs_tol, prec.rel_tol,
            std::string(name(kv)) + " dim " + std::to_string(dim) + " " +
                std::to_string(ctas_per_sm) + " CTAs per multiprocessor " + seed_trace(seed));
      }
    }
  }
}

// Ragged lengths: the schedule's chunks cover the longest row; work items are of similar size.
TEST_F(CudaAttention, ScheduleSplitsRaggedBatchesEvenly) {
  AttentionDesc d;
  d.num_q_heads = 32;
  d.kv = KVFormat{8, 128};
  d.pages = PageFormat{1 << 16, 16, PageLayout::nhd};
  d.max_batch = 64;
  d.max_seq_len = 32768;
  const DecodeAttentionPlan plan = DecodeAttentionPlan::select(d, gpu()).value();
  std::vector<int32_t> lens(16, 512);
  lens[3] = 30000;
  const AttentionSchedule s = plan.schedule(lens).value();
  EXPECT_GE(s.chunk_size * s.max_chunks, 30000);
  EXPECT_LT(s.chunk_size, 30000 / 8);  // the long row is split, not run in one CTA
  EXPECT_TRUE(
      has_error(plan.schedule(std::vector<int32_t>(65, 1)), Code::invalid_argument, "max_batch"));
  EXPECT_TRUE(has_error(plan.schedule(std::vector<int32_t>{0}), Code::invalid_argument,
                        "seq_lens[0] is 0"));
}

// Ragged decode batches of many rows: lengths on chunk boundaries (96 = 3 chunks of 32), rows of
// one key, splits of some rows and not others, a grid of thousands of CTAs.
TEST_F(CudaAttention, RaggedBatchesOfManyRows) {
  const uint32_t seed = test_seed();
  std::mt19937 rng(seed);
  for (int64_t batch : {37, 257}) {
    Config c = paged_config(8, 2, 64, 16, {});
    for (int64_t b = 0; b < batch; ++b) {
      c.seq_lens.push_back(b % 5 == 0 ? 96 : static_cast<int32_t>(1 + rng() % 300));
    }
    check(c, seed, "batch " + std::to_string(batch));
  }
}

// Entries the host cannot check are counted by the kernel and reported once by check.
TEST_F(CudaAttention, BadDeviceEntriesAreSkippedAndReported) {
  std::mt19937 rng(test_seed());
  const Config c = paged_config(4, 2, 32, 8, {20, 40});
  Problem p(c, rng);
  const DecodeAttentionPlan plan = DecodeAttentionPlan::select(p.desc(), gpu()).value();
  const std::span<std::byte> ws = workspace(plan);
  const AttentionArgs h = p.args();

  // A page index past the pool.
  std::vector<int32_t> indices(h.page_table.indices.begin(), h.page_table.indices.end());
  indices[1] = 1 << 20;
  AttentionArgs d = upload_args(p);
  d.page_table.indices = upload(indices);
  ASSERT_OK(plan.run(stream(), ws, d));
  EXPECT_TRUE(has_error(check_device_errors(stream()), Code::out_of_range,
                        "decode_attention: page_table.indices[1] is 1048576"));
  EXPECT_OK(check_device_errors(stream()));

  // A length past the sequence's pages: its row is skipped (o keeps its poison).
  std::vector<int32_t> lens = c.seq_lens;
  lens[1] = 1000;
  d = upload_args(p);
  d.seq_lens = upload(lens);
  ASSERT_OK(plan.run(stream(), ws, d));
  EXPECT_TRUE(has_error(check_device_errors(stream()), Code::out_of_range,
                        "decode_attention: seq_lens[1] is 1000"));
  const std::vector<uint8_t> o = download(d.o);
  const size_t row_bytes = o.size() / 2;
  EXPECT_TRUE(std::all_of(o.begin() + static_cast<ptrdiff_t>(row_bytes), o.end(),
                          [](uint8_t b) { return b == 0x7f; }));
  EXPECT_FALSE(std::all_of(o.begin(), o.begin() + static_cast<ptrdiff_t>(row_bytes),
                           [](uint8_t b) { return b == 0x7f; }));

  // A schedule made for shorter sequences.
  d = upload_args(p);
  d.schedule = AttentionSchedule{8, 3};
  ASSERT_OK(plan.run(stream(), ws, d));
  EXPECT_TRUE(has_error(check_device_errors(stream()), Code::out_of_range, "seq_lens[1] is 40"));
  EXPECT_OK(check_device_errors(stream()));
}

TEST_F(CudaAttention, ExtendBadQIndptrIsReported) {
  std::mt19937 rng(test_seed());
  Config c = paged_config(4, 2, 32, 8, {20, 40});
  c.q_counts = {3, 5};
  Problem p(c, rng);
  const ExtendAttentionPlan plan = ExtendAttentionPlan::select(p.desc(), gpu()).value();
  const std::span<std::byte> ws = workspace(plan);
  AttentionArgs d = upload_args(p);
  d.q_indptr = upload(std::vector<int32_t>{0, 3, 9});  // 9 rows claimed, q has 8
  ASSERT_OK(plan.run(stream(), ws, d));
  EXPECT_TRUE(has_error(check_device_errors(stream()), Code::out_of_range,
                        "extend_attention: q_indptr[2] is 9"));
}

// A decode step captured in a CUDA graph and replayed gives what a direct call gives.
TEST_F(CudaAttention, GraphReplayMatchesDirectRun) {
  const uint32_t seed = test_seed();
  std::mt19937 rng(seed);
  const Config c = paged_config(32, 8, 128, 16, {700, 31, 1500});
  Problem p(c, rng);
  const std::vector<double> direct = run_any(p);
  const DecodeAttentionPlan plan = DecodeAttentionPlan::select(p.desc(), gpu()).value();
  const AttentionArgs d = upload_args(p);
  const std::span<std::byte> ws = workspace(plan);
  ASSERT_OK(backend::cuda_run_graph(
      stream(), [&] { return plan.run(stream(), ws, d); }, 3));
  EXPECT_OK(check_device_errors(stream()));
  EXPECT_EQ(outputs(p, d), direct);
}

TEST_F(CudaAttention, Refusals) {
  std::mt19937 rng(test_seed());
  const Config c = paged_config(4, 2, 32, 8, {20});
  Problem p(c, rng);
  AttentionDesc bad = p.desc();
  bad.kv.head_dim = 96;
  EXPECT_TRUE(
      has_error(DecodeAttentionPlan::select(bad, gpu()), Code::invalid_argument, "head_dim 96"));

  const DecodeAttentionPlan plan = DecodeAttentionPlan::select(p.desc(), gpu()).value();
  const std::span<std::byte> ws = workspace(plan);
  AttentionArgs d = upload_args(p);
  const std::vector<uint8_t> before = download(d.o);
  AttentionArgs host_q = d;
  host_q.q = p.args().q;  // a host view given to a GPU plan
  EXPECT_TRUE(has_error(plan.run(stream(), ws, host_q), Code::invalid_argument, "q is on cpu"));
  EXPECT_TRUE(has_error(plan.run(Stream{}, ws, d), Code::invalid_argument, "stream is on cpu"));
  EXPECT_TRUE(has_error(plan.run(stream(), ws.first(ws.size() - 1), d), Code::resource_exhausted,
                        "workspace"));
  AttentionArgs misaligned = d;
  misaligned.paged.k_pages.data = static_cast<std::byte*>(d.paged.k_pages.data) + 2;
  EXPECT_TRUE(has_error(plan.run(stream(), ws, misaligned), Code::invalid_argument, "aligned"));
  AttentionArgs too_big = d;
  too_big.schedule = AttentionSchedule{1, 64};
  EXPECT_TRUE(
      has_error(plan.run(stream(), ws, too_big), Code::invalid_argument, "workspace_items"));
  too_big.schedule = AttentionSchedule{1, 65};
  EXPECT_TRUE(
      has_error(plan.run(stream(), ws, too_big), Code::invalid_argument, "max_chunks in [1, 64]"));
  EXPECT_EQ(download(d.o), before);

  // The tensor-core kernel reads q rows with 16-byte loads: q rows must be 16-byte aligned.
  Problem pm(paged_config(4, 2, 128, 16, {20}), rng);
  const DecodeAttentionPlan mma = DecodeAttentionPlan::select(pm.desc(), gpu()).value();
  ASSERT_STREQ(mma.sku(), "cuda.sm90.mma");
  AttentionArgs dm = upload_args(pm);
  const std::vector<uint8_t> before_m = download(dm.o);
  AttentionArgs odd_q = dm;  // one row: a longer row stride moves no element
  odd_q.q.strides[0] += 2;
  EXPECT_TRUE(has_error(mma.run(stream(), workspace(mma), odd_q), Code::invalid_argument,
                        "q has stride 514 on axis 0, expected a multiple of 4 elements"));
  EXPECT_EQ(download(dm.o), before_m);
}

}  // namespace
}  // namespace kvcache
