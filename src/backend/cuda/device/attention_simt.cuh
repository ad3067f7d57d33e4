// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The attention kernel on CUDA cores (split-KV "flash decoding"): every supported K/V dtype and
// head_dim, K and V of any two storage types (int8 K with bf16 V); attention_mma.cuh is the faster
// path where tensor cores apply (equal K and V types only).
//
// A CTA of 4 warps serves one work item (attention_common.cuh) of kGroup query heads. A key row is
// read by lanes_per_key lanes, 8 elements each (16 bytes for 16-bit storage, 8 for 8-bit, 32 for
// f32), so a warp reads 32 / lanes_per_key keys at once and every load is a full-width vector;
// each lane group keeps kUnroll keys in flight. K and V rows are loaded and converted each by
// their own type's KVRow (8 elements per lane either way), so equal types are the one-type kernel.
// The scores of the kGroup heads are butterfly-reduced over the lane group; each lane group keeps
// its own online softmax (f32, base-2 exponentials with log2(e) folded into q) and is one slot of
// the epilogue. Quantized K/V: the per-(token, head) scale multiplies the score (K) and the softmax
// weight (V), never each element.

#include <tuple>

#include "attention_common.cuh"

namespace kvcache::cuda {

// --- 8 elements of K or V per lane: raw load and conversion to float ---

template <class KV>
struct KVRow;

template <>
struct KVRow<BF16> {
  using Raw = uint4;
  static constexpr int kBytes = 2;
  __device__ static Raw load(const uint8_t* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
  __device__ static void to_float(const Raw& r, float (&x)[8]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

template <>
struct KVRow<F16> {
  using Raw = uint4;
  static constexpr int kBytes = 2;
  __device__ static Raw load(const uint8_t* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
  __device__ static void to_float(const Raw& r, float (&x)[8]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], 4);
      const float2 f = __half22float2(h);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
};

template <>
struct KVRow<float> {
  struct Raw {
    uint4 a, b;
  };
  static constexpr int kBytes = 4;
  __device__ static Raw load(const uint8_t* p) {
    const auto* v = reinterpret_cast<const uint4*>(p);
    return Raw{__ldg(v), __ldg(v + 1)};
  }
  __device__ static void to_float(const Raw& r, float (&x)[8]) {
    const uint32_t w[8] = {r.a.x, r.a.y, r.a.z, r.a.w, r.b.x, r.b.y, r.b.z, r.b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = __uint_as_float(w[i]);
  }
};

template <>
struct KVRow<E4M3> {
  using Raw = uint2;
  static constexpr int kBytes = 1;
  __device__ static Raw load(const uint8_t* p) { return __ldg(reinterpret_cast<const uint2*>(p)); }
  __device__ static void to_float(const Raw& r, float (&x)[8]) {
    const uint32_t w[2] = {r.x, r.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const auto pair = static_cast<__nv_fp8x2_storage_t>(w[i] >> (16 * j));
        const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
        __half2 h;
        memcpy(&h, &hr, 4);
        const float2 f = __half22float2(h);
        x[4 * i + 2 * j] = f.x;
        x[4 * i + 2 * j + 1] = f.y;
      }
    }
  }
};

template <>
struct KVRow<int8_t> {
  using Raw = uint2;
  static constexpr int kBytes = 1;
  __device__ static Raw load(const uint8_t* p) { return __ldg(reinterpret_cast<const uint2*>(p)); }
  __device__ static void to_float(const Raw& r, float (&x)[8]) {
    const uint32_t w[2] = {r.x, r.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        x[4 * i + j] = static_cast<float>(static_cast<int8_t>((w[i] >> (8 * j)) & 0xffu));
      }
    }
  }
};

template <class KV>
inline constexpr bool kQuantized = sizeof(KV) == 1;

// The device storage types, in KVStorage's order.
using KVStorageTypes = std::tuple<float, F16, BF16, int8_t, E4M3>;
static_assert(std::tuple_size_v<KVStorageTypes> == kNumKVStorage);
template <KVStorage S>
using StorageType = std::tuple_element_t<static_cast<size_t>(S), KVStorageTypes>;

// kGroup query heads (padded; it.heads of them real) per CTA; K stored as KT, V as VT.
template <class KT, class VT, int kGroup>
__global__ void __launch_bounds__(kAttnThreads)
    attention_simt_kernel(const __grid_constant__ AttnKernelParams p) {
  using KRow = KVRow<KT>;
  using VRow = KVRow<VT>;
  constexpr int kUnroll = kGroup >= 8 ? 2 : 4;
  constexpr int kMaxSlots = kAttnThreads / 2;  // lane groups of 2 (head_dim 16)

  __shared__ float s_acc[kAttnThreads * 8 * kGroup];  // [slot][g][head_dim]: 128 * 8 floats per g
  __shared__ EpilogueSmem<kGroup, kMaxSlots> ep;
  __shared__ float merge_scratch[kMergeScratchFloats<kGroup>];

  const AttnItem it = resolve_item(p, kGroup);  // one query row per CTA (q_per_cta == 1)
  if (!it.ok) return;
  const AttnItem& row = it;
  const int r = it.q_row0;
  const int chunk = it.chunk;
  const int kv_head = it.kv_head;
  const int heads = it.heads;
  const int head0 = it.head0;
  const int head_group = it.row_group % (p.num_kv_heads * p.subgroups);
  const int num_chunks = (row.num_vis + p.chunk_size - 1) / p.chunk_size;
  if (chunk >= num_chunks) return;

  const int L = p.lanes_per_key;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int li = lane & (L - 1);
  const int slot = static_cast<int>(threadIdx.x) / L;
  const int num_slots = kAttnThreads / L;
  const int d0 = li * 8;

  // q, pre-scaled.
  float q[kGroup][8];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      q[g][e] = g < heads
                    ? p.q_scale *
                          load_io(p.q, r * p.q_row_stride + (head0 + g) * p.q_head_stride + d0 + e,
                                  p.q_type)
                    : 0.0f;
    }
  }

  float m[kGroup];
  float l[kGroup];
  float acc[kGroup][8];
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[g][e] = 0.0f;
  }

  const bool report_pages = head_group == 0 && li == 0;
  const int v0 = chunk * p.chunk_size;
  const int v1 = min(v0 + p.chunk_size, row.num_vis);
  const int step = num_slots * kUnroll;

  // The chunk's visible keys as two runs of real positions: sinks, then the window part.
#pragma unroll
  for (int run = 0; run < 2; ++run) {
    const int j_begin = run == 0 ? v0 : row.win_lo + max(v0, row.sink_cnt) - row.sink_cnt;
    const int j_end = run == 0 ? min(v1, row.sink_cnt) : row.win_lo + v1 - row.sink_cnt;
    for (int j0 = j_begin; j0 < j_end; j0 += step) {
      typename KRow::Raw kr[kUnroll];
      typename VRow::Raw vr[kUnroll];
      float ks[kUnroll];
      float vs[kUnroll];
      bool ok[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + slot + u * num_slots;
        ok[u] = j < j_end;
        ks[u] = 1.0f;
        vs[u] = 1.0f;
        if (!ok[u]) continue;
        int64_t page;
        int64_t in_page;
        if (p.paged) {
          const int local = p.page_shift >= 0 ? j >> p.page_shift : j / p.page_size;
          in_page = j - local * p.page_size;
          page = p.indices[row.page_base + local];
          if (page < 0 || page >= p.num_pages) {
            if (report_pages) {
              record_error(p.errors, p.op, ErrorArg::page_indices, row.page_base + local, page, 0,
                           p.num_pages);
            }
            ok[u] = false;
            continue;
          }
        } else {
          page = row.b;
          in_page = j;
        }
        const int64_t k_off =
            page * p.k.page_stride + in_page * p.k.slot_stride + kv_head * p.k.head_stride + d0;
        const int64_t v_off =
            page * p.v.page_stride + in_page * p.v.slot_stride + kv_head * p.v.head_stride + d0;
        kr[u] = KRow::load(p.k.base + k_off * KRow::kBytes);
        vr[u] = VRow::load(p.v.base + v_off * VRow::kBytes);
        if constexpr (kQuantized<KT>) {
          ks[u] = __ldg(p.k.scales + page * p.k.scale_page_stride +
                        in_page * p.k.scale_slot_stride + kv_head * p.k.scale_head_stride);
        }
        if constexpr (kQuantized<VT>) {
          vs[u] = __ldg(p.v.scales + page * p.v.scale_page_stride +
                        in_page * p.v.scale_slot_stride + kv_head * p.v.scale_head_stride);
        }
      }

      // Scores: partial dot products over this lane's 8 dims, reduced over the lane group.
      float s[kUnroll][kGroup];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float x[8];
        if (ok[u]) {
          KRow::to_float(kr[u], x);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) x[e] = 0.0f;
        }
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          float dot = 0.0f;
#pragma unroll
          for (int e = 0; e < 8; ++e) dot = fmaf(q[g][e], x[e], dot);
          s[u][g] = dot;
        }
      }
      for (int off = 1; off < L; off <<= 1) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int g = 0; g < kGroup; ++g) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], off);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          float x = s[u][g] * ks[u];
          if (p.soft_cap_log2 > 0.0f) x = p.soft_cap_log2 * tanhf(x * p.inv_soft_cap);
          s[u][g] = ok[u] ? x : -INFINITY;
        }
      }

      // Online softmax: one rescale per kUnroll keys.
      float m_new[kGroup];
#pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        float mx = m[g];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) mx = fmaxf(mx, s[u][g]);
        m_new[g] = mx;
        if (mx != -INFINITY) {
          const float corr = exp2f(m[g] - mx);
          l[g] *= corr;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[g][e] *= corr;
        }
        m[g] = mx;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!ok[u]) continue;
        float x[8];
        VRow::to_float(vr[u], x);
#pragma unroll
        for (int g = 0; g < kGroup; ++g) {
          const float w = exp2f(s[u][g] - m_new[g]);
          l[g] += w;
          const float wv = w * vs[u];
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(wv, x[e], acc[g][e]);
        }
      }
    }
  }

  // Hand the lane groups' partials to the epilogue.
  const int D = p.head_dim;
  if (li == 0) {
#pragma unroll
    for (int g = 0; g < kGroup; ++g) {
      ep.m[slot * kGroup + g] = m[g];
      ep.l[slot * kGroup + g] = l[g];
    }
  }
#pragma unroll
  for (int g = 0; g < kGroup; ++g) {
#pragma unroll
    for (int x = 0; x < 8; ++x) s_acc[(slot * kGroup + g) * D + d0 + x] = acc[g][x];
  }
  __syncthreads();
  finish_item(p, it, num_chunks, num_slots, s_acc, D, ep, merge_scratch);
}

// Calls f.template operator()<kGroup>() for kGroup = group_pad (1, 4 or 8).
template <class F>
cudaError_t with_simt_group(int group_pad, F f) {
  switch (group_pad) {
    case 1:
      return f.template operator()<1>();
    case 4:
      return f.template operator()<4>();
    default:
      return f.template operator()<8>();
  }
}

// The launcher and occupancy query that backend/cuda/attention_launch.h declares; instances/
// instantiates them once per (K, V) pair.
template <KVStorage K, KVStorage V>
cudaError_t launch_attention_simt(const AttnKernelParams& p, int group_pad, cudaStream_t stream) {
  using KT = StorageType<K>;
  using VT = StorageType<V>;
  const int64_t ctas = attention_ctas(p);
  return with_simt_group(group_pad, [&]<int kGroup>() {
    attention_simt_kernel<KT, VT, kGroup>
        <<<dim3(static_cast<unsigned>(ctas)), kAttnThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

template <KVStorage K, KVStorage V>
cudaError_t attention_simt_occupancy(int group_pad, int* ctas_per_sm) {
  using KT = StorageType<K>;
  using VT = StorageType<V>;
  return with_simt_group(group_pad, [&]<int kGroup>() {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        ctas_per_sm, attention_simt_kernel<KT, VT, kGroup>, kAttnThreads, 0);
  });
}

}  // namespace kvcache::cuda
