// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The RoPE and RMS-norm pieces of qkv_rope_write's kernels, written as the CPU's portable kernels
// compute them (backend/cpu/rope_kernels.{h,cpp}), operation for operation and in their order, so
// that the results are the same bits:
//   rms_norm: ss = sum of x[i] * x[i] from i = 0 up (one rounding per product and per sum),
//             r = 1 / sqrt(ss / n + eps), x[i] = (x[i] * r) * (offset + w[i]);
//   rotate:   (x1, x2) -> (x1 * c - x2 * s, x2 * c + x1 * s), each product rounded;
//   cos / sin: the table's floats (already times the attention factor, as the CPU multiplies them).

#include <cstdint>

#include "backend/cuda/device/write_common.cuh"

namespace kvcache::cuda {

// The RoPE configuration a kernel reads (by value, in the kernel's parameters).
struct DeviceRope {
  const float* cos = nullptr;  // [max_position, num_freqs]
  const float* sin = nullptr;
  int64_t max_position = 0;
  int32_t num_freqs = 0;   // rotary_dim / 2
  int32_t rotary_dim = 0;  // elements past it pass through
  int32_t num_streams = 1;
  int32_t section_begin[5] = {};  // stream s: frequencies [begin[s], begin[s + 1]); num_freqs after
  bool gptj = false;
  bool table_vec4 = false;  // num_freqs % 4 == 0: rows of the table are 16-byte aligned
};

// A token's position in each stream (up to 4).
struct StreamPositions {
  int32_t p[4] = {0, 0, 0, 0};
};

__device__ __forceinline__ int section_of(const DeviceRope& r, int f) {
  return f < r.section_begin[1] ? 0
                                : (f < r.section_begin[2] ? 1 : (f < r.section_begin[3] ? 2 : 3));
}

// Constant indices only, so the positions stay in registers.
__device__ __forceinline__ int32_t position_of(const StreamPositions& sp, int s) {
  return s == 0 ? sp.p[0] : (s == 1 ? sp.p[1] : (s == 2 ? sp.p[2] : sp.p[3]));
}

// cos / sin of frequencies f0 .. f0 + N - 1 (those below num_freqs; the rest are left as they
// are): two or four 16-byte loads when one stream drives them all and the row is aligned.
template <int N>
__device__ __forceinline__ void load_cos_sin(const DeviceRope& r, const StreamPositions& sp, int f0,
                                             float (&cs)[N], float (&sn)[N]) {
  const auto load_vec = [&](int32_t position) {
    const int64_t at = static_cast<int64_t>(position) * r.num_freqs + f0;
#pragma unroll
    for (int k = 0; k < N; k += 4) {
      const float4 c = __ldg(reinterpret_cast<const float4*>(r.cos + at + k));
      const float4 s = __ldg(reinterpret_cast<const float4*>(r.sin + at + k));
      cs[k] = c.x, cs[k + 1] = c.y, cs[k + 2] = c.z, cs[k + 3] = c.w;
      sn[k] = s.x, sn[k + 1] = s.y, sn[k + 2] = s.z, sn[k + 3] = s.w;
    }
  };
  const bool vec = r.table_vec4 && f0 % 4 == 0 && f0 + N <= r.num_freqs;
  if (r.num_streams == 1) {  // the usual RoPE: no sections to look up
    if (vec) return load_vec(sp.p[0]);
  } else {
    const int s0 = section_of(r, f0);
    if (vec && section_of(r, f0 + N - 1) == s0) return load_vec(position_of(sp, s0));
  }
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const int f = f0 + k;
    if (f >= r.num_freqs) continue;
    const int64_t at = static_cast<int64_t>(position_of(sp, section_of(r, f))) * r.num_freqs + f;
    cs[k] = __ldg(r.cos + at);
    sn[k] = __ldg(r.sin + at);
  }
}

// The first half of a rotated pair: x1 * c - x2 * s.
__device__ __forceinline__ float rotate_first(float x1, float x2, float c, float s) {
  return __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
}
// The second half: x2 * c + x1 * s.
__device__ __forceinline__ float rotate_second(float x1, float x2, float c, float s) {
  return __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}

// 1 / sqrt(ss / n + eps) (cpu::norm_factor).
__device__ __forceinline__ float norm_factor(float ss, float eps, int n) {
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, static_cast<float>(n)), eps)));
}

// (x * r) * (offset + w).
__device__ __forceinline__ float norm_scale(float x, float r, float offset, float w) {
  return __fmul_rn(__fmul_rn(x, r), __fadd_rn(offset, w));
}

// The shared memory one warp of `groups` row groups stages its rows' squares in (stage_sum):
// float4s.
__host__ __device__ constexpr int stage_float4s(int groups, int num_chunks) {
  return 2 * groups * (num_chunks + 1);
}

// The sum of a row's squares in the CPU's order (ss = 0; ss += x[i] * x[i] from i = 0 up), for
// group `group` of the warp's `groups`, whose lanes hold the row as `map` places it (xa / xb:
// chunks ca / cb, when has_a / has_b). Each lane stages its squares in this warp's `stage`
// (stage_float4s), then every lane of the group runs the whole chain of additions: one rounding
// per product and per sum, the additions back to back, with no lane waiting on another. Every
// lane of the warp calls it.
__device__ __forceinline__ float stage_sum(float4* stage, int group, int groups,
                                           const ChunkMap& map, const float (&xa)[8],
                                           const float (&xb)[8], int ca, int cb, bool has_a,
                                           bool has_b) {
  const int stride = map.num_chunks + 1;  // a float4 of padding: the groups' reads hit other banks
  float4* lo = stage + group * stride;
  float4* hi = lo + groups * stride;
  auto sq = [](const float(&x)[8], int k) {
    return make_float4(__fmul_rn(x[k], x[k]), __fmul_rn(x[k + 1], x[k + 1]),
                       __fmul_rn(x[k + 2], x[k + 2]), __fmul_rn(x[k + 3], x[k + 3]));
  };
  if (has_a) {
    lo[ca] = sq(xa, 0);
    hi[ca] = sq(xa, 4);
  }
  if (has_b) {
    lo[cb] = sq(xb, 0);
    hi[cb] = sq(xb, 4);
  }
  __syncwarp();
  float s = 0.0f;
  for (int c = 0; c < map.num_chunks; ++c) {
    const float4 u = lo[c];
    const float4 v = hi[c];
    s = __fadd_rn(s, u.x);
    s = __fadd_rn(s, u.y);
    s = __fadd_rn(s, u.z);
    s = __fadd_rn(s, u.w);
    s = __fadd_rn(s, v.x);
    s = __fadd_rn(s, v.y);
    s = __fadd_rn(s, v.z);
    s = __fadd_rn(s, v.w);
  }
  return s;
}

}  // namespace kvcache::cuda
