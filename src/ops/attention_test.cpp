// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/thread_pool.h"

#include "ops/quantize.h"
#include "reference/attention.h"
#include "reference/element.h"
#include "testing/test_util.h"

namespace kvcache {
namespace {

using testing::has_error;
using testing::seed_trace;
using testing::test_seed;

// One attention problem: the K/V of every sequence as floats, stored (quantized if asked) in a
// contiguous cache AND in a page pool with the same bytes per row, plus q, outputs and sinks.
struct Config {
  int64_t hq = 4;
  int64_t hkv = 2;
  int64_t dim = 8;
  int64_t dim_v = 0;
  DType k = DType::bf16;
  DType v = DType::bf16;
  DType q = DType::f32;
  DType o = DType::f32;
  std::vector<int32_t> seq_lens = {5, 17, 1};
  std::vector<int32_t> q_counts;  // extend when given (one per sequence)
  int64_t page_size = 0;          // 0: contiguous
  PageLayout layout = PageLayout::nhd;
  bool token_major = false;  // contiguous caches laid out [B, cap, H, D] in memory
  float scale = 0.0f;
  float soft_cap = 0.0f;
  int64_t window = 0;
  int64_t sink_tokens = 0;
  bool sinks = false;
  int64_t chunk = 0;
  int64_t max_seq_len = 0;  // 0: the longest sequence
};

float nonzero_uniform(std::mt19937& rng, float lo, float hi) {
  for (;;) {
    const float x = std::uniform_real_distribution<float>(lo, hi)(rng);
    if (x != 0.0f) return x;
  }
}

// Stores a float row as dtype (quantized rows return their scale).
float store_row(const float* x, int64_t n, DType dtype, void* dst) {
  if (dtype == DType::int8) return ops::quantize_row(x, n, static_cast<int8_t*>(dst));
  if (dtype == DType::fp8_e4m3) return ops::quantize_row(x, n, static_cast<fp8_e4m3_t*>(dst));
  from_float(x, dtype, dst, static_cast<size_t>(n));
  return 1.0f;
}

class Problem {
 public:
  Problem(const Config& cfg, std::mt19937& rng) : cfg_(cfg) {
    const auto batch = static_cast<int64_t>(cfg.seq_lens.size());
    const int64_t dv = cfg.dim_v == 0 ? cfg.dim : cfg.dim_v;
    const int64_t longest = *std::max_element(cfg.seq_lens.begin(), cfg.seq_lens.end());
    cap_ = longest + 2;
    desc_.num_q_heads = cfg.hq;
    desc_.kv = KVFormat{cfg.hkv, cfg.dim, cfg.dim_v, cfg.k, cfg.v};
    desc_.q_dtype = cfg.q;
    desc_.o_dtype = cfg.o;
    desc_.scale = cfg.scale;
    desc_.soft_cap = cfg.soft_cap;
    desc_.window = cfg.window;
    desc_.sink_tokens = cfg.sink_tokens;
    desc_.has_sinks = cfg.sinks;
    desc_.max_batch = batch;
    desc_.max_seq_len = cfg.max_seq_len > 0 ? cfg.max_seq_len : longest;
    desc_.chunk_size = cfg.chunk;
    rows_ = batch;
    if (!cfg.q_counts.empty()) {
      q_indptr_.push_back(0);
      for (int32_t n : cfg.q_counts) q_indptr_.push_back(q_indptr_.back() + n);
      rows_ = q_indptr_.back();
      desc_.max_q_tokens = std::max<int64_t>(1, rows_);
    }
    // Pages: each sequence gets ceil(len / page_size) + 1 pages, shuffled over the pool.
    if (cfg.page_size > 0) {
      page_indptr_.push_back(0);
      for (int32_t len : cfg.seq_lens) {
        page_indptr_.push_back(page_indptr_.back() +
                               static_cast<int32_t>((len + cfg.page_size - 1) / cfg.page_size + 1));
      }
      const int64_t num_pages = page_indptr_.back() + 3;
      std::vector<int32_t> perm(static_cast<size_t>(num_pages));
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      page_indices_.assign(perm.begin(), perm.begin() + page_indptr_.back());
      pages_ = PageFormat{num_pages, cfg.page_size, cfg.layout};
      desc_.pages = pages_;
    }
    // Unused cells hold NaN (0xff bytes; int8 -1 with a NaN scale): reading one shows.
    const auto alloc = [](std::vector<uint8_t>& buf, size_t n) { buf.assign(n, 0xff); };
    const int64_t cells_c = batch * cap_ * cfg.hkv;
    const int64_t cells_p = pages_ ? pages_->num_pages * cfg.page_size * cfg.hkv : 0;
    for (int side = 0; side < 2; ++side) {
      const DType dt = side == 0 ? cfg.k : cfg.v;
      const int64_t dim = side == 0 ? cfg.dim : dv;
      alloc(cont_[side], static_cast<size_t>(cells_c * dim) * size_of(dt));
      alloc(cont_scales_[side], static_cast<size_t>(cells_c) * 4);
      alloc(pool_[side], static_cast<size_t>(cells_p * dim) * size_of(dt));
      alloc(pool_scales_[side], static_cast<size_t>(cells_p) * 4);
      std::vector<float> row(static_cast<size_t>(dim));
      std::vector<uint8_t> stored(static_cast<size_t>(dim) * size_of(dt));
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t t = 0; t < cfg.seq_lens[static_cast<size_t>(b)]; ++t) {
          for (int64_t h = 0; h < cfg.hkv; ++h) {
            for (float& x : row) x = nonzero_uniform(rng, -1.0f, 1.0f);
            originals_[side].insert(originals_[side].end(), row.begin(), row.end());
            const float sc = store_row(row.data(), dim, dt, stored.data());
            put(cont_[side], cont_scales_[side], contiguous_cell(b, h, t), dim, dt, stored, sc);
            if (pages_)
              put(pool_[side], pool_scales_[side], paged_cell(b, h, t), dim, dt, stored, sc);
          }
        }
      }
    }
    q_.resize(static_cast<size_t>(rows_ * cfg.hq * cfg.dim) * size_of(cfg.q));
    std::vector<float> qf(static_cast<size_t>(rows_ * cfg.hq * cfg.dim));
    for (float& x : qf) x = nonzero_uniform(rng, -1.0f, 1.0f);
    from_float(qf.data(), cfg.q, q_.data(), qf.size());
    for (int64_t h = 0; h < cfg.hq; ++h) sinks_.push_back(nonzero_uniform(rng, 0.5f, 2.5f));
    o_.resize(static_cast<size_t>(rows_ * cfg.hq * dv) * size_of(cfg.o));
    lse_.resize(static_cast<size_t>(rows_ * cfg.hq));
    poison();
  }

  void poison() {
    std::fill(o_.begin(), o_.end(), 0x7f);
    std::fill(lse_.begin(), lse_.end(), std::nanf(""));
  }

  [[nodiscard]] const AttentionDesc& desc() const { return desc_; }
  // Reads the page pool (when the config has pages) or the contiguous cache.
  void use_pages(bool on) { desc_.pages = on ? pages_ : std::nullopt; }
  [[nodiscard]] const Config& config() const { return cfg_; }

  // The arguments; as_paged picks the page pool (desc().pages set) or the contiguous cache.
  AttentionArgs args() {
    const int64_t dv = desc_.kv.dim_v();
    const auto batch = static_cast<int64_t>(cfg_.seq_lens.size());
    AttentionArgs a;
    a.q = TensorView::contiguous(q_.data(), cfg_.q, {rows_, cfg_.hq, cfg_.dim});
    a.o = TensorView::contiguous(o_.data(), cfg_.o, {rows_, cfg_.hq, dv});
    a.lse = TensorView::contiguous(lse_.data(), DType::f32, {rows_, cfg_.hq});
    a.q_indptr = q_indptr_;
    a.seq_lens = cfg_.seq_lens;
    if (cfg_.sinks) a.sinks = TensorView::contiguous(sinks_.data(), DType::f32, {cfg_.hq});
    for (int side = 0; side < 2; ++side) {
      const DType dt = side == 0 ? cfg_.k : cfg_.v;
      const int64_t dim = side == 0 ? cfg_.dim : dv;
      TensorView data = contiguous_view(cont_[side].data(), dt, batch, dim);
      TensorView scales;
      if (is_quantized(dt))
        scales = contiguous_view(cont_scales_[side].data(), DType::f32, batch, 1);
      (side == 0 ? a.contiguous.k : a.contiguous.v) = data;
      (side == 0 ? a.contiguous.k_scales : a.contiguous.v_scales) = scales;
      if (!pages_) continue;
      const int64_t n = pages_->num_pages;
      const int64_t p = cfg_.page_size;
      const bool nhd = cfg_.layout == PageLayout::nhd;
      (side == 0 ? a.paged.k_pages : a.paged.v_pages) =
          TensorView::contiguous(pool_[side].data(), dt,
                                 nhd ? std::initializer_list<int64_t>{n, p, cfg_.hkv, dim}
                                     : std::initializer_list<int64_t>{n, cfg_.hkv, p, dim});
      if (is_quantized(dt)) {
        (side == 0 ? a.paged.k_scales : a.paged.v_scales) =
            TensorView::contiguous(pool_scales_[side].data(), DType::f32,
                                   nhd ? std::initializer_list<int64_t>{n, p, cfg_.hkv}
                                       : std::initializer_list<int64_t>{n, cfg_.hkv, p});
      }
    }
    a.page_table = PageTable{page_indptr_, page_indices_};
    return a;
  }

  // Output element i of o as a double; lse element i.
  [[nodiscard]] double o_at(size_t i) const {
    return reference::read_element(o_.data(), cfg_.o, static_cast<int64_t>(i));
  }
  [[nodiscard]] double lse_at(size_t i) const { return lse_[i]; }
  [[nodiscard]] size_t o_size() const { return o_.size() / size_of(cfg_.o); }
  // o, lse and q: what a refused call must leave alone.
  [[nodiscard]] std::vector<uint8_t> output_bytes() const {
    std::vector<uint8_t> bytes(o_);
    bytes.insert(bytes.end(), q_.begin(), q_.end());
    const auto* l = reinterpret_cast<const uint8_t*>(lse_.data());
    bytes.insert(bytes.end(), l, l + lse_.size() * sizeof(float));
    return bytes;
  }
  // The float originals (before storage) of side 0 (K) or 1 (V), in generation order.
  [[nodiscard]] const std::vector<float>& originals(int side) const { return originals_[side]; }

 private:
  int64_t contiguous_cell(int64_t b, int64_t h, int64_t t) const {
    return cfg_.token_major ? (b * cap_ + t) * cfg_.hkv + h : (b * cfg_.hkv + h) * cap_ + t;
  }
  int64_t paged_cell(int64_t b, int64_t h, int64_t t) const {
    const int64_t page = page_indices_[static_cast<size_t>(page_indptr_[static_cast<size_t>(b)] +
                                                           t / cfg_.page_size)];
    const int64_t slot = t % cfg_.page_size;
    return cfg_.layout == PageLayout::nhd ? (page * cfg_.page_size + slot) * cfg_.hkv + h
                                          : (page * cfg_.hkv + h) * cfg_.page_size + slot;
  }
  static void put(std::vector<uint8_t>& data, std::vector<uint8_t>& scales, int64_t cell,
                  int64_t dim, DType dt, const std::vector<uint8_t>& stored, float sc) {
    std::memcpy(data.data() + static_cast<size_t>(cell * dim) * size_of(dt), stored.data(),
                stored.size());
    std::memcpy(scales.data() + static_cast<size_t>(cell) * 4, &sc, 4);
  }
  // [batch, hkv, cap, dim] over head-major or token-major storage.
  TensorView contiguous_view(void* data, DType dt, int64_t batch, int64_t dim) const {
    TensorView t = TensorView::contiguous(data, dt, {batch, cfg_.hkv, cap_, dim});
    if (cfg_.token_major) t.strides = {cap_ * cfg_.hkv * dim, dim, cfg_.hkv * dim, 1, 0, 0};
    if (dim == 1) {  // scales: [batch, hkv, cap]
      t.rank = 3;
      t.shape = {batch, cfg_.hkv, cap_, 0, 0, 0};
      t.strides = cfg_.token_major
                      ? std::array<int64_t, kMaxRank>{cap_ * cfg_.hkv, 1, cfg_.hkv, 0, 0, 0}
                      : std::array<int64_t, kMaxRank>{cfg_.hkv * cap_, cap_, 1, 0, 0, 0};
    }
    return t;
  }

  Config cfg_;
  AttentionDesc desc_;
  std::optional<PageFormat> pages_;
  int64_t cap_ = 0;
  int64_t rows_ = 0;
  std::vector<int32_t> q_indptr_, page_indptr_, page_indices_;
  std::vector<uint8_t> cont_[2], cont_scales_[2], pool_[2], pool_scales_[2];
  std::vector<float> originals_[2];
  std::vector<uint8_t> q_, o_;
  std::vector<float> lse_;
  std::vector<float> sinks_;
};

// The ISAs this CPU runs for attention: portable, and avx2 / avx512 when usable.
std::vector<CpuIsa> isas() {
  std::vector<CpuIsa> out = {CpuIsa::portable};
  AttentionDesc d;
  d.num_q_heads = 1;
  d.kv = KVFormat{1, 4};
  d.max_seq_len = 1;
  for (CpuIsa isa : {CpuIsa::avx2, CpuIsa::avx512}) {
    if (cpu_supports(isa) && DecodeAttentionPlan::select(d, Device::cpu(), isa).ok()) {
      out.push_back(isa);
    }
  }
  return out;
}

// Runs the problem (poisoned outputs) with the plan for its desc; fills got with o and lse.
template <class Plan>
Status run_problem(Problem& p, CpuIsa isa, ThreadPool* pool, std::vector<double>* got) {
  Result<Plan> plan = Plan::select(p.desc(), Device::cpu(), isa);
  if (!plan.ok()) return plan.status();
  std::vector<std::byte> ws(plan->workspace_size());
  p.poison();
  Stream stream;
  stream.pool = pool;
  if (Status s = plan->run(stream, ws, p.args()); !s.ok()) return s;
  got->clear();
  for (size_t i = 0; i < p.o_size(); ++i) got->push_back(p.o_at(i));
  const AttentionArgs a = p.args();
  for (int64_t i = 0; i < a.lse.numel(); ++i) got->push_back(p.lse_at(static_cast<size_t>(i)));
  return Status();
}

Status run_any(Problem& p, CpuIsa isa, ThreadPool* pool, std::vector<double>* got) {
  return p.config().q_counts.empty() ? run_problem<DecodeAttentionPlan>(p, isa, pool, got)
                                     : run_problem<ExtendAttentionPlan>(p, isa, pool, got);
}

Precision precision_of(const Problem& p) {
  return DecodeAttentionPlan::select(p.desc()).value().precision();
}

// |got - want| <= abs + rel * |want| for o then lse (want: reference o then lse).
void expect_close(const std::vector<double>& got, const std::vector<double>& want, double abs,
                  double rel, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double worst = 0.0;
  size_t bad = 0;
  size_t first_bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(got[i] - want[i]);
    worst = std::max(worst, err);
    if (!(err <= abs + rel * std::fabs(want[i]))) {
      if (bad++ == 0) first_bad = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": first bad element " << first_bad << " got " << got[first_bad]
                     << " want " << want[first_bad] << "; max error " << worst;
}

std::vector<double> reference_of(Problem& p) {
  reference::AttentionOutput r = reference::attention(p.desc(), p.args());
  r.o.insert(r.o.end(), r.lse.begin(), r.lse.end());
  return r.o;
}

// Every ISA, with and without a pool of 2, against the reference.
void check_problem(const Config& cfg, uint32_t seed, const std::string& what) {
  std::mt19937 rng(seed);
  Problem p(cfg, rng);
  const std::vector<double> want = reference_of(p);
  const Precision prec = precision_of(p);
  ThreadPool pool(2);
  for (CpuIsa isa : isas()) {
    for (ThreadPool* tp : {static_cast<ThreadPool*>(nullptr), &pool}) {
      std::vector<double> got;
      ASSERT_OK(run_any(p, isa, tp, &got));
      expect_close(got, want, prec.abs_tol, prec.rel_tol,
                   what + " isa " + name(isa) + (tp ? " pool 2" : " inline"));
    }
  }
}

TEST(Attention, DecodeMatchesReferenceAcrossDTypes) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  const std::pair<DType, DType> kv[] = {
      {DType::f32, DType::f32},           {DType::f16, DType::f16},
      {DType::bf16, DType::bf16},         {DType::int8, DType::int8},
      {DType::fp8_e4m3, DType::fp8_e4m3}, {DType::int8, DType::bf16},
      {DType::bf16, DType::fp8_e4m3},     {DType::fp8_e4m3, DType::f16}};
  for (auto [k, v] : kv) {
    Config cfg;
    cfg.k = k;
    cfg.v = v;
    cfg.dim = 33;
    cfg.dim_v = 5;
    check_problem(cfg, seed, std::string("k ") + name(k) + " v " + name(v));
  }
  const DType io[] = {DType::f32, DType::f16, DType::bf16};
  for (DType q : io) {
    for (DType o : io) {
      Config cfg;
      cfg.q = q;
      cfg.o = o;
      check_problem(cfg, seed, std::string("q ") + name(q) + " o " + name(o));
    }
  }
}

TEST(Attention, HeadDimsAndGqaRatios) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (int64_t dim : {5, 64, 128, 256}) {
    Config cfg;
    cfg.dim = dim;
    cfg.seq_lens = {9, 2};
    check_problem(cfg, seed, "head_dim " + std::to_string(dim));
  }
  for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{3, 3}, {8, 2}, {7, 1}, {40, 1}}) {
    Config cfg;
    cfg.hq = hq;
    cfg.hkv = hkv;
    cfg.page_size = 3;
    check_problem(cfg, seed, "heads " + std::to_string(hq) + "/" + std::to_string(hkv));
  }
}

TEST(Attention, PagedEqualsContiguousEqualsReference) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (DType dt : {DType::bf16, DType::int8}) {
    for (int64_t page : {16, 3}) {
      for (PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
        Config cfg;
        cfg.k = cfg.v = dt;
        cfg.dim = 64;
        cfg.seq_lens = {40, 7, 1};
        cfg.page_size = page;
        cfg.layout = layout;
        cfg.token_major = layout == PageLayout::nhd;
        std::mt19937 rng(seed);
        Problem p(cfg, rng);  // holds the same rows in its pool and its contiguous cache
        const std::vector<double> want = reference_of(p);
        p.use_pages(false);
        EXPECT_EQ(want, reference_of(p));
        const Precision prec = precision_of(p);
        for (CpuIsa isa : isas()) {
          std::vector<double> a, b;
          p.use_pages(true);
          ASSERT_OK(run_any(p, isa, nullptr, &a));
          p.use_pages(false);
          ASSERT_OK(run_any(p, isa, nullptr, &b));
          const std::string what = std::string(name(dt)) + " page " + std::to_string(page) + " " +
                                   name(layout) + " " + name(isa);
          expect_close(a, want, prec.abs_tol, prec.rel_tol, what + " paged");
          expect_close(b, want, prec.abs_tol, prec.rel_tol, what + " contiguous");
        }
      }
    }
  }
}

// Decode over pages hands one work item several kv heads when there are enough chunks (all 8
// heads at group 4; 4 + 1 at group 8, 5 kv heads), walking each page head by head.
TEST(Attention, PagedDecodeWithSeveralKvHeadsPerItem) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{32, 8}, {40, 5}, {12, 6}}) {
    for (DType dt : {DType::bf16, DType::int8}) {
      for (PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
        Config cfg;
        cfg.hq = hq;
        cfg.hkv = hkv;
        cfg.dim = 64;
        cfg.k = cfg.v = dt;
        cfg.q = cfg.o = DType::bf16;
        cfg.seq_lens = {40, 33, 70, 5};
        cfg.page_size = hkv == 6 ? 3 : 16;
        cfg.layout = layout;
        cfg.chunk = hkv == 6 ? 15 : 16;  // 12 chunks (13 at 15)
        check_problem(cfg, seed,
                      "heads " + std::to_string(hq) + "/" + std::to_string(hkv) + " " + name(dt) +
                          " " + name(layout));
      }
    }
  }
}

TEST(Attention, SplitContextEqualsUnsplitAndThreadCountDoesNotMatter) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  Config cfg;
  cfg.hq = 8;
  cfg.dim = 64;
  cfg.seq_lens = {300, 45, 129};
  cfg.page_size = 16;
  cfg.sinks = true;
  std::mt19937 rng(seed);
  Problem whole(cfg, rng);
  cfg.chunk = 32;  // a multiple of the page
  std::mt19937 rng2(seed);
  Problem split32(cfg, rng2);
  cfg.chunk = 7;  // runs end at pages and chunks
  std::mt19937 rng3(seed);
  Problem split7(cfg, rng3);
  const std::vector<double> want = reference_of(whole);
  const Precision prec = precision_of(whole);
  ThreadPool pool(2);
  for (CpuIsa isa : isas()) {
    std::vector<double> a, b, c, b2;
    ASSERT_OK(run_any(whole, isa, nullptr, &a));
    ASSERT_OK(run_any(split32, isa, nullptr, &b));
    ASSERT_OK(run_any(split7, isa, nullptr, &c));
    ASSERT_OK(run_any(split32, isa, &pool, &b2));
    expect_close(a, want, prec.abs_tol, prec.rel_tol, std::string("unsplit ") + name(isa));
    // Split vs unsplit differ by float rounding of the merge only (f32 output).
    expect_close(b, a, 1e-6, 1e-6, std::string("chunk 32 vs unsplit ") + name(isa));
    expect_close(c, a, 1e-6, 1e-6, std::string("chunk 7 vs unsplit ") + name(isa));
    EXPECT_EQ(b, b2) << "the pool changed the result";
  }
}

TEST(Attention, WindowSoftCapAndSinksEachMatchReference) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (int option = 0; option < 6; ++option) {
    for (bool extend : {false, true}) {
      Config cfg;
      cfg.dim = 64;
      cfg.hq = 6;
      cfg.seq_lens = {70, 12, 33};
      cfg.page_size = 16;
      cfg.chunk = 16;
      if (extend) cfg.q_counts = {5, 12, 1};
      if (option == 0) cfg.window = 9;
      if (option == 1) cfg.window = 1;
      if (option == 2) {
        cfg.scale = 1.0f;  // logits ~ +-3: a cap of 2 bends most of them
        cfg.soft_cap = 2.0f;
      }
      if (option == 3) cfg.sinks = true;
      if (option == 4) {  // StreamingLLM: 3 sink tokens stay visible beside a window of 9
        cfg.window = 9;
        cfg.sink_tokens = 3;
      }
      if (option == 5) {  // sinks past a chunk boundary, a window of 1
        cfg.window = 1;
        cfg.sink_tokens = 20;
      }
      check_problem(cfg, seed,
                    "option " + std::to_string(option) + (extend ? " extend" : " decode"));
    }
  }
}

TEST(Attention, ExtendRaggedCausal) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (int64_t page : {0, 3}) {
    Config cfg;
    cfg.hq = 7;
    cfg.hkv = 1;
    cfg.dim = 33;
    cfg.q = DType::bf16;
    cfg.o = DType::bf16;
    cfg.seq_lens = {11, 4, 0, 40};
    cfg.q_counts = {3, 4, 0, 9};  // a whole prompt, an empty sequence, a long tail
    cfg.page_size = page;
    cfg.chunk = 8;
    check_problem(cfg, seed, "page " + std::to_string(page));
  }
}

TEST(Attention, LongContextSplitsAcrossThreads) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  Config cfg;
  cfg.hq = 8;
  cfg.dim = 64;
  cfg.seq_lens = {2500};
  cfg.page_size = 16;
  cfg.max_seq_len = 4096;  // auto chunk 512: five chunks
  check_problem(cfg, seed, "2500 keys");
}

// Quantized storage vs the same data in float: the error the storage adds, for |x| <= 1,
// head_dim 128 and 200 keys. Stated bounds: int8 0.005, fp8_e4m3 0.03 (max abs on o; measured
// ~0.0015 and ~0.009).
TEST(Attention, QuantizationErrorBound) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  for (auto [dt, bound] : {std::pair{DType::int8, 0.005}, std::pair{DType::fp8_e4m3, 0.03}}) {
    Config cfg;
    cfg.dim = 128;
    cfg.seq_lens = {200, 31};
    cfg.k = cfg.v = dt;
    std::mt19937 rng(seed);
    Problem quant(cfg, rng);
    cfg.k = cfg.v = DType::f32;
    std::mt19937 rng2(seed);
    Problem exact(cfg, rng2);
    ASSERT_EQ(quant.originals(0), exact.originals(0));
    std::vector<double> got;
    ASSERT_OK(run_any(quant, CpuIsa::best, nullptr, &got));
    std::vector<double> want = reference_of(exact);
    got.resize(quant.o_size());
    want.resize(quant.o_size());
    expect_close(got, want, bound, 0.0, name(dt));
  }
}

// --- refusals ---

TEST(Attention, SelectRefusesBadDescriptors) {
  AttentionDesc good;
  good.num_q_heads = 4;
  good.kv = KVFormat{2, 8};
  good.max_seq_len = 16;
  good.max_q_tokens = 4;
  ASSERT_OK(DecodeAttentionPlan::select(good));
  ASSERT_OK(ExtendAttentionPlan::select(good));
  struct Case {
    std::function<void(AttentionDesc&)> mutate;
    const char* fragment;
  };
  const Case cases[] = {
      {[](AttentionDesc& d) { d.num_q_heads = 5; },
       "num_q_heads is 5, expected a positive multiple of num_kv_heads = 2"},
      {[](AttentionDesc& d) { d.kv.num_kv_heads = 0; }, "num_kv_heads is 0"},
      {[](AttentionDesc& d) { d.kv.head_dim = 513; },
       "head_dim 513 / head_dim_v 513 is not supported, expected each in [1, 512]"},
      {[](AttentionDesc& d) { d.kv.head_dim_v = 600; },
       "head_dim 8 / head_dim_v 600 is not supported"},
      {[](AttentionDesc& d) { d.kv.k_dtype = DType::fp8_e5m2; }, "k_dtype is fp8_e5m2"},
      {[](AttentionDesc& d) { d.q_dtype = DType::int8; }, "q_dtype is int8, expected one of f32"},
      {[](AttentionDesc& d) { d.o_dtype = DType::f64; }, "o_dtype is f64"},
      {[](AttentionDesc& d) { d.scale = -1.0f; }, "scale is"},
      {[](AttentionDesc& d) { d.scale = std::nanf(""); }, "scale is"},
      {[](AttentionDesc& d) { d.soft_cap = -2.0f; }, "soft_cap is"},
      {[](AttentionDesc& d) { d.window = -1; }, "window is -1"},
      {[](AttentionDesc& d) { d.sink_tokens = 2; },
       "sink_tokens is 2, expected 0, or > 0 together"},
      {[](AttentionDesc& d) { d.max_batch = 0; }, "max_batch is 0"},
      {[](AttentionDesc& d) { d.max_seq_len = 0; }, "max_seq_len is 0"},
      {[](AttentionDesc& d) { d.chunk_size = -3; }, "chunk_size is -3"},
      {[](AttentionDesc& d) {
         d.pages = PageFormat{0, 16};
       },
       "num_pages is 0"},
      {[](AttentionDesc& d) {
         d.pages = PageFormat{4, 0};
       },
       "page_size is 0"},
  };
  for (const Case& c : cases) {
    AttentionDesc d = good;
    c.mutate(d);
    EXPECT_TRUE(has_error(DecodeAttentionPlan::select(d), Code::invalid_argument,
                          std::string("decode_attention: ") + c.fragment));
    EXPECT_TRUE(has_error(ExtendAttentionPlan::select(d), Code::invalid_argument,
                          std::string("extend_attention: ") + c.fragment));
  }
  AttentionDesc d = good;
  d.max_q_tokens = 0;
  EXPECT_OK(DecodeAttentionPlan::select(d));
  EXPECT_TRUE(
      has_error(ExtendAttentionPlan::select(d), Code::invalid_argument, "max_q_tokens is 0"));
  EXPECT_TRUE(has_error(DecodeAttentionPlan::select(good, Device::cuda(0)), Code::unavailable,
                        "expected cpu"));
  if (!cpu_supports(CpuIsa::avx2)) {
    EXPECT_TRUE(has_error(DecodeAttentionPlan::select(good, Device::cpu(), CpuIsa::avx2),
                          Code::unavailable, "isa avx2"));
  }
  if (!cpu_supports(CpuIsa::avx512)) {
    EXPECT_TRUE(has_error(DecodeAttentionPlan::select(good, Device::cpu(), CpuIsa::avx512),
                          Code::unavailable, "isa avx512"));
  }
}

struct Refusal {
  const char* what;
  std::function<void(AttentionArgs&)> mutate;
  Code code;
  const char* fragment;
};

// can_implement and run refuse each case with its code and message; nothing is written.
template <class Plan>
void expect_refusals(Problem& p, std::span<const Refusal> cases) {
  const Plan plan = Plan::select(p.desc()).value();
  std::vector<std::byte> ws(plan.workspace_size());
  for (const Refusal& c : cases) {
    SCOPED_TRACE(c.what);
    AttentionArgs a = p.args();
    c.mutate(a);
    p.poison();
    const std::vector<uint8_t> before = p.output_bytes();
    EXPECT_TRUE(has_error(plan.can_implement(a), c.code, c.fragment));
    EXPECT_TRUE(has_error(plan.run(Stream{}, ws, a), c.code, c.fragment));
    EXPECT_EQ(p.output_bytes(), before);
  }
  // The unchanged arguments run.
  EXPECT_OK(plan.run(Stream{}, ws, p.args()));
}

TEST(Attention, DecodeRefusals) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  Config cfg;
  cfg.q = cfg.o = DType::f32;
  cfg.k = DType::int8;
  cfg.seq_lens = {5, 17, 1};
  cfg.page_size = 3;
  cfg.sinks = true;
  cfg.max_seq_len = 40;  // past the contiguous capacity (19) and the pages (21)
  Problem p(cfg, rng);
  const std::vector<int32_t> too_many = {5, 17, 1, 1};
  const std::vector<int32_t> zero_len = {5, 0, 1};
  const std::vector<int32_t> past_max = {5, 41, 1};
  const std::vector<int32_t> past_room = {5, 22, 1};
  const std::vector<int32_t> past_cap = {5, 20, 1};
  const std::vector<int32_t> indptr = {0, 1, 2, 3};
  const std::vector<int32_t> short_indptr = {0, 1, 2};
  std::vector<int32_t> bad_pages;
  std::vector<float> lse_small(2);
  const Refusal common[] = {
      {"batch > max_batch", [&](AttentionArgs& a) { a.seq_lens = too_many; },
       Code::invalid_argument,
       "decode_attention: batch (seq_lens entries) is 4, expected <= max_batch = 3"},
      {"empty sequence", [&](AttentionArgs& a) { a.seq_lens = zero_len; }, Code::invalid_argument,
       "seq_lens[1] is 0, expected >= 1 (a query sees at least itself)"},
      {"past max_seq_len", [&](AttentionArgs& a) { a.seq_lens = past_max; }, Code::invalid_argument,
       "seq_lens[1] is 41, expected <= max_seq_len = 40"},
      {"q_indptr in decode", [&](AttentionArgs& a) { a.q_indptr = indptr; }, Code::invalid_argument,
       "q_indptr has 4 entries, expected none for decode"},
      {"q dtype", [](AttentionArgs& a) { a.q.dtype = DType::bf16; }, Code::invalid_argument,
       "q has dtype bf16, expected f32"},
      {"q heads", [](AttentionArgs& a) { a.q.shape[1] = 3; }, Code::invalid_argument,
       "q dim 1 (num_q_heads) is 3, expected 4"},
      {"o head_dim", [](AttentionArgs& a) { a.o.shape[2] = 9; }, Code::invalid_argument,
       "o dim 2 (head_dim_v) is 9, expected 8"},
      {"o strided dim", [](AttentionArgs& a) { a.o.strides[2] = 2; }, Code::invalid_argument,
       "o has stride 2 on its last axis, expected 1"},
      {"o overlaps q", [](AttentionArgs& a) { a.o.data = a.q.data; }, Code::invalid_argument,
       "o overlaps q"},
      {"lse shape",
       [&](AttentionArgs& a) { a.lse = TensorView::contiguous(lse_small.data(), DType::f32, {2}); },
       Code::invalid_argument,
       "lse has rank 1 (shape [2]), expected rank 2 [batch=3, num_q_heads=4]"},
      {"lse overlaps o", [](AttentionArgs& a) { a.lse.data = a.o.data; }, Code::invalid_argument,
       "lse overlaps q or o"},
      {"missing sinks", [](AttentionArgs& a) { a.sinks = TensorView(); }, Code::invalid_argument,
       "sinks has rank 0 (shape []), expected rank 1 [num_q_heads=4]"},
      {"sinks dtype", [](AttentionArgs& a) { a.sinks.dtype = DType::f16; }, Code::invalid_argument,
       "sinks has dtype f16"},
  };
  const Refusal paged[] = {
      {"past pages", [&](AttentionArgs& a) { a.seq_lens = past_room; }, Code::out_of_range,
       "seq_lens[1] is 22, expected <= 21"},
      {"page out of range",
       [&](AttentionArgs& a) {
         bad_pages.assign(a.page_table.indices.begin(), a.page_table.indices.end());
         bad_pages[3] = static_cast<int32_t>(p.desc().pages->num_pages);
         a.page_table.indices = bad_pages;
       },
       Code::out_of_range, "page_indices[3] is"},
      {"page table size", [&](AttentionArgs& a) { a.page_table.indptr = short_indptr; },
       Code::invalid_argument, "page_indptr has 3 entries, expected batch + 1 = 4"},
      {"pool dtype", [](AttentionArgs& a) { a.paged.v_pages.dtype = DType::f16; },
       Code::invalid_argument, "v_pages has dtype f16"},
      {"missing scales", [](AttentionArgs& a) { a.paged.k_scales = TensorView(); },
       Code::invalid_argument, "k_scales"},
  };
  const Refusal contiguous[] = {
      {"past capacity", [&](AttentionArgs& a) { a.seq_lens = past_cap; }, Code::out_of_range,
       "seq_lens[1] is 20, expected <= 19 (the caches' capacity)"},
      {"cache heads", [](AttentionArgs& a) { a.contiguous.v.shape[1] = 1; }, Code::invalid_argument,
       "v dim 1 (num_kv_heads) is 1, expected 2"},
      {"scales for bf16", [](AttentionArgs& a) { a.contiguous.v_scales = a.contiguous.k_scales; },
       Code::invalid_argument, "v_scales is given for bf16 storage"},
  };
  expect_refusals<DecodeAttentionPlan>(p, common);
  expect_refusals<DecodeAttentionPlan>(p, paged);
  p.use_pages(false);
  expect_refusals<DecodeAttentionPlan>(p, common);
  expect_refusals<DecodeAttentionPlan>(p, contiguous);
}

TEST(Attention, ExtendRefusals) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  Config cfg;
  cfg.seq_lens = {5, 17};
  cfg.q_counts = {2, 3};
  Problem p(cfg, rng);
  const std::vector<int32_t> short_indptr = {0, 2};
  const std::vector<int32_t> nonzero = {1, 2, 5};
  const std::vector<int32_t> decreasing = {0, 3, 2};
  const std::vector<int32_t> too_many_q = {0, 6, 6};
  const std::vector<int32_t> lens = {5, 17};
  const std::vector<int32_t> short_seq = {1, 17};
  std::vector<float> sinks(4, 1.0f);
  const Refusal cases[] = {
      {"q_indptr size", [&](AttentionArgs& a) { a.q_indptr = short_indptr; },
       Code::invalid_argument, "extend_attention: q_indptr has 2 entries, expected batch + 1 = 3"},
      {"q_indptr[0]", [&](AttentionArgs& a) { a.q_indptr = nonzero; }, Code::invalid_argument,
       "q_indptr[0] is 1, expected 0"},
      {"q_indptr decreasing", [&](AttentionArgs& a) { a.q_indptr = decreasing; },
       Code::invalid_argument, "q_indptr decreases at 2"},
      {"more queries than tokens", [&](AttentionArgs& a) { a.q_indptr = too_many_q; },
       Code::invalid_argument, "seq_lens[0] is 5, expected >= its 6 queries"},
      {"q rows vs q_indptr", [&](AttentionArgs& a) { a.seq_lens = short_seq; },
       Code::invalid_argument, "seq_lens[0] is 1, expected >= its 2 queries"},
      {"total_q vs q", [](AttentionArgs& a) { a.q.shape[0] = 4; }, Code::invalid_argument,
       "q dim 0 (total_q) is 4, expected 5"},
      {"sinks without has_sinks",
       [&](AttentionArgs& a) { a.sinks = TensorView::contiguous(sinks.data(), DType::f32, {4}); },
       Code::invalid_argument, "sinks is given, expected none"},
  };
  expect_refusals<ExtendAttentionPlan>(p, cases);
  // total_q past the plan's bound.
  AttentionDesc d = p.desc();
  d.max_q_tokens = 4;
  const ExtendAttentionPlan plan = ExtendAttentionPlan::select(d).value();
  EXPECT_TRUE(has_error(plan.can_implement(p.args()), Code::invalid_argument,
                        "total_q (q_indptr[batch]) is 5, expected <= max_q_tokens = 4"));
}

TEST(Attention, RunRefusesSmallWorkspaceAndOtherDevices) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  Config cfg;
  cfg.seq_lens = {40, 3};
  cfg.chunk = 8;  // split: the workspace holds partials
  Problem p(cfg, rng);
  const DecodeAttentionPlan plan = DecodeAttentionPlan::select(p.desc()).value();
  ASSERT_GT(plan.workspace_size(), 0u);
  std::vector<std::byte> ws(plan.workspace_size() - 1);
  const std::vector<uint8_t> before = p.output_bytes();
  EXPECT_TRUE(has_error(plan.run(Stream{}, ws, p.args()), Code::resource_exhausted,
                        "decode_attention: workspace has"));
  Stream gpu;
  gpu.device = Device::cuda(0);
  ws.resize(plan.workspace_size());
  EXPECT_TRUE(
      has_error(plan.run(gpu, ws, p.args()), Code::invalid_argument, "stream is on cuda:0"));
  AttentionArgs on_gpu = p.args();
  on_gpu.q.device = Device::cuda(0);
  EXPECT_TRUE(has_error(plan.run(Stream{}, ws, on_gpu), Code::invalid_argument, "q"));
  EXPECT_EQ(p.output_bytes(), before);
  EXPECT_EQ(plan.sku(), std::string(plan.sku()));
}

}  // namespace
}  // namespace kvcache
