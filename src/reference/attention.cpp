// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "reference/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "reference/element.h"

namespace kvcache::reference {
namespace {

// The dequantized element d of K (is_k) or V at position t of kv head h of sequence b.
double kv_value(const AttentionDesc& desc, const AttentionArgs& a, bool is_k, int64_t b, int64_t h,
                int64_t t, int64_t d) {
  const DType dtype = is_k ? desc.kv.k_dtype : desc.kv.v_dtype;
  const int64_t dim = is_k ? desc.kv.head_dim : desc.kv.dim_v();
  const int64_t heads = desc.kv.num_kv_heads;
  double value = 0.0;
  double scale = 1.0;
  if (desc.pages) {
    const int64_t ps = desc.pages->page_size;
    const int64_t page =
        a.page_table
            .indices[static_cast<size_t>(a.page_table.indptr[static_cast<size_t>(b)] + t / ps)];
    const int64_t slot = t % ps;
    // NHD: [page, slot, head]; HND: [page, head, slot].
    const int64_t cell = desc.pages->layout == PageLayout::nhd ? (page * ps + slot) * heads + h
                                                               : (page * heads + h) * ps + slot;
    const PagedKV& kv = a.paged;
    value = read_element(is_k ? kv.k_pages.data : kv.v_pages.data, dtype, cell * dim + d);
    if (is_quantized(dtype))
      scale = read_element(is_k ? kv.k_scales.data : kv.v_scales.data, DType::f32, cell);
  } else {
    const TensorView& t4 = is_k ? a.contiguous.k : a.contiguous.v;
    value =
        read_element(t4.data, dtype,
                     b * t4.strides[0] + h * t4.strides[1] + t * t4.strides[2] + d * t4.strides[3]);
    if (is_quantized(dtype)) {
      const TensorView& s3 = is_k ? a.contiguous.k_scales : a.contiguous.v_scales;
      scale = read_element(s3.data, DType::f32,
                           b * s3.strides[0] + h * s3.strides[1] + t * s3.strides[2]);
    }
  }
  return value * scale;
}

}  // namespace

AttentionOutput attention(const AttentionDesc& desc, const AttentionArgs& a) {
  const int64_t hq = desc.num_q_heads;
  const int64_t group = hq / desc.kv.num_kv_heads;
  const int64_t dim = desc.kv.head_dim;
  const int64_t dim_v = desc.kv.dim_v();
  const double scale = desc.scale > 0.0f ? desc.scale : 1.0 / std::sqrt(static_cast<double>(dim));
  const auto batch = static_cast<int64_t>(a.seq_lens.size());
  const int64_t rows = a.q.shape[0];
  AttentionOutput out;
  out.o.assign(static_cast<size_t>(rows * hq * dim_v), 0.0);
  out.lse.assign(static_cast<size_t>(rows * hq), 0.0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = a.seq_lens[static_cast<size_t>(b)];
    const int64_t row0 = a.q_indptr.empty() ? b : a.q_indptr[static_cast<size_t>(b)];
    const int64_t n = a.q_indptr.empty() ? 1 : a.q_indptr[static_cast<size_t>(b + 1)] - row0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t row = row0 + i;
      const int64_t pos = len - n + i;
      const int64_t first = desc.window > 0 ? std::max<int64_t>(0, pos - desc.window + 1) : 0;
      for (int64_t h = 0; h < hq; ++h) {
        const int64_t kvh = h / group;
        std::vector<int64_t> keys;  // visible: the window, and the sink tokens before it
        for (int64_t t = 0; t <= pos; ++t) {
          if (t >= first || t < desc.sink_tokens) keys.push_back(t);
        }
        std::vector<double> logits;
        for (int64_t t : keys) {
          double x = 0.0;
          for (int64_t d = 0; d < dim; ++d) {
            const double q =
                read_element(a.q.data, a.q.dtype,
                             row * a.q.strides[0] + h * a.q.strides[1] + d * a.q.strides[2]);
            x += q * kv_value(desc, a, true, b, kvh, t, d);
          }
          x *= scale;
          if (desc.soft_cap > 0.0f) x = desc.soft_cap * std::tanh(x / desc.soft_cap);
          logits.push_back(x);
        }
        double m = *std::max_element(logits.begin(), logits.end());
        double sink = 0.0;
        if (desc.has_sinks) {
          sink = read_element(a.sinks.data, DType::f32, h * a.sinks.strides[0]);
          m = std::max(m, sink);
        }
        double denom = desc.has_sinks ? std::exp(sink - m) : 0.0;
        for (double x : logits) denom += std::exp(x - m);
        double* o = &out.o[static_cast<size_t>((row * hq + h) * dim_v)];
        for (size_t k = 0; k < keys.size(); ++k) {
          const int64_t t = keys[k];
          const double p = std::exp(logits[k] - m) / denom;
          for (int64_t d = 0; d < dim_v; ++d) o[d] += p * kv_value(desc, a, false, b, kvh, t, d);
        }
        out.lse[static_cast<size_t>(row * hq + h)] = m + std::log(denom);
      }
    }
  }
  return out;
}

}  // namespace kvcache::reference
