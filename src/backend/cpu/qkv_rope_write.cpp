// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The fused qkv_rope_write driver: one pass over the packed rows, each head converted to float
// once, through the RoPE row primitives of rope_kernels.h.

#include <functional>

#include "backend/cpu/rope_kernels.h"
#include "ops/paged_checks.h"

namespace kvcache::cpu {
namespace {

// The coefficients of a neox rotation with the norm weights g taken in: [g1 c | g2 s | g2 c | g1 s]
// (g1 = g[0, nf), g2 = g[nf, 2 nf)), so that x = v g / rms rotates as
// (v1 (g1 c) - v2 (g2 s)) / rms and (v2 (g2 c) + v1 (g1 s)) / rms.
void fold_norm(const RopeKernels& k, const float* g, const float* c, const float* s, int64_t nf,
               float* out) {
#if defined(__x86_64__)
  if (k.isa == CpuIsa::avx512 && nf % 16 == 0) return fold_norm_avx512(g, c, s, nf, out);
#endif
  for (int64_t i = 0; i < nf; ++i) {
    out[i] = g[i] * c[i];
    out[nf + i] = g[nf + i] * s[i];
    out[2 * nf + i] = g[nf + i] * c[i];
    out[3 * nf + i] = g[i] * s[i];
  }
}

struct QkvJob {
  const QkvRopeWriteDesc* desc;
  const ops::RopeTable* table;
  const RopeKernels* k;
  const QkvRopeWriteArgs* args;
  ops::RopeSections sections;
  bool stream;  // outputs too large to stay in cache: non-temporal stores
};

// Past this many output bytes (more than a core's L2) the outputs go around the cache: a prefill
// chunk's K/V and q are read back only later, while a decode step's stay hot for attention.
constexpr double kStreamBytes = 4 << 20;

void qkv_tokens(const QkvJob& job, int64_t begin, int64_t end) {
  const QkvRopeWriteDesc& d = *job.desc;
  const QkvRopeWriteArgs& a = *job.args;
  const RopeKernels& k = *job.k;
  const ops::RopeTable& table = *job.table;
  const KVFormat& f = d.cache.kv;
  const int64_t dim = f.head_dim;
  const int64_t dim_v = f.dim_v();
  const int64_t nf = table.num_freqs;
  const size_t in_size = size_of(d.qkv_dtype);
  const size_t q_size = size_of(d.q_dtype);
  const size_t k_size = size_of(f.k_dtype);
  const size_t v_size = size_of(f.v_dtype);
  const ops::PoolStrides ks = ops::pool_strides(d.cache.pages, f.num_kv_heads, dim);
  const ops::PoolStrides vs = ops::pool_strides(d.cache.pages, f.num_kv_heads, dim_v);
  const ops::PoolStrides ss = ops::pool_strides(d.cache.pages, f.num_kv_heads, 1);
  const int64_t num_tokens = a.qkv.shape[0];
  const float* qw = a.q_norm_weight.data_as<const float>();
  const float* kw = a.k_norm_weight.data_as<const float>();
  float cs[kRopeMaxHeadDim / 2], sn[kRopeMaxHeadDim / 2], x[kRopeMaxHeadDim];
  // qk-norm folded into the rotation (AVX-512 heads with full rotary dimension): per token, the
  // weights times cos / sin, shared by every head of the token.
  const bool fold = d.qk_norm && k.isa == CpuIsa::avx512 && d.rope.style == RopeStyle::neox &&
                    dim == 2 * nf && dim <= 256;
  float qg[256], kg[256], fq[512], fk[512];
  if (fold) {
    for (int64_t i = 0; i < dim; ++i) {
      qg[i] = d.norm_weight_offset + qw[i];
      kg[i] = d.norm_weight_offset + kw[i];
    }
  }
  for (int64_t t = begin; t < end; ++t) {
    for (int st = 0; st < job.sections.num_streams; ++st) {
      const int64_t pos = a.positions[static_cast<size_t>(st * num_tokens + t)];
      for (int64_t i = job.sections.begin[static_cast<size_t>(st)];
           i < job.sections.begin[static_cast<size_t>(st + 1)]; ++i) {
        cs[i] = table.cos[static_cast<size_t>(pos * nf + i)] * table.attention_factor;
        sn[i] = table.sin[static_cast<size_t>(pos * nf + i)] * table.attention_factor;
      }
    }
    if (fold) {
      fold_norm(k, qg, cs, sn, nf, fq);
      fold_norm(k, kg, cs, sn, nf, fk);
    }
    const char* row =
        static_cast<const char*>(a.qkv.data) + static_cast<size_t>(t * a.qkv.strides[0]) * in_size;
    auto head_in = [&](int64_t h) { return row + static_cast<size_t>(h * dim) * in_size; };
    char* q_row =
        static_cast<char*>(a.q_out.data) + static_cast<size_t>(t * d.num_q_heads * dim) * q_size;
    for (int64_t h = 0; h < d.num_q_heads; ++h) {
      k.rope_head_out(head_in(h), d.qkv_dtype, d.qk_norm ? qw : nullptr, d.norm_weight_offset,
                      d.norm_eps, cs, sn, fold ? fq : nullptr, nf, d.rope.style, dim, x, d.q_dtype,
                      q_row + static_cast<size_t>(h * dim) * q_size, job.stream);
    }
    const int64_t slot = ops::token_slot(d.cache.pages, a.slots, t);
    const int64_t page = slot / d.cache.pages.page_size;
    const int64_t in_page = slot % d.cache.pages.page_size;
    for (int64_t h = 0; h < f.num_kv_heads; ++h) {
      const int64_t at = page * ks.page + in_page * ks.slot + h * ks.head;
      void* dst = static_cast<char*>(a.kv.k_pages.data) + static_cast<size_t>(at) * k_size;
      const float scale =
          k.rope_head_out(head_in(d.num_q_heads + h), d.qkv_dtype, d.qk_norm ? kw : nullptr,
                          d.norm_weight_offset, d.norm_eps, cs, sn, fold ? fk : nullptr, nf,
                          d.rope.style, dim, x, f.k_dtype, dst, job.stream);
      if (is_quantized(f.k_dtype)) {
        a.kv.k_scales.data_as<float>()[page * ss.page + in_page * ss.slot + h * ss.head] = scale;
      }
    }
    const char* v_in = head_in(d.num_q_heads + f.num_kv_heads);
    char* v_slot = static_cast<char*>(a.kv.v_pages.data) +
                   static_cast<size_t>(page * vs.page + in_page * vs.slot) * v_size;
    if (f.v_dtype == d.qkv_dtype && vs.head == dim_v) {  // NHD: the token's V heads are one block
      k.copy(v_in, v_slot, static_cast<size_t>(f.num_kv_heads * dim_v) * v_size, job.stream);
      continue;
    }
    for (int64_t h = 0; h < f.num_kv_heads; ++h) {
      const char* src = v_in + static_cast<size_t>(h * dim_v) * in_size;
      void* dst = v_slot + static_cast<size_t>(h * vs.head) * v_size;
      if (f.v_dtype == d.qkv_dtype) {
        k.copy(src, dst, static_cast<size_t>(dim_v) * v_size, job.stream);
      } else if (is_quantized(f.v_dtype)) {
        a.kv.v_scales.data_as<float>()[page * ss.page + in_page * ss.slot + h * ss.head] =
            k.quantize_from(d.qkv_dtype, src, f.v_dtype, dst, dim_v, job.stream);
      } else {
        k.load(d.qkv_dtype, src, x, dim_v);
        k.store(x, f.v_dtype, dst, dim_v, job.stream);
      }
    }
  }
  k.fence();
}

}  // namespace

void qkv_rope_write(const QkvRopeWriteDesc& desc, const ops::RopeTable& table,
                    const RopeKernels& kernels, const QkvRopeWriteArgs& args, ThreadPool* pool) {
  const KVFormat& f = desc.cache.kv;
  const int64_t n = args.qkv.shape[0];
  const double out_bytes =
      static_cast<double>(n) *
      static_cast<double>(desc.num_q_heads * f.head_dim *
                              static_cast<int64_t>(size_of(desc.q_dtype)) +
                          f.num_kv_heads * (f.head_dim * static_cast<int64_t>(size_of(f.k_dtype)) +
                                            f.dim_v() * static_cast<int64_t>(size_of(f.v_dtype))));
  const QkvJob job{&desc,
                   &table,
                   &kernels,
                   &args,
                   ops::rope_sections(desc.rope, table.num_freqs),
                   out_bytes > kStreamBytes};
  if (pool == nullptr || n < 2) {
    qkv_tokens(job, 0, n);
    return;
  }
  // One pointer of capture: std::function keeps it inline (no allocation).
  const QkvJob* j = &job;
  pool->parallel_for(n, [j](int64_t begin, int64_t end) { qkv_tokens(*j, begin, end); });
}

}  // namespace kvcache::cpu
