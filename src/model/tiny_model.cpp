// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "model/tiny_model.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "kvcache/contiguous_cache.h"
#include "kvcache/recurrent_cache.h"
#include "kvcache/rotating_cache.h"
#include "kvcache/tensor.h"

#include "model/cached_attention.h"

namespace kvcache::model {
namespace {

constexpr float kNormEps = 1e-6f;

// splitmix64: a tiny, well-mixed generator, so weights depend only on the seed.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1) with 24 bits, exact in float.
  float unit() { return static_cast<float>(next() >> 40) * 0x1.0p-24f; }
  // Uniform in [-scale, scale).
  std::vector<float> fill(int64_t n, float scale) {
    std::vector<float> out(static_cast<size_t>(n));
    for (float& x : out) x = (2.0f * unit() - 1.0f) * scale;
    return out;
  }
  // Norm weights near one, so every layer stays well scaled.
  std::vector<float> fill_near_one(int64_t n) {
    std::vector<float> out = fill(n, 0.1f);
    for (float& x : out) x += 1.0f;
    return out;
  }

 private:
  uint64_t state_;
};

float inv_sqrt(int64_t n) { return 1.0f / std::sqrt(static_cast<float>(n)); }
float silu(float x) { return x / (1.0f + std::exp(-x)); }
float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
float softplus(float x) { return x > 20.0f ? x : std::log1p(std::exp(x)); }
size_t sz(int64_t n) { return static_cast<size_t>(n); }

// Scales x [n] to unit L2 norm (the q/k normalization of Gated DeltaNet).
void l2_normalize(float* x, int64_t n) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss + kNormEps);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

AttentionMask mask_of(const LayerConfig& layer) {
  if (layer.kind == LayerKind::sliding_window) {
    return AttentionMask{layer.attention.window, layer.attention.keep};
  }
  return AttentionMask{};
}

Status check_config(const TinyModelConfig& c) {
  const auto bad = [](const std::string& what) {
    return Status::invalid_argument("TinyModel.create: " + what);
  };
  if (c.vocab < 2) return bad("vocab is " + std::to_string(c.vocab) + ", expected >= 2");
  if (c.d_model < 1) return bad("d_model is " + std::to_string(c.d_model) + ", expected >= 1");
  if (c.mlp_dim < 1) return bad("mlp_dim is " + std::to_string(c.mlp_dim) + ", expected >= 1");
  if (c.dtype != DType::f32 && c.dtype != DType::f16 && c.dtype != DType::bf16) {
    return bad(std::string("dtype is ") + name(c.dtype) + ", expected f32, f16 or bf16");
  }
  if (c.layers.empty()) return bad("no layers, expected at least one");
  for (size_t i = 0; i < c.layers.size(); ++i) {
    const std::string at = "layer " + std::to_string(i) + " ";
    const LayerConfig& l = c.layers[i];
    if (l.kind == LayerKind::recurrent) {
      const RecurrentConfig& r = l.recurrent;
      if (r.num_k_heads < 1 || r.num_v_heads < 1 || r.head_k_dim < 1 || r.head_v_dim < 1) {
        return bad(at + "has a non-positive head count or dim, expected all >= 1");
      }
      if (r.num_v_heads % r.num_k_heads != 0) {
        return bad(at + "num_v_heads " + std::to_string(r.num_v_heads) +
                   " is not a multiple of num_k_heads " + std::to_string(r.num_k_heads) +
                   ", expected a multiple");
      }
      if (r.conv_tail < 0) {
        return bad(at + "conv_tail is " + std::to_string(r.conv_tail) + ", expected >= 0");
      }
      continue;
    }
    const AttentionConfig& a = l.attention;
    if (a.num_q_heads < 1 || a.num_kv_heads < 1) {
      return bad(at + "has a non-positive head count, expected >= 1");
    }
    if (a.num_q_heads % a.num_kv_heads != 0) {
      return bad(at + "num_q_heads " + std::to_string(a.num_q_heads) +
                 " is not a multiple of num_kv_heads " + std::to_string(a.num_kv_heads) +
                 ", expected a multiple");
    }
    if (a.head_dim < 2 || a.head_dim % 2 != 0) {
      return bad(at + "head_dim is " + std::to_string(a.head_dim) + ", expected even and >= 2");
    }
    if (!(a.rope_theta > 0.0)) return bad(at + "rope_theta is not positive, expected > 0");
    int64_t pairs = 0;
    for (size_t s = 0; s < a.mrope_section.size(); ++s) {
      const int32_t n = a.mrope_section[s];
      if (n < 0 || (s >= 3 && n != 0) || (s > 0 && n != 0 && a.mrope_section[s - 1] == 0)) {
        return bad(at + "mrope_section is {" + std::to_string(a.mrope_section[0]) + ", " +
                   std::to_string(a.mrope_section[1]) + ", " + std::to_string(a.mrope_section[2]) +
                   ", " + std::to_string(a.mrope_section[3]) +
                   "}, expected up to 3 non-negative sizes, non-zero ones first, the 4th 0");
      }
      pairs += n;
    }
    if (pairs != 0 && pairs != a.head_dim / 2) {
      return bad(at + "mrope_section sums to " + std::to_string(pairs) + ", expected 0 or " +
                 std::to_string(a.head_dim / 2) + " (head_dim / 2)");
    }
    if (l.kind == LayerKind::sliding_window && (a.keep < 0 || a.keep >= a.window)) {
      return bad(at + "window " + std::to_string(a.window) + " / keep " + std::to_string(a.keep) +
                 ", expected 0 <= keep < window");
    }
  }
  return Status();
}

// Float rows -> the storage dtype's bytes.
std::vector<std::byte> encode(DType dtype, const std::vector<float>& x) {
  std::vector<std::byte> out(x.size() * size_of(dtype));
  from_float(x.data(), dtype, out.data(), x.size());
  return out;
}

// [1, num_heads, n, head_dim] over token-major rows [n, num_heads, head_dim].
TensorView heads_view(std::vector<std::byte>& bytes, DType dtype, int64_t num_heads, int64_t n,
                      int64_t head_dim) {
  TensorView t;
  t.data = bytes.data();
  t.dtype = dtype;
  t.rank = 4;
  t.shape = {1, num_heads, n, head_dim};
  t.strides = {n * num_heads * head_dim, head_dim, num_heads * head_dim, 1};
  return t;
}

// A contiguous recurrent state view -> float (zeros when the cache holds no memory).
std::vector<float> read_state(const TensorView& t) {
  std::vector<float> out(sz(t.numel()), 0.0f);
  if (t.data != nullptr && !out.empty()) to_float(t.dtype, t.data, out.data(), out.size());
  return out;
}

}  // namespace

float logit_tolerance(DType storage) {
  switch (storage) {
    case DType::f16:
      return 2e-3f;
    case DType::bf16:
      return 8e-3f;
    default:
      return 1e-4f;
  }
}

const char* name(LayerKind kind) {
  switch (kind) {
    case LayerKind::attention:
      return "attention";
    case LayerKind::sliding_window:
      return "sliding_window";
    case LayerKind::recurrent:
      return "recurrent";
  }
  return "unknown";
}

int64_t conv_dim(const RecurrentConfig& c) {
  return 2 * c.num_k_heads * c.head_k_dim + c.num_v_heads * c.head_v_dim;
}

std::vector<LayerConfig> default_layers() {
  LayerConfig full;
  LayerConfig sliding;
  sliding.kind = LayerKind::sliding_window;
  sliding.attention.window = 24;
  sliding.attention.keep = 2;
  LayerConfig recurrent;
  recurrent.kind = LayerKind::recurrent;
  return {full, sliding, recurrent, full};
}

std::vector<LayerConfig> serving_layers() {
  std::vector<LayerConfig> layers = default_layers();  // full, sliding, recurrent, full
  layers[1].attention.window = 32;
  layers[1].attention.keep = 0;
  layers[3].attention.mrope_section = {4, 2, 2, 0};
  return layers;
}

std::array<int64_t, 3> mrope_positions(int64_t pos) { return {pos, pos / 16, pos % 16}; }

// --- math ---

void matmul(const float* x, int64_t rows, const float* w, int64_t in, int64_t out, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * in;
    for (int64_t o = 0; o < out; ++o) {
      const float* wo = w + o * in;
      float acc = 0.0f;
      for (int64_t i = 0; i < in; ++i) acc += xr[i] * wo[i];
      y[r * out + o] = acc;
    }
  }
}

void rms_norm(const float* x, const float* weight, int64_t n, float* y) {
  float ss = 0.0f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + kNormEps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * weight[i];
}

void rope(float* x, int64_t num_heads, int64_t head_dim, int64_t pos, double theta) {
  rope_sections(x, num_heads, head_dim, pos, theta, {});
}

void rope_sections(float* x, int64_t num_heads, int64_t head_dim, int64_t pos, double theta,
                   const std::array<int32_t, 4>& sections) {
  const int64_t half = head_dim / 2;
  const std::array<int64_t, 3> streams = mrope_positions(pos);
  for (int64_t i = 0; i < half; ++i) {
    // The section of pair i picks its position stream (plain RoPE: stream 0, which is pos).
    int64_t stream_pos = pos;
    int64_t end = 0;
    for (size_t s = 0; s < streams.size() && sections[s] != 0; ++s) {
      end += sections[s];
      if (i < end) {
        stream_pos = streams[s];
        break;
      }
    }
    const double inv_freq =
        std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
    const double angle = static_cast<double>(stream_pos) * inv_freq;
    const auto c = static_cast<float>(std::cos(angle));
    const auto s = static_cast<float>(std::sin(angle));
    for (int64_t h = 0; h < num_heads; ++h) {
      float* xh = x + h * head_dim;
      const float x0 = xh[i];
      const float x1 = xh[i + half];
      xh[i] = x0 * c - x1 * s;
      xh[i + half] = x0 * s + x1 * c;
    }
  }
}

void round_through(DType dtype, std::span<float> x) {
  if (dtype == DType::f32 || x.empty()) return;
  std::vector<std::byte> tmp(x.size() * size_of(dtype));
  from_float(x.data(), dtype, tmp.data(), x.size());
  to_float(dtype, tmp.data(), x.data(), x.size());
}

bool AttentionMask::visible(int64_t key_pos, int64_t q_pos) const {
  if (key_pos > q_pos) return false;
  if (window <= 0 || key_pos < keep) return true;
  return key_pos > q_pos - (window - keep);
}

void attention(const float* q, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
               int64_t q_pos, const KVRows& kv, const AttentionMask& mask, float* out) {
  const int64_t group = num_q_heads / num_kv_heads;
  const float scale = inv_sqrt(head_dim);
  std::vector<int64_t> rows;  // visible rows, ascending
  for (int64_t j = 0; j < kv.n; ++j) {
    if (mask.visible(kv.pos[sz(j)], q_pos)) rows.push_back(j);
  }
  std::vector<float> p(rows.size());
  for (int64_t h = 0; h < num_q_heads; ++h) {
    const float* qh = q + h * head_dim;
    const int64_t kvh = h / group;
    float m = -std::numeric_limits<float>::infinity();
    for (size_t r = 0; r < rows.size(); ++r) {
      const float* k = &kv.k[sz((rows[r] * num_kv_heads + kvh) * head_dim)];
      float s = 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) s += qh[d] * k[d];
      p[r] = s * scale;
      m = std::max(m, p[r]);
    }
    float sum = 0.0f;
    for (float& x : p) {
      x = std::exp(x - m);
      sum += x;
    }
    float* oh = out + h * head_dim;
    std::fill(oh, oh + head_dim, 0.0f);
    for (size_t r = 0; r < rows.size(); ++r) {
      const float* v = &kv.v[sz((rows[r] * num_kv_heads + kvh) * head_dim)];
      const float weight = p[r] / sum;
      for (int64_t d = 0; d < head_dim; ++d) oh[d] += weight * v[d];
    }
  }
}

void recurrent_step(const RecurrentConfig& c, const RecurrentWeights& w, int64_t d_model,
                    const float* x, DType storage, float* conv_state, float* delta_state,
                    float* out) {
  const int64_t cd = conv_dim(c);
  const int64_t taps = c.conv_tail + 1;
  std::vector<float> mixed(sz(cd));
  matmul(x, 1, w.w_qkv.data(), d_model, cd, mixed.data());

  // Causal depthwise conv over [the last conv_tail inputs, this input], then SiLU.
  std::vector<float> conv(sz(cd));
  for (int64_t ch = 0; ch < cd; ++ch) {
    const float* wc = &w.conv_w[sz(ch * taps)];
    float acc = 0.0f;
    for (int64_t t = 0; t < c.conv_tail; ++t) acc += wc[t] * conv_state[t * cd + ch];
    acc += wc[c.conv_tail] * mixed[sz(ch)];
    conv[sz(ch)] = silu(acc);
  }
  if (c.conv_tail > 0) {
    std::copy(conv_state + cd, conv_state + c.conv_tail * cd, conv_state);
    std::copy(mixed.begin(), mixed.end(), conv_state + (c.conv_tail - 1) * cd);
    round_through(storage, std::span<float>(conv_state, sz(c.conv_tail * cd)));
  }

  const int64_t hk = c.head_k_dim, hv = c.head_v_dim;
  float* q = conv.data();
  float* k = q + c.num_k_heads * hk;
  const float* v = k + c.num_k_heads * hk;
  for (int64_t h = 0; h < c.num_k_heads; ++h) {
    l2_normalize(q + h * hk, hk);
    l2_normalize(k + h * hk, hk);
    for (int64_t d = 0; d < hk; ++d) q[h * hk + d] *= inv_sqrt(hk);
  }
  std::vector<float> z(sz(c.num_v_heads * hv));
  matmul(x, 1, w.w_z.data(), d_model, c.num_v_heads * hv, z.data());
  std::vector<float> beta(sz(c.num_v_heads)), decay(sz(c.num_v_heads));
  matmul(x, 1, w.w_beta.data(), d_model, c.num_v_heads, beta.data());
  matmul(x, 1, w.w_decay.data(), d_model, c.num_v_heads, decay.data());

  // Delta rule per v head: S = g*S; S += beta * (v - S k) k^T; o = S q.
  std::vector<float> o(sz(c.num_v_heads * hv));
  const int64_t group = c.num_v_heads / c.num_k_heads;
  for (int64_t h = 0; h < c.num_v_heads; ++h) {
    const float* kh = k + (h / group) * hk;
    const float* qh = q + (h / group) * hk;
    const float b = sigmoid(beta[sz(h)]);
    const float g = std::exp(-std::exp(w.a_log[sz(h)]) * softplus(decay[sz(h)] + w.dt_bias[sz(h)]));
    float* s = delta_state + h * hv * hk;
    float* oh = &o[sz(h * hv)];
    for (int64_t i = 0; i < hv; ++i) {
      float* si = s + i * hk;
      float mem = 0.0f;
      for (int64_t j = 0; j < hk; ++j) {
        si[j] *= g;
        mem += si[j] * kh[j];
      }
      const float delta = (v[h * hv + i] - mem) * b;
      float acc = 0.0f;
      for (int64_t j = 0; j < hk; ++j) {
        si[j] += delta * kh[j];
        acc += si[j] * qh[j];
      }
      oh[i] = acc;
    }
    rms_norm(oh, w.o_norm.data(), hv, oh);
    for (int64_t i = 0; i < hv; ++i) oh[i] *= silu(z[sz(h * hv + i)]);
  }
  round_through(storage, std::span<float>(delta_state, sz(c.num_v_heads * hv * hk)));
  matmul(o.data(), 1, w.wo.data(), c.num_v_heads * hv, d_model, out);
}

// --- TinyModel ---

TinyModel::TinyModel(const TinyModelConfig& config) : config_(config) {
  const int64_t d = config.d_model;
  SplitMix64 rng(config.seed);
  embedding_ = rng.fill(config.vocab * d, 1.0f);
  final_norm_ = rng.fill_near_one(d);
  lm_head_ = rng.fill(config.vocab * d, inv_sqrt(d));
  for (size_t i = 0; i < config.layers.size(); ++i) {
    // One stream per layer: a layer's weights do not depend on the layers before it.
    SplitMix64 lr(SplitMix64(config.seed ^ (0xA5A5A5A5ull * (i + 1))).next());
    const LayerConfig& lc = config.layers[i];
    LayerWeights w;
    w.mixer_norm = lr.fill_near_one(d);
    w.mlp_norm = lr.fill_near_one(d);
    if (lc.kind == LayerKind::recurrent) {
      const RecurrentConfig& c = lc.recurrent;
      const int64_t cd = conv_dim(c);
      const int64_t vdim = c.num_v_heads * c.head_v_dim;
      RecurrentWeights& r = w.recurrent;
      r.w_qkv = lr.fill(cd * d, inv_sqrt(d));
      r.conv_w = lr.fill(cd * (c.conv_tail + 1), inv_sqrt(c.conv_tail + 1));
      r.w_z = lr.fill(vdim * d, inv_sqrt(d));
      r.w_beta = lr.fill(c.num_v_heads * d, inv_sqrt(d));
      r.w_decay = lr.fill(c.num_v_heads * d, inv_sqrt(d));
      // Decay rates exp(a_log) in [0.05, 0.3): states remember a few dozen tokens.
      r.a_log.resize(sz(c.num_v_heads));
      for (float& a : r.a_log) a = std::log(0.05f + 0.25f * lr.unit());
      r.dt_bias = lr.fill(c.num_v_heads, 0.5f);
      r.o_norm = lr.fill_near_one(c.head_v_dim);
      r.wo = lr.fill(d * vdim, inv_sqrt(vdim));
    } else {
      const AttentionConfig& c = lc.attention;
      const int64_t qdim = c.num_q_heads * c.head_dim;
      const int64_t kvdim = c.num_kv_heads * c.head_dim;
      AttentionWeights& a = w.attention;
      a.wq = lr.fill(qdim * d, inv_sqrt(d));
      a.wk = lr.fill(kvdim * d, inv_sqrt(d));
      a.wv = lr.fill(kvdim * d, inv_sqrt(d));
      a.wo = lr.fill(d * qdim, inv_sqrt(qdim));
      a.q_norm = lr.fill_near_one(c.head_dim);
      a.k_norm = lr.fill_near_one(c.head_dim);
    }
    w.w_gate = lr.fill(config.mlp_dim * d, inv_sqrt(d));
    w.w_up = lr.fill(config.mlp_dim * d, inv_sqrt(d));
    w.w_down = lr.fill(d * config.mlp_dim, inv_sqrt(config.mlp_dim));
    layers_.push_back(std::move(w));
  }
}

Result<std::unique_ptr<TinyModel>> TinyModel::create(const TinyModelConfig& config) {
  if (Status s = check_config(config); !s.ok()) return s;
  return std::unique_ptr<TinyModel>(new TinyModel(config));
}

Status TinyModel::check_tokens(std::span<const int32_t> tokens, const char* op) const {
  if (tokens.empty()) {
    return Status::invalid_argument(std::string(op) + ": no tokens, expected at least one");
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= config_.vocab) {
      return Status::invalid_argument(std::string(op) + ": token " + std::to_string(i) + " is " +
                                      std::to_string(tokens[i]) + ", expected 0 <= token < " +
                                      std::to_string(config_.vocab));
    }
  }
  return Status();
}

std::vector<float> TinyModel::embed(std::span<const int32_t> tokens) const {
  const int64_t d = config_.d_model;
  std::vector<float> x(tokens.size() * sz(d));
  for (size_t i = 0; i < tokens.size(); ++i) {
    const auto row = embedding_.begin() + static_cast<std::ptrdiff_t>(tokens[i] * d);
    std::copy(row, row + d, x.begin() + static_cast<std::ptrdiff_t>(i * sz(d)));
  }
  return x;
}

std::vector<float> TinyModel::norm_rows(const std::vector<float>& x, int64_t n,
                                        const std::vector<float>& weight) const {
  const int64_t d = config_.d_model;
  std::vector<float> h(x.size());
  for (int64_t r = 0; r < n; ++r) rms_norm(&x[sz(r * d)], weight.data(), d, &h[sz(r * d)]);
  return h;
}

TinyModel::Qkv TinyModel::project_qkv(int64_t layer, const std::vector<float>& h, int64_t n,
                                      int64_t pos0) const {
  const AttentionConfig& c = config_.layers[sz(layer)].attention;
  const AttentionWeights& w = layers_[sz(layer)].attention;
  const int64_t d = config_.d_model, hd = c.head_dim;
  Qkv out;
  out.q.resize(sz(n * c.num_q_heads * hd));
  out.k.resize(sz(n * c.num_kv_heads * hd));
  out.v.resize(sz(n * c.num_kv_heads * hd));
  matmul(h.data(), n, w.wq.data(), d, c.num_q_heads * hd, out.q.data());
  matmul(h.data(), n, w.wk.data(), d, c.num_kv_heads * hd, out.k.data());
  matmul(h.data(), n, w.wv.data(), d, c.num_kv_heads * hd, out.v.data());
  for (int64_t r = 0; r < n; ++r) {
    float* q = &out.q[sz(r * c.num_q_heads * hd)];
    float* k = &out.k[sz(r * c.num_kv_heads * hd)];
    if (c.qk_norm) {
      for (int64_t i = 0; i < c.num_q_heads; ++i)
        rms_norm(q + i * hd, w.q_norm.data(), hd, q + i * hd);
      for (int64_t i = 0; i < c.num_kv_heads; ++i)
        rms_norm(k + i * hd, w.k_norm.data(), hd, k + i * hd);
    }
    rope_sections(q, c.num_q_heads, hd, pos0 + r, c.rope_theta, c.mrope_section);
    rope_sections(k, c.num_kv_heads, hd, pos0 + r, c.rope_theta, c.mrope_section);
  }
  round_through(config_.dtype, out.k);
  round_through(config_.dtype, out.v);
  return out;
}

void TinyModel::attend_into(int64_t layer, const std::vector<float>& q, int64_t n, int64_t pos0,
                            const KVRows& kv, std::vector<float>& x) const {
  const LayerConfig& lc = config_.layers[sz(layer)];
  const AttentionConfig& c = lc.attention;
  const int64_t qdim = c.num_q_heads * c.head_dim;
  std::vector<float> o(sz(n * qdim));
  for (int64_t r = 0; r < n; ++r) {
    attention(&q[sz(r * qdim)], c.num_q_heads, c.num_kv_heads, c.head_dim, pos0 + r, kv,
              mask_of(lc), &o[sz(r * qdim)]);
  }
  output_into(layer, o, n, x);
}

void TinyModel::output_into(int64_t layer, const std::vector<float>& o, int64_t n,
                            std::vector<float>& x) const {
  const AttentionConfig& c = config_.layers[sz(layer)].attention;
  const int64_t qdim = c.num_q_heads * c.head_dim, d = config_.d_model;
  std::vector<float> y(sz(n * d));
  matmul(o.data(), n, layers_[sz(layer)].attention.wo.data(), qdim, d, y.data());
  for (size_t i = 0; i < y.size(); ++i) x[i] += y[i];
}

void TinyModel::recurrent_into(int64_t layer, const std::vector<float>& h, int64_t n,
                               std::vector<float>& conv_state, std::vector<float>& delta_state,
                               std::vector<float>& x) const {
  const RecurrentConfig& c = config_.layers[sz(layer)].recurrent;
  const int64_t d = config_.d_model;
  std::vector<float> y(sz(d));
  for (int64_t r = 0; r < n; ++r) {
    recurrent_step(c, layers_[sz(layer)].recurrent, d, &h[sz(r * d)], config_.dtype,
                   conv_state.data(), delta_state.data(), y.data());
    for (int64_t i = 0; i < d; ++i) x[sz(r * d + i)] += y[sz(i)];
  }
}

void TinyModel::mlp_into(int64_t layer, std::vector<float>& x, int64_t n) const {
  const LayerWeights& w = layers_[sz(layer)];
  const int64_t d = config_.d_model, m = config_.mlp_dim;
  const std::vector<float> h = norm_rows(x, n, w.mlp_norm);
  std::vector<float> gate(sz(n * m)), up(sz(n * m)), y(sz(n * d));
  matmul(h.data(), n, w.w_gate.data(), d, m, gate.data());
  matmul(h.data(), n, w.w_up.data(), d, m, up.data());
  for (size_t i = 0; i < gate.size(); ++i) gate[i] = silu(gate[i]) * up[i];
  matmul(gate.data(), n, w.w_down.data(), m, d, y.data());
  for (size_t i = 0; i < y.size(); ++i) x[i] += y[i];
}

std::vector<float> TinyModel::logits(const std::vector<float>& x, int64_t n) const {
  const std::vector<float> h = norm_rows(x, n, final_norm_);
  std::vector<float> out(sz(n * config_.vocab));
  matmul(h.data(), n, lm_head_.data(), config_.d_model, config_.vocab, out.data());
  return out;
}

Result<std::vector<float>> TinyModel::forward_full(std::span<const int32_t> tokens) const {
  if (Status s = check_tokens(tokens, "TinyModel.forward_full"); !s.ok()) return s;
  const auto n = static_cast<int64_t>(tokens.size());
  std::vector<float> x = embed(tokens);
  for (int64_t l = 0; l < num_layers(); ++l) {
    const LayerConfig& lc = config_.layers[sz(l)];
    const std::vector<float> h = norm_rows(x, n, layers_[sz(l)].mixer_norm);
    if (lc.kind == LayerKind::recurrent) {
      const RecurrentConfig& c = lc.recurrent;
      std::vector<float> conv(sz(c.conv_tail * conv_dim(c)), 0.0f);
      std::vector<float> delta(sz(c.num_v_heads * c.head_v_dim * c.head_k_dim), 0.0f);
      recurrent_into(l, h, n, conv, delta, x);
    } else {
      Qkv qkv = project_qkv(l, h, n, 0);
      KVRows kv;
      kv.n = n;
      kv.k = std::move(qkv.k);
      kv.v = std::move(qkv.v);
      kv.pos.resize(sz(n));
      for (int64_t i = 0; i < n; ++i) kv.pos[sz(i)] = i;
      attend_into(l, qkv.q, n, 0, kv, x);
    }
    mlp_into(l, x, n);
  }
  return logits(x, n);
}

// --- Session ---

size_t SessionCheckpoint::num_bytes() const {
  size_t total = 0;
  for (const Snapshot& s : layers) total += s.num_bytes();
  return total;
}

Session::Session(const TinyModel& model) : model_(&model) {}

Result<std::unique_ptr<Session>> Session::create(const TinyModel& model) {
  std::unique_ptr<Session> session(new Session(model));
  const TinyModelConfig& config = model.config();
  for (const LayerConfig& lc : config.layers) {
    std::unique_ptr<Cache> cache;
    if (lc.kind == LayerKind::attention) {
      auto c = KVCache::make(1, lc.attention.num_kv_heads, lc.attention.head_dim, config.dtype);
      if (!c.ok()) return c.status();
      cache = std::move(*c);
    } else if (lc.kind == LayerKind::sliding_window) {
      RotatingKVCacheOptions o;
      o.max_size = lc.attention.window;
      o.keep = lc.attention.keep;
      o.num_kv_heads = lc.attention.num_kv_heads;
      o.head_dim = lc.attention.head_dim;
      o.dtype = config.dtype;
      auto c = RotatingKVCache::create(o);
      if (!c.ok()) return c.status();
      cache = std::move(*c);
    } else {
      const RecurrentConfig& r = lc.recurrent;
      RecurrentCacheOptions o;
      o.conv_tail = r.conv_tail;
      o.conv_dim = conv_dim(r);
      o.num_v_heads = r.num_v_heads;
      o.head_v_dim = r.head_v_dim;
      o.head_k_dim = r.head_k_dim;
      o.dtype = config.dtype;
      auto c = RecurrentCache::create(o);
      if (!c.ok()) return c.status();
      cache = std::move(*c);
    }
    session->caches_.push_back(std::move(cache));
  }
  return session;
}

Result<std::vector<float>> Session::prefill(std::span<const int32_t> tokens) {
  if (Status s = model_->check_tokens(tokens, "Session.prefill"); !s.ok()) return s;
  return run(tokens);
}

Result<std::vector<float>> Session::run(std::span<const int32_t> tokens) {
  const TinyModelConfig& config = model_->config();
  const DType dtype = config.dtype;
  const auto n = static_cast<int64_t>(tokens.size());
  std::vector<float> x = model_->embed(tokens);
  for (int64_t l = 0; l < num_layers(); ++l) {
    const LayerConfig& lc = config.layers[sz(l)];
    const std::vector<float> h = model_->norm_rows(x, n, model_->weights(l).mixer_norm);
    if (lc.kind == LayerKind::recurrent) {
      auto& cache = static_cast<RecurrentCache&>(*caches_[sz(l)]);
      std::vector<float> conv = read_state(cache.conv_state());
      std::vector<float> delta = read_state(cache.delta_state());
      model_->recurrent_into(l, h, n, conv, delta, x);
      const RecurrentConfig& r = lc.recurrent;
      std::vector<std::byte> conv_bytes = encode(dtype, conv);
      std::vector<std::byte> delta_bytes = encode(dtype, delta);
      const TensorView conv_view =
          TensorView::contiguous(conv_bytes.data(), dtype, {1, r.conv_tail, conv_dim(r)});
      const TensorView delta_view = TensorView::contiguous(
          delta_bytes.data(), dtype, {1, r.num_v_heads, r.head_v_dim, r.head_k_dim});
      if (auto views = cache.update(conv_view, delta_view); !views.ok()) return views.status();
      if (Status s = cache.advance(n); !s.ok()) return s;
    } else {
      const AttentionConfig& a = lc.attention;
      TinyModel::Qkv qkv = model_->project_qkv(l, h, n, offset_);
      std::vector<std::byte> k_bytes = encode(dtype, qkv.k);
      std::vector<std::byte> v_bytes = encode(dtype, qkv.v);
      auto views =
          caches_[sz(l)]->update(heads_view(k_bytes, dtype, a.num_kv_heads, n, a.head_dim),
                                 heads_view(v_bytes, dtype, a.num_kv_heads, n, a.head_dim));
      if (!views.ok()) return views.status();
      Result<std::vector<float>> o = cached_attention(lc, qkv.q, n, *views);
      if (!o.ok()) return o.status();
      model_->output_into(l, *o, n, x);
    }
    model_->mlp_into(l, x, n);
  }
  offset_ += n;
  return model_->logits(x, n);
}

Result<std::vector<float>> Session::decode(int32_t token) {
  if (token < 0 || token >= model_->config().vocab) {
    return Status::invalid_argument("Session.decode: token is " + std::to_string(token) +
                                    ", expected 0 <= token < " +
                                    std::to_string(model_->config().vocab));
  }
  const int32_t tokens[] = {token};
  return run(tokens);
}

Result<SessionCheckpoint> Session::checkpoint() const {
  if (offset_ == 0) {
    return Status::invalid_argument(
        "Session.checkpoint: the session is empty, expected at least one token");
  }
  SessionCheckpoint cp;
  cp.offset = offset_;
  for (const auto& cache : caches_) {
    Result<std::optional<Snapshot>> snap = cache->snapshot(offset_ - 1);
    if (!snap.ok()) return snap.status();
    if (!snap->has_value()) {
      return Status::internal("Session.checkpoint: a " + std::string(name(cache->kind())) +
                              " cache gave no snapshot of one token, expected one");
    }
    cp.layers.push_back(std::move(**snap));
  }
  return cp;
}

Status Session::rollback(const SessionCheckpoint& checkpoint) {
  if (checkpoint.layers.size() != caches_.size()) {
    return Status::invalid_argument("Session.rollback: checkpoint has " +
                                    std::to_string(checkpoint.layers.size()) +
                                    " layers, expected " + std::to_string(caches_.size()));
  }
  if (checkpoint.offset < 1 || checkpoint.offset > offset_) {
    return Status::invalid_argument("Session.rollback: checkpoint offset is " +
                                    std::to_string(checkpoint.offset) +
                                    ", expected 1 <= offset <= " + std::to_string(offset_));
  }
  for (size_t l = 0; l < caches_.size(); ++l) {
    if (Status s = caches_[l]->restore(checkpoint.layers[l], checkpoint.offset); !s.ok()) return s;
  }
  offset_ = checkpoint.offset;
  return Status();
}

Result<size_t> speculate(Session& session, std::span<const int32_t> draft) {
  if (Status s = session.model().check_tokens(draft, "speculate"); !s.ok()) return s;
  Result<SessionCheckpoint> cp = session.checkpoint();
  if (!cp.ok()) return cp.status();
  for (const int32_t token : draft) {
    if (auto logits = session.decode(token); !logits.ok()) return logits.status();
  }
  if (Status s = session.rollback(*cp); !s.ok()) return s;
  return cp->num_bytes();
}

int32_t argmax(std::span<const float> values) {
  size_t best = 0;
  for (size_t i = 1; i < values.size(); ++i) {
    if (values[i] > values[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

float max_abs_diff(std::span<const float> a, std::span<const float> b) {
  if (a.size() != b.size()) return std::numeric_limits<float>::infinity();
  float m = 0.0f;
  for (size_t i = 0; i < a.size(); ++i) {
    const float diff = std::fabs(a[i] - b[i]);
    if (!(diff <= m)) m = std::isnan(diff) ? std::numeric_limits<float>::infinity() : diff;
  }
  return m;
}

}  // namespace kvcache::model
