// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// KVCache: the contiguous per-sequence cache. Per layer, K is stored as
// [batch, capacity, num_kv_heads, head_dim] and V as [batch, capacity, num_kv_heads, head_dim_v]
// (token-major, "NHD"), so one token's heads are adjacent and a layer's live tokens are one
// strided view. Capacity is allocated up front; appending within it never allocates. Past it the
// cache doubles (amortized), or refuses with resource_exhausted when fixed_capacity is set.
//
// Two ways in, one storage:
//  - model loops that run all layers per step: append(layer, k, v) for each layer, then advance();
//  - the per-layer Cache contract (mlx-lm style): update(keys, values), for a 1-layer cache.
// Not thread-safe; callers serialize access. Const methods may run concurrently.

#include <cstdint>
#include <memory>
#include <string_view>
#include <vector>

#include "kvcache/buffer.h"
#include "kvcache/cache.h"
#include "kvcache/dtype.h"
#include "kvcache/export.h"
#include "kvcache/rope.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

namespace kvcache {

struct KVCacheOptions {
  // --- affects behaviour ---
  int64_t num_layers = 1;
  int64_t num_kv_heads = 1;
  int64_t head_dim = 0;      // of K
  int64_t head_dim_v = 0;    // of V; 0 means head_dim
  DType dtype = DType::f32;  // f32, f16 or bf16
  int64_t batch = 1;
  bool fixed_capacity = false;  // refuse to grow past `capacity` instead of doubling
  // --- affects performance ---
  int64_t capacity = 0;  // tokens allocated up front
};

class KVCACHE_API KVCache final : public Cache {
 public:
  // invalid_argument for non-positive dims, a dtype other than f32/f16/bf16, negative capacity,
  // or fixed_capacity with capacity 0; resource_exhausted when allocation fails.
  static Result<std::unique_ptr<KVCache>> create(const KVCacheOptions& options);
  // Shorthands: a growable cache with no preallocation, and one preallocated for max_seq_len
  // tokens that refuses to grow.
  static Result<std::unique_ptr<KVCache>> make(int64_t num_layers, int64_t num_kv_heads,
                                               int64_t head_dim, DType dtype = DType::f32);
  static Result<std::unique_ptr<KVCache>> with_capacity(int64_t num_layers, int64_t num_kv_heads,
                                                        int64_t head_dim, int64_t max_seq_len,
                                                        DType dtype = DType::f32);
  ~KVCache() override;

  // --- the layer-by-layer interface ---

  // Writes n tokens into `layer` after the tokens already written to it since the last advance().
  // k: [n, num_kv_heads, head_dim] (batch 1) or [batch, n, num_kv_heads, head_dim]; v likewise
  // with head_dim_v; n >= 1, same n for k and v, the cache's dtype, any strides. The tokens are not
  // visible in len() / k(layer) until advance(). Refusals (layer out of range, shapes, dtype,
  // capacity) change nothing.
  Status append(int64_t layer, const TensorView& k, const TensorView& v);
  // Commits the tokens appended since the last advance(): every layer must have the same number
  // pending (invalid_argument naming the first layer that differs). With none pending: no-op.
  Status advance();
  // Live keys of a layer: [len, num_kv_heads, head_dim] for batch 1, else
  // [batch, len, num_kv_heads, head_dim]. out_of_range for a bad layer.
  [[nodiscard]] Result<TensorView> k(int64_t layer) const;
  [[nodiscard]] Result<TensorView> v(int64_t layer) const;
  [[nodiscard]] int64_t len() const { return len_; }
  [[nodiscard]] bool is_empty() const { return len_ == 0; }
  [[nodiscard]] int64_t num_layers() const { return options_.num_layers; }
  [[nodiscard]] int64_t capacity() const { return capacity_; }
  [[nodiscard]] const KVCacheOptions& options() const { return options_; }
  // Bytes one token occupies: K and V, every layer, every batch row.
  [[nodiscard]] size_t entry_size() const;
  // Drops every token and anything pending; keeps the memory.
  void clear();
  // Keeps tokens [0, n) and drops anything pending. invalid_argument unless 0 <= n <= len().
  Status truncate(int64_t n);
  // Re-rotates K of tokens [p0, p1) in every layer by delta positions (see rope_shift): K rotated
  // for position q becomes K rotated for q + delta. out_of_range unless 0 <= p0 <= p1 <= len(),
  // p1 <= rope.max_position and |delta| < rope.max_position; invalid_argument for a rope config
  // that does not fit head_dim. Pending tokens are untouched.
  Status shift(int64_t p0, int64_t p1, int64_t delta, const RopeConfig& rope);
  // Removes tokens [p0, p1), moving later tokens down (llama.cpp seq_rm inside a sequence); with
  // shift() this is a context shift. out_of_range unless 0 <= p0 <= p1 <= len(). Drops anything
  // pending.
  Status erase(int64_t p0, int64_t p1);

  // --- the Cache contract ---
  [[nodiscard]] CacheKind kind() const override { return CacheKind::contiguous; }
  // REQUIRES (checked): num_layers == 1 and nothing pending from append().
  Result<CacheViews> update(const TensorView& keys, const TensorView& values) override;
  [[nodiscard]] int64_t offset() const override { return len_; }
  // [k_0, v_0, k_1, v_1, ...]: each [batch, len, num_kv_heads, head_dim(_v)].
  [[nodiscard]] std::vector<TensorView> state() const override;
  [[nodiscard]] Result<std::optional<Snapshot>> snapshot(int64_t from) const override;
  // Same as truncate(target).
  Status restore(int64_t target) override;
  Status restore(const Snapshot& snapshot, int64_t target) override;
  [[nodiscard]] Result<Snapshot> merge(std::optional<Snapshot>&& parent,
                                       std::optional<Snapshot>&& child) const override;
  [[nodiscard]] Result<SnapshotPair> split(Snapshot&& s, int64_t at) const override;
  void free() override;

 private:
  explicit KVCache(const KVCacheOptions& options);

  // A [batch, n, num_kv_heads, dim] view of tokens [first, first + n) of arrays_[array].
  [[nodiscard]] TensorView storage(size_t array, int64_t first, int64_t n) const;
  // Makes room for `count` tokens at `length` (doubling, or the fixed capacity); the old
  // buffers move to `retired`, so inputs that point into them stay valid during the write.
  Status reserve(int64_t length, int64_t count, std::string_view op, std::vector<Buffer>* retired);

  KVCacheOptions options_;  // head_dim_v resolved; capacity as configured
  int64_t capacity_ = 0;
  int64_t len_ = 0;
  std::vector<int64_t> pending_;  // per layer, tokens appended since advance()
  std::vector<Buffer> arrays_;    // [k_0, v_0, k_1, v_1, ...], as state() lists them
};

}  // namespace kvcache
