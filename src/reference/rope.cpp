// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "reference/rope.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "kvcache/dtype.h"

#include "reference/element.h"

namespace kvcache::reference {
namespace {

// The position stream frequency i uses: the section it falls in (0 without sections).
int stream_of(const RopeConfig& c, int64_t i) {
  int64_t end = 0;
  for (int s = 0; s < kMaxRopeSections; ++s) {
    end += c.mrope_section[static_cast<size_t>(s)];
    if (i < end) return s;
  }
  return 0;
}

// Rotates pair i of x by angle, scaled by m: neox pairs (i, i + half), gptj (2i, 2i + 1).
void rotate_pair(const RopeConfig& c, std::span<double> x, int64_t half, int64_t i, double angle,
                 double m) {
  const auto a = static_cast<size_t>(c.style == RopeStyle::neox ? i : 2 * i);
  const auto b = static_cast<size_t>(c.style == RopeStyle::neox ? i + half : 2 * i + 1);
  const double x1 = x[a];
  const double x2 = x[b];
  x[a] = (x1 * std::cos(angle) - x2 * std::sin(angle)) * m;
  x[b] = (x2 * std::cos(angle) + x1 * std::sin(angle)) * m;
}

}  // namespace

std::vector<double> rope_inv_freq(const RopeConfig& c, int64_t head_dim) {
  const int64_t dim = c.rotary_dim == 0 ? head_dim : c.rotary_dim;
  const double d = static_cast<double>(dim);
  std::vector<double> out;
  for (int64_t i = 0; i < dim / 2; ++i) {
    const double pos_freq = std::pow(c.base, static_cast<double>(2 * i) / d);
    const double plain = 1.0 / pos_freq;
    double f = plain;
    if (c.scaling == RopeScaling::linear) {
      f = plain / c.factor;
    } else if (c.scaling == RopeScaling::llama3) {
      const double old_len = static_cast<double>(c.original_max_position);
      const double wavelen = 2.0 * std::numbers::pi / plain;
      if (wavelen > old_len / c.low_freq_factor) {
        f = plain / c.factor;
      } else if (wavelen >= old_len / c.high_freq_factor) {
        const double smooth =
            (old_len / wavelen - c.low_freq_factor) / (c.high_freq_factor - c.low_freq_factor);
        f = (1.0 - smooth) * plain / c.factor + smooth * plain;
      }
    } else if (c.scaling == RopeScaling::yarn) {
      const double old_len = static_cast<double>(c.original_max_position);
      auto correction_dim = [&](double rotations) {
        return d * std::log(old_len / (rotations * 2.0 * std::numbers::pi)) /
               (2.0 * std::log(c.base));
      };
      const double low = std::max(0.0, std::floor(correction_dim(c.beta_fast)));
      double high = std::min(d - 1.0, std::ceil(correction_dim(c.beta_slow)));
      if (high == low) high += 0.001;
      const double ramp =
          std::min(1.0, std::max(0.0, (static_cast<double>(i) - low) / (high - low)));
      const double interpolation = 1.0 / (c.factor * pos_freq);
      f = interpolation * ramp + plain * (1.0 - ramp);
    }
    out.push_back(f);
  }
  return out;
}

double rope_attention_factor(const RopeConfig& c) {
  if (c.scaling != RopeScaling::yarn) return 1.0;
  if (c.attention_factor > 0.0) return c.attention_factor;
  return c.factor <= 1.0 ? 1.0 : 0.1 * std::log(c.factor) + 1.0;
}

void rope_apply(const RopeConfig& c, std::span<double> x, std::span<const int64_t> positions) {
  const std::vector<double> inv = rope_inv_freq(c, static_cast<int64_t>(x.size()));
  const double m = rope_attention_factor(c);
  const auto half = static_cast<int64_t>(inv.size());
  for (int64_t i = 0; i < half; ++i) {
    const double pos = static_cast<double>(positions[static_cast<size_t>(stream_of(c, i))]);
    rotate_pair(c, x, half, i, pos * inv[static_cast<size_t>(i)], m);
  }
}

void rope_apply_delta(const RopeConfig& c, std::span<double> x, int64_t delta) {
  const std::vector<double> inv = rope_inv_freq(c, static_cast<int64_t>(x.size()));
  const auto half = static_cast<int64_t>(inv.size());
  for (int64_t i = 0; i < half; ++i) {
    rotate_pair(c, x, half, i, static_cast<double>(delta) * inv[static_cast<size_t>(i)], 1.0);
  }
}

QkvRopeWriteResult qkv_rope_write(const QkvRopeWriteDesc& desc, const QkvRopeWriteArgs& args) {
  const int64_t n = args.qkv.shape[0];
  const int64_t hq = desc.num_q_heads;
  const int64_t hk = desc.cache.kv.num_kv_heads;
  const int64_t dim = desc.cache.kv.head_dim;
  const int64_t dim_v = desc.cache.kv.dim_v();
  const int streams = desc.rope.num_position_streams();
  QkvRopeWriteResult out;
  for (int64_t t = 0; t < n; ++t) {
    std::vector<int64_t> pos;
    for (int s = 0; s < streams; ++s) pos.push_back(args.positions[static_cast<size_t>(s * n + t)]);
    // Heads 0 .. hq - 1 are q, then hk k heads; both normed and rotated.
    for (int64_t h = 0; h < hq + hk; ++h) {
      std::vector<double> x;
      for (int64_t i = 0; i < dim; ++i) x.push_back(read_element(args.qkv, {t, h * dim + i}));
      if (desc.qk_norm) {
        double ss = 0.0;
        for (double v : x) ss += v * v;
        const double r = 1.0 / std::sqrt(ss / static_cast<double>(dim) + desc.norm_eps);
        const TensorView& w = h < hq ? args.q_norm_weight : args.k_norm_weight;
        for (int64_t i = 0; i < dim; ++i) {
          x[static_cast<size_t>(i)] *= r * (desc.norm_weight_offset + read_element(w, {i}));
        }
      }
      rope_apply(desc.rope, x, pos);
      std::vector<double>& dst = h < hq ? out.q : out.k;
      dst.insert(dst.end(), x.begin(), x.end());
    }
    for (int64_t h = 0; h < hk; ++h) {
      for (int64_t i = 0; i < dim_v; ++i) {
        out.v.push_back(read_element(args.qkv, {t, (hq + hk) * dim + h * dim_v + i}));
      }
    }
  }
  return out;
}

std::vector<double> stored_k(const RopeShiftDesc& desc, const RopeShiftArgs& args, int64_t b,
                             int64_t h, int64_t p) {
  const int64_t dim = desc.kv.head_dim;
  const TensorView& k = desc.pages ? args.kv.k_pages : args.caches.k;
  const TensorView& scales = desc.pages ? args.kv.k_scales : args.caches.k_scales;
  std::vector<double> x;
  double scale = 1.0;
  if (!desc.pages) {
    if (is_quantized(desc.kv.k_dtype)) scale = read_element(scales, {b, h, p});
    for (int64_t i = 0; i < dim; ++i) x.push_back(read_element(k, {b, h, p, i}) * scale);
    return x;
  }
  const int64_t page_size = desc.pages->page_size;
  const int64_t page =
      args.table
          .indices[static_cast<size_t>(args.table.indptr[static_cast<size_t>(b)] + p / page_size)];
  const int64_t slot = p % page_size;
  const bool nhd = desc.pages->layout == PageLayout::nhd;
  if (is_quantized(desc.kv.k_dtype)) {
    scale = nhd ? read_element(scales, {page, slot, h}) : read_element(scales, {page, h, slot});
  }
  for (int64_t i = 0; i < dim; ++i) {
    x.push_back((nhd ? read_element(k, {page, slot, h, i}) : read_element(k, {page, h, slot, i})) *
                scale);
  }
  return x;
}

std::vector<double> rope_shift(const RopeShiftDesc& desc, const RopeShiftArgs& args) {
  std::vector<double> out;
  for (size_t b = 0; b < args.p0.size(); ++b) {
    for (int64_t p = args.p0[b]; p < args.p1[b]; ++p) {
      for (int64_t h = 0; h < desc.kv.num_kv_heads; ++h) {
        std::vector<double> x = stored_k(desc, args, static_cast<int64_t>(b), h, p);
        rope_apply_delta(desc.rope, x, args.delta[b]);
        out.insert(out.end(), x.begin(), x.end());
      }
    }
  }
  return out;
}

}  // namespace kvcache::reference
