// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The float64 reference of decode_attention and extend_attention (kvcache/attention.h): per query
// head, dequantize every stored K/V value it sees (stored * scale), then the textbook softmax with
// the descriptor's scale, window, soft-cap and sink. Slow and obviously right; shares nothing with
// the kernels beyond the dtype conversions. Thread-safe (pure).

#include <vector>

#include "kvcache/attention.h"

namespace kvcache::reference {

struct AttentionOutput {
  std::vector<double> o;    // [rows, num_q_heads, head_dim_v]
  std::vector<double> lse;  // [rows, num_q_heads], natural log, sink included
};

// Extend semantics when args.q_indptr is given, decode (one query per sequence) otherwise.
// REQUIRES: args pass can_implement of a plan made from desc.
[[nodiscard]] AttentionOutput attention(const AttentionDesc& desc, const AttentionArgs& args);

}  // namespace kvcache::reference
