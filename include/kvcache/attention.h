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
// log-sum-exp rule. On the CPU the chunking is fixed by the plan, so results do not depend on the
// thread count; on CUDA it comes from an AttentionSchedule (computed on the host from a step's
// lengths), and the query heads of a group ride in one CTA (at most 8 per CTA). Plans are values
// (intentionally copyable); const methods are thread-safe. run() serializes on its stream.

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

// How a CUDA plan splits the keys of one call into work items: rows whose visible keys exceed
// chunk_size are split into at most max_chunks chunks, merged by the log-sum-exp rule. Computed on
// the host from a step's lengths (Plan::schedule) and reusable for later steps while every row's
// visible keys stay <= chunk_size * max_chunks (a longer row is skipped and counted in the device
// error record). Intentionally copyable.
struct AttentionSchedule {
  int64_t chunk_size = 0;
  int64_t max_chunks = 0;
  // Extend on tensor cores without a window: > 0 packs several query tokens of a sequence into one
  // work item (their K/V read once), the grid covering this many blocks per sequence (a sequence
  // with more queries is skipped and counted in the device error record). 0: one query row per
  // work item.
  int64_t max_query_blocks = 0;
};

// The arguments of one call; every view on the plan's device (CPU: host memory; CUDA: the plan's
// GPU, the spans included: on CUDA they hold device pointers and are never read on the host).
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
  // CUDA: the split of this call (nullopt: the plan's default, made for max_batch sequences of
  // max_seq_len). The CPU plans split by desc.chunk_size and ignore it.
  std::optional<AttentionSchedule> schedule;
};

namespace detail {
// What both plans hold. Intentionally copyable.
struct AttentionPlanState {
  AttentionDesc desc;
  bool extend = false;
  Device device = Device::cpu();
  CpuIsa isa = CpuIsa::portable;  // CPU: the row loops run: portable, avx2 or avx512
  bool dot8 = false;  // CPU avx512: 8-bit K or V rows by dot-product instructions (q, P rounded)
  int64_t chunk = 0;  // CPU: keys per chunk (resolved)
  int64_t max_chunks = 0;  // CPU: chunks of a max_seq_len context
  // --- CUDA ---
  bool mma = false;                    // the tensor-core kernel (else CUDA cores)
  void* errors = nullptr;              // the GPU's device error record
  int64_t num_sms = 0;                 // multiprocessors: the schedule sizes its waves by them
  int64_t ctas_per_sm = 0;             // CTAs of the chosen kernel a multiprocessor holds
  int64_t workspace_items = 0;         // partial results the workspace holds
  AttentionSchedule default_schedule;  // for args without one
};
}  // namespace detail

// One query per sequence.
class KVCACHE_API DecodeAttentionPlan {
 public:
  // Intentionally copyable.
  // invalid_argument: desc malformed or unsupported (the message lists the supported set; CUDA
  // supports head_dim == head_dim_v in {16, 32, 64, 128, 256} and K, V each f32, f16, bf16,
  // int8 or fp8_e4m3; K != V runs on CUDA cores, sku cuda.sm90.simt);
  // unavailable: a GPU this build or machine lacks, or a forced isa this CPU lacks / whose
  // self-test failed. CPU best: avx512, else avx2, else portable; isa is ignored for CUDA. An
  // avx512 plan with int8 / fp8 K or V (head dims a multiple of 64, <= 512) reads those rows with
  // dot-product instructions when the CPU has AVX512_VNNI and AVX512_VBMI and their self-test
  // passed (sku cpu.avx512.dot8).
  static Result<DecodeAttentionPlan> select(const AttentionDesc& desc,
                                            Device device = Device::cpu(),
                                            CpuIsa isa = CpuIsa::best);
  // Every check (shapes, dtypes, devices, overlap, bounds, page table, seq_lens); writes nothing.
  // invalid_argument, or out_of_range for a seq_len past the cache's capacity or pages and a page
  // index past the pool. CUDA: the index arrays are device memory, so only their sizes are
  // checked here; the kernel skips bad entries (their rows, or keys for a bad page index) and
  // counts them for check_device_errors(). CUDA also needs 16-byte aligned K/V rows (8-byte for
  // int8 / fp8), and on the tensor-core kernel (sku cuda.sm90.mma) 16-byte aligned q rows.
  [[nodiscard]] Status can_implement(const AttentionArgs& args) const;
  // CPU: per-chunk partial results; CUDA: counters + partial results of workspace_items items,
  // device memory. Zero-initialization is not needed.
  [[nodiscard]] size_t workspace_size() const;
  // can_implement, then resource_exhausted when workspace.size() < workspace_size(), and
  // invalid_argument for a stream on another device; then the work: CPU over stream.pool when
  // set; CUDA on stream.cuda_stream, asynchronously (no allocation, no synchronization: a
  // memset of the merge counters and one kernel, so a step can be captured in a CUDA graph).
  // A refused call writes nothing. Allocates nothing.
  Status run(const Stream& stream, std::span<std::byte> workspace, const AttentionArgs& args) const;
  // The split for these lengths (host arrays: seq_lens [batch], extend also q_indptr [batch +
  // 1]): the chunk count with the least estimated time, the GPU's multiprocessors (CTA slots for
  // 8-bit K/V) taking work items of a chunk's keys plus a fixed cost in turn, ragged or not.
  // invalid_argument for lengths the plan refuses. CPU plans return their fixed chunking.
  [[nodiscard]] Result<AttentionSchedule> schedule(std::span<const int32_t> seq_lens,
                                                   std::span<const int32_t> q_indptr = {}) const;
  // "cpu.avx512", "cpu.avx512.dot8" (int8 / fp8 K or V rows by vpdpwssd / vdpbf16ps, with q and
  // softmax weights rounded: see precision()), "cpu.avx2", "cpu.portable", "cuda.sm90.mma"
  // (tensor cores) or "cuda.sm90.simt".
  [[nodiscard]] const char* sku() const;
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
  [[nodiscard]] Result<AttentionSchedule> schedule(std::span<const int32_t> seq_lens,
                                                   std::span<const int32_t> q_indptr) const;
  [[nodiscard]] const char* sku() const;
  [[nodiscard]] Precision precision() const;
  [[nodiscard]] const AttentionDesc& desc() const { return state_.desc; }

 private:
  explicit ExtendAttentionPlan(const detail::AttentionPlanState& state) : state_(state) {}
  detail::AttentionPlanState state_;
};

}  // namespace kvcache
