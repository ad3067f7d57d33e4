// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The attention cases of `kvcache bench ops --device cuda` (issue 5's matrix): Llama-3-8B heads
// (32 q / 8 kv, head_dim 128), pages of 16 (NHD, HND) and contiguous caches, bf16 / int8 / fp8
// K/V, uniform and ragged batches, one extend shape. Every case runs with the schedule the plan
// computes from its lengths. Bytes counted: K/V (and scales) read once + q + o.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvcache/attention.h"

#include "bench/cuda_arena.h"
#include "bench/cuda_cases.h"

namespace kvcache::bench {
namespace {

struct AttentionShape {
  std::string label;          // the shape column
  std::vector<int32_t> lens;  // tokens per sequence (the queries' included)
  DType kv = DType::bf16;
  bool paged = true;
  PageLayout layout = PageLayout::nhd;
  int32_t queries = 0;  // extend: new tokens per sequence; 0: decode
};

template <class Plan>
Result<CudaCase> attention_case(const CudaCaseOptions& o, const AttentionShape& shape) {
  const Stream& stream = o.stream;
  const Device gpu = stream.device;
  const bool extend = shape.queries > 0;
  const auto batch = static_cast<int64_t>(shape.lens.size());
  const int64_t longest = *std::max_element(shape.lens.begin(), shape.lens.end());
  const int64_t tokens = std::accumulate(shape.lens.begin(), shape.lens.end(), int64_t{0});
  const int64_t rows = extend ? batch * shape.queries : batch;
  const bool quantized = is_quantized(shape.kv);

  AttentionDesc desc;
  desc.num_q_heads = kQHeads;
  desc.kv = KVFormat{kKVHeads, kHeadDim, 0, shape.kv, shape.kv};
  desc.max_batch = batch;
  desc.max_seq_len = longest;
  desc.max_q_tokens = extend ? rows : 0;
  auto arena = std::make_shared<DeviceArena>(stream);
  AttentionArgs args;
  std::vector<int32_t> q_indptr;
  if (shape.paged) {
    std::vector<int32_t> indptr = {0};
    for (int32_t len : shape.lens) {
      indptr.push_back(indptr.back() + static_cast<int32_t>((len + kPageSize - 1) / kPageSize));
    }
    const int64_t num_pages = indptr.back();
    std::vector<int32_t> indices(static_cast<size_t>(num_pages));
    std::iota(indices.begin(), indices.end(), 0);
    std::shuffle(indices.begin(), indices.end(), std::mt19937(7));
    desc.pages = PageFormat{num_pages, kPageSize, shape.layout};
    const bool nhd = shape.layout == PageLayout::nhd;
    const auto pool_shape = [&](int64_t dim) {
      return nhd ? std::vector<int64_t>{num_pages, kPageSize, kKVHeads, dim}
                 : std::vector<int64_t>{num_pages, kKVHeads, kPageSize, dim};
    };
    for (int side = 0; side < 2; ++side) {
      Result<TensorView> data = arena->random(shape.kv, pool_shape(kHeadDim));
      if (!data.ok()) return data.status();
      (side == 0 ? args.paged.k_pages : args.paged.v_pages) = *data;
      if (!quantized) continue;
      Result<TensorView> scales =
          arena->random(DType::f32,
                        nhd ? std::vector<int64_t>{num_pages, kPageSize, kKVHeads}
                            : std::vector<int64_t>{num_pages, kKVHeads, kPageSize},
                        0.002f, 0.01f);
      if (!scales.ok()) return scales.status();
      (side == 0 ? args.paged.k_scales : args.paged.v_scales) = *scales;
    }
    Result<std::span<const int32_t>> d_indptr = arena->copy(indptr);
    Result<std::span<const int32_t>> d_indices = arena->copy(indices);
    if (!d_indptr.ok()) return d_indptr.status();
    if (!d_indices.ok()) return d_indices.status();
    args.page_table = PageTable{*d_indptr, *d_indices};
  } else {
    for (int side = 0; side < 2; ++side) {
      Result<TensorView> data = arena->random(shape.kv, {batch, kKVHeads, longest, kHeadDim});
      if (!data.ok()) return data.status();
      (side == 0 ? args.contiguous.k : args.contiguous.v) = *data;
      if (!quantized) continue;
      Result<TensorView> scales =
          arena->random(DType::f32, {batch, kKVHeads, longest}, 0.002f, 0.01f);
      if (!scales.ok()) return scales.status();
      (side == 0 ? args.contiguous.k_scales : args.contiguous.v_scales) = *scales;
    }
  }
  Result<TensorView> q = arena->random(DType::bf16, {rows, kQHeads, kHeadDim});
  Result<TensorView> out = arena->random(DType::bf16, {rows, kQHeads, kHeadDim});
  if (!q.ok()) return q.status();
  if (!out.ok()) return out.status();
  args.q = *q;
  args.o = *out;
  Result<std::span<const int32_t>> lens = arena->copy(shape.lens);
  if (!lens.ok()) return lens.status();
  args.seq_lens = *lens;
  if (extend) {
    q_indptr.push_back(0);
    for (int64_t b = 0; b < batch; ++b) q_indptr.push_back(q_indptr.back() + shape.queries);
    Result<std::span<const int32_t>> d_q_indptr = arena->copy(q_indptr);
    if (!d_q_indptr.ok()) return d_q_indptr.status();
    args.q_indptr = *d_q_indptr;
  }

  Result<Plan> plan = Plan::select(desc, gpu);
  if (!plan.ok()) return plan.status();
  Result<AttentionSchedule> schedule = plan->schedule(shape.lens, q_indptr);
  if (!schedule.ok()) return schedule.status();
  args.schedule = *schedule;
  Result<void*> ws = arena->allocate(plan->workspace_size());
  if (!ws.ok()) return ws.status();
  const std::span<std::byte> workspace(static_cast<std::byte*>(*ws), plan->workspace_size());
  if (Status s = plan->can_implement(args); !s.ok()) return s;
  if (Status s = arena->ready(); !s.ok()) return s;

  const double elem = static_cast<double>(size_of(shape.kv));
  const double kv_bytes =
      2.0 * static_cast<double>(tokens * kKVHeads) * (kHeadDim * elem + (quantized ? 4.0 : 0.0));
  const double qo_bytes = 2.0 * static_cast<double>(rows * kQHeads * kHeadDim) * 2.0;
  CudaCase c;
  c.op = extend ? "extend_attention" : "decode_attention";
  c.shape = shape.label +
            (shape.paged ? (shape.layout == PageLayout::nhd ? " nhd16" : " hnd16") : " contiguous");
  c.dtype = std::string("kv ") + name(shape.kv);
  c.sku = plan->sku();
  c.bytes = kv_bytes + qo_bytes;
  c.copy_bound = false;
  const Plan p = *plan;
  c.call = [p, stream, workspace, args] { return p.run(stream, workspace, args); };
  c.keep = arena;
  return c;
}

std::vector<int32_t> uniform_lens(int64_t batch, int32_t len) {
  return std::vector<int32_t>(static_cast<size_t>(batch), len);
}

// Lengths uniform in [lo, hi].
std::vector<int32_t> ragged_uniform(int64_t batch, int32_t lo, int32_t hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> lens;
  for (int64_t b = 0; b < batch; ++b) {
    lens.push_back(std::uniform_int_distribution<int32_t>(lo, hi)(rng));
  }
  return lens;
}

// Zipf-like (Pareto, alpha 1.5: a few long sequences, many short) with mean about `mean`,
// clamped to [16, 32768].
std::vector<int32_t> ragged_zipf(int64_t batch, double mean, uint32_t seed) {
  std::mt19937 rng(seed);
  constexpr double kAlpha = 1.5;
  const double x_min = mean * (kAlpha - 1.0) / kAlpha;
  std::vector<int32_t> lens;
  for (int64_t b = 0; b < batch; ++b) {
    const double u = std::uniform_real_distribution<double>(1e-9, 1.0)(rng);
    const double x = x_min / std::pow(u, 1.0 / kAlpha);
    lens.push_back(static_cast<int32_t>(std::clamp(x, 16.0, 32768.0)));
  }
  return lens;
}

std::string batch_label(int64_t batch, int64_t len) {
  std::string label = "b";  // appended step by step: g++ 12 misreads "b" + to_string (-Wrestrict)
  label += std::to_string(batch);
  label += "x";
  label += std::to_string(len);
  return label;
}

}  // namespace

std::vector<CudaCaseBuilder> cuda_attention_cases(const CudaCaseOptions& options) {
  std::vector<AttentionShape> shapes;
  const auto add = [&](std::string label, std::vector<int32_t> lens, DType kv, bool paged = true,
                       PageLayout layout = PageLayout::nhd) {
    shapes.push_back(AttentionShape{std::move(label), std::move(lens), kv, paged, layout, 0});
  };
  if (options.quick) {
    add(batch_label(2, 300), uniform_lens(2, 300), DType::bf16);
    add(batch_label(2, 300), uniform_lens(2, 300), DType::int8);
    add(batch_label(2, 300), uniform_lens(2, 300), DType::fp8_e4m3, false);
  } else {
    const std::pair<int64_t, int32_t> decode[] = {{128, 4096}, {64, 4096}, {16, 4096},
                                                  {64, 512},   {1, 32768}, {1, 512}};
    for (auto [batch, len] : decode)
      add(batch_label(batch, len), uniform_lens(batch, len), DType::bf16);
    add(batch_label(64, 4096), uniform_lens(64, 4096), DType::bf16, true, PageLayout::hnd);
    add(batch_label(64, 4096), uniform_lens(64, 4096), DType::bf16, false);
    for (DType kv : {DType::int8, DType::fp8_e4m3}) {
      add(batch_label(64, 4096), uniform_lens(64, 4096), kv);
      add(batch_label(16, 4096), uniform_lens(16, 4096), kv);
      add(batch_label(1, 32768), uniform_lens(1, 32768), kv);
    }
    // 8-bit rows of a head 128 bytes long: 1 KB apart in NHD pages, contiguous in HND ones.
    add(batch_label(64, 4096), uniform_lens(64, 4096), DType::int8, true, PageLayout::hnd);
    // Ragged batches next to a uniform batch with the same total tokens.
    for (int64_t batch : {16, 64}) {
      for (int kind = 0; kind < 2; ++kind) {
        std::vector<int32_t> lens =
            kind == 0 ? ragged_uniform(batch, 512, 4096, 5u) : ragged_zipf(batch, 1024.0, 9u);
        const int64_t total = std::accumulate(lens.begin(), lens.end(), int64_t{0});
        const auto flat = static_cast<int32_t>(total / batch);
        add(std::string(kind == 0 ? "ragged512-4096 b" : "zipf1024 b") + std::to_string(batch) +
                " total" + std::to_string(total),
            std::move(lens), DType::bf16);
        add(batch_label(batch, flat) + " (same total)", uniform_lens(batch, flat), DType::bf16);
      }
    }
  }
  std::vector<CudaCaseBuilder> builders;
  for (const AttentionShape& s : shapes) {
    builders.push_back([options, s] { return attention_case<DecodeAttentionPlan>(options, s); });
  }
  AttentionShape ext{"b4x2048 q64", uniform_lens(4, 2048), DType::bf16, true, PageLayout::nhd, 64};
  if (options.quick)
    ext = {"b2x300 q16", uniform_lens(2, 300), DType::bf16, true, PageLayout::nhd, 16};
  builders.push_back([options, ext] { return attention_case<ExtendAttentionPlan>(options, ext); });
  return builders;
}

}  // namespace kvcache::bench
