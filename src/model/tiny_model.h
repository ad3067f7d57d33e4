// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// TinyModel: a small deterministic transformer for `kvcache demo` and its tests. Weights come from
// a seed (no files). Layers are full attention (GQA, optional QK-norm, RoPE), sliding-window
// attention with sink tokens, and a simplified Gated DeltaNet (causal depthwise conv + delta rule);
// each is pre-RMSNorm mixer + residual, then pre-RMSNorm SwiGLU MLP + residual.
//
// Two ways to get logits, which must agree:
//  - TinyModel::forward_full(tokens): from scratch, no cache, plain vectors;
//  - Session: one Cache per layer (KVCache, RotatingKVCache, RecurrentCache), prefill() / decode().
// Both round K, V and the recurrent states through the cache's storage dtype at the same points
// and run the same math functions in the same order, so they agree to float rounding (in practice
// exactly) for every storage dtype.
//
// The math is small free functions (matmul, rms_norm, rope, attention, recurrent_step) so that the
// serving demo can swap them for ops kernels and the Session's caches for the paged manager.
// A TinyModel is immutable after create(); const methods may run concurrently. A Session is not
// thread-safe; callers serialize access. A Session must not outlive its model.

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "kvcache/cache.h"
#include "kvcache/dtype.h"
#include "kvcache/status.h"

namespace kvcache::model {

// Logit tolerance of the cached path against forward_full. forward_full rounds K/V/states
// through the storage dtype exactly where the cache does, but its attention is the naive loop
// while the session runs the attention op, which sums in another order: float noise that can flip
// the rounding of a later layer's K/V or state by one unit of the storage dtype. So the bound
// grows with the storage's unit: observed max over 40 seeds x 76 positions 1.5e-6 (f32),
// 7.4e-4 (f16), 3.3e-3 (bf16); the bounds below leave 2-60x headroom. A wrong cached token moves
// logits by 1e-1 and more.
[[nodiscard]] float logit_tolerance(DType storage);

enum class LayerKind : uint8_t { attention, sliding_window, recurrent };
// "attention", "sliding_window", "recurrent".
[[nodiscard]] const char* name(LayerKind kind);

struct AttentionConfig {
  int64_t num_q_heads = 4;
  int64_t num_kv_heads = 2;  // GQA: divides num_q_heads
  int64_t head_dim = 16;     // even: RoPE rotates pairs
  double rope_theta = 10000.0;
  bool qk_norm = true;  // RMSNorm over head_dim of q and k before RoPE
  // Multi-section RoPE (Qwen2-VL mrope): sizes in frequency pairs of up to 3 sections summing to
  // head_dim / 2, driven by the position streams of mrope_positions(); all zero: plain RoPE.
  std::array<int32_t, 4> mrope_section{};
  // sliding_window only (RotatingKVCache): a query at position p sees keys
  // [0, keep) and [p - (window - keep) + 1, p].
  int64_t window = 0;  // max_size, sinks included
  int64_t keep = 0;    // sink tokens, 0 <= keep < window
};

// A simplified Gated DeltaNet. The conv runs over q, k and v projections together:
// conv_dim = 2 * num_k_heads * head_k_dim + num_v_heads * head_v_dim.
struct RecurrentConfig {
  int64_t num_k_heads = 2;
  int64_t num_v_heads = 4;  // a multiple of num_k_heads
  int64_t head_k_dim = 8;
  int64_t head_v_dim = 8;
  int64_t conv_tail = 3;  // kernel size - 1
};
[[nodiscard]] int64_t conv_dim(const RecurrentConfig& config);

struct LayerConfig {
  LayerKind kind = LayerKind::attention;
  AttentionConfig attention;  // attention and sliding_window
  RecurrentConfig recurrent;  // recurrent
};

// Attention, sliding window (24 tokens, 2 sinks: a 40-60 token decode wraps it), recurrent,
// attention.
[[nodiscard]] std::vector<LayerConfig> default_layers();
// The serving demo's layers: attention, sliding window of 32 tokens without sinks (the paged
// manager releases pages that leave the window, so sink tokens could not stay), recurrent, and
// attention with multi-section RoPE (sections 4, 2, 2 of head_dim 16).
[[nodiscard]] std::vector<LayerConfig> serving_layers();

// The three position streams of multi-section RoPE for text position pos, as if the text were
// laid out in rows of 16: (pos, pos / 16, pos % 16). Distinct streams, so a section that used the
// wrong one would show.
[[nodiscard]] std::array<int64_t, 3> mrope_positions(int64_t pos);

struct TinyModelConfig {
  int64_t vocab = 97;
  int64_t d_model = 64;
  int64_t mlp_dim = 128;  // SwiGLU hidden size
  uint64_t seed = 1;
  DType dtype = DType::f32;  // cache storage: f32, f16 or bf16
  std::vector<LayerConfig> layers = default_layers();
};

// --- weights (row-major; a [out, in] matrix maps in -> out) ---
struct AttentionWeights {
  std::vector<float> wq, wk, wv;      // [num_(q|kv)_heads * head_dim, d_model]
  std::vector<float> wo;              // [d_model, num_q_heads * head_dim]
  std::vector<float> q_norm, k_norm;  // [head_dim]
};
struct RecurrentWeights {
  std::vector<float> w_qkv;           // [conv_dim, d_model]
  std::vector<float> conv_w;          // [conv_dim, conv_tail + 1], oldest tap first
  std::vector<float> w_z;             // [num_v_heads * head_v_dim, d_model], output gate
  std::vector<float> w_beta;          // [num_v_heads, d_model]
  std::vector<float> w_decay;         // [num_v_heads, d_model]
  std::vector<float> a_log, dt_bias;  // [num_v_heads]
  std::vector<float> o_norm;          // [head_v_dim]
  std::vector<float> wo;              // [d_model, num_v_heads * head_v_dim]
};
struct LayerWeights {
  std::vector<float> mixer_norm, mlp_norm;  // [d_model]
  AttentionWeights attention;               // attention and sliding_window
  RecurrentWeights recurrent;               // recurrent
  std::vector<float> w_gate, w_up;          // [mlp_dim, d_model]
  std::vector<float> w_down;                // [d_model, mlp_dim]
};

// --- math (float, CPU) ---

// y[r, o] = sum_i x[r, i] * w[o, i] for r < rows. x: [rows, in], w: [out, in], y: [rows, out].
void matmul(const float* x, int64_t rows, const float* w, int64_t in, int64_t out, float* y);
// y = x / rms(x) * weight over n elements (eps 1e-6). y may alias x.
void rms_norm(const float* x, const float* weight, int64_t n, float* y);
// Rotates x [num_heads, head_dim] in place for position pos (rotate-half pairs (i, i + d/2)).
void rope(float* x, int64_t num_heads, int64_t head_dim, int64_t pos, double theta);
// The same with multi-section RoPE: frequency pair i uses stream s of mrope_positions(pos) when i
// falls in section s. All-zero sections: rope() above.
void rope_sections(float* x, int64_t num_heads, int64_t head_dim, int64_t pos, double theta,
                   const std::array<int32_t, 4>& sections);
// Rounds x through dtype (f32: unchanged), as storing it in a cache of that dtype does.
void round_through(DType dtype, std::span<float> x);

// K/V rows an attention query can read, in float: k, v [n, num_kv_heads, head_dim] and the
// position of each row, ascending.
struct KVRows {
  std::vector<float> k, v;
  std::vector<int64_t> pos;
  int64_t n = 0;
};
// Which keys a query at q_pos sees: causal, and for window > 0 only [0, keep) and
// [q_pos - (window - keep) + 1, q_pos].
struct AttentionMask {
  int64_t window = 0;
  int64_t keep = 0;
  [[nodiscard]] bool visible(int64_t key_pos, int64_t q_pos) const;
};
// Softmax attention of one query q [num_q_heads, head_dim] over the visible rows of kv (GQA:
// q head h reads kv head h / (num_q_heads / num_kv_heads)), scale 1/sqrt(head_dim).
// out: [num_q_heads, head_dim]. REQUIRES: at least one visible row.
void attention(const float* q, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
               int64_t q_pos, const KVRows& kv, const AttentionMask& mask, float* out);
// One token through the Gated DeltaNet mixer. x: [d_model] (normed input), conv_state
// [conv_tail, conv_dim] (oldest first), delta_state [num_v_heads, head_v_dim, head_k_dim], both
// updated in place and rounded through `storage`; out: [d_model].
void recurrent_step(const RecurrentConfig& config, const RecurrentWeights& w, int64_t d_model,
                    const float* x, DType storage, float* conv_state, float* delta_state,
                    float* out);

class TinyModel {
 public:
  // invalid_argument for a config that cannot run (see the comments on the config fields).
  static Result<std::unique_ptr<TinyModel>> create(const TinyModelConfig& config);
  TinyModel(const TinyModel&) = delete;
  TinyModel& operator=(const TinyModel&) = delete;

  [[nodiscard]] const TinyModelConfig& config() const { return config_; }
  [[nodiscard]] int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  [[nodiscard]] const LayerWeights& weights(int64_t layer) const { return layers_[layer]; }

  // Logits [tokens.size(), vocab] for every position, recomputed from scratch without a cache.
  // invalid_argument for no tokens or a token outside [0, vocab).
  [[nodiscard]] Result<std::vector<float>> forward_full(std::span<const int32_t> tokens) const;

  // --- building blocks shared by forward_full and Session (rows are tokens) ---

  // invalid_argument (op "<op>") for no tokens or a token outside [0, vocab).
  [[nodiscard]] Status check_tokens(std::span<const int32_t> tokens, const char* op) const;
  // x: [n, d_model].
  [[nodiscard]] std::vector<float> embed(std::span<const int32_t> tokens) const;
  // Each row of x [n, d_model] normalized with `weight`.
  [[nodiscard]] std::vector<float> norm_rows(const std::vector<float>& x, int64_t n,
                                             const std::vector<float>& weight) const;
  // q [n, num_q_heads * head_dim], k, v [n, num_kv_heads * head_dim] of an attention layer for
  // normed rows h at positions pos0 + i: QK-norm, RoPE, and K/V rounded through the storage dtype.
  struct Qkv {
    std::vector<float> q, k, v;
  };
  [[nodiscard]] Qkv project_qkv(int64_t layer, const std::vector<float>& h, int64_t n,
                                int64_t pos0) const;
  // Attention of the n queries (positions pos0 + i) over kv, then the output projection:
  // adds [n, d_model] into x.
  void attend_into(int64_t layer, const std::vector<float>& q, int64_t n, int64_t pos0,
                   const KVRows& kv, std::vector<float>& x) const;
  // The output projection of an attention layer: adds o [n, num_q_heads * head_dim] times wo
  // into x [n, d_model].
  void output_into(int64_t layer, const std::vector<float>& o, int64_t n,
                   std::vector<float>& x) const;
  // The recurrent mixer over normed rows h, token by token from the given states; adds into x.
  void recurrent_into(int64_t layer, const std::vector<float>& h, int64_t n,
                      std::vector<float>& conv_state, std::vector<float>& delta_state,
                      std::vector<float>& x) const;
  // x += SwiGLU MLP of RMSNorm(x), per row.
  void mlp_into(int64_t layer, std::vector<float>& x, int64_t n) const;
  // Final RMSNorm and LM head: [n, vocab].
  [[nodiscard]] std::vector<float> logits(const std::vector<float>& x, int64_t n) const;

 private:
  explicit TinyModel(const TinyModelConfig& config);

  TinyModelConfig config_;
  std::vector<float> embedding_;   // [vocab, d_model]
  std::vector<float> final_norm_;  // [d_model]
  std::vector<float> lm_head_;     // [vocab, d_model]
  std::vector<LayerWeights> layers_;
};

// A rollback point for every layer of a session: per layer snapshot(offset - 1), restorable
// only to `offset` (the whole-state kinds allow no other target). Move-only.
struct SessionCheckpoint {
  int64_t offset = 0;
  std::vector<Snapshot> layers;
  [[nodiscard]] size_t num_bytes() const;
};

// A cached decoder over one sequence: one Cache per layer, each used through the Cache contract
// (full attention: a 1-layer KVCache via update(), so every layer is "one Cache" as in mlx-lm).
// A call that fails leaves the session unusable unless it failed validating its arguments.
class Session {
 public:
  // REQUIRES: model outlives the session. resource_exhausted / invalid_argument from the caches.
  static Result<std::unique_ptr<Session>> create(const TinyModel& model);
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // Runs tokens as one chunk (one update() per layer); logits [tokens.size(), vocab].
  // invalid_argument for no tokens or a bad token (the session is unchanged).
  Result<std::vector<float>> prefill(std::span<const int32_t> tokens);
  // One token; logits [vocab].
  Result<std::vector<float>> decode(int32_t token);

  // Tokens processed.
  [[nodiscard]] int64_t offset() const { return offset_; }
  [[nodiscard]] const TinyModel& model() const { return *model_; }
  [[nodiscard]] int64_t num_layers() const { return static_cast<int64_t>(caches_.size()); }
  // The layer's cache (its kind follows the layer's kind). REQUIRES: 0 <= layer < num_layers().
  [[nodiscard]] Cache& cache(int64_t layer) { return *caches_[layer]; }
  [[nodiscard]] const Cache& cache(int64_t layer) const { return *caches_[layer]; }

  // invalid_argument at offset 0 (nothing to roll back to).
  [[nodiscard]] Result<SessionCheckpoint> checkpoint() const;
  // Every layer back to checkpoint.offset via restore(snapshot, offset). invalid_argument (session
  // unchanged) for a checkpoint of another layer count or one past offset().
  Status rollback(const SessionCheckpoint& checkpoint);

 private:
  explicit Session(const TinyModel& model);
  // prefill/decode after validation: every layer's cache takes the chunk in one update().
  Result<std::vector<float>> run(std::span<const int32_t> tokens);

  const TinyModel* model_;
  std::vector<std::unique_ptr<Cache>> caches_;
  int64_t offset_ = 0;
};

// Speculative decoding with every draft token rejected: checkpoints the session, decodes `draft`,
// then rolls every layer back, so the session continues as if it never drafted. Returns the bytes
// the checkpoint held. invalid_argument (session unchanged) for an empty session or draft, or a
// bad token.
Result<size_t> speculate(Session& session, std::span<const int32_t> draft);

// Index of the largest value (the first on ties). REQUIRES: !values.empty().
[[nodiscard]] int32_t argmax(std::span<const float> values);
// max |a[i] - b[i]|; infinity when sizes differ or a value is NaN.
[[nodiscard]] float max_abs_diff(std::span<const float> a, std::span<const float> b);

}  // namespace kvcache::model
