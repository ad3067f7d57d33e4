// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Attention over the cache: decode_attention (one query per sequence) and extend_attention
// (several causal queries per sequence: chunked prefill after a prefix hit, speculative verify),
// over contiguous caches (ContiguousKV) or page pools (PagedKV + PageTable), as descriptor + plan
// (op_plan.h). GQA/MQA: query head h reads kv head h / (num_q_heads / num_kv_heads).
//
// For query head h at position p of sequence b the op computes, over the keys j it sees,
//   x_j   = scale * dot(q, k_j)                       (k_j dequantized: stored * scale_j)
//   l_j   = soft_cap > 0 ? soft_cap * tanh(x_j / soft_cap) : x_j
//   o     = sum_j exp(l_j) v_j / (sum_j exp(l_j) + (has_sinks ? exp(sinks[h]) : 0))
//   lse   = log(sum_j exp(l_j) + (has_sinks ? exp(sinks[h]) : 0))       (natural log)
// Keys seen: positions j <= p, and j > p - window when window > 0, except that with a window
// the first sink_tokens keys stay visible (StreamingLLM attention sinks). Decode: the query of
// sequence b sits at p = seq_lens[b] - 1. Extend: the cache already holds the new tokens (the
// caller wrote them first); query i of the n_b = q_indptr[b + 1] - q_indptr[b] queries of b sits at
// p = seq_lens[b] - n_b + i.
//
// Long contexts are split into chunks of chunk_size keys; each (sequence, kv head, chunk) is one
// work item that reads its K/V rows once for all query heads of the group, and chunks merge by the
// log-sum-exp rule. The chunking is fixed by the plan, so results do not depend on the thread
// count. Plans are values (intentionally copyable); const methods are thread-safe. run() serializes
// on its stream's pool.

#include <cstdint>
#include <optional>
#include <span>

#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/export.h"
#include "kvcache/op_plan.h"
#include "kvcache/paged_kv.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

namespace kvcache {

struct AttentionDesc {
  // --- affects behaviour ---
  int64_t num_q_heads = 0;          // a multiple of kv.num_kv_heads (any ratio)
  KVFormat kv;                      // K/V heads, dims (each <= 512) and storage dtypes
  std::optional<PageFormat> pages;  // nullopt: contiguous caches
  DType q_dtype = DType::bf16;      // f32, f16 or bf16
  DType o_dtype = DType::bf16;      // f32, f16 or bf16
  float scale = 0.0f;               // softmax scale; 0 means 1 / sqrt(head_dim)
  int64_t window = 0;               // 0: no window; else keys in (p - window, p]
  int64_t sink_tokens = 0;          // with a window: keys [0, sink_tokens) stay visible too
  float soft_cap = 0.0f;            // 0: none; else logits = soft_cap * tanh(x / soft_cap)
  bool has_sinks = false;           // per-q-head sink logits join the softmax denominator
  // --- bounds (size the workspace; can_implement refuses more) ---
  int64_t max_batch = 1;     // sequences per call
  int64_t max_seq_len = 0;   // seq_lens[b] <= max_seq_len
  int64_t max_q_tokens = 0;  // extend only: total_q <= max_q_tokens (decode: unused)
  // --- affects performance ---
  int64_t chunk_size = 0;  // keys per split-context chunk; 0: auto (512, a multiple of page_size)
};

// The arguments of one call; every view on the plan's device (CPU: host memory).
struct AttentionArgs {
  // Decode: [batch, num_q_heads, head_dim]; extend: [total_q, num_q_heads, head_dim] with the rows
  // of sequence b at q_indptr[b] .. q_indptr[b + 1]. q_dtype, unit stride on head_dim.
  TensorView q;
  // Like q with head_dim_v, o_dtype, unit stride on head_dim_v. Must not overlap q.
  TensorView o;
  // Optional (empty view: not written): float32 [rows of q, num_q_heads], natural-log lse.
  TensorView lse;
  std::span<const int32_t> q_indptr;  // extend: [batch + 1] from 0, non-decreasing; decode: empty
  // [batch]: tokens in each sequence's cache, the new ones included. Decode: >= 1 (a query sees at
  // least itself); extend: >= the sequence's query count.
  std::span<const int32_t> seq_lens;
  ContiguousKV contiguous;  // read when desc.pages is nullopt
  PagedKV paged;            // read, with page_table, when desc.pages is set
  PageTable page_table;     // [batch] sequences
  TensorView sinks;         // float32 [num_q_heads] when desc.has_sinks; else empty
};

namespace detail {
// What both plans hold. Intentionally copyable.
struct AttentionPlanState {
  AttentionDesc desc;
  bool extend = false;
  CpuIsa isa = CpuIsa::portable;  // the row loops run: portable, avx2 or avx512
  int64_t chunk = 0;              // keys per chunk (resolved)
  int64_t max_chunks = 0;         // chunks of a max_seq_len context
};
}  // namespace detail

// One query per sequence.
class KVCACHE_API DecodeAttentionPlan {
 public:
  // Intentionally copyable.
  // invalid_argument: desc malformed or unsupported (the message lists the supported set);
  // unavailable: Device::cuda (the CUDA backend is issue 5), or a forced isa this CPU lacks /
  // whose self-test failed. best: avx512, else avx2, else portable.
  static Result<DecodeAttentionPlan> select(const AttentionDesc& desc,
                                            Device device = Device::cpu(),
                                            CpuIsa isa = CpuIsa::best);
  // Every check (shapes, dtypes, devices, overlap, bounds, page table, seq_lens); writes nothing.
  // invalid_argument, or out_of_range for a seq_len past the cache's capacity or pages and a page
  // index past the pool.
  [[nodiscard]] Status can_implement(const AttentionArgs& args) const;
  [[nodiscard]] size_t workspace_size() const;
  // can_implement, then resource_exhausted when workspace.size() < workspace_size(), and
  // invalid_argument for a stream on another device; then the work, over stream.pool when set.
  // A refused call writes nothing. Allocates nothing.
  Status run(const Stream& stream, std::span<std::byte> workspace, const AttentionArgs& args) const;
  [[nodiscard]] const char* sku() const;  // "cpu.avx512", "cpu.avx2" or "cpu.portable"
  // Per element of o and lse against reference::attention (module comment of the .cpp derives it).
  [[nodiscard]] Precision precision() const;
  [[nodiscard]] const AttentionDesc& desc() const { return state_.desc; }

 private:
  explicit DecodeAttentionPlan(const detail::AttentionPlanState& state) : state_(state) {}
  detail::AttentionPlanState state_;
};

// Several causal queries per sequence; same contract as DecodeAttentionPlan, args.q_indptr given.
class KVCACHE_API ExtendAttentionPlan {
 public:
  // Intentionally copyable.
  // As DecodeAttentionPlan::select; also invalid_argument when max_q_tokens < 1.
  static Result<ExtendAttentionPlan> select(const AttentionDesc& desc,
                                            Device device = Device::cpu(),
                                            CpuIsa isa = CpuIsa::best);
  [[nodiscard]] Status can_implement(const AttentionArgs& args) const;
  [[nodiscard]] size_t workspace_size() const;
  Status run(const Stream& stream, std::span<std::byte> workspace, const AttentionArgs& args) const;
  [[nodiscard]] const char* sku() const;
  [[nodiscard]] Precision precision() const;
  [[nodiscard]] const AttentionDesc& desc() const { return state_.desc; }

 private:
  explicit ExtendAttentionPlan(const detail::AttentionPlanState& state) : state_(state) {}
  detail::AttentionPlanState state_;
};

}  // namespace kvcache
