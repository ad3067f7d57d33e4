// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The rope_shift driver: K rotated for position p is rotated once more by the angle of delta,
// which is K rotated for p + delta (rotations compose; the attention factor is already in K).

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "backend/cpu/rope_kernels.h"
#include "ops/paged_checks.h"

namespace kvcache::cpu {
namespace {

struct ShiftJob {
  const RopeShiftDesc* desc;
  const ops::RopeTable* table;
  const RopeKernels* k;
  const RopeShiftArgs* args;
  int64_t max_len;  // the longest [p0, p1) of the batch; work item = b * max_len + t
};

// The element offset of K(b, h, p) and of its scale.
struct KAddress {
  int64_t data;
  int64_t scale;
};

KAddress k_address(const RopeShiftDesc& d, const RopeShiftArgs& a, int64_t b, int64_t h,
                   int64_t p) {
  if (!d.pages) {
    const TensorView& k = a.caches.k;
    const TensorView& s = a.caches.k_scales;
    return {b * k.strides[0] + h * k.strides[1] + p * k.strides[2],
            b * s.strides[0] + h * s.strides[1] + p * s.strides[2]};
  }
  const PageFormat& pf = *d.pages;
  const int64_t page =
      a.table
          .indices[static_cast<size_t>(a.table.indptr[static_cast<size_t>(b)] + p / pf.page_size)];
  const int64_t slot = p % pf.page_size;
  const ops::PoolStrides ks = ops::pool_strides(pf, d.kv.num_kv_heads, d.kv.head_dim);
  const ops::PoolStrides ss = ops::pool_strides(pf, d.kv.num_kv_heads, 1);
  return {page * ks.page + slot * ks.slot + h * ks.head,
          page * ss.page + slot * ss.slot + h * ss.head};
}

void shift_items(const ShiftJob& job, int64_t begin, int64_t end) {
  const RopeShiftDesc& d = *job.desc;
  const RopeShiftArgs& a = *job.args;
  const ops::RopeTable& table = *job.table;
  const int64_t dim = d.kv.head_dim;
  const int64_t nf = table.num_freqs;
  const DType dtype = d.kv.k_dtype;
  const bool quantized = is_quantized(dtype);
  const size_t esize = size_of(dtype);
  char* k_base = static_cast<char*>(d.pages ? a.kv.k_pages.data : a.caches.k.data);
  float* s_base = static_cast<float*>(d.pages ? a.kv.k_scales.data : a.caches.k_scales.data);
  float cs[kRopeMaxHeadDim / 2], sn[kRopeMaxHeadDim / 2], x[kRopeMaxHeadDim];
  int64_t row_b = -1;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / job.max_len;
    const int64_t p = a.p0[static_cast<size_t>(b)] + item % job.max_len;
    const int32_t delta = a.delta[static_cast<size_t>(b)];
    if (p >= a.p1[static_cast<size_t>(b)] || delta == 0) continue;
    if (b != row_b) {
      // The rotation by delta: the table row |delta|, sin negated for a negative delta.
      const int64_t at = std::abs(static_cast<int64_t>(delta)) * nf;
      const float sign = delta < 0 ? -1.0f : 1.0f;
      for (int64_t i = 0; i < nf; ++i) {
        cs[i] = table.cos[static_cast<size_t>(at + i)];
        sn[i] = sign * table.sin[static_cast<size_t>(at + i)];
      }
      row_b = b;
    }
    for (int64_t h = 0; h < d.kv.num_kv_heads; ++h) {
      const KAddress addr = k_address(d, a, b, h, p);
      void* k = k_base + static_cast<size_t>(addr.data) * esize;
      if (quantized) {
        s_base[addr.scale] =
            job.k->rotate_quantized(dtype, k, s_base[addr.scale], cs, sn, nf, d.rope.style, dim, x);
      } else {
        // load, rotate, store in place: the row is read whole before any of it is written.
        job.k->rope_head_out(k, dtype, nullptr, 0.0f, 0.0f, cs, sn, nullptr, nf, d.rope.style, dim,
                             x, dtype, k, false);
      }
    }
  }
}

}  // namespace

void rope_shift(const RopeShiftDesc& desc, const ops::RopeTable& table, const RopeKernels& kernels,
                const RopeShiftArgs& args, ThreadPool* pool) {
  int64_t max_len = 0;
  for (size_t b = 0; b < args.p0.size(); ++b)
    max_len = std::max<int64_t>(max_len, args.p1[b] - args.p0[b]);
  if (max_len == 0) return;
  const ShiftJob job{&desc, &table, &kernels, &args, max_len};
  const int64_t n = static_cast<int64_t>(args.p0.size()) * max_len;
  if (pool == nullptr || n < 2) {
    shift_items(job, 0, n);
    return;
  }
  const ShiftJob* j = &job;  // one pointer of capture: std::function keeps it inline
  pool->parallel_for(n, [j](int64_t begin, int64_t end) { shift_items(*j, begin, end); });
}

}  // namespace kvcache::cpu
