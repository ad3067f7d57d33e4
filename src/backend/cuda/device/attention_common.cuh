// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// What the two attention kernels share (attention_simt.cuh: CUDA cores, any supported dtype;
// attention_mma.cuh: tensor cores): the work item's row (which sequence, query position, visible
// keys), q / o element access, and the epilogue.
//
// Work items. A CTA serves (query row, kv head, sub-group of the kv head's query heads, chunk of
// chunk_size visible keys); blockIdx.x = ((row * num_kv_heads + kv head) * subgroups + sub-group)
// * max_chunks + chunk. Visible keys of a query at position p: the window part [win_lo, p], win_lo
// = max(0, p + 1 - window) with a window (else 0), and the sinks [0, min(sink_tokens, win_lo));
// chunks index this visible list (sinks first), so a sliding window reads only what it sees.
//
// Epilogue. The CTA's "slots" (lane groups or warps) each hold an unnormalized partial result of
// its rows: acc[row][head_dim], max and sum in base 2. The epilogue weighs them by 2^(m - M).
// A row whose visible keys fit one chunk is written at once (o, and lse in natural log, the sink
// logit joining the sum); otherwise each CTA publishes its partial to the workspace and the last
// CTA of the row to arrive (a counter per row group, which it resets to 0) merges them.
// Bad entries in device memory (seq_lens, q_indptr, page table) are counted in the error record
// and their rows skipped.

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "attention_params.cuh"
#include "convert.cuh"
#include "errors.cuh"

namespace kvcache::cuda {

inline constexpr int kAttnThreads = 128;
inline constexpr int kAttnWarps = kAttnThreads / 32;
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

// --- q / o ---

__device__ inline float load_io(const uint8_t* base, int64_t index, IoType t) {
  switch (t) {
    case IoType::f32:
      return reinterpret_cast<const float*>(base)[index];
    case IoType::f16:
      return to_float(reinterpret_cast<const F16*>(base)[index]);
    default:
      return to_float(reinterpret_cast<const BF16*>(base)[index]);
  }
}

// Eight consecutive elements from element index i, as floats: one or two 16-byte loads (the plan
// checked that q rows of the tensor-core kernel are 16-byte aligned).
__device__ inline void load_io8(const uint8_t* base, int64_t i, IoType t, float (&x)[8]) {
  if (t == IoType::f32) {
    const auto* src = reinterpret_cast<const float4*>(reinterpret_cast<const float*>(base) + i);
    const float4 a = src[0];
    const float4 b = src[1];
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w;
    x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
    return;
  }
  const uint4 u = *reinterpret_cast<const uint4*>(base + i * 2);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t lo = w[k] & 0xffffu;
    const uint32_t hi = w[k] >> 16;
    // Plain conversions (no NaN payload care): the values are rounded to the MMA type next.
    x[2 * k] = t == IoType::bf16 ? __uint_as_float(lo << 16)
                                 : __half2float(__ushort_as_half(static_cast<unsigned short>(lo)));
    x[2 * k + 1] = t == IoType::bf16
                       ? __uint_as_float(hi << 16)
                       : __half2float(__ushort_as_half(static_cast<unsigned short>(hi)));
  }
}

__device__ inline void store_io(uint8_t* base, int64_t index, IoType t, float x) {
  switch (t) {
    case IoType::f32:
      reinterpret_cast<float*>(base)[index] = x;
      break;
    case IoType::f16:
      reinterpret_cast<F16*>(base)[index] = from_float<F16>(x);
      break;
    default:
      reinterpret_cast<BF16*>(base)[index] = from_float<BF16>(x);
      break;
  }
}

// --- one work item ---

// Which work item this CTA serves, and the facts of its query rows that every CTA of the row
// derives the same way.
struct AttnItem {
  int chunk = 0;
  int row_group = 0;  // the counter and partials block: ((row or query block) * kv heads + kv head)
                      // * sub-groups + sub-group
  int kv_head = 0;
  int head0 = 0;   // first query head of the sub-group
  int heads = 0;   // real query heads per token (<= the kernel's rows)
  int q_row0 = 0;  // first query row (token) of the CTA
  int ntok = 1;    // query rows of the CTA (packed extend: up to q_per_cta)
  int rows = 0;    // ntok * heads: the kernel rows that carry a (token, head)
  // The sequence and its keys, for the CTA's last query row.
  int b = 0;
  int pos = 0;        // query position of the last row; row t sits at pos - (ntok - 1) + t
  int num_vis = 0;    // visible keys of the last row
  int sink_cnt = 0;   // visible sinks before the window part
  int win_lo = 0;     // first key of the window part
  int page_base = 0;  // paged: indptr[b]
  bool ok = false;
};

// The grid: one CTA per (query row or packed query block, kv head, sub-group, chunk).
inline int64_t attention_ctas(const AttnKernelParams& p) {
  const int64_t blocks = p.q_per_cta > 1 ? static_cast<int64_t>(p.batch) * p.max_q_blocks
                                         : static_cast<int64_t>(p.num_rows);
  return blocks * p.num_kv_heads * p.subgroups * p.max_chunks;
}

// Checks sequence b's page list and length for query rows i_q of its n_q; fills the key facts.
// Records a bad entry when report (each CTA family reports once).
__device__ inline bool resolve_keys(const AttnKernelParams& p, AttnItem& it, int n_q, int i_q,
                                    bool report) {
  const int len = p.seq_lens[it.b];
  int room = p.capacity;
  if (p.paged) {
    const int first = p.indptr[it.b];
    const int last = p.indptr[it.b + 1];
    if (first < 0 || first > last || last > p.num_indices) {
      if (report) {
        record_error(p.errors, p.op, ErrorArg::page_indptr, it.b + 1, last, first,
                     p.num_indices + 1);
      }
      return false;
    }
    it.page_base = first;
    room = static_cast<int>(
        min(static_cast<int64_t>(last - first) * p.page_size, static_cast<int64_t>(0x7fffffff)));
  }
  if (len < n_q || len < 1 || len > room) {
    if (report) record_error(p.errors, p.op, ErrorArg::seq_lens, it.b, len, max(n_q, 1), room + 1);
    return false;
  }
  it.pos = len - n_q + i_q;
  it.win_lo = p.window > 0 ? max(0, it.pos + 1 - p.window) : 0;
  it.sink_cnt = p.window > 0 ? min(p.sink_tokens, it.win_lo) : 0;
  it.num_vis = it.sink_cnt + (it.pos + 1 - it.win_lo);
  if (it.num_vis > p.max_chunks * p.chunk_size) {
    // The schedule was made for shorter sequences: its chunks do not reach this key.
    if (report) {
      record_error(p.errors, p.op, ErrorArg::seq_lens, it.b, len, 1,
                   p.max_chunks * p.chunk_size + 1);
    }
    return false;
  }
  return true;
}

// The item of blockIdx.x, with rows_per_cta query heads per token (header paragraph). Not ok: a
// bad entry (recorded once: by the first CTA of its family) or an empty packed block.
__device__ inline AttnItem resolve_item(const AttnKernelParams& p, int rows_per_cta) {
  AttnItem it;
  const int item = static_cast<int>(blockIdx.x);
  it.chunk = item % p.max_chunks;
  it.row_group = item / p.max_chunks;
  const int head_group = it.row_group % (p.num_kv_heads * p.subgroups);
  const int block = it.row_group / (p.num_kv_heads * p.subgroups);
  it.kv_head = head_group / p.subgroups;
  const int sub = head_group % p.subgroups;
  const int gs = p.q_per_cta > 1 ? p.group : rows_per_cta;
  it.heads = min(gs, p.group - sub * gs);
  it.head0 = it.kv_head * p.group + sub * gs;
  const bool first_cta = it.chunk == 0 && head_group == 0 && threadIdx.x == 0;

  if (p.q_per_cta > 1) {  // packed extend: block = (sequence, query block)
    it.b = block / p.max_q_blocks;
    const int qb = block % p.max_q_blocks;
    const int seq_begin = p.q_indptr[it.b];
    const int seq_end = p.q_indptr[it.b + 1];
    const bool report = first_cta && qb == 0;
    if (report && it.b == 0 && seq_begin != 0) {
      record_error(p.errors, p.op, ErrorArg::q_indptr, 0, seq_begin, 0, 1);
    }
    if (report && it.b == 0 && p.q_indptr[p.batch] != p.num_rows) {
      record_error(p.errors, p.op, ErrorArg::q_indptr, p.batch, p.q_indptr[p.batch], p.num_rows,
                   p.num_rows + 1);
    }
    if (seq_begin < 0 || seq_end < seq_begin || seq_end > p.num_rows) {
      if (report) {
        record_error(p.errors, p.op, ErrorArg::q_indptr, it.b + 1, seq_end, seq_begin,
                     p.num_rows + 1);
      }
      return it;
    }
    it.q_row0 = seq_begin + qb * p.q_per_cta;
    if (qb == p.max_q_blocks - 1 && seq_end > it.q_row0 + p.q_per_cta && first_cta) {
      // More queries than the schedule's blocks cover: the rest would go unanswered.
      record_error(p.errors, p.op, ErrorArg::q_indptr, it.b + 1, seq_end, seq_begin,
                   seq_begin + p.max_q_blocks * p.q_per_cta + 1);
    }
    if (it.q_row0 >= seq_end) return it;  // an empty block of a shorter sequence
    it.ntok = min(p.q_per_cta, seq_end - it.q_row0);
    it.rows = it.ntok * it.heads;
    const int n_q = seq_end - seq_begin;
    it.ok = resolve_keys(p, it, n_q, it.q_row0 + it.ntok - 1 - seq_begin, report);
    return it;
  }

  // One query row per CTA: decode (row = sequence) or extend (find the row's sequence).
  const int r = block;
  it.q_row0 = r;
  it.rows = it.heads;
  int n_q = 1;
  int i_q = 0;
  if (p.q_indptr != nullptr) {
    if (first_cta && r == 0) {
      if (p.q_indptr[0] != 0) {
        record_error(p.errors, p.op, ErrorArg::q_indptr, 0, p.q_indptr[0], 0, 1);
      }
      if (p.q_indptr[p.batch] != p.num_rows) {
        record_error(p.errors, p.op, ErrorArg::q_indptr, p.batch, p.q_indptr[p.batch], p.num_rows,
                     p.num_rows + 1);
      }
    }
    int lo = 0;  // the last b with q_indptr[b] <= r
    int hi = p.batch - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.q_indptr[mid] <= r) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    it.b = lo;
    const int begin = p.q_indptr[lo];
    const int end = p.q_indptr[lo + 1];
    if (!(begin <= r && r < end)) {
      if (first_cta) {
        record_error(p.errors, p.op, ErrorArg::q_indptr, lo + 1, end, r + 1, p.num_rows + 1);
      }
      return it;
    }
    n_q = end - begin;
    i_q = r - begin;
  } else {
    it.b = r;
  }
  it.ok = resolve_keys(p, it, n_q, i_q, first_cta && i_q == 0);
  return it;
}

// The epilogue's scratch for merging the CTA's slots: per (slot, row) max, sum and weight
// 2^(m - M); the merged max and sum per row.
template <int kRows, int kMaxSlots>
struct EpilogueSmem {
  float m[kMaxSlots * kRows];
  float l[kMaxSlots * kRows];
  float w[kMaxSlots * kRows];
  float final_m[kRows];
  float final_l[kRows];
  bool last;
};

// Floats of the scratch the row merge needs (finish_item's merge_scratch).
template <int kRows>
inline constexpr int kMergeScratchFloats = 2 * kAttnMaxChunks* kRows;

// Writes o (and lse) of kernel row g (token g / heads, head g % heads) from an unnormalized
// (acc, max, sum), adding the sink logit.
__device__ inline void write_output(const AttnKernelParams& p, const AttnItem& it, int g, int d,
                                    float o, float mx, float sum) {
  const int token = it.q_row0 + g / it.heads;
  const int head = it.head0 + g % it.heads;
  if (p.sinks != nullptr) {
    const float sink = p.sinks[head] * kLog2e;
    const float m2 = fmaxf(mx, sink);
    const float c = mx == -INFINITY ? 0.0f : exp2f(mx - m2);
    o *= c;
    sum = sum * c + exp2f(sink - m2);
    mx = m2;
  }
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
  store_io(p.o, token * p.o_row_stride + head * p.o_head_stride + d, p.o_type, o * inv);
  if (d == 0 && p.lse != nullptr) {
    p.lse[token * p.lse_row_stride + head * p.lse_head_stride] =
        sum > 0.0f ? (mx + log2f(sum)) * kLn2 : -INFINITY;
  }
}

// For rows g < heads of n partials whose max and sum are m[k * kRows + g], l[...]: the weights
// w[k * kRows + g] = 2^(m_k - M) (w may alias m) and the merged max and sum, into final_m /
// final_l. Threads < heads work; m and l live in shared memory.
template <int kRows>
__device__ void merge_weights(const float* m, const float* l, float* w, int heads, int n,
                              float* final_m, float* final_l) {
  if (static_cast<int>(threadIdx.x) >= heads) return;
  const int g = static_cast<int>(threadIdx.x);
  float mx = -INFINITY;
  for (int k = 0; k < n; ++k) mx = fmaxf(mx, m[k * kRows + g]);
  float sum = 0.0f;
  for (int k = 0; k < n; ++k) {
    const float mk = m[k * kRows + g];
    const float wk = mk == -INFINITY ? 0.0f : exp2f(mk - mx);
    sum += l[k * kRows + g] * wk;
    w[k * kRows + g] = wk;
  }
  final_m[g] = mx;
  final_l[g] = sum;
}

// The epilogue (header paragraph). REQUIRES: every slot's partial is in s_acc ([slot][kRows]
// rows of acc_stride floats, head_dim used), e.m and e.l, and a __syncthreads() since they were
// written. merge_scratch: kMergeScratchFloats<kRows> floats of shared memory that nothing else
// uses now.
template <int kRows, int kMaxSlots, int kThreads = kAttnThreads>
__device__ void finish_item(const AttnKernelParams& p, const AttnItem& it, int num_chunks,
                            int num_slots, const float* s_acc, int acc_stride,
                            EpilogueSmem<kRows, kMaxSlots>& e, float* merge_scratch) {
  const int D = p.head_dim;
  const int heads = it.rows;  // kernel rows that carry a (token, head)
  merge_weights<kRows>(e.m, e.l, e.w, heads, num_slots, e.final_m, e.final_l);
  __syncthreads();
  const auto combined = [&](int g, int d) {
    float o = 0.0f;
    for (int t = 0; t < num_slots; ++t) {
      o += s_acc[(t * kRows + g) * acc_stride + d] * e.w[t * kRows + g];
    }
    return o;
  };
  if (num_chunks == 1) {
    for (int i = static_cast<int>(threadIdx.x); i < heads * D; i += kThreads) {
      const int g = i / D;
      const int d = i - g * D;
      write_output(p, it, g, d, combined(g, d), e.final_m[g], e.final_l[g]);
    }
    return;
  }

  // Several chunks: publish this one's partial, then the last CTA of the row merges.
  const int pr = D + kAttnPartialExtra;
  const int64_t row_item = static_cast<int64_t>(it.row_group) * p.max_chunks;
  float* mine = p.partials + (row_item + it.chunk) * p.item_floats;
  for (int i = static_cast<int>(threadIdx.x); i < heads * D; i += kThreads) {
    const int g = i / D;
    const int d = i - g * D;
    mine[g * pr + d] = combined(g, d);
  }
  if (static_cast<int>(threadIdx.x) < heads) {
    mine[threadIdx.x * pr + D] = e.final_m[threadIdx.x];
    mine[threadIdx.x * pr + D + 1] = e.final_l[threadIdx.x];
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned arrived = atomicAdd(p.counters + it.row_group, 1u);
    e.last = arrived == static_cast<unsigned>(num_chunks - 1);
    if (e.last) p.counters[it.row_group] = 0u;  // every other CTA of the row has arrived
  }
  __syncthreads();
  if (!e.last) return;
  __threadfence();
  const float* all = p.partials + row_item * p.item_floats;
  const int stride = p.item_floats;
  // Every thread fetches some chunks' (max, sum) so that their latencies overlap.
  float* cm = merge_scratch;
  float* cl = merge_scratch + kAttnMaxChunks * kRows;
  for (int i = static_cast<int>(threadIdx.x); i < num_chunks * heads; i += kThreads) {
    const int c = i / heads;
    const int g = i - c * heads;
    cm[c * kRows + g] = __ldcg(all + c * stride + g * pr + D);
    cl[c * kRows + g] = __ldcg(all + c * stride + g * pr + D + 1);
  }
  __syncthreads();
  merge_weights<kRows>(cm, cl, cm, heads, num_chunks, e.final_m, e.final_l);
  __syncthreads();
  // Four dims per thread and 16 chunks' loads in flight: the merge sits on the row's critical
  // path, and one load per dim and chunk made it a chain of dependent L2 round trips.
  const int quads = D / 4;
  for (int i = static_cast<int>(threadIdx.x); i < heads * quads; i += kThreads) {
    const int g = i / quads;
    const int d = (i - g * quads) * 4;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 16
    for (int c = 0; c < num_chunks; ++c) {
      const float4 v = __ldcg(reinterpret_cast<const float4*>(all + c * stride + g * pr + d));
      const float w = cm[c * kRows + g];
      o.x += v.x * w;
      o.y += v.y * w;
      o.z += v.z * w;
      o.w += v.w * w;
    }
    write_output(p, it, g, d, o.x, e.final_m[g], e.final_l[g]);
    write_output(p, it, g, d + 1, o.y, e.final_m[g], e.final_l[g]);
    write_output(p, it, g, d + 2, o.z, e.final_m[g], e.final_l[g]);
    write_output(p, it, g, d + 3, o.w, e.final_m[g], e.final_l[g]);
  }
}

}  // namespace kvcache::cuda
