// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Cache: the one contract every per-sequence cache kind implements (contiguous KVCache,
// RotatingKVCache, RecurrentCache), after mlx-lm's per-layer cache objects. docs/CACHE_CONTRACT.md
// has the table of what each call does for each kind and what each refuses.
//
// Positions are token counts: a cache at offset n holds (or held) tokens [0, n). Ranges are
// half-open. Every call that changes a cache validates everything first and only then writes
// ("validate, then mutate"): a call that returns an error leaves the cache byte-for-byte as it was.
// A Cache is not thread-safe; callers serialize access. Const methods may run concurrently.

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "kvcache/buffer.h"
#include "kvcache/export.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

namespace kvcache {

enum class CacheKind : uint8_t { contiguous, rotating, recurrent };
// "contiguous", "rotating", "recurrent".
[[nodiscard]] KVCACHE_API const char* name(CacheKind kind);

// What update() returns: views of the whole live cache, in temporal order, valid until the next
// call that changes the cache.
//   attention caches: keys [B, num_kv_heads, n, head_dim], values [B, num_kv_heads, n, head_dim_v]
//     (strided views into the cache's storage). Entry i < num_pinned holds position i; entry
//     i >= num_pinned holds position first_pos + (i - num_pinned). A contiguous cache has
//     num_pinned = 0 and first_pos = 0; a rotating cache reports its pinned tokens and window.
//   recurrent cache: keys is the conv state, values the delta state (see recurrent_cache.h).
struct CacheViews {
  TensorView keys;
  TensorView values;
  int64_t num_pinned = 0;
  int64_t first_pos = 0;
};

// An owned copy of a cache's state over tokens [begin, end). Move-only. What `arrays` hold is
// the business of the kind that made it; `layout` is the kind's shape signature (dims, dtype):
// a snapshot can be restored into, or merged by, a cache of the same kind and layout.
// `cache_id` names the cache it was taken from (merge refuses snapshots of two caches).
class KVCACHE_API Snapshot {
 public:
  Snapshot(CacheKind kind, uint64_t cache_id, std::vector<int64_t> layout, int64_t begin,
           int64_t end, std::vector<Buffer> arrays);
  Snapshot(const Snapshot&) = delete;
  Snapshot& operator=(const Snapshot&) = delete;
  Snapshot(Snapshot&&) noexcept = default;
  Snapshot& operator=(Snapshot&&) noexcept = default;

  [[nodiscard]] CacheKind kind() const { return kind_; }
  [[nodiscard]] uint64_t cache_id() const { return cache_id_; }
  [[nodiscard]] const std::vector<int64_t>& layout() const { return layout_; }
  [[nodiscard]] int64_t begin() const { return begin_; }
  [[nodiscard]] int64_t end() const { return end_; }
  [[nodiscard]] const std::vector<Buffer>& arrays() const { return arrays_; }
  // Moves the arrays out and leaves none: for a merge that adopts one side's state as it is.
  [[nodiscard]] std::vector<Buffer> take_arrays() && { return std::exchange(arrays_, {}); }
  // Bytes held by the arrays.
  [[nodiscard]] size_t num_bytes() const;

 private:
  CacheKind kind_;
  uint64_t cache_id_;
  std::vector<int64_t> layout_;
  int64_t begin_;
  int64_t end_;
  std::vector<Buffer> arrays_;
};

// The two halves split() returns; either may be none.
struct SnapshotPair {
  std::optional<Snapshot> first;
  std::optional<Snapshot> second;
};

class KVCACHE_API Cache {
 public:
  Cache(const Cache&) = delete;
  Cache& operator=(const Cache&) = delete;
  virtual ~Cache() = default;

  [[nodiscard]] virtual CacheKind kind() const = 0;
  // A process-unique id, fixed for the cache's lifetime; snapshots carry it.
  [[nodiscard]] uint64_t id() const { return id_; }

  // Appends L new tokens and returns views of the whole live cache (see CacheViews).
  // keys: [B, num_kv_heads, L, head_dim], values: [B, num_kv_heads, L, head_dim_v], the cache's
  // dtype, on the CPU, any strides. invalid_argument on any mismatch; resource_exhausted when a
  // fixed capacity would be exceeded. (RecurrentCache: see its header.)
  virtual Result<CacheViews> update(const TensorView& keys, const TensorView& values) = 0;

  // Tokens held (or, for a rotating cache, seen; see rotating_cache.h).
  [[nodiscard]] virtual int64_t offset() const = 0;

  // The owned arrays that hold the cache, for saving or moving between devices. Each kind's
  // header says which arrays and in what order. Views are valid until the next mutation.
  [[nodiscard]] virtual std::vector<TensorView> state() const = 0;

  // An owned copy of [from, offset()): none when from == offset(); invalid_argument when from < 0
  // or from > offset(). The live cache is unchanged.
  [[nodiscard]] virtual Result<std::optional<Snapshot>> snapshot(int64_t from) const = 0;

  // Rewinds to `target` using live state. REQUIRES of the caller, checked: 0 <= target <=
  // offset() and the tokens before target still held (see each kind). Refusals change nothing.
  virtual Status restore(int64_t target) = 0;

  // Restores from a snapshot [a, b) of this kind and layout, then rewinds to target
  // (a <= target <= b). Contiguous: the cache must hold [0, a); it rewinds to a and re-appends the
  // snapshot. Whole-state kinds: see their headers. Refusals change nothing.
  virtual Status restore(const Snapshot& snapshot, int64_t target) = 0;

  // One snapshot [a, c) from parent [a, b) and child [b, c). Refuses (invalid_argument) a missing
  // side, non-adjacent ranges, snapshots of another kind, layout or cache. On success both
  // arguments are consumed; on failure neither is moved from.
  [[nodiscard]] virtual Result<Snapshot> merge(std::optional<Snapshot>&& parent,
                                               std::optional<Snapshot>&& child) const = 0;

  // Splits s [a, c) at b into ([a, b), [b, c)): b <= a gives (none, s), b >= c gives (s, none);
  // kinds that cannot split (rotating, recurrent) give (none, s). Refuses a snapshot of another
  // kind or layout (then s is not moved from).
  [[nodiscard]] virtual Result<SnapshotPair> split(Snapshot&& s, int64_t at) const = 0;

  // Releases the memory; the cache is empty (offset 0) and usable again afterwards.
  virtual void free() = 0;

 protected:
  Cache();

 private:
  uint64_t id_;
};

}  // namespace kvcache
