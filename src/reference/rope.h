// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// float64 references of RoPE and of the ops built on it (qkv_rope_write, rope_shift): plain loops
// in double from the configuration and the published formulas, sharing nothing with the kernels
// but the dtype conversions. Inputs are read through their views (any strides). Pure functions.

#include <cstdint>
#include <span>
#include <vector>

#include "kvcache/qkv_rope_write.h"
#include "kvcache/rope.h"
#include "kvcache/rope_shift.h"

namespace kvcache::reference {

// The inverse frequencies [rotary_dim / 2] of a configuration for heads of head_dim (Hugging Face
// rope_utils: default, linear, llama3, yarn), and the factor cos and sin are multiplied by.
[[nodiscard]] std::vector<double> rope_inv_freq(const RopeConfig& config, int64_t head_dim);
[[nodiscard]] double rope_attention_factor(const RopeConfig& config);

// Rotates x [head_dim] in place for a token at positions[s] of each position stream s
// ([num_position_streams()]); rotated elements are multiplied by the attention factor.
void rope_apply(const RopeConfig& config, std::span<double> x, std::span<const int64_t> positions);
// Rotates x [head_dim] in place by delta positions in every stream, without the attention factor:
// K rotated for p becomes K rotated for p + delta.
void rope_apply_delta(const RopeConfig& config, std::span<double> x, int64_t delta);

// What qkv_rope_write computes, before storage rounding or quantization.
struct QkvRopeWriteResult {
  std::vector<double> q;  // [num_tokens, num_q_heads, head_dim]
  std::vector<double> k;  // [num_tokens, num_kv_heads, head_dim]
  std::vector<double> v;  // [num_tokens, num_kv_heads, head_dim_v]
};
// REQUIRES: the plan's can_implement(args) passed. Reads qkv, positions and the norm weights.
[[nodiscard]] QkvRopeWriteResult qkv_rope_write(const QkvRopeWriteDesc& desc,
                                                const QkvRopeWriteArgs& args);

// The stored K of sequence b, head h, position p as double (dequantized for int8 / fp8).
[[nodiscard]] std::vector<double> stored_k(const RopeShiftDesc& desc, const RopeShiftArgs& args,
                                           int64_t b, int64_t h, int64_t p);
// What rope_shift leaves in K, before storage rounding: for b in batch, p in [p0[b], p1[b]),
// h in num_kv_heads (in that order), head_dim values each: the stored K rotated by delta[b].
// REQUIRES: the plan's can_implement(args) passed.
[[nodiscard]] std::vector<double> rope_shift(const RopeShiftDesc& desc, const RopeShiftArgs& args);

}  // namespace kvcache::reference
