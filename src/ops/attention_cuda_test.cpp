// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The CUDA attention schedule (host code: runs without a GPU) on plan states like an H100's:
// chunks cover every row, respect the workspace and the chunk limit, split long rows of ragged
// batches, and fill the GPU for few long sequences; which kernel serves which K / V dtype pair.
#include "ops/attention_cuda.h"

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/cuda_attention_ops.h"
#include "testing/test_util.h"

namespace kvcache {
namespace {

detail::AttentionPlanState h100_like_plan() {
  detail::AttentionPlanState st;
  st.desc.num_q_heads = 32;
  st.desc.kv = KVFormat{8, 128};
  st.desc.max_batch = 256;
  st.desc.max_seq_len = 32768;
  st.device = Device::cuda(0);
  st.mma = true;
  st.num_sms = 132;
  st.ctas_per_sm = 2;
  st.workspace_items = 128 * st.num_sms;
  return st;
}

int64_t items_of(const AttentionSchedule& s, const std::vector<int64_t>& keys, int64_t groups) {
  int64_t items = 0;
  for (int64_t k : keys) items += (k + s.chunk_size - 1) / s.chunk_size;
  return items * groups;
}

void expect_valid(const detail::AttentionPlanState& plan, const AttentionSchedule& s,
                  const std::vector<int64_t>& keys) {
  const int64_t longest = *std::max_element(keys.begin(), keys.end());
  EXPECT_GE(s.chunk_size * s.max_chunks, longest);
  EXPECT_GE(s.max_chunks, 1);
  EXPECT_LE(s.max_chunks, backend::kCudaAttentionMaxChunks);
  if (s.max_chunks > 1) {
    EXPECT_EQ(s.chunk_size % 64, 0) << s.chunk_size;
    EXPECT_LE(static_cast<int64_t>(keys.size()) * plan.desc.kv.num_kv_heads * s.max_chunks,
              plan.workspace_items);
  }
}

TEST(CudaAttentionSchedule, CoversEveryRowWithinTheLimits) {
  const detail::AttentionPlanState plan = h100_like_plan();
  std::mt19937 rng(testing::test_seed());
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t batch = testing::uniform_int(rng, 1, 256);
    std::vector<int64_t> keys(static_cast<size_t>(batch));
    for (int64_t& k : keys) k = testing::uniform_int(rng, 1, trial % 2 == 0 ? 4096 : 32768);
    SCOPED_TRACE("trial " + std::to_string(trial));
    expect_valid(plan, ops::cuda_attention_schedule(plan, keys, static_cast<int64_t>(keys.size())),
                 keys);
  }
}

// One long sequence is split over the GPU (nearly every multiprocessor gets a CTA), not left to
// a few CTAs.
TEST(CudaAttentionSchedule, SplitsOneLongSequenceOverTheGpu) {
  const detail::AttentionPlanState plan = h100_like_plan();
  const std::vector<int64_t> keys = {32768};
  const AttentionSchedule s =
      ops::cuda_attention_schedule(plan, keys, static_cast<int64_t>(keys.size()));
  expect_valid(plan, s, keys);
  EXPECT_GE(items_of(s, keys, 8), plan.num_sms * 9 / 10);
}

// 16-bit K/V streams at a multiprocessor's bandwidth share with one CTA: 16 x 4096 on 132 SMs
// stays unsplit (128 CTAs). 8-bit K/V is limited per CTA: it splits to fill both CTA slots.
TEST(CudaAttentionSchedule, SplitsEightBitToFillTheCtaSlots) {
  detail::AttentionPlanState plan = h100_like_plan();
  const std::vector<int64_t> keys(16, 4096);
  EXPECT_EQ(ops::cuda_attention_schedule(plan, keys, 16).max_chunks, 1);
  plan.desc.kv.k_dtype = plan.desc.kv.v_dtype = DType::int8;
  const AttentionSchedule s = ops::cuda_attention_schedule(plan, keys, 16);
  expect_valid(plan, s, keys);
  EXPECT_EQ(s.max_chunks, 2);
}

// A ragged batch: the long row gets as many chunks as needed so that no item is much longer
// than the others, and the item count stays near whole waves.
TEST(CudaAttentionSchedule, SplitsTheLongRowsOfARaggedBatch) {
  const detail::AttentionPlanState plan = h100_like_plan();
  std::vector<int64_t> keys(16, 512);
  keys[3] = 30000;
  const AttentionSchedule s =
      ops::cuda_attention_schedule(plan, keys, static_cast<int64_t>(keys.size()));
  expect_valid(plan, s, keys);
  EXPECT_LE(s.chunk_size, 30000 / 8);
}

// A big uniform batch already fills the GPU: no split, so no merge traffic.
TEST(CudaAttentionSchedule, LeavesABigBatchUnsplitWhenWavesAreFull) {
  const detail::AttentionPlanState plan = h100_like_plan();
  const std::vector<int64_t> keys(264 / 8 * 4, 4096);  // 4 full waves of unsplit rows
  const AttentionSchedule s =
      ops::cuda_attention_schedule(plan, keys, static_cast<int64_t>(keys.size()));
  expect_valid(plan, s, keys);
  EXPECT_EQ(s.max_chunks, 1);
}

// The tensor cores serve equal K and V types only; every pair of different types goes to the
// CUDA-core kernel, whatever the head_dim.
TEST(CudaAttentionKernels, MixedKVDTypesGoToCudaCores) {
  for (DType k : backend::kCudaAttentionKVDTypes) {
    for (DType v : backend::kCudaAttentionKVDTypes) {
      for (int64_t dim : backend::kCudaAttentionHeadDims) {
        SCOPED_TRACE(std::string(name(k)) + " / " + name(v) + " dim " + std::to_string(dim));
        bool want = false;  // mixed pairs and f32: CUDA cores
        if (k == v && (k == DType::bf16 || k == DType::f16)) want = dim >= 64;
        if (k == v && is_quantized(k)) want = dim >= 128;
        EXPECT_EQ(backend::cuda_attention_has_mma(k, v, dim), want);
      }
    }
  }
}

}  // namespace
}  // namespace kvcache
