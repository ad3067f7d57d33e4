// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/contiguous_cache.h"

#include <algorithm>
#include <cstring>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>

#include "kvcache/rope_shift.h"

#include "cache/snapshot_checks.h"
#include "core/check.h"

namespace kvcache {
namespace {

using detail::checked_product;
using detail::copy_or_die;
using detail::str;

// Arrays alternate K and V: even ones hold head_dim, odd ones head_dim_v.
int64_t array_dim(const KVCacheOptions& o, size_t array) {
  return array % 2 == 0 ? o.head_dim : o.head_dim_v;
}

// A [batch, n, heads, dim] view of tokens [first, first + n) of storage laid out as
// [batch, capacity, heads, dim].
TensorView token_view(const void* base, const KVCacheOptions& o, size_t array, int64_t capacity,
                      int64_t first, int64_t n) {
  const int64_t dim = array_dim(o, array);
  TensorView t;
  t.dtype = o.dtype;
  t.rank = 4;
  t.shape = {o.batch, n, o.num_kv_heads, dim, 0, 0};
  t.strides = {capacity * o.num_kv_heads * dim, o.num_kv_heads * dim, dim, 1, 0, 0};
  char* data = const_cast<char*>(static_cast<const char*>(base));
  if (data != nullptr) {
    data += first * o.num_kv_heads * dim * static_cast<int64_t>(size_of(o.dtype));
  }
  t.data = data;
  return t;
}

// Tokens [first, first + n) of one array of a snapshot, stored as [batch, end - begin, H, dim].
TensorView snapshot_view(const KVCacheOptions& o, const Snapshot& s, size_t array, int64_t first,
                         int64_t n) {
  return token_view(s.arrays()[array].data(), o, array, s.end() - s.begin(), first, n);
}

// [batch, n, H, D] as the [batch, H, n, D] the Cache contract speaks.
TensorView head_major(const TensorView& t) {
  TensorView out = t;
  std::swap(out.shape[1], out.shape[2]);
  std::swap(out.strides[1], out.strides[2]);
  return out;
}

// Batch 1 drops the batch axis: [len, H, D].
TensorView live_view(const TensorView& t, int64_t batch) {
  if (batch != 1) return t;
  TensorView out = t;
  out.rank = 3;
  out.shape = {t.shape[1], t.shape[2], t.shape[3], 0, 0, 0};
  out.strides = {t.strides[1], t.strides[2], t.strides[3], 0, 0, 0};
  return out;
}

// A rank-3 [n, H, D] input as the [1, n, H, D] the copies use.
TensorView as_rank4(const TensorView& t) {
  if (t.rank == 4) return t;
  TensorView out = t;
  out.rank = 4;
  out.shape = {1, t.shape[0], t.shape[1], t.shape[2], 0, 0};
  out.strides = {0, t.strides[0], t.strides[1], t.strides[2], 0, 0};
  return out;
}

std::vector<int64_t> layout_of(const KVCacheOptions& o) {
  return {o.num_layers, o.batch,      o.num_kv_heads,
          o.head_dim,   o.head_dim_v, static_cast<int64_t>(o.dtype)};
}

Status check_layer(const KVCacheOptions& o, int64_t layer, std::string_view op) {
  if (layer >= 0 && layer < o.num_layers) return Status();
  return Status::out_of_range(std::string(op) + ": layer " + str(layer) +
                              " is out of range, expected 0 <= layer < " + str(o.num_layers));
}

// dtype, device, shape (batch, n, heads, dim; rank 3 without batch when batch is 1), data.
Status check_tokens(const KVCacheOptions& o, const TensorView& t, size_t array, std::string_view op,
                    const char* arg) {
  if (Status s = check_dtype(t, o.dtype, op, arg); !s.ok()) return s;
  if (Status s = check_device(t, Device::cpu(), op, arg); !s.ok()) return s;
  const DimSpec dim{array_dim(o, array), array % 2 == 0 ? "head_dim" : "head_dim_v"};
  const DimSpec heads{o.num_kv_heads, "num_kv_heads"};
  Status s = o.batch == 1 && t.rank == 3
                 ? check_shape(t, {{-1, "n"}, heads, dim}, op, arg)
                 : check_shape(t, {{o.batch, "batch"}, {-1, "n"}, heads, dim}, op, arg);
  if (!s.ok()) return s;
  return check_data(t, op, arg);
}

// What this cache reads as a snapshot: arrays [k_0, v_0, ...], each [batch, end - begin, H, dim].
detail::SnapshotSpec snapshot_spec(const KVCacheOptions& o) {
  return {CacheKind::contiguous,
          layout_of(o),
          "(layers, batch, num_kv_heads, head_dim, head_dim_v, dtype)",
          /*allow_empty=*/true,
          2 * static_cast<size_t>(o.num_layers),
          [&o](const Snapshot& s, size_t array) {
            return snapshot_view(o, s, array, 0, s.end() - s.begin()).num_bytes();
          }};
}

// A snapshot [begin, end) of `cache_id` whose array a is the concatenation, along tokens, of
// piece(a, 0), ..., piece(a, num_pieces - 1) (each [batch, n_i, H, dim]).
template <class Piece>
Result<Snapshot> make_snapshot(const KVCacheOptions& o, uint64_t cache_id, int64_t begin,
                               int64_t end, int num_pieces, Piece piece) {
  const int64_t n = end - begin;
  const size_t num_arrays = 2 * static_cast<size_t>(o.num_layers);
  std::vector<Buffer> arrays;
  arrays.reserve(num_arrays);
  for (size_t a = 0; a < num_arrays; ++a) {
    const size_t bytes = token_view(nullptr, o, a, n, 0, n).num_bytes();
    Result<Buffer> buffer = Buffer::allocate(Device::cpu(), bytes);
    if (!buffer.ok()) return buffer.status();
    arrays.push_back(std::move(*buffer));
  }
  for (size_t a = 0; a < num_arrays; ++a) {
    int64_t at = 0;
    for (int i = 0; i < num_pieces; ++i) {
      const TensorView src = piece(a, i);
      copy_or_die(src, token_view(arrays[a].data(), o, a, n, at, src.shape[1]));
      at += src.shape[1];
    }
    KV_CHECK(at == n);
  }
  return Snapshot(CacheKind::contiguous, cache_id, layout_of(o), begin, end, std::move(arrays));
}

}  // namespace

// --- construction ---

KVCache::KVCache(const KVCacheOptions& options)
    : options_(options),
      pending_(static_cast<size_t>(options.num_layers), 0),
      arrays_(2 * static_cast<size_t>(options.num_layers)) {}

KVCache::~KVCache() = default;

Result<std::unique_ptr<KVCache>> KVCache::create(const KVCacheOptions& options) {
  constexpr std::string_view kOp = "KVCache.create";
  const std::string op = std::string(kOp) + ": ";
  for (const auto& [value, field] :
       {std::pair{options.num_layers, "num_layers"},
        std::pair{options.num_kv_heads, "num_kv_heads"}, std::pair{options.head_dim, "head_dim"},
        std::pair{options.batch, "batch"}}) {
    if (Status s = detail::check_positive(kOp, field, value); !s.ok()) return s;
  }
  if (options.head_dim_v < 0) {
    return Status::invalid_argument(op + "head_dim_v is " + str(options.head_dim_v) +
                                    ", expected >= 0 (0 means head_dim)");
  }
  if (Status s = detail::check_float_dtype(kOp, options.dtype); !s.ok()) return s;
  if (options.capacity < 0) {
    return Status::invalid_argument(op + "capacity is " + str(options.capacity) +
                                    ", expected >= 0");
  }
  if (options.fixed_capacity && options.capacity == 0) {
    return Status::invalid_argument(op +
                                    "fixed_capacity is set with capacity 0, expected "
                                    "capacity > 0");
  }
  KVCacheOptions resolved = options;
  if (resolved.head_dim_v == 0) resolved.head_dim_v = resolved.head_dim;
  int64_t dims = 0;
  int64_t entry = 0;
  if (__builtin_add_overflow(resolved.head_dim, resolved.head_dim_v, &dims) ||
      !checked_product({resolved.num_layers, resolved.batch, resolved.num_kv_heads, dims,
                        static_cast<int64_t>(size_of(resolved.dtype))},
                       &entry)) {
    return Status::invalid_argument(op +
                                    "one token's K and V overflow 64 bits, expected "
                                    "smaller dims");
  }
  std::unique_ptr<KVCache> cache(new KVCache(resolved));
  std::vector<Buffer> retired;
  if (Status s = cache->reserve(0, resolved.capacity, "KVCache.create", &retired); !s.ok()) {
    return s;
  }
  return cache;
}

Result<std::unique_ptr<KVCache>> KVCache::make(int64_t num_layers, int64_t num_kv_heads,
                                               int64_t head_dim, DType dtype) {
  KVCacheOptions options;
  options.num_layers = num_layers;
  options.num_kv_heads = num_kv_heads;
  options.head_dim = head_dim;
  options.dtype = dtype;
  return create(options);
}

Result<std::unique_ptr<KVCache>> KVCache::with_capacity(int64_t num_layers, int64_t num_kv_heads,
                                                        int64_t head_dim, int64_t max_seq_len,
                                                        DType dtype) {
  KVCacheOptions options;
  options.num_layers = num_layers;
  options.num_kv_heads = num_kv_heads;
  options.head_dim = head_dim;
  options.dtype = dtype;
  options.capacity = max_seq_len;
  options.fixed_capacity = true;
  return create(options);
}

// --- storage ---

TensorView KVCache::storage(size_t array, int64_t first, int64_t n) const {
  return token_view(arrays_[array].data(), options_, array, capacity_, first, n);
}

Status KVCache::reserve(int64_t length, int64_t count, std::string_view op,
                        std::vector<Buffer>* retired) {
  const int64_t needed = length + count;
  if (needed <= capacity_) return Status();
  int64_t new_capacity = 0;
  if (options_.fixed_capacity) {
    if (needed > options_.capacity) {
      return Status::resource_exhausted(std::string(op) + ": " + str(count) + " tokens at length " +
                                        str(length) + " exceed the fixed capacity " +
                                        str(options_.capacity) + ", expected at most " +
                                        str(std::max<int64_t>(0, options_.capacity - length)));
    }
    new_capacity = options_.capacity;  // after free(): the configured capacity again
  } else {
    new_capacity = std::max({2 * capacity_, needed, options_.capacity});
  }
  std::vector<Buffer> fresh;
  fresh.reserve(arrays_.size());
  for (size_t a = 0; a < arrays_.size(); ++a) {
    int64_t bytes = 0;
    if (!checked_product({options_.batch, new_capacity, options_.num_kv_heads,
                          array_dim(options_, a), static_cast<int64_t>(size_of(options_.dtype))},
                         &bytes)) {
      return Status::resource_exhausted(std::string(op) + ": a capacity of " + str(new_capacity) +
                                        " tokens overflows 64 bits of bytes, expected fewer");
    }
    Result<Buffer> buffer = Buffer::allocate(Device::cpu(), static_cast<size_t>(bytes));
    if (!buffer.ok()) return buffer.status();
    fresh.push_back(std::move(*buffer));
  }
  // Nothing fails from here on.
  for (size_t a = 0; a < arrays_.size(); ++a) {
    const int64_t held = len_ + pending_[a / 2];
    copy_or_die(storage(a, 0, held),
                token_view(fresh[a].data(), options_, a, new_capacity, 0, held));
    retired->push_back(std::exchange(arrays_[a], std::move(fresh[a])));
  }
  capacity_ = new_capacity;
  return Status();
}

// --- the layer-by-layer interface ---

Status KVCache::append(int64_t layer, const TensorView& k, const TensorView& v) {
  constexpr std::string_view kOp = "KVCache.append";
  if (Status s = check_layer(options_, layer, kOp); !s.ok()) return s;
  if (Status s = check_tokens(options_, k, 0, kOp, "k"); !s.ok()) return s;
  if (Status s = check_tokens(options_, v, 1, kOp, "v"); !s.ok()) return s;
  const TensorView k4 = as_rank4(k);
  const TensorView v4 = as_rank4(v);
  const int64_t n = k4.shape[1];
  if (n < 1) {
    return Status::invalid_argument(std::string(kOp) + ": k has " + str(n) +
                                    " tokens, expected at least 1");
  }
  if (v4.shape[1] != n) {
    return Status::invalid_argument(std::string(kOp) + ": v has " + str(v4.shape[1]) +
                                    " tokens, expected " + str(n) + " (as many as k)");
  }
  const auto l = static_cast<size_t>(layer);
  const int64_t at = len_ + pending_[l];
  std::vector<Buffer> retired;
  if (Status s = reserve(at, n, kOp, &retired); !s.ok()) return s;
  copy_or_die(k4, storage(2 * l, at, n));
  copy_or_die(v4, storage(2 * l + 1, at, n));
  pending_[l] += n;
  return Status();
}

Status KVCache::advance() {
  for (size_t l = 1; l < pending_.size(); ++l) {
    if (pending_[l] != pending_[0]) {
      return Status::invalid_argument("KVCache.advance: layer " + std::to_string(l) + " has " +
                                      str(pending_[l]) + " pending tokens, expected " +
                                      str(pending_[0]) + " (as layer 0)");
    }
  }
  len_ += pending_[0];
  std::fill(pending_.begin(), pending_.end(), 0);
  return Status();
}

Result<TensorView> KVCache::k(int64_t layer) const {
  if (Status s = check_layer(options_, layer, "KVCache.k"); !s.ok()) return s;
  return live_view(storage(2 * static_cast<size_t>(layer), 0, len_), options_.batch);
}

Result<TensorView> KVCache::v(int64_t layer) const {
  if (Status s = check_layer(options_, layer, "KVCache.v"); !s.ok()) return s;
  return live_view(storage(2 * static_cast<size_t>(layer) + 1, 0, len_), options_.batch);
}

size_t KVCache::entry_size() const {
  return static_cast<size_t>(options_.num_layers * options_.batch * options_.num_kv_heads *
                             (options_.head_dim + options_.head_dim_v)) *
         size_of(options_.dtype);
}

void KVCache::clear() {
  len_ = 0;
  std::fill(pending_.begin(), pending_.end(), 0);
}

Status KVCache::truncate(int64_t n) {
  if (Status s = detail::check_position("KVCache.truncate", "n", n, len_); !s.ok()) return s;
  len_ = n;
  std::fill(pending_.begin(), pending_.end(), 0);
  return Status();
}

Status KVCache::shift(int64_t p0, int64_t p1, int64_t delta, const RopeConfig& rope) {
  constexpr std::string_view kOp = "KVCache.shift";
  if (p0 < 0 || p0 > p1 || p1 > len_) {
    return Status::out_of_range(std::string(kOp) + ": [p0, p1) is [" + str(p0) + ", " + str(p1) +
                                "), expected 0 <= p0 <= p1 <= len() = " + str(len_));
  }
  if (Status s = check_rope_config(rope, options_.head_dim, kOp); !s.ok()) return s;
  if (p0 == p1) return Status();
  if (p1 > rope.max_position || delta <= -rope.max_position || delta >= rope.max_position) {
    return Status::out_of_range(std::string(kOp) + ": tokens [" + str(p0) + ", " + str(p1) +
                                ") moved by " + str(delta) +
                                ", expected p1 <= rope.max_position and |delta| < "
                                "rope.max_position = " +
                                str(rope.max_position));
  }
  RopeShiftDesc desc;
  desc.kv.num_kv_heads = options_.num_kv_heads;
  desc.kv.head_dim = options_.head_dim;
  desc.kv.k_dtype = options_.dtype;
  desc.kv.v_dtype = options_.dtype;
  desc.rope = rope;
  Result<RopeShiftPlan> plan = RopeShiftPlan::select(desc);
  if (!plan.ok()) return plan.status();
  // Every batch row moves the same range; the checks above keep the values in int32.
  const auto batch = static_cast<size_t>(options_.batch);
  const std::vector<int32_t> first(batch, static_cast<int32_t>(p0));
  const std::vector<int32_t> last(batch, static_cast<int32_t>(p1));
  const std::vector<int32_t> by(batch, static_cast<int32_t>(delta));
  const std::vector<int32_t> lens(batch, static_cast<int32_t>(len_));
  std::vector<RopeShiftArgs> args(static_cast<size_t>(options_.num_layers));
  for (size_t l = 0; l < args.size(); ++l) {
    RopeShiftArgs& a = args[l];
    a.p0 = first;
    a.p1 = last;
    a.delta = by;
    a.seq_lens = lens;
    // [batch, capacity, H, D] storage as the [batch, H, capacity, D] view the op takes.
    a.caches.k = storage(2 * l, 0, capacity_);
    std::swap(a.caches.k.shape[1], a.caches.k.shape[2]);
    std::swap(a.caches.k.strides[1], a.caches.k.strides[2]);
    if (Status s = plan->can_implement(a); !s.ok()) return s;
  }
  for (const RopeShiftArgs& a : args) {
    if (Status s = plan->run(Stream{}, {}, a); !s.ok()) return s;
  }
  return Status();
}

Status KVCache::erase(int64_t p0, int64_t p1) {
  if (p0 < 0 || p0 > p1 || p1 > len_) {
    return Status::out_of_range("KVCache.erase: [p0, p1) is [" + str(p0) + ", " + str(p1) +
                                "), expected 0 <= p0 <= p1 <= len() = " + str(len_));
  }
  std::fill(pending_.begin(), pending_.end(), 0);
  if (p0 == p1) return Status();
  const size_t esize = size_of(options_.dtype);
  for (size_t a = 0; a < arrays_.size(); ++a) {
    const auto token_bytes =
        static_cast<size_t>(options_.num_kv_heads * array_dim(options_, a)) * esize;
    auto* base = static_cast<char*>(arrays_[a].data());
    for (int64_t b = 0; b < options_.batch; ++b) {
      char* row = base + static_cast<size_t>(b * capacity_) * token_bytes;
      std::memmove(row + static_cast<size_t>(p0) * token_bytes,
                   row + static_cast<size_t>(p1) * token_bytes,
                   static_cast<size_t>(len_ - p1) * token_bytes);
    }
  }
  len_ -= p1 - p0;
  return Status();
}

// --- the Cache contract ---

Result<CacheViews> KVCache::update(const TensorView& keys, const TensorView& values) {
  constexpr std::string_view kOp = "KVCache.update";
  if (options_.num_layers != 1) {
    return Status::invalid_argument(std::string(kOp) + ": the cache has " +
                                    str(options_.num_layers) +
                                    " layers, expected 1 (use append and advance)");
  }
  if (pending_[0] != 0) {
    return Status::invalid_argument(std::string(kOp) + ": " + str(pending_[0]) +
                                    " tokens are pending from append, expected none (call "
                                    "advance first)");
  }
  const KVCacheOptions& o = options_;
  if (Status s = detail::check_update_inputs(
          keys, values, {o.dtype, o.batch, o.num_kv_heads, o.head_dim, o.head_dim_v}, kOp);
      !s.ok()) {
    return s;
  }
  const int64_t n = keys.shape[2];
  std::vector<Buffer> retired;
  if (Status s = reserve(len_, n, kOp, &retired); !s.ok()) return s;
  copy_or_die(keys, head_major(storage(0, len_, n)));
  copy_or_die(values, head_major(storage(1, len_, n)));
  len_ += n;
  CacheViews views;
  views.keys = head_major(storage(0, 0, len_));
  views.values = head_major(storage(1, 0, len_));
  return views;
}

std::vector<TensorView> KVCache::state() const {
  std::vector<TensorView> out;
  out.reserve(arrays_.size());
  for (size_t a = 0; a < arrays_.size(); ++a) out.push_back(storage(a, 0, len_));
  return out;
}

Result<std::optional<Snapshot>> KVCache::snapshot(int64_t from) const {
  if (Status s = detail::check_position("KVCache.snapshot", "from", from, len_); !s.ok()) return s;
  if (from == len_) return std::optional<Snapshot>();
  const int64_t n = len_ - from;
  Result<Snapshot> s = make_snapshot(options_, id(), from, len_, 1,
                                     [&](size_t a, int) { return storage(a, from, n); });
  if (!s.ok()) return s.status();
  return std::optional<Snapshot>(std::move(*s));
}

Status KVCache::restore(int64_t target) {
  if (Status s = detail::check_position("KVCache.restore", "target", target, len_); !s.ok()) {
    return s;
  }
  len_ = target;
  std::fill(pending_.begin(), pending_.end(), 0);
  return Status();
}

Status KVCache::restore(const Snapshot& snapshot, int64_t target) {
  constexpr std::string_view kOp = "KVCache.restore";
  if (Status s = detail::check_snapshot(snapshot, snapshot_spec(options_), kOp, "snapshot");
      !s.ok()) {
    return s;
  }
  const int64_t a = snapshot.begin();
  if (a > len_) {
    return Status::invalid_argument(
        std::string(kOp) + ": snapshot begins at " + str(a) + " but the cache holds " + str(len_) +
        " tokens, expected begin <= " + str(len_) + " (the cache must hold [0, begin))");
  }
  if (Status s = detail::check_target_in(kOp, snapshot, target); !s.ok()) return s;
  std::vector<Buffer> retired;
  if (Status s = reserve(a, target - a, kOp, &retired); !s.ok()) return s;
  // Only [a, target) is copied: the rewind to target would drop the rest.
  const int64_t n = target - a;
  for (size_t i = 0; i < arrays_.size(); ++i) {
    copy_or_die(snapshot_view(options_, snapshot, i, 0, n), storage(i, a, n));
  }
  len_ = target;
  std::fill(pending_.begin(), pending_.end(), 0);
  return Status();
}

Result<Snapshot> KVCache::merge(std::optional<Snapshot>&& parent,
                                std::optional<Snapshot>&& child) const {
  if (Status s = detail::check_merge(parent, child, snapshot_spec(options_), "KVCache.merge");
      !s.ok()) {
    return s;
  }
  const Snapshot& p = *parent;
  const Snapshot& c = *child;
  Result<Snapshot> merged =
      make_snapshot(options_, p.cache_id(), p.begin(), c.end(), 2, [&](size_t a, int i) {
        const Snapshot& s = i == 0 ? p : c;
        return snapshot_view(options_, s, a, 0, s.end() - s.begin());
      });
  if (!merged.ok()) return merged.status();
  parent.reset();
  child.reset();
  return merged;
}

Result<SnapshotPair> KVCache::split(Snapshot&& s, int64_t at) const {
  if (Status st = detail::check_snapshot(s, snapshot_spec(options_), "KVCache.split", "s");
      !st.ok()) {
    return st;
  }
  SnapshotPair out;
  if (at <= s.begin()) {
    out.second.emplace(std::move(s));
    return out;
  }
  if (at >= s.end()) {
    out.first.emplace(std::move(s));
    return out;
  }
  const int64_t head = at - s.begin();
  Result<Snapshot> first =
      make_snapshot(options_, s.cache_id(), s.begin(), at, 1,
                    [&](size_t a, int) { return snapshot_view(options_, s, a, 0, head); });
  if (!first.ok()) return first.status();
  Result<Snapshot> second = make_snapshot(
      options_, s.cache_id(), at, s.end(), 1,
      [&](size_t a, int) { return snapshot_view(options_, s, a, head, s.end() - at); });
  if (!second.ok()) return second.status();
  out.first.emplace(std::move(*first));
  out.second.emplace(std::move(*second));
  return out;
}

void KVCache::free() {
  for (Buffer& b : arrays_) b = Buffer();
  capacity_ = 0;
  len_ = 0;
  std::fill(pending_.begin(), pending_.end(), 0);
}

}  // namespace kvcache
