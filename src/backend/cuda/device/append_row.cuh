// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// One (token, kv head) row of new K or V written into its pool row, as paged_append and
// qkv_rope_write's V do on the CPU: a bit copy when the pool holds the input type, the rule of
// ops/quantize.h for int8 / e4m3 (its scale stored beside the row), else a conversion (round to
// nearest even, Saturation::none). Two shapes of the same work:
//  - write_row: a group of `width` lanes (a power of two) holds the row, each lane up to two
//    8-element chunks (16-byte accesses) as write_common.cuh's ChunkMap places them;
//  - write_row_scalar: one warp holds the row, lane l elements l, l + 32, ... (any size, any
//    alignment).
// Every lane of the warp calls them (the quantized path reduces over the group).

#include <cstdint>

#include "backend/cuda/device/write_common.cuh"

namespace kvcache::cuda {

// The chunks of a row one lane holds (ChunkMap): their raw inputs and their places in the row.
template <class In>
struct LaneRow {
  Raw8<In> a{}, b{};
  int ca = 0, cb = 0;  // chunk indices
  bool has_a = false, has_b = false;
};

// Issues this lane's loads of `row` (when `active`).
template <class In>
__device__ __forceinline__ LaneRow<In> load_lane_row(const In* row, const ChunkMap& map, int idx,
                                                     bool active) {
  LaneRow<In> r;
  r.ca = map.chunk_a(idx);
  r.cb = map.chunk_b(idx);
  r.has_a = active && r.ca < map.num_chunks;
  r.has_b = active && r.cb < map.num_chunks;
  if (r.has_a) r.a = load_raw8(row + 8 * r.ca);
  if (r.has_b) r.b = load_raw8(row + 8 * r.cb);
  return r;
}

// Writes the lane's chunks into the pool row at `at` (its first element) when `write`; the
// quantized path takes the group's maximum over every chunk loaded (has_a / has_b).
template <class In>
__device__ __forceinline__ void write_row(const LaneRow<In>& r, bool write, int idx, int width,
                                          const DevicePool& pool, int64_t at, float* scale) {
  const Elem e = pool.elem;
  const bool wa = write && r.has_a;
  const bool wb = write && r.has_b;
  if (e == elem_of<In>::value) {
    if (wa) store_raw8(static_cast<In*>(pool.data) + at + 8 * r.ca, r.a);
    if (wb) store_raw8(static_cast<In*>(pool.data) + at + 8 * r.cb, r.b);
    return;
  }
  float xa[8], xb[8];
  if (!is_quantized(e)) {
    to_float8(r.a, xa);
    to_float8(r.b, xb);
    if (wa) store_float8(pool.data, e, at + 8 * r.ca, xa);
    if (wb) store_float8(pool.data, e, at + 8 * r.cb, xb);
    return;
  }
  to_float8_nan_sign_only(r.a, xa);
  to_float8_nan_sign_only(r.b, xb);
  store_quantized_row(pool.data, e, at, xa, xb, r.has_a, r.has_b, wa, wb, r.ca, r.cb, idx, width,
                      scale);
}

// value(k): the float of element k (k < dim); called once per element per pass.
template <class F>
__device__ __forceinline__ void store_row_scalar(F&& value, int dim, bool active, int lane, Elem e,
                                                 void* base, int64_t at, float* scale) {
  if (!is_quantized(e)) {
    if (active) {
      for (int k = lane; k < dim; k += 32) store_elem(base, e, at + k, value(k));
    }
    return;
  }
  float m = 0.0f;
  if (active) {
    for (int k = lane; k < dim; k += 32) m = fmaxf(m, fabsf(value(k)));
  }
  m = group_max(m, 32);
  const float qmax = quantized_max(e);
  if (!active) return;
  const float inv = quantize_inv(m, qmax);
  for (int k = lane; k < dim; k += 32) store_elem(base, e, at + k, host_mul(value(k), inv));
  if (lane == 0) *scale = store_scale(m, qmax);
}

// src: the row's dim inputs.
template <class In>
__device__ __forceinline__ void write_row_scalar(const In* src, int dim, bool active, int lane,
                                                 const DevicePool& pool, int64_t at, float* scale) {
  if (pool.elem == elem_of<In>::value) {
    if (active) {
      for (int k = lane; k < dim; k += 32) static_cast<In*>(pool.data)[at + k] = src[k];
    }
    return;
  }
  store_row_scalar([&](int k) { return load_elem(src, k); }, dim, active, lane, pool.elem,
                   pool.data, at, scale);
}

}  // namespace kvcache::cuda
