// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The serving engine end to end at a small size, every decode step verified: bf16, int8 and fp8,
// a page budget that forces eviction and preemption, a corrupted cache that must be caught, bad
// options, and no page leaked at the end.
#include "serving/engine.h"

#include <gtest/gtest.h>

#include "kvcache/device.h"

#include "serving/verify.h"
#include "testing/test_util.h"

namespace kvcache::serving {
namespace {

using ::kvcache::testing::has_error;
using ::kvcache::testing::seed_trace;
using ::kvcache::testing::test_seed;

// 12 conversations of 3 turns in groups of 4: long enough for forks, evictions and reuse.
EngineOptions small(uint64_t seed) {
  EngineOptions o;
  o.workload.num_conversations = 12;
  o.workload.num_turns = 3;
  o.workload.group_size = 4;
  o.workload.seed = seed;
  o.workload.system_min = 40;
  o.workload.system_max = 80;
  o.workload.user_min = 4;
  o.workload.user_max = 20;
  o.workload.decode_min = 4;
  o.workload.decode_max = 12;
  o.workload.think_max = 8;
  o.num_pages = 96;
  o.page_size = 8;
  o.max_running = 8;
  o.watermark_pages = 2;
  o.verify = VerifyMode::all;
  return o;
}

// Invariants every clean run keeps.
void expect_clean(const EngineReport& r, const EngineOptions& o) {
  EXPECT_EQ(r.mismatches, 0) << (r.mismatch_lines.empty() ? "" : r.mismatch_lines[0]);
  EXPECT_EQ(r.faults_injected, 0);
  EXPECT_GT(r.checks, 0);
  EXPECT_LE(r.max_error, r.tolerance);
  EXPECT_EQ(r.leaked_pages, 0);
  EXPECT_GT(r.hit_rate, 0.0);
  EXPECT_GT(r.tokens_reused, 0);
  EXPECT_EQ(r.requests, o.workload.num_conversations * o.workload.num_turns + r.forks);
  EXPECT_EQ(r.verified_requests, r.requests);  // VerifyMode::all
  EXPECT_LE(r.peak_pages, o.num_pages);
  // After the last request: every page is free or a cached prefix nobody holds.
  ASSERT_FALSE(r.timeline.empty());
  const TimelinePoint& last = r.timeline.back();
  EXPECT_EQ(last.live, 0);
  EXPECT_EQ(last.free + last.cached, o.num_pages);
}

void print(const char* what, const EngineReport& r) {
  std::printf(
      "%s: checks %lld max_error %g (tolerance %g) hit %.3f evictions %lld preemptions "
      "%lld cow %lld\n",
      what, static_cast<long long>(r.checks), static_cast<double>(r.max_error),
      static_cast<double>(r.tolerance), r.hit_rate, static_cast<long long>(r.evictions),
      static_cast<long long>(r.preemptions), static_cast<long long>(r.cow_copies));
}

TEST(Engine, Bf16EveryStepVerified) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  const EngineOptions o = small(seed);
  Result<EngineReport> r = run_engine(o);
  ASSERT_OK(r);
  expect_clean(*r, o);
  EXPECT_GT(r->forks, 0);
  EXPECT_GT(r->cow_copies, 0);  // every fork writes into its shared partial page
  EXPECT_EQ(r->reference_dtype, DType::bf16);
  print("bf16", *r);
}

// int8 / fp8 pages against the bf16 model: the quantization error stays within its bound.
TEST(Engine, QuantizedStorageEveryStepVerified) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (const DType dtype : {DType::int8, DType::fp8_e4m3}) {
    SCOPED_TRACE(name(dtype));
    EngineOptions o = small(seed);
    o.kv_dtype = dtype;
    Result<EngineReport> r = run_engine(o);
    ASSERT_OK(r);
    expect_clean(*r, o);
    EXPECT_EQ(r->reference_dtype, DType::bf16);
    EXPECT_EQ(r->tolerance, verify_tolerance(dtype));
    // Quantized storage does cost something: an error of exactly 0 would mean bf16 ran.
    EXPECT_GT(r->max_error, 0.0f);
    print(name(dtype), *r);
  }
}

// A budget below what the running batch needs: cached pages are evicted and, when even that is
// not enough, running sequences are preempted and later resume from what is still cached.
TEST(Engine, TightBudgetEvictsAndPreempts) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  EngineOptions o = small(seed);
  o.num_pages = 48;
  Result<EngineReport> r = run_engine(o);
  ASSERT_OK(r);
  expect_clean(*r, o);
  EXPECT_GT(r->evictions, 0);
  EXPECT_GT(r->preemptions, 0);
  EXPECT_EQ(r->peak_pages, o.num_pages);
  EXPECT_GT(r->contiguous_pages_needed, o.num_pages);
  print("tight", *r);
}

// The negative control: one cached K page inverted on purpose must show up as mismatches, in
// sample mode too (the fault lands on a checked sequence). The same run without the fault is
// clean (Bf16EveryStepVerified), so the checks are what tells them apart.
TEST(Engine, CorruptedPageIsCaught) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (const VerifyMode mode : {VerifyMode::all, VerifyMode::sample}) {
    EngineOptions o = small(seed);
    o.verify = mode;
    o.flip_k_page_at_step = 20;
    Result<EngineReport> r = run_engine(o);
    ASSERT_OK(r);
    EXPECT_EQ(r->faults_injected, 1);
    EXPECT_GT(r->mismatches, 0);
    EXPECT_FALSE(r->mismatch_lines.empty());
    EXPECT_EQ(r->leaked_pages, 0);
  }
}

TEST(Engine, BadOptionsAreRefused) {
  EngineOptions o = small(1);
  o.num_pages = 0;
  EXPECT_TRUE(has_error(run_engine(o), Code::invalid_argument, "num_pages is 0"));
  o = small(1);
  o.watermark_pages = o.num_pages;
  EXPECT_TRUE(has_error(run_engine(o), Code::invalid_argument, "watermark_pages"));
  o = small(1);
  o.workload.num_turns = 0;
  EXPECT_TRUE(has_error(run_engine(o), Code::invalid_argument, "make_workload"));
  o = small(1);
  o.kv_dtype = DType::f64;
  EXPECT_TRUE(has_error(run_engine(o), Code::invalid_argument));
  // A budget below one request's prompt: no schedule can serve it.
  o = small(1);
  o.num_pages = 6;
  o.watermark_pages = 1;
  EXPECT_TRUE(has_error(run_engine(o), Code::resource_exhausted, "expected more pages"));
}

// Without a GPU (or a CUDA build) the CUDA device is refused before anything runs; with one, the
// same small workload on the CUDA ops passes the same checks against the CPU recompute.
TEST(Engine, CudaDevice) {
  EngineOptions o = small(1);
  o.device = Device::cuda(0);
  Result<EngineReport> r = run_engine(o);
  if (cuda_device_count() == 0) {
    EXPECT_TRUE(has_error(r, Code::unavailable));
    return;
  }
  ASSERT_OK(r);
  expect_clean(*r, o);
}

}  // namespace
}  // namespace kvcache::serving
