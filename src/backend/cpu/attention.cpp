// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// CPU attention: the driver (work split, online softmax, log-sum-exp merge of chunks, threading)
// and the portable row loops.
//
// Work item = (sequence, kv head, tile of query rows, chunk of keys). A tile holds the rows
// (query, head) of one GQA group, so each K/V row is loaded once for all of them; decode has one
// tile per group unless the group exceeds kMaxRows. Chunks sit at multiples of the plan's chunk
// size in absolute key positions. An item walks its chunk in runs (at most kRunRows keys, never
// across a page), calls score(), soft-caps and masks, keeps a running max and sum in base 2 (q is
// pre-multiplied by scale * log2(e)) and calls accumulate(). A sequence whose keys fit one chunk
// writes o directly; otherwise each item leaves (max, sum, unnormalized o) in the workspace and a
// second pass merges the chunks by the log-sum-exp rule and adds the sink.

#include "kvcache/attention.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "kvcache/thread_pool.h"

#include "backend/cpu/attention_kernels.h"
#include "ops/paged_checks.h"

namespace kvcache::cpu {
namespace {

constexpr int64_t kMaxRows = 32;  // query rows per tile
constexpr int64_t kMaxDim = 512;  // head_dim and head_dim_v (the op refuses more)
constexpr int64_t kRunRows = 64;  // keys per run
constexpr int64_t kBlock = 64;    // elements converted at a time by the portable loops
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// --- portable row loops ---

const std::array<float, 256>& fp8_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i)
      t[static_cast<size_t>(i)] = fp8_e4m3_to_float(static_cast<uint8_t>(i));
    return t;
  }();
  return table;
}

// Converts n elements of a row to float.
template <class T>
void load_block(const T* row, int64_t n, float* out) {
  for (int64_t d = 0; d < n; ++d) {
    if constexpr (std::is_same_v<T, float>) {
      out[d] = row[d];
    } else if constexpr (std::is_same_v<T, bf16_t>) {
      const uint32_t bits = static_cast<uint32_t>(row[d].bits) << 16;
      std::memcpy(&out[d], &bits, sizeof(float));
    } else if constexpr (std::is_same_v<T, f16_t>) {
      out[d] = f16_to_float(row[d].bits);
    } else if constexpr (std::is_same_v<T, int8_t>) {
      out[d] = static_cast<float>(row[d]);
    } else {
      out[d] = fp8_table()[row[d].bits];
    }
  }
}

float dot(const float* a, const float* b, int64_t n) {
  float lanes[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] += a[d + j] * b[d + j];
  }
  float sum = 0.0f;
  for (; d < n; ++d) sum += a[d] * b[d];
  for (float x : lanes) sum += x;
  return sum;
}

template <class T>
void score_portable(const float* q, int64_t group, const KVRows& k, float* s) {
  const int64_t n = k.count;
  float buf[kBlock];
  for (int64_t t = 0; t < n; ++t) {
    const T* row = static_cast<const T*>(k.data) + t * k.stride;
    for (int64_t g = 0; g < group; ++g) s[g * n + t] = 0.0f;
    for (int64_t d0 = 0; d0 < k.dim; d0 += kBlock) {
      const int64_t len = std::min(kBlock, k.dim - d0);
      load_block(row + d0, len, buf);
      for (int64_t g = 0; g < group; ++g) s[g * n + t] += dot(q + g * k.dim + d0, buf, len);
    }
    if (k.scales != nullptr) {
      const float sc = k.scales[t * k.scale_stride];
      for (int64_t g = 0; g < group; ++g) s[g * n + t] *= sc;
    }
  }
}

template <class T>
void accumulate_portable(const float* p, int64_t group, const KVRows& v, float* acc) {
  const int64_t n = v.count;
  float buf[kBlock];
  for (int64_t t = 0; t < n; ++t) {
    const T* row = static_cast<const T*>(v.data) + t * v.stride;
    const float sc = v.scales != nullptr ? v.scales[t * v.scale_stride] : 1.0f;
    for (int64_t d0 = 0; d0 < v.dim; d0 += kBlock) {
      const int64_t len = std::min(kBlock, v.dim - d0);
      load_block(row + d0, len, buf);
      for (int64_t g = 0; g < group; ++g) {
        const float w = p[g * n + t] * sc;
        float* a = acc + g * v.dim + d0;
        for (int64_t d = 0; d < len; ++d) a[d] += w * buf[d];
      }
    }
  }
}

void score_any(const float* q, int64_t group, const KVRows& k, float* s) {
  dispatch_dtype(k.dtype, [&]<class T>(std::type_identity<T>) {
    if constexpr (std::is_same_v<T, double> || std::is_same_v<T, fp8_e5m2_t>) {
      return;  // not a storage dtype: the op refuses it before any loop runs
    } else {
      score_portable<T>(q, group, k, s);
    }
  });
}

void accumulate_any(const float* p, int64_t group, const KVRows& v, float* acc) {
  dispatch_dtype(v.dtype, [&]<class T>(std::type_identity<T>) {
    if constexpr (std::is_same_v<T, double> || std::is_same_v<T, fp8_e5m2_t>) {
      return;
    } else {
      accumulate_portable<T>(p, group, v, acc);
    }
  });
}

// --- softmax pieces ---

// 2^x for x <= 0 within 2^-22 relative; x below -126 (and -inf) gives ~2^-126, which no sum
// holding its own maximum (2^0) can notice. Branch-free so the loops vectorize.
[[gnu::always_inline]] inline float fast_exp2(float x) {
  x = std::max(x, -126.0f);
  const float rounded = (x + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  const float f = x - rounded;                            // [-0.5, 0.5]
  float y = 1.5403530393381606e-4f;                       // ln2^6 / 6!
  y = y * f + 1.3333558146428443e-3f;                     // ln2^5 / 5!
  y = y * f + 9.6181291076284772e-3f;
  y = y * f + 5.5504108664821580e-2f;
  y = y * f + 2.4022650695910071e-1f;
  y = y * f + 6.9314718055994531e-1f;
  y = y * f + 1.0f;
  const int32_t e = static_cast<int32_t>(rounded) + 127;
  const uint32_t bits = static_cast<uint32_t>(e) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return y * scale;
}

// One run of the online softmax for every row of a tile: soft-cap, mask, new running max, p in
// place of the logits (row j at sc + j * n), rescaled acc and sum.
struct RunUpdate {
  float* sc;
  int64_t n;
  int64_t nrows;
  int64_t t0;  // position of key 0
  const int64_t* pos;
  float* m;
  float* l;
  float* acc;
  int64_t dim_v;
  float cap2;
  int64_t window;
  int64_t sink;
  bool all_visible;
};

constexpr int kLanes = 16;  // independent lanes for the max and sum reductions, so they vectorize

[[gnu::always_inline]] inline void update_rows_impl(const RunUpdate& u) {
  const int64_t n = u.n;
  for (int64_t j = 0; j < u.nrows; ++j) {
    float* srow = u.sc + j * n;
    if (u.cap2 > 0.0f) {
      for (int64_t t = 0; t < n; ++t) srow[t] = u.cap2 * std::tanh(srow[t] / u.cap2);
    }
    if (!u.all_visible) {
      for (int64_t t = 0; t < n; ++t) {
        const int64_t key = u.t0 + t;
        if (key > u.pos[j] || (u.window > 0 && key <= u.pos[j] - u.window && key >= u.sink)) {
          srow[t] = kNegInf;
        }
      }
    }
    float lanes[kLanes];
    std::fill(lanes, lanes + kLanes, u.m[j]);
    int64_t t = 0;
    for (; t + kLanes <= n; t += kLanes) {
      for (int i = 0; i < kLanes; ++i) lanes[i] = srow[t + i] > lanes[i] ? srow[t + i] : lanes[i];
    }
    float mx = u.m[j];
    for (float x : lanes) mx = x > mx ? x : mx;
    for (; t < n; ++t) mx = srow[t] > mx ? srow[t] : mx;
    if (mx == kNegInf) {
      std::fill(srow, srow + n, 0.0f);
      continue;
    }
    std::fill(lanes, lanes + kLanes, 0.0f);
    for (t = 0; t + kLanes <= n; t += kLanes) {
      for (int i = 0; i < kLanes; ++i) {
        srow[t + i] = fast_exp2(srow[t + i] - mx);
        lanes[i] += srow[t + i];
      }
    }
    float sum = 0.0f;
    for (; t < n; ++t) {
      srow[t] = fast_exp2(srow[t] - mx);
      sum += srow[t];
    }
    for (float x : lanes) sum += x;
    if (mx != u.m[j]) {
      const float alpha = fast_exp2(u.m[j] - mx);
      float* arow = u.acc + j * u.dim_v;
      for (int64_t d = 0; d < u.dim_v; ++d) arow[d] *= alpha;
      u.l[j] *= alpha;
      u.m[j] = mx;
    }
    u.l[j] += sum;
  }
}

void update_rows_portable(const RunUpdate& u) { update_rows_impl(u); }

#if defined(__x86_64__)
// The same loops compiled for AVX-512 (used with the AVX-512 row loops only).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"))) void update_rows_avx512(
    const RunUpdate& u) {
  update_rows_impl(u);
}
#endif

// --- the driver ---

struct SeqInfo {
  int64_t len = 0;      // keys in the cache
  int64_t queries = 0;  // n_b
  int64_t row0 = 0;     // first q row
  int64_t key_lo = 0;   // first key any of its queries sees
  int64_t chunk0 = 0;   // absolute index of the first chunk
  int64_t chunks = 0;   // chunks holding keys in [key_lo, len)
  int64_t tiles = 0;    // per kv head
};

struct Ctx {
  const detail::AttentionPlanState* plan = nullptr;
  const AttentionArgs* args = nullptr;
  AttentionRowKernels kernels;
  void (*update)(const RunUpdate&) = update_rows_portable;
  int64_t hq = 0, hkv = 0, group = 0, dim = 0, dim_v = 0, tile_rows = 0;
  float q_scale = 0.0f;  // scale * log2(e)
  float cap2 = 0.0f;     // soft_cap * log2(e)
  int64_t window = 0;
  int64_t sink = 0;  // keys [0, sink) visible despite the window
  int64_t chunk = 0;
  int64_t* prefix = nullptr;  // [batch + 1] items before each sequence
  float* partials = nullptr;  // [rows, hq, max_chunks, dim_v + 2]
  // K/V addressing: element strides of (sequence | page, slot, head) and byte sizes.
  std::byte* k_base = nullptr;
  std::byte* v_base = nullptr;
  const float* ks_base = nullptr;
  const float* vs_base = nullptr;
  int64_t k_seq = 0, k_row = 0, k_head = 0, v_seq = 0, v_row = 0, v_head = 0;
  int64_t ks_seq = 0, ks_row = 0, ks_head = 0, vs_seq = 0, vs_row = 0, vs_head = 0;
  size_t k_elem = 0, v_elem = 0;
  int64_t page_size = 0;  // 0: contiguous
};

SeqInfo seq_info(const Ctx& c, int64_t b) {
  const AttentionArgs& a = *c.args;
  SeqInfo s;
  s.len = a.seq_lens[static_cast<size_t>(b)];
  if (c.plan->extend) {
    s.row0 = a.q_indptr[static_cast<size_t>(b)];
    s.queries = a.q_indptr[static_cast<size_t>(b + 1)] - s.row0;
  } else {
    s.row0 = b;
    s.queries = 1;
  }
  if (s.queries == 0) return s;
  s.key_lo =
      c.window > 0 && c.sink == 0 ? std::max<int64_t>(0, s.len - s.queries - c.window + 1) : 0;
  s.chunk0 = s.key_lo / c.chunk;
  s.chunks = (s.len + c.chunk - 1) / c.chunk - s.chunk0;
  s.tiles = (s.queries * c.group + c.tile_rows - 1) / c.tile_rows;
  return s;
}

// K or V rows [t, t + n) of (sequence b, kv head h).
KVRows rows_at(const Ctx& c, bool is_k, int64_t b, int64_t h, int64_t t, int64_t n) {
  const AttentionArgs& a = *c.args;
  KVRows r;
  r.dtype = is_k ? c.plan->desc.kv.k_dtype : c.plan->desc.kv.v_dtype;
  r.dim = is_k ? c.dim : c.dim_v;
  r.count = n;
  r.stride = is_k ? c.k_row : c.v_row;
  const float* sb = is_k ? c.ks_base : c.vs_base;
  r.scale_stride = is_k ? c.ks_row : c.vs_row;
  int64_t outer = b;  // sequence (contiguous) or page (paged)
  int64_t slot = t;
  if (c.page_size > 0) {
    outer = a.page_table.indices[static_cast<size_t>(a.page_table.indptr[static_cast<size_t>(b)] +
                                                     t / c.page_size)];
    slot = t % c.page_size;
  }
  const int64_t off = is_k ? outer * c.k_seq + slot * c.k_row + h * c.k_head
                           : outer * c.v_seq + slot * c.v_row + h * c.v_head;
  r.data = (is_k ? c.k_base : c.v_base) + off * static_cast<int64_t>(is_k ? c.k_elem : c.v_elem);
  if (sb != nullptr) {
    r.scales = sb + (is_k ? outer * c.ks_seq + slot * c.ks_row + h * c.ks_head
                          : outer * c.vs_seq + slot * c.vs_row + h * c.vs_head);
  }
  return r;
}

// Keys in the run from t0: at most kRunRows, never past hi or a page's end.
int64_t run_length(const Ctx& c, int64_t t0, int64_t hi) {
  const int64_t n = std::min(kRunRows, hi - t0);
  return c.page_size > 0 ? std::min(n, c.page_size - t0 % c.page_size) : n;
}

void prefetch_rows(const KVRows& r, size_t elem) {
  const auto bytes = static_cast<int64_t>(static_cast<size_t>(r.dim) * elem);
  for (int64_t t = 0; t < r.count; ++t) {
    const auto* row = static_cast<const char*>(r.data) + t * r.stride * static_cast<int64_t>(elem);
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off);
  }
}

float* partial_at(const Ctx& c, int64_t row, int64_t head, int64_t chunk) {
  return c.partials + ((row * c.hq + head) * c.plan->max_chunks + chunk) * (c.dim_v + 2);
}

// Normalizes one (row, head) and writes o (and lse): m and l in base 2, acc unnormalized.
void finish(const Ctx& c, int64_t row, int64_t head, float m, float l, float* acc) {
  const AttentionArgs& a = *c.args;
  if (c.plan->desc.has_sinks) {
    const float sink = a.sinks.data_as<float>()[head * a.sinks.strides[0]] * kLog2e;
    const float m_new = std::max(m, sink);
    l = l * std::exp2(m - m_new) + std::exp2(sink - m_new);
    const float alpha = std::exp2(m - m_new);
    for (int64_t d = 0; d < c.dim_v; ++d) acc[d] *= alpha;
    m = m_new;
  }
  const float inv = 1.0f / l;
  for (int64_t d = 0; d < c.dim_v; ++d) acc[d] *= inv;
  auto* o = static_cast<std::byte*>(a.o.data) + (row * a.o.strides[0] + head * a.o.strides[1]) *
                                                    static_cast<int64_t>(size_of(a.o.dtype));
  from_float(acc, a.o.dtype, o, static_cast<size_t>(c.dim_v));
  if (a.lse.data != nullptr) {
    a.lse.data_as<float>()[row * a.lse.strides[0] + head * a.lse.strides[1]] =
        (m + std::log2(l)) * kLn2;
  }
}

void run_item(const Ctx& c, int64_t item) {
  const AttentionArgs& a = *c.args;
  const auto batch = static_cast<int64_t>(a.seq_lens.size());
  const int64_t b = std::upper_bound(c.prefix, c.prefix + batch + 1, item) - c.prefix - 1;
  const SeqInfo s = seq_info(c, b);
  int64_t local = item - c.prefix[b];
  const int64_t chunk = local % s.chunks;
  local /= s.chunks;
  const int64_t tile = local % s.tiles;
  const int64_t h = local / s.tiles;

  const int64_t r_begin = tile * c.tile_rows;
  const int64_t nrows = std::min(c.tile_rows, s.queries * c.group - r_begin);
  alignas(64) float qf[kMaxRows * kMaxDim];
  alignas(64) float acc[kMaxRows * kMaxDim];
  alignas(64) float sc[kMaxRows * kRunRows];
  float m[kMaxRows];
  float l[kMaxRows];
  int64_t pos[kMaxRows];
  int64_t min_pos = std::numeric_limits<int64_t>::max();
  int64_t max_pos = 0;
  const auto q_elem = static_cast<int64_t>(size_of(a.q.dtype));
  for (int64_t j = 0; j < nrows; ++j) {
    const int64_t i = (r_begin + j) / c.group;
    const int64_t head = h * c.group + (r_begin + j) % c.group;
    pos[j] = s.len - s.queries + i;
    min_pos = std::min(min_pos, pos[j]);
    max_pos = std::max(max_pos, pos[j]);
    const auto* src = static_cast<const std::byte*>(a.q.data) +
                      ((s.row0 + i) * a.q.strides[0] + head * a.q.strides[1]) * q_elem;
    float* dst = qf + j * c.dim;
    to_float(a.q.dtype, src, dst, static_cast<size_t>(c.dim));
    for (int64_t d = 0; d < c.dim; ++d) dst[d] *= c.q_scale;
    m[j] = kNegInf;
    l[j] = 0.0f;
  }
  std::fill(acc, acc + nrows * c.dim_v, 0.0f);

  const int64_t abs_chunk = s.chunk0 + chunk;
  const int64_t chunk_lo = std::max(abs_chunk * c.chunk, s.key_lo);
  const int64_t hi = std::min({(abs_chunk + 1) * c.chunk, s.len, max_pos + 1});
  // The window's keys, and before them the sinks (empty without sinks).
  const int64_t lo = c.window > 0 ? std::max(chunk_lo, min_pos - c.window + 1) : chunk_lo;
  const int64_t sink_hi = std::min({hi, c.sink, lo});
  for (int64_t t0 = chunk_lo < sink_hi ? chunk_lo : lo; t0 < hi;) {
    const int64_t end = t0 < sink_hi ? sink_hi : hi;
    const int64_t n = run_length(c, t0, end);
    if (c.page_size > 0 && t0 + n < end) {
      // The next page is anywhere in the pool: start its loads while this one computes.
      const int64_t n2 = run_length(c, t0 + n, end);
      prefetch_rows(rows_at(c, true, b, h, t0 + n, n2), c.k_elem);
      prefetch_rows(rows_at(c, false, b, h, t0 + n, n2), c.v_elem);
    }
    c.kernels.score(qf, nrows, rows_at(c, true, b, h, t0, n), sc);
    RunUpdate u{sc, n, nrows, t0, pos, m, l, acc, c.dim_v, c.cap2, c.window, c.sink, false};
    // Every row sees every key of the run: no mask needed.
    u.all_visible =
        t0 + n - 1 <= min_pos && (c.window == 0 || t0 > max_pos - c.window || t0 + n <= c.sink);
    c.update(u);
    c.kernels.accumulate(sc, nrows, rows_at(c, false, b, h, t0, n), acc);
    t0 += n;
    if (t0 == sink_hi) t0 = std::max(t0, lo);  // from the sinks to the window
  }

  for (int64_t j = 0; j < nrows; ++j) {
    const int64_t row = s.row0 + (r_begin + j) / c.group;
    const int64_t head = h * c.group + (r_begin + j) % c.group;
    if (s.chunks == 1) {
      finish(c, row, head, m[j], l[j], acc + j * c.dim_v);
    } else {
      float* p = partial_at(c, row, head, chunk);
      p[0] = m[j];
      p[1] = l[j];
      std::copy(acc + j * c.dim_v, acc + (j + 1) * c.dim_v, p + 2);
    }
  }
}

// Merges the chunks of (row, head) of a sequence with more than one chunk.
void merge(const Ctx& c, int64_t row, int64_t head, int64_t chunks) {
  float m = kNegInf;
  for (int64_t k = 0; k < chunks; ++k) m = std::max(m, partial_at(c, row, head, k)[0]);
  alignas(64) float acc[kMaxDim] = {};
  float l = 0.0f;
  for (int64_t k = 0; k < chunks; ++k) {
    const float* p = partial_at(c, row, head, k);
    if (p[0] == kNegInf) continue;  // a chunk past every key the tile's queries see
    const float w = std::exp2(p[0] - m);
    l += p[1] * w;
    for (int64_t d = 0; d < c.dim_v; ++d) acc[d] += p[2 + d] * w;
  }
  finish(c, row, head, m, l, acc);
}

void parallel(ThreadPool* pool, int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (pool != nullptr && pool->num_threads() > 1 && n > 1) {
    pool->parallel_for(n, fn);
  } else if (n > 0) {
    fn(0, n);
  }
}

size_t align64(size_t n) { return (n + 63) / 64 * 64; }

}  // namespace

AttentionRowKernels portable_attention_rows() {
  return AttentionRowKernels{score_any, accumulate_any, "portable"};
}

bool attention_avx512_usable() {
  static const bool usable = cpu_supports(CpuIsa::avx512) && avx512_attention_rows_self_test();
  return usable;
}

size_t attention_workspace_size(const detail::AttentionPlanState& plan) {
  const AttentionDesc& d = plan.desc;
  const int64_t rows = plan.extend ? d.max_q_tokens : d.max_batch;
  size_t bytes = 64;  // room to align the start
  bytes += align64(static_cast<size_t>(d.max_batch + 1) * sizeof(int64_t));
  if (plan.max_chunks > 1) {
    bytes += static_cast<size_t>(rows * d.num_q_heads * plan.max_chunks * (d.kv.dim_v() + 2)) *
             sizeof(float);
  }
  return bytes;
}

void run_attention(const detail::AttentionPlanState& plan, const AttentionArgs& args,
                   std::span<std::byte> workspace, ThreadPool* pool) {
  const AttentionDesc& d = plan.desc;
  const auto batch = static_cast<int64_t>(args.seq_lens.size());
  if (batch == 0) return;
  Ctx c;
  c.plan = &plan;
  c.args = &args;
  c.kernels = portable_attention_rows();
#if defined(__x86_64__)
  if (plan.avx512) {
    c.kernels = avx512_attention_rows();
    c.update = update_rows_avx512;
  }
#endif
  c.hq = d.num_q_heads;
  c.hkv = d.kv.num_kv_heads;
  c.group = c.hq / c.hkv;
  c.dim = d.kv.head_dim;
  c.dim_v = d.kv.dim_v();
  c.tile_rows = c.group <= kMaxRows ? kMaxRows / c.group * c.group : kMaxRows;
  const float scale = d.scale > 0.0f ? d.scale : 1.0f / std::sqrt(static_cast<float>(c.dim));
  c.q_scale = scale * kLog2e;
  c.cap2 = d.soft_cap * kLog2e;
  c.window = d.window;
  c.sink = d.sink_tokens;
  c.chunk = plan.chunk;
  auto addr = reinterpret_cast<uintptr_t>(workspace.data());
  auto* base = workspace.data() + (align64(addr) - addr);
  c.prefix = reinterpret_cast<int64_t*>(base);
  c.partials = reinterpret_cast<float*>(
      base + align64(static_cast<size_t>(d.max_batch + 1) * sizeof(int64_t)));
  c.k_elem = size_of(d.kv.k_dtype);
  c.v_elem = size_of(d.kv.v_dtype);
  if (d.pages) {
    const TensorView& kp = args.paged.k_pages;
    const TensorView& vp = args.paged.v_pages;
    c.page_size = d.pages->page_size;
    const ops::PoolStrides ks = ops::pool_strides(*d.pages, c.hkv, c.dim);
    const ops::PoolStrides vs = ops::pool_strides(*d.pages, c.hkv, c.dim_v);
    const ops::PoolStrides ss = ops::pool_strides(*d.pages, c.hkv, 1);
    c.k_base = static_cast<std::byte*>(kp.data);
    c.v_base = static_cast<std::byte*>(vp.data);
    c.ks_base = args.paged.k_scales.data_as<const float>();
    c.vs_base = args.paged.v_scales.data_as<const float>();
    c.k_seq = ks.page, c.k_row = ks.slot, c.k_head = ks.head;
    c.v_seq = vs.page, c.v_row = vs.slot, c.v_head = vs.head;
    c.ks_seq = c.vs_seq = ss.page;
    c.ks_row = c.vs_row = ss.slot;
    c.ks_head = c.vs_head = ss.head;
  } else {
    const ContiguousKV& kv = args.contiguous;
    c.k_base = static_cast<std::byte*>(kv.k.data);
    c.v_base = static_cast<std::byte*>(kv.v.data);
    c.k_seq = kv.k.strides[0], c.k_head = kv.k.strides[1], c.k_row = kv.k.strides[2];
    c.v_seq = kv.v.strides[0], c.v_head = kv.v.strides[1], c.v_row = kv.v.strides[2];
    c.ks_base = kv.k_scales.data_as<const float>();
    c.vs_base = kv.v_scales.data_as<const float>();
    c.ks_seq = kv.k_scales.strides[0], c.ks_head = kv.k_scales.strides[1];
    c.ks_row = kv.k_scales.strides[2];
    c.vs_seq = kv.v_scales.strides[0], c.vs_head = kv.v_scales.strides[1];
    c.vs_row = kv.v_scales.strides[2];
  }

  bool split = false;
  c.prefix[0] = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const SeqInfo s = seq_info(c, b);
    split = split || s.chunks > 1;
    c.prefix[b + 1] = c.prefix[b] + c.hkv * s.tiles * s.chunks;
  }
  const int64_t items = c.prefix[batch];
  // Items are taken one at a time from a shared counter: ragged batches balance themselves.
  std::atomic<int64_t> next{0};
  const int threads = pool != nullptr ? pool->num_threads() : 1;
  parallel(pool, std::min<int64_t>(threads, items), [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) run_item(c, i);
  });
  if (!split) return;
  const int64_t rows = args.q.shape[0];
  parallel(pool, rows * c.hq, [&](int64_t begin, int64_t end) {
    int64_t b = 0;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / c.hq;
      if (plan.extend) {
        while (args.q_indptr[static_cast<size_t>(b + 1)] <= row) ++b;
      } else {
        b = row;
      }
      const SeqInfo s = seq_info(c, b);
      if (s.chunks > 1) merge(c, row, i % c.hq, s.chunks);
    }
  });
}

}  // namespace kvcache::cpu
