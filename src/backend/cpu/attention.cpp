// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// CPU attention: the driver (work split, online softmax, log-sum-exp merge of chunks, threading).
// The row loops are in attention_portable.cpp, attention_avx2.cpp and attention_avx512*.cpp.
//
// Work item = (sequence, kv head, tile of query rows, chunk of keys). A tile holds the rows
// (query, head) of one GQA group, so each K/V row is loaded once for all of them; decode has one
// tile per group unless the group exceeds kMaxRows, and over pages an item takes several kv heads
// (one tile each). Chunks sit at multiples of the plan's chunk size in absolute key positions. An
// item walks its chunk in runs (at most kRunRows keys), calls score() per page and kv head (paged
// 8-bit K/V with the dot-product loops: once per kv head over the run's listed rows,
// run_item<true>), soft-caps and masks, keeps a running max and sum in base 2 (q is pre-multiplied
// by scale * log2(e)) and calls accumulate(). A sequence whose keys fit one chunk writes o
// directly; otherwise each item leaves (max, sum, unnormalized o) in the workspace and a second
// pass merges the chunks by the log-sum-exp rule and adds the sink.

#include "kvcache/attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "kvcache/thread_pool.h"

#include "backend/cpu/attention_avx2.h"
#include "backend/cpu/attention_kernels.h"
#include "ops/paged_checks.h"

#if defined(__x86_64__)
#include "backend/cpu/x86_intrinsics.h"
#endif

namespace kvcache::cpu {
namespace {

constexpr int64_t kMaxRows = 32;    // query rows per tile
constexpr int64_t kMaxDim = 512;    // head_dim and head_dim_v (the op refuses more)
constexpr int64_t kRunRows = 64;    // keys per run
constexpr int64_t kTouchKeys = 32;  // how far ahead touch() starts the hardware prefetcher
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

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

// Soft-cap and mask the logits of row j.
[[gnu::always_inline]] inline void cap_and_mask(const RunUpdate& u, int64_t j, float* srow) {
  if (u.cap2 > 0.0f) {
    for (int64_t t = 0; t < u.n; ++t) srow[t] = u.cap2 * std::tanh(srow[t] / u.cap2);
  }
  if (!u.all_visible) {
    for (int64_t t = 0; t < u.n; ++t) {
      const int64_t key = u.t0 + t;
      if (key > u.pos[j] || (u.window > 0 && key <= u.pos[j] - u.window && key >= u.sink)) {
        srow[t] = kNegInf;
      }
    }
  }
}

// Rescales row j's acc and sum to the new running max mx, then adds sum.
[[gnu::always_inline]] inline void rescale_row(const RunUpdate& u, int64_t j, float mx, float sum) {
  if (mx != u.m[j]) {
    const float alpha = fast_exp2(u.m[j] - mx);
    float* arow = u.acc + j * u.dim_v;
    for (int64_t d = 0; d < u.dim_v; ++d) arow[d] *= alpha;
    u.l[j] *= alpha;
    u.m[j] = mx;
  }
  u.l[j] += sum;
}

[[gnu::always_inline]] inline void update_rows_impl(const RunUpdate& u) {
  const int64_t n = u.n;
  for (int64_t j = 0; j < u.nrows; ++j) {
    float* srow = u.sc + j * n;
    cap_and_mask(u, j, srow);
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
    rescale_row(u, j, mx, sum);
  }
}

void update_rows_portable(const RunUpdate& u) { update_rows_impl(u); }

#if defined(__x86_64__)
#define KV_UPDATE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

// fast_exp2 on 16 lanes, the same steps.
KV_UPDATE_AVX512 inline __m512 fast_exp2_16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
  const __m512 big = _mm512_set1_ps(12582912.0f);
  const __m512 rounded = _mm512_sub_ps(_mm512_add_ps(x, big), big);
  const __m512 f = _mm512_sub_ps(x, rounded);
  __m512 y = _mm512_set1_ps(1.5403530393381606e-4f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3333558146428443e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.6181291076284772e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504108664821580e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022650695910071e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718055994531e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_add_epi32(_mm512_cvttps_epi32(rounded), _mm512_set1_epi32(127));
  return _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(e, 23)));
}

// The same update with AVX-512 intrinsics (used with the AVX-512 row loops only). The compiler's
// vectorization of update_rows_impl ends each row's max and sum with 16 dependent scalar steps
// (perf, dot8 loops in cache: the update took ~14% of the time); here they are tree reductions,
// and the sum adds its lanes in another order (f32, within the stated precision).
KV_UPDATE_AVX512 void update_rows_avx512(const RunUpdate& u) {
  const int64_t n = u.n;
  const auto tail = static_cast<__mmask16>((1u << (n % 16)) - 1u);
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);
  for (int64_t j = 0; j < u.nrows; ++j) {
    float* srow = u.sc + j * n;
    cap_and_mask(u, j, srow);
    __m512 top = _mm512_set1_ps(u.m[j]);
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) top = _mm512_max_ps(_mm512_loadu_ps(srow + t), top);
    if (tail != 0) top = _mm512_max_ps(_mm512_mask_loadu_ps(neg_inf, tail, srow + t), top);
    const float mx = _mm512_reduce_max_ps(top);
    if (mx == kNegInf) {
      std::fill(srow, srow + n, 0.0f);
      continue;
    }
    const __m512 vmx = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= n; t += 16) {
      const __m512 p = fast_exp2_16(_mm512_sub_ps(_mm512_loadu_ps(srow + t), vmx));
      _mm512_storeu_ps(srow + t, p);
      sum = _mm512_add_ps(sum, p);
    }
    if (tail != 0) {
      const __m512 p = fast_exp2_16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, srow + t), vmx));
      _mm512_mask_storeu_ps(srow + t, tail, p);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, p));
    }
    rescale_row(u, j, mx, _mm512_reduce_add_ps(sum));
  }
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
  int64_t heads_per_item = 1;  // kv heads per work item (> 1: decode over pages, one tile each)
  float q_scale = 0.0f;        // scale * log2(e)
  float cap2 = 0.0f;           // soft_cap * log2(e)
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
  int64_t page_size = 0;   // 0: contiguous
  bool same_rows = false;  // K and V rows share dtype and strides
  // Paged 8-bit K/V with the dot-product loops: one call per kv head walks a run of pages.
  ListedRowKernels listed;
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

// Rows from t on that share one stride: never past hi or a page's end.
int64_t segment_length(const Ctx& c, int64_t t, int64_t hi) {
  return c.page_size > 0 ? std::min(hi - t, c.page_size - t % c.page_size) : hi - t;
}

// The rows of a run of keys as offsets into the K/V pools (elements) and their scales, for kv
// head 0: K and V and every kv head share them (listed runs need one layout for K and V).
struct RunList {
  alignas(64) int64_t rows[kRunRows];
  alignas(64) int64_t scales[kRunRows];
  int64_t count = 0;
};

// Keys [t, t + n) of sequence b, page by page. REQUIRES paged K/V, n <= kRunRows.
void list_run(const Ctx& c, int64_t b, int64_t t, int64_t n, RunList& out) {
  const PageTable& pt = c.args->page_table;
  const int32_t* pages = pt.indices.data() + pt.indptr[static_cast<size_t>(b)];
  for (int64_t i = 0; i < n;) {
    const int64_t page = pages[(t + i) / c.page_size];
    const int64_t slot = (t + i) % c.page_size;
    const int64_t m = std::min(n - i, c.page_size - slot);
    for (int64_t j = 0; j < m; ++j) {
      out.rows[i + j] = page * c.k_seq + (slot + j) * c.k_row;
      out.scales[i + j] = page * c.ks_seq + (slot + j) * c.ks_row;
    }
    i += m;
  }
  out.count = n;
}

// Rows of kv head h listed by `list`, K or V; rows walked after them: none.
ListedRows listed_rows(const Ctx& c, bool is_k, int64_t h, const RunList& list) {
  ListedRows r;
  r.dtype = is_k ? c.plan->desc.kv.k_dtype : c.plan->desc.kv.v_dtype;
  r.data = (is_k ? c.k_base : c.v_base) + h * (is_k ? c.k_head : c.v_head);  // 1-byte elements
  r.offsets = list.rows;
  const float* sb = is_k ? c.ks_base : c.vs_base;
  if (sb != nullptr) {
    r.scales = sb + h * (is_k ? c.ks_head : c.vs_head);
    r.scale_offsets = list.scales;
  }
  r.count = list.count;
  r.dim = is_k ? c.dim : c.dim_v;
  r.apart = c.k_row > c.dim;
  return r;
}

// Prefetches into L2 the scale lines of kv heads [h, h + nh) for the keys of `list` (keys [t,
// t + list.count)), page by page: the loops fetch a row's scale only where the walk
// enters `next`, not where a run crosses into another page.
void prefetch_run_scales(const Ctx& c, int64_t t, int64_t h, int64_t nh, const RunList& list) {
  if (c.ks_base == nullptr) return;
  for (int64_t i = 0; i < list.count; i += segment_length(c, t + i, t + list.count)) {
    const int64_t m = segment_length(c, t + i, t + list.count);
    for (const float* base : {c.ks_base, c.vs_base}) {
      if (base == nullptr) continue;
      // the page's scales of these slots and heads: one block from (slot i, head h) on
      const auto* first = reinterpret_cast<const char*>(base + list.scales[i] + h * c.ks_head);
      const auto* last =
          reinterpret_cast<const char*>(base + list.scales[i + m - 1] + (h + nh - 1) * c.ks_head);
      for (const char* p = first; p < last; p += 64) __builtin_prefetch(p, 0, 2);
      __builtin_prefetch(last, 0, 2);
    }
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

template <bool kListed>
void run_item(const Ctx& c, int64_t item) {
  const AttentionArgs& a = *c.args;
  const auto batch = static_cast<int64_t>(a.seq_lens.size());
  const int64_t b = std::upper_bound(c.prefix, c.prefix + batch + 1, item) - c.prefix - 1;
  const SeqInfo s = seq_info(c, b);
  int64_t local = item - c.prefix[b];
  const int64_t chunk = local % s.chunks;
  local /= s.chunks;
  const int64_t tile = local % s.tiles;
  // kv heads [h_lo, h_lo + nh): one tile each (tiles == 1 when heads_per_item > 1)
  const int64_t h_lo = local / s.tiles * c.heads_per_item;
  const int64_t nh = std::min(c.heads_per_item, c.hkv - h_lo);

  const int64_t r_begin = tile * c.tile_rows;
  const int64_t rows_h = std::min(c.tile_rows, s.queries * c.group - r_begin);  // per kv head
  const int64_t nrows = nh * rows_h;  // row j: kv head h_lo + j / rows_h, tile row j % rows_h
  alignas(64) float qf[kMaxRows * kMaxDim];
  alignas(64) float acc[kMaxRows * kMaxDim];
  alignas(64) float sc[kMaxRows * kRunRows];
  alignas(64) float seg[kMaxRows * kRunRows];
  float m[kMaxRows];
  float l[kMaxRows];
  int64_t pos[kMaxRows];
  int64_t min_pos = std::numeric_limits<int64_t>::max();
  int64_t max_pos = 0;
  const auto q_elem = static_cast<int64_t>(size_of(a.q.dtype));
  const auto row_of = [&](int64_t j) { return s.row0 + (r_begin + j % rows_h) / c.group; };
  const auto head_of = [&](int64_t j) {
    return (h_lo + j / rows_h) * c.group + (r_begin + j % rows_h) % c.group;
  };
  for (int64_t j = 0; j < nrows; ++j) {
    pos[j] = s.len - s.queries + (row_of(j) - s.row0);
    min_pos = std::min(min_pos, pos[j]);
    max_pos = std::max(max_pos, pos[j]);
    const auto* src = static_cast<const std::byte*>(a.q.data) +
                      (row_of(j) * a.q.strides[0] + head_of(j) * a.q.strides[1]) * q_elem;
    float* dst = qf + j * c.dim;
    to_float(a.q.dtype, src, dst, static_cast<size_t>(c.dim));
    for (int64_t d = 0; d < c.dim; ++d) dst[d] *= c.q_scale;
    if (c.kernels.prepare_q != nullptr) c.kernels.prepare_q(dst, c.dim);
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
    const int64_t n = std::min(kRunRows, end - t0);
    // The row loops go page by page and, within a page, kv head by kv head (in memory order),
    // through `seg` ([rows_h, page] logits or weights) unless one call covers the run; the
    // softmax update runs once per run for all rows.
    // K or V rows of (kv head h_lo + k, keys [t, t + count)) and the rows walked after them: the
    // same keys of the next kv head, else the next page of the run; after the run's last K rows,
    // its first V rows, and after its last V rows, the next run's K rows (when K and V rows have
    // one layout: the loops prefetch `next` with the current rows' stride and dtype). The loops
    // prefetch into those as these end, so the switch between K and V and between pages does not
    // wait on memory.
    const auto walk_rows = [&](bool is_k, int64_t k, int64_t t, int64_t count) {
      KVRows r = rows_at(c, is_k, b, h_lo + k, t, count);
      KVRows next;
      if (k + 1 < nh) {
        next = rows_at(c, is_k, b, h_lo + k + 1, t, count);
      } else if (t + count < t0 + n) {
        next = rows_at(c, is_k, b, h_lo, t + count, segment_length(c, t + count, t0 + n));
      } else if (c.same_rows && is_k) {
        next = rows_at(c, false, b, h_lo, t0, segment_length(c, t0, t0 + n));
      } else if (c.same_rows && t0 + n < end) {
        next =
            rows_at(c, true, b, h_lo, t0 + n, std::min(kRunRows, segment_length(c, t0 + n, end)));
      } else if (!c.same_rows && c.page_size > 0 && t + count < end) {
        next = rows_at(c, is_k, b, h_lo, t + count,
                       std::min(kRunRows, segment_length(c, t + count, end)));
      }
      r.next = next.data;
      r.next_scales = next.scales;
      r.next_count = next.count;
      return r;
    };
    // Touches one line per 4 KB of the rows kTouchKeys ahead (kv heads [h_lo, h_lo + nh), into
    // L2): each touch starts the hardware prefetcher on that 4 KB page long before the loops
    // reach it. NHD pages got this from the loops' own prefetch (a page's head spans all of its
    // 4 KB pages); HND pages and contiguous caches read one sequential stream and did not. The
    // range stays small: paged items' heads share one page, contiguous items have one head.
    const auto touch = [&](bool is_k, int64_t t) {
      const int64_t ta = t + kTouchKeys;
      if (ta >= end) return;
      const int64_t cnt = std::min(kRunRows, segment_length(c, ta, end));
      const auto* first = static_cast<const char*>(rows_at(c, is_k, b, h_lo, ta, 1).data);
      const auto* last =
          static_cast<const char*>(rows_at(c, is_k, b, h_lo + nh - 1, ta + cnt - 1, 1).data);
      for (const char* p = first; p < last; p += 4096) __builtin_prefetch(p, 0, 2);
      __builtin_prefetch(last, 0, 2);
    };
    // The online softmax over the run's logits in sc.
    const auto update_run = [&] {
      RunUpdate u{sc, n, nrows, t0, pos, m, l, acc, c.dim_v, c.cap2, c.window, c.sink, false};
      // Every row sees every key of the run: no mask needed.
      u.all_visible =
          t0 + n - 1 <= min_pos && (c.window == 0 || t0 > max_pos - c.window || t0 + n <= c.sink);
      c.update(u);
    };
    if constexpr (kListed) {
      // One call per kv head over the whole run (every page of it); the lists of this run and of
      // the next (after its last V rows the loops prefetch the next run's first K rows).
      RunList cur;
      RunList nxt;
      list_run(c, b, t0, n, cur);
      int64_t t1 = t0 + n;
      if (t1 == sink_hi) t1 = std::max(t1, lo);
      if (t1 < hi) {
        list_run(c, b, t1, std::min(kRunRows, (t1 < sink_hi ? sink_hi : hi) - t1), nxt);
        prefetch_run_scales(c, t1, h_lo, nh, nxt);
      }
      const auto walk = [&](bool is_k, int64_t k) {
        ListedRows r = listed_rows(c, is_k, h_lo + k, cur);
        ListedRows next;
        if (k + 1 < nh) {
          next = listed_rows(c, is_k, h_lo + k + 1, cur);
        } else if (is_k) {
          next = listed_rows(c, false, h_lo, cur);
        } else {
          next = listed_rows(c, true, h_lo, nxt);
        }
        r.next = next.data;
        r.next_offsets = next.offsets;
        r.next_scales = next.scales;
        r.next_scale_offsets = next.scale_offsets;
        r.next_count = next.count;
        return r;
      };
      for (int64_t t = t0; t < t0 + n; t += segment_length(c, t, t0 + n)) touch(true, t);
      for (int64_t k = 0; k < nh; ++k) {
        c.listed.score(qf + k * rows_h * c.dim, rows_h, walk(true, k), sc + k * rows_h * n);
      }
      update_run();
      for (int64_t t = t0; t < t0 + n; t += segment_length(c, t, t0 + n)) touch(false, t);
      for (int64_t k = 0; k < nh; ++k) {
        c.listed.accumulate(sc + k * rows_h * n, rows_h, walk(false, k),
                            acc + k * rows_h * c.dim_v);
      }
    } else {
      const bool direct = nh == 1 && segment_length(c, t0, t0 + n) == n;
      if (direct) {
        touch(true, t0);
        c.kernels.score(qf, nrows, walk_rows(true, 0, t0, n), sc);
      } else {
        for (int64_t t = t0, m2 = 0; t < t0 + n; t += m2) {
          m2 = segment_length(c, t, t0 + n);
          touch(true, t);
          for (int64_t k = 0; k < nh; ++k) {
            c.kernels.score(qf + k * rows_h * c.dim, rows_h, walk_rows(true, k, t, m2), seg);
            for (int64_t j = 0; j < rows_h; ++j) {
              std::copy(seg + j * m2, seg + (j + 1) * m2, sc + (k * rows_h + j) * n + (t - t0));
            }
          }
        }
      }
      update_run();
      if (direct) {
        touch(false, t0);
        c.kernels.accumulate(sc, nrows, walk_rows(false, 0, t0, n), acc);
      } else {
        for (int64_t t = t0, m2 = 0; t < t0 + n; t += m2) {
          m2 = segment_length(c, t, t0 + n);
          touch(false, t);
          for (int64_t k = 0; k < nh; ++k) {
            for (int64_t j = 0; j < rows_h; ++j) {
              const float* p = sc + (k * rows_h + j) * n + (t - t0);
              std::copy(p, p + m2, seg + j * m2);
            }
            c.kernels.accumulate(seg, rows_h, walk_rows(false, k, t, m2),
                                 acc + k * rows_h * c.dim_v);
          }
        }
      }
    }
    t0 += n;
    if (t0 == sink_hi) t0 = std::max(t0, lo);  // from the sinks to the window
  }

  for (int64_t j = 0; j < nrows; ++j) {
    if (s.chunks == 1) {
      finish(c, row_of(j), head_of(j), m[j], l[j], acc + j * c.dim_v);
    } else {
      float* p = partial_at(c, row_of(j), head_of(j), chunk);
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

bool attention_avx512_usable() {
  static const bool usable = cpu_supports(CpuIsa::avx512) && avx512_attention_rows_self_test();
  return usable;
}

bool attention_dot8_applies(const AttentionDesc& desc) {
  return avx512_dot8_attention_rows_self_test() &&
         (dot8_applies(desc.kv.k_dtype, desc.kv.head_dim) ||
          dot8_applies(desc.kv.v_dtype, desc.kv.dim_v()));
}

bool attention_avx2_usable() {
  static const bool usable = cpu_supports(CpuIsa::avx2) && avx2_attention_rows_self_test();
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
  if (plan.isa == CpuIsa::avx512) {
    c.kernels = plan.dot8 ? avx512_dot8_attention_rows(d.kv.k_dtype, d.kv.head_dim)
                          : avx512_attention_rows();
    c.update = update_rows_avx512;
  }
  if (plan.isa == CpuIsa::avx2) c.kernels = avx2_attention_rows();
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

  c.same_rows = c.k_elem == c.v_elem && c.dim == c.dim_v && c.k_row == c.v_row &&
                c.ks_row == c.vs_row && d.kv.k_dtype == d.kv.v_dtype;
  // Paged 8-bit K and V with the dot-product loops: one call per kv head walks a whole run of
  // pages (listed rows). Every other case calls the strided loops per page.
  if (plan.isa == CpuIsa::avx512 && plan.dot8 && d.pages && c.same_rows && c.k_seq == c.v_seq &&
      c.k_head == c.v_head && dot8_applies(d.kv.k_dtype, c.dim)) {
    c.listed = avx512_dot8_listed_rows(d.kv.k_dtype);
  }
  const int threads = pool != nullptr ? pool->num_threads() : 1;
  // Decode over pages: one item takes several kv heads, so a page (all heads of its slots, in
  // either layout) is read as one block by one thread, not in per-head slices by several threads
  // at different times (NHD measured ~30% faster); as many heads as leave >= 4 items per thread.
  // Contiguous caches keep one head per item (8 concurrent streams per thread measured slower).
  if (!plan.extend && d.pages && c.group <= kMaxRows) {
    int64_t chunks = 0;
    for (int64_t b = 0; b < batch; ++b) chunks += seq_info(c, b).chunks;
    for (int64_t k = std::min(c.hkv, kMaxRows / c.group); k > 1; k /= 2) {
      if (chunks * ((c.hkv + k - 1) / k) >= 4 * threads) {
        c.heads_per_item = k;
        break;
      }
    }
  }
  const int64_t head_groups = (c.hkv + c.heads_per_item - 1) / c.heads_per_item;
  bool split = false;
  c.prefix[0] = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const SeqInfo s = seq_info(c, b);
    split = split || s.chunks > 1;
    c.prefix[b + 1] = c.prefix[b] + head_groups * s.tiles * s.chunks;
  }
  const int64_t items = c.prefix[batch];
  // Items are taken one at a time from a shared counter: ragged batches balance themselves.
  std::atomic<int64_t> next{0};
  parallel(pool, std::min<int64_t>(threads, items), [&](int64_t, int64_t) {
    if (c.listed.score != nullptr) {
      for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) run_item<true>(c, i);
    } else {
      for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) run_item<false>(c, i);
    }
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
