// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// RotatingKVCache: a sliding-window cache for one attention layer. It keeps the first `keep`
// tokens (attention sinks) and the most recent max_size - keep tokens; older tokens are dropped.
// offset() counts every token ever appended (it is the next token's position).
//
// Views come back in temporal order and contiguous in the token axis: the live tokens are one run
// of slots in a buffer of at least 2 * max_size token slots, the pinned block first and the
// rolling tokens after it. New tokens are appended after the run; the pinned block slides forward
// with the window (an O(keep) copy per step) and the whole run moves back to the front when the
// buffer fills (an O(window) copy once every ~max_size tokens). update(L tokens) returns the pinned
// tokens plus every token a query of the chunk can see: rolling tokens
// [max(keep, offset_before - (max_size - keep) + 1), offset_after), so the view grows past
// max_size for a multi-token chunk (mlx-lm does the same). The CacheViews
// fields num_pinned / first_pos give each entry's position.
//
// Rewinds: the window "has wrapped" once offset() > max_size (a token was dropped). A wrapped
// cache refuses restore(target) for target < offset(). Snapshots are whole-window copies taken at
// their offset (range [from, offset)); restore(snapshot [a, b), target) replaces the live window by
// the snapshot's and accepts target == b, or a <= target < b when the snapshot's window had not
// wrapped (b <= max_size). split() always returns (none, s).
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

struct RotatingKVCacheOptions {
  int64_t max_size = 0;  // window, pinned tokens included
  int64_t keep = 0;      // first tokens pinned; 0 <= keep < max_size
  int64_t num_kv_heads = 1;
  int64_t head_dim = 0;
  int64_t head_dim_v = 0;    // 0 means head_dim
  DType dtype = DType::f32;  // f32, f16 or bf16
  int64_t batch = 1;
};

class KVCACHE_API RotatingKVCache final : public Cache {
 public:
  // invalid_argument for non-positive dims or max_size, keep outside [0, max_size), or a dtype
  // other than f32/f16/bf16.
  static Result<std::unique_ptr<RotatingKVCache>> create(const RotatingKVCacheOptions& options);
  ~RotatingKVCache() override;

  [[nodiscard]] int64_t max_size() const { return options_.max_size; }
  [[nodiscard]] int64_t keep() const { return options_.keep; }
  [[nodiscard]] const RotatingKVCacheOptions& options() const { return options_; }
  // Tokens in the window now: min(offset(), max_size()).
  [[nodiscard]] int64_t window_len() const;
  [[nodiscard]] bool has_wrapped() const { return offset_ > options_.max_size; }

  // --- the Cache contract ---
  [[nodiscard]] CacheKind kind() const override { return CacheKind::rotating; }
  Result<CacheViews> update(const TensorView& keys, const TensorView& values) override;
  [[nodiscard]] int64_t offset() const override { return offset_; }
  // [keys, values]: the window in temporal order, each [batch, window_len, num_kv_heads,
  // head_dim(_v)].
  [[nodiscard]] std::vector<TensorView> state() const override;
  [[nodiscard]] Result<std::optional<Snapshot>> snapshot(int64_t from) const override;
  Status restore(int64_t target) override;
  Status restore(const Snapshot& snapshot, int64_t target) override;
  [[nodiscard]] Result<Snapshot> merge(std::optional<Snapshot>&& parent,
                                       std::optional<Snapshot>&& child) const override;
  [[nodiscard]] Result<SnapshotPair> split(Snapshot&& s, int64_t at) const override;
  void free() override;

 private:
  explicit RotatingKVCache(const RotatingKVCacheOptions& options);

  // Storage is [batch, num_slots_, num_kv_heads, dim] per array (token-major). The live tokens
  // are one run of slots: the pinned block (position p < keep at start_slot_ + p), then rolling
  // positions [base_pos_, offset_) at start_slot_ + keep + (p - base_pos_). The pinned block
  // moves forward with the window (an O(keep) copy per step) so that it always sits right before
  // the oldest rolling token a view needs; with keep > 0, base_pos_ is the window's first
  // rolling position after every call, so state() is one view too.
  [[nodiscard]] int64_t num_rolling() const { return options_.max_size - options_.keep; }
  // The first rolling position of the window at offset_: max(keep, offset_ - num_rolling()).
  [[nodiscard]] int64_t window_first() const;
  // A [batch, n, num_kv_heads, dim] view of storage slots [first_slot, first_slot + n).
  [[nodiscard]] TensorView slots_view(const Buffer& buffer, int64_t dim, int64_t first_slot,
                                      int64_t n) const;

  RotatingKVCacheOptions options_;  // head_dim_v resolved
  int64_t offset_ = 0;
  int64_t num_slots_ = 0;  // 0 until the first update (and after free())
  int64_t start_slot_ = 0;
  int64_t base_pos_ = 0;
  Buffer keys_;
  Buffer values_;
};

}  // namespace kvcache
