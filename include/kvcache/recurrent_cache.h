// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// RecurrentCache: the state of one linear-attention / state-space layer (Gated DeltaNet,
// Mamba-style): a conv state [batch, conv_tail, conv_dim] (the last conv_tail inputs of the
// short causal convolution) and a delta state [batch, num_v_heads, head_v_dim, head_k_dim].
// The state summarizes every token seen, so it cannot be rewound: only snapshots (whole-state
// copies taken at their offset) bring back an earlier point, and only to exactly that offset.
// A change of batch size or dtype is an error, never a silent reset. Both states start at zero.
//
// Contract mapping: update(conv_state, delta_state) replaces the state with the layer's new one
// (it does not move the offset; advance(n) records the n tokens that produced it) and returns
// keys = conv state, values = delta state. restore(target) accepts only target == offset().
// restore(snapshot [a, b), target) replaces the state and accepts only target == b. merge gives
// [a, c) holding the child's state; split always returns (none, s).
// Not thread-safe; callers serialize access. Const methods may run concurrently.

#include <cstdint>
#include <memory>
#include <vector>

#include "kvcache/buffer.h"
#include "kvcache/cache.h"
#include "kvcache/dtype.h"
#include "kvcache/export.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

namespace kvcache {

struct RecurrentCacheOptions {
  int64_t conv_tail = 0;  // kernel size - 1 of the causal conv
  int64_t conv_dim = 0;
  int64_t num_v_heads = 0;
  int64_t head_v_dim = 0;
  int64_t head_k_dim = 0;
  DType dtype = DType::f32;  // f32, f16 or bf16
  int64_t batch = 1;
};

class KVCACHE_API RecurrentCache final : public Cache {
 public:
  // invalid_argument for non-positive dims (conv_tail may be 0: no conv state) or a dtype other
  // than f32/f16/bf16.
  static Result<std::unique_ptr<RecurrentCache>> create(const RecurrentCacheOptions& options);
  ~RecurrentCache() override;

  [[nodiscard]] const RecurrentCacheOptions& options() const { return options_; }
  // Views of the live states: [batch, conv_tail, conv_dim] and
  // [batch, num_v_heads, head_v_dim, head_k_dim], contiguous; null data after free().
  [[nodiscard]] TensorView conv_state() const;
  [[nodiscard]] TensorView delta_state() const;
  // Records that n more tokens went into the state. invalid_argument for n < 0.
  Status advance(int64_t n);

  // --- the Cache contract ---
  [[nodiscard]] CacheKind kind() const override { return CacheKind::recurrent; }
  // conv_state: [batch, conv_tail, conv_dim], delta_state: [batch, num_v_heads, head_v_dim,
  // head_k_dim], the cache's dtype and batch (a different batch or dtype is invalid_argument).
  Result<CacheViews> update(const TensorView& conv_state, const TensorView& delta_state) override;
  [[nodiscard]] int64_t offset() const override { return offset_; }
  // [conv_state, delta_state].
  [[nodiscard]] std::vector<TensorView> state() const override;
  [[nodiscard]] Result<std::optional<Snapshot>> snapshot(int64_t from) const override;
  Status restore(int64_t target) override;
  Status restore(const Snapshot& snapshot, int64_t target) override;
  [[nodiscard]] Result<Snapshot> merge(std::optional<Snapshot>&& parent,
                                       std::optional<Snapshot>&& child) const override;
  [[nodiscard]] Result<SnapshotPair> split(Snapshot&& s, int64_t at) const override;
  // Releases both arrays; offset 0. Until the next update(), conv_state() and delta_state() are
  // views with null data (a state at offset 0 is zero by definition), and snapshots of it are none.
  void free() override;

 private:
  explicit RecurrentCache(const RecurrentCacheOptions& options);

  RecurrentCacheOptions options_;
  int64_t offset_ = 0;
  Buffer conv_;
  Buffer delta_;
};

}  // namespace kvcache
