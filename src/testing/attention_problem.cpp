// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "testing/attention_problem.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include <gtest/gtest.h>

#include "ops/quantize.h"
#include "reference/attention.h"
#include "reference/element.h"

namespace kvcache::testing {

float nonzero_uniform(std::mt19937& rng, float lo, float hi) {
  for (;;) {
    const float x = std::uniform_real_distribution<float>(lo, hi)(rng);
    if (x != 0.0f) return x;
  }
}

float store_row(const float* x, int64_t n, DType dtype, void* dst) {
  if (dtype == DType::int8) return ops::quantize_row(x, n, static_cast<int8_t*>(dst));
  if (dtype == DType::fp8_e4m3) return ops::quantize_row(x, n, static_cast<fp8_e4m3_t*>(dst));
  from_float(x, dtype, dst, static_cast<size_t>(n));
  return 1.0f;
}

Problem::Problem(const Config& cfg, std::mt19937& rng) : cfg_(cfg) {
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

void Problem::poison() {
  std::fill(o_.begin(), o_.end(), 0x7f);
  std::fill(lse_.begin(), lse_.end(), std::nanf(""));
}

AttentionArgs Problem::args() {
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
    if (is_quantized(dt)) scales = contiguous_view(cont_scales_[side].data(), DType::f32, batch, 1);
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

double Problem::o_at(size_t i) const {
  return reference::read_element(o_.data(), cfg_.o, static_cast<int64_t>(i));
}

std::vector<uint8_t> Problem::output_bytes() const {
  std::vector<uint8_t> bytes(o_);
  bytes.insert(bytes.end(), q_.begin(), q_.end());
  const auto* l = reinterpret_cast<const uint8_t*>(lse_.data());
  bytes.insert(bytes.end(), l, l + lse_.size() * sizeof(float));
  return bytes;
}

int64_t Problem::contiguous_cell(int64_t b, int64_t h, int64_t t) const {
  return cfg_.token_major ? (b * cap_ + t) * cfg_.hkv + h : (b * cfg_.hkv + h) * cap_ + t;
}

int64_t Problem::paged_cell(int64_t b, int64_t h, int64_t t) const {
  const int64_t page =
      page_indices_[static_cast<size_t>(page_indptr_[static_cast<size_t>(b)] + t / cfg_.page_size)];
  const int64_t slot = t % cfg_.page_size;
  return cfg_.layout == PageLayout::nhd ? (page * cfg_.page_size + slot) * cfg_.hkv + h
                                        : (page * cfg_.hkv + h) * cfg_.page_size + slot;
}

void Problem::put(std::vector<uint8_t>& data, std::vector<uint8_t>& scales, int64_t cell,
                  int64_t dim, DType dt, const std::vector<uint8_t>& stored, float sc) {
  std::memcpy(data.data() + static_cast<size_t>(cell * dim) * size_of(dt), stored.data(),
              stored.size());
  std::memcpy(scales.data() + static_cast<size_t>(cell) * 4, &sc, 4);
}

TensorView Problem::contiguous_view(void* data, DType dt, int64_t batch, int64_t dim) const {
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

}  // namespace kvcache::testing
