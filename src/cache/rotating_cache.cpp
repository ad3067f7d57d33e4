// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/rotating_cache.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>

#include "cache/snapshot_checks.h"
#include "core/check.h"

namespace kvcache {
namespace {

using detail::copy_or_die;
using detail::str;

// Where a run of tokens lives: a token-major [batch, num_slots, heads, dim] buffer, from a slot.
struct SlotRun {
  char* base;
  int64_t num_slots;
  int64_t slot;
};

// Copies `count` tokens of every batch row from `src` to `dst`; the runs may overlap (memmove),
// which is how the window is moved within one buffer.
void move_tokens(SlotRun src, SlotRun dst, int64_t count, int64_t batch, int64_t token_bytes) {
  if (count <= 0 || (src.base == dst.base && src.slot == dst.slot)) return;
  for (int64_t b = 0; b < batch; ++b) {
    const char* from = src.base + (b * src.num_slots + src.slot) * token_bytes;
    char* to = dst.base + (b * dst.num_slots + dst.slot) * token_bytes;
    std::memmove(to, from, static_cast<size_t>(count * token_bytes));
  }
}

// Tokens [first, first + n) of a [B, H, L, D] input.
TensorView token_range(const TensorView& t, int64_t first, int64_t n) {
  TensorView out = t;
  out.shape[2] = n;
  out.data =
      static_cast<char*>(t.data) + first * t.strides[2] * static_cast<int64_t>(size_of(t.dtype));
  return out;
}

// A [batch, n, heads, dim] token-major view as the [batch, heads, n, dim] view update() returns.
TensorView heads_first(const TensorView& t) {
  TensorView out = t;
  out.shape = {t.shape[0], t.shape[2], t.shape[1], t.shape[3]};
  out.strides = {t.strides[0], t.strides[2], t.strides[1], t.strides[3]};
  return out;
}

// The shape signature snapshots carry (see Snapshot::layout).
std::vector<int64_t> layout_of(const RotatingKVCacheOptions& o) {
  return {o.max_size,
          o.keep,
          o.batch,
          o.num_kv_heads,
          o.head_dim,
          o.head_dim_v,
          static_cast<int64_t>(o.dtype)};
}

// What this cache reads as a snapshot: [keys, values], the window at end(), each
// [batch, min(end, max_size), num_kv_heads, head_dim(_v)].
detail::SnapshotSpec snapshot_spec(const RotatingKVCacheOptions& o) {
  return {CacheKind::rotating,
          layout_of(o),
          "(max_size, keep, batch, num_kv_heads, head_dim, head_dim_v, dtype)",
          /*allow_empty=*/true,
          2,
          [&o](const Snapshot& s, size_t array) {
            const int64_t dim = array == 0 ? o.head_dim : o.head_dim_v;
            const int64_t n = std::min(s.end(), o.max_size);
            return static_cast<size_t>(o.batch * n * o.num_kv_heads * dim) * size_of(o.dtype);
          }};
}

}  // namespace

// --- construction ---

RotatingKVCache::RotatingKVCache(const RotatingKVCacheOptions& options)
    : options_(options), base_pos_(options.keep) {}

RotatingKVCache::~RotatingKVCache() = default;

Result<std::unique_ptr<RotatingKVCache>> RotatingKVCache::create(
    const RotatingKVCacheOptions& options) {
  constexpr std::string_view kOp = "RotatingKVCache.create";
  const std::string op = std::string(kOp) + ": ";
  for (const auto& [value, field] :
       {std::pair{options.max_size, "max_size"}, std::pair{options.num_kv_heads, "num_kv_heads"},
        std::pair{options.head_dim, "head_dim"}, std::pair{options.batch, "batch"}}) {
    if (Status s = detail::check_positive(kOp, field, value); !s.ok()) return s;
  }
  if (options.keep < 0 || options.keep >= options.max_size) {
    return Status::invalid_argument(op + "keep is " + str(options.keep) +
                                    ", expected 0 <= keep < max_size (" + str(options.max_size) +
                                    ")");
  }
  if (options.head_dim_v < 0) {
    return Status::invalid_argument(op + "head_dim_v is " + str(options.head_dim_v) +
                                    ", expected >= 0 (0 means head_dim)");
  }
  if (Status s = detail::check_float_dtype(kOp, options.dtype); !s.ok()) return s;
  RotatingKVCacheOptions resolved = options;
  if (resolved.head_dim_v == 0) resolved.head_dim_v = resolved.head_dim;
  // Storage for 2 * max_size tokens must be addressable; larger chunks are checked in update().
  int64_t total = 0;
  if (!detail::checked_product({resolved.batch, 2, resolved.max_size, resolved.num_kv_heads,
                                std::max(resolved.head_dim, resolved.head_dim_v),
                                static_cast<int64_t>(size_of(resolved.dtype))},
                               &total)) {
    return Status::invalid_argument(op + "batch * 2 * max_size * num_kv_heads * " +
                                    "head_dim bytes overflow int64, expected smaller dims");
  }
  return std::unique_ptr<RotatingKVCache>(new RotatingKVCache(resolved));
}

// --- queries ---

int64_t RotatingKVCache::window_len() const { return std::min(offset_, options_.max_size); }

int64_t RotatingKVCache::window_first() const {
  return std::max(options_.keep, offset_ - num_rolling());
}

TensorView RotatingKVCache::slots_view(const Buffer& buffer, int64_t dim, int64_t first_slot,
                                       int64_t n) const {
  const int64_t heads = options_.num_kv_heads;
  TensorView t;
  t.dtype = options_.dtype;
  t.rank = 4;
  t.shape = {options_.batch, n, heads, dim};
  t.strides = {num_slots_ * heads * dim, heads * dim, dim, 1};
  const void* base = buffer.data();
  const int64_t offset_bytes = first_slot * heads * dim * static_cast<int64_t>(size_of(t.dtype));
  // Views are non-owning and writable by design; const_cast only hands out our own storage.
  t.data = base ? const_cast<char*>(static_cast<const char*>(base)) + offset_bytes : nullptr;
  return t;
}

std::vector<TensorView> RotatingKVCache::state() const {
  // With keep > 0, base_pos_ == window_first() (update() keeps it so), so the pinned block and
  // the window's rolling tokens are adjacent; with keep == 0 the window starts mid-run.
  KV_CHECK(options_.keep == 0 || base_pos_ == window_first());
  const int64_t first_slot = start_slot_ + (window_first() - base_pos_);
  const int64_t n = window_len();
  return {slots_view(keys_, options_.head_dim, first_slot, n),
          slots_view(values_, options_.head_dim_v, first_slot, n)};
}

// --- update ---

Result<CacheViews> RotatingKVCache::update(const TensorView& keys, const TensorView& values) {
  constexpr std::string_view kOp = "RotatingKVCache.update";
  const RotatingKVCacheOptions& o = options_;
  if (Status s = detail::check_update_inputs(
          keys, values, {o.dtype, o.batch, o.num_kv_heads, o.head_dim, o.head_dim_v}, kOp);
      !s.ok()) {
    return s;
  }
  const int64_t count = keys.shape[2];

  // Inputs that alias our own storage (a view update() returned, say) are copied out first: the
  // moves below may overwrite what they point at.
  Buffer key_copy;
  Buffer value_copy;
  TensorView key_input = keys;
  TensorView value_input = values;
  for (auto [in, copy] : {std::pair{&key_input, &key_copy}, std::pair{&value_input, &value_copy}}) {
    if (!overlaps(*in, keys_.data(), keys_.num_bytes()) &&
        !overlaps(*in, values_.data(), values_.num_bytes())) {
      continue;
    }
    Result<Buffer> b = Buffer::allocate(Device::cpu(), in->num_bytes());
    if (!b.ok()) return b.status();
    *copy = std::move(*b);
    const TensorView dst = TensorView::contiguous(
        copy->data(), in->dtype, std::span<const int64_t>(in->shape.data(), in->rank));
    copy_or_die(*in, dst);
    *in = dst;
  }

  // Plan. The view holds the pinned tokens and rolling positions [new_base, end): every token a
  // query of the chunk can see.
  const int64_t keep = o.keep;
  const int64_t begin = offset_;
  const int64_t end = begin + count;
  const int64_t new_base = std::max(keep, begin - num_rolling() + 1);
  KV_CHECK(base_pos_ <= new_base);
  const int64_t old_pinned = std::min(keep, begin);
  const int64_t old_rolling = std::max<int64_t>(0, begin - new_base);  // [new_base, begin) kept
  const int64_t view_slots = keep + std::max<int64_t>(0, end - new_base);
  // A chunk leaves the window (pinned + the last max_size - keep tokens) a proper suffix of the
  // view; with keep > 0 a second copy of the window follows the view, so state() is one view.
  const int64_t window_first_after = std::max(keep, end - num_rolling());
  const bool copy_window = keep > 0 && window_first_after > new_base;
  const int64_t needed = view_slots + (copy_window ? o.max_size : 0);
  const int64_t shifted_start = start_slot_ + (new_base - base_pos_);

  const int64_t k_token_bytes =
      o.num_kv_heads * o.head_dim * static_cast<int64_t>(size_of(o.dtype));
  const int64_t v_token_bytes =
      o.num_kv_heads * o.head_dim_v * static_cast<int64_t>(size_of(o.dtype));
  Buffer grown_keys;
  Buffer grown_values;
  int64_t grown_slots = 0;
  if (needed > num_slots_) {
    grown_slots = std::max(2 * o.max_size, needed + o.max_size);
    int64_t grown_bytes = 0;
    if (!detail::checked_product({grown_slots, o.batch, std::max(k_token_bytes, v_token_bytes)},
                                 &grown_bytes)) {
      return Status::resource_exhausted(std::string(kOp) + ": " + str(grown_slots) +
                                        " token slots overflow int64 bytes, expected a " +
                                        "smaller chunk (L = " + str(count) + ")");
    }
    Result<Buffer> k =
        Buffer::allocate(Device::cpu(), static_cast<size_t>(grown_slots * o.batch * k_token_bytes));
    if (!k.ok()) return k.status();
    Result<Buffer> v =
        Buffer::allocate(Device::cpu(), static_cast<size_t>(grown_slots * o.batch * v_token_bytes));
    if (!v.ok()) return v.status();
    grown_keys = std::move(*k);
    grown_values = std::move(*v);
  }

  // Apply: nothing below can fail.
  int64_t view_slot = shifted_start;
  if (grown_slots > 0 || shifted_start + needed > num_slots_) {
    // Move (or copy into the new buffers) the pinned block to slot 0 and the kept rolling
    // tokens right after it: the O(window) step, rare for decode.
    view_slot = 0;
    const int64_t new_slots = grown_slots > 0 ? grown_slots : num_slots_;
    for (auto [old_buf, new_buf, token_bytes] :
         {std::tuple{&keys_, &grown_keys, k_token_bytes},
          std::tuple{&values_, &grown_values, v_token_bytes}}) {
      char* from = static_cast<char*>(old_buf->data());
      char* to = grown_slots > 0 ? static_cast<char*>(new_buf->data()) : from;
      move_tokens({from, num_slots_, start_slot_}, {to, new_slots, 0}, old_pinned, o.batch,
                  token_bytes);
      move_tokens({from, num_slots_, start_slot_ + keep + (new_base - base_pos_)},
                  {to, new_slots, keep}, old_rolling, o.batch, token_bytes);
    }
    if (grown_slots > 0) {
      // The old buffers die at the end of this call, after the chunk is read.
      std::swap(keys_, grown_keys);
      std::swap(values_, grown_values);
      num_slots_ = grown_slots;
    }
  } else {
    // The rolling tokens stay; the pinned block slides up to just before new_base.
    for (auto [buf, token_bytes] :
         {std::pair{&keys_, k_token_bytes}, std::pair{&values_, v_token_bytes}}) {
      char* base = static_cast<char*>(buf->data());
      move_tokens({base, num_slots_, start_slot_}, {base, num_slots_, shifted_start}, old_pinned,
                  o.batch, token_bytes);
    }
  }
  start_slot_ = view_slot;
  base_pos_ = new_base;

  // Write the chunk: positions below keep into the pinned block, the rest after new_base.
  const int64_t num_new_pinned = std::max<int64_t>(0, std::min(end, keep) - begin);
  const int64_t first_rolling = std::max(begin, keep);
  const int64_t num_new_rolling = std::max<int64_t>(0, end - first_rolling);
  for (auto [src, buf, dim] : {std::tuple{&key_input, &keys_, o.head_dim},
                               std::tuple{&value_input, &values_, o.head_dim_v}}) {
    copy_or_die(token_range(*src, 0, num_new_pinned),
                heads_first(slots_view(*buf, dim, start_slot_ + begin, num_new_pinned)));
    copy_or_die(token_range(*src, first_rolling - begin, num_new_rolling),
                heads_first(slots_view(*buf, dim, start_slot_ + keep + (first_rolling - base_pos_),
                                       num_new_rolling)));
  }
  offset_ = end;

  CacheViews views;
  const int64_t n = std::min(keep, end) + std::max<int64_t>(0, end - new_base);
  views.keys = heads_first(slots_view(keys_, o.head_dim, start_slot_, n));
  views.values = heads_first(slots_view(values_, o.head_dim_v, start_slot_, n));
  if (end > o.max_size) {
    views.num_pinned = keep;
    views.first_pos = new_base;
  } else {
    KV_CHECK(n == end);
  }

  if (copy_window) {
    // The window copy goes after the view, which stays intact until the next call.
    const int64_t window_slot = start_slot_ + view_slots;
    for (auto [buf, token_bytes] :
         {std::pair{&keys_, k_token_bytes}, std::pair{&values_, v_token_bytes}}) {
      char* base = static_cast<char*>(buf->data());
      move_tokens({base, num_slots_, start_slot_}, {base, num_slots_, window_slot}, keep, o.batch,
                  token_bytes);
      move_tokens({base, num_slots_, start_slot_ + keep + (window_first_after - base_pos_)},
                  {base, num_slots_, window_slot + keep}, end - window_first_after, o.batch,
                  token_bytes);
    }
    start_slot_ = window_slot;
    base_pos_ = window_first_after;
  }
  return views;
}

// --- snapshots and rewinds ---

Result<std::optional<Snapshot>> RotatingKVCache::snapshot(int64_t from) const {
  if (Status s = detail::check_position("RotatingKVCache.snapshot", "from", from, offset_);
      !s.ok()) {
    return s;
  }
  if (from == offset_) return std::optional<Snapshot>();
  const std::vector<TensorView> live = state();
  std::vector<Buffer> arrays;
  for (const TensorView& t : live) {
    Result<Buffer> b = Buffer::allocate(Device::cpu(), t.num_bytes());
    if (!b.ok()) return b.status();
    copy_or_die(t, TensorView::contiguous(b->data(), t.dtype,
                                          std::span<const int64_t>(t.shape.data(), t.rank)));
    arrays.push_back(std::move(*b));
  }
  return std::optional<Snapshot>(
      Snapshot(CacheKind::rotating, id(), layout_of(options_), from, offset_, std::move(arrays)));
}

Status RotatingKVCache::restore(int64_t target) {
  constexpr std::string_view kOp = "RotatingKVCache.restore";
  if (Status s = detail::check_position(kOp, "target", target, offset_); !s.ok()) return s;
  if (target == offset_) return Status();
  if (has_wrapped()) {
    return Status::invalid_argument(
        std::string(kOp) + ": target is " + str(target) + " but the window wrapped at offset " +
        str(offset_) + " (max_size " + str(options_.max_size) + "), so tokens before " +
        str(target) + " were overwritten, expected target == offset or a snapshot to restore");
  }
  // An unwrapped window holds every token at its position; forgetting the tail is enough.
  KV_CHECK(base_pos_ == options_.keep);
  offset_ = target;
  return Status();
}

Status RotatingKVCache::restore(const Snapshot& snapshot, int64_t target) {
  constexpr std::string_view kOp = "RotatingKVCache.restore";
  if (Status s = detail::check_snapshot(snapshot, snapshot_spec(options_), kOp, "snapshot");
      !s.ok()) {
    return s;
  }
  if (Status s = detail::check_target_in(kOp, snapshot, target); !s.ok()) return s;
  const int64_t b = snapshot.end();
  if (target < b && b > options_.max_size) {
    return Status::invalid_argument(
        std::string(kOp) + ": target is " + str(target) + " but the snapshot's window wrapped at " +
        str(b) + " (max_size " + str(options_.max_size) + "), so tokens before " + str(target) +
        " were overwritten, expected target == " + str(b));
  }
  const RotatingKVCacheOptions& o = options_;
  if (num_slots_ == 0) {
    const int64_t slots = 2 * o.max_size;
    const auto bytes = [&](int64_t dim) {
      return static_cast<size_t>(slots * o.batch * o.num_kv_heads * dim) * size_of(o.dtype);
    };
    Result<Buffer> k = Buffer::allocate(Device::cpu(), bytes(o.head_dim));
    if (!k.ok()) return k.status();
    Result<Buffer> v = Buffer::allocate(Device::cpu(), bytes(o.head_dim_v));
    if (!v.ok()) return v.status();
    keys_ = std::move(*k);
    values_ = std::move(*v);
    num_slots_ = slots;
  }
  // The snapshot's window at b; below b it is unwrapped, so its first `target` tokens are
  // positions [0, target).
  const int64_t stored = std::min(b, o.max_size);
  const int64_t n = target == b ? stored : target;
  for (size_t i = 0; i < 2; ++i) {
    const int64_t dim = i == 0 ? o.head_dim : o.head_dim_v;
    TensorView src = TensorView::contiguous(const_cast<void*>(snapshot.arrays()[i].data()), o.dtype,
                                            {o.batch, stored, o.num_kv_heads, dim});
    src.shape[1] = n;
    copy_or_die(src, slots_view(i == 0 ? keys_ : values_, dim, 0, n));
  }
  start_slot_ = 0;
  offset_ = target;
  base_pos_ = window_first();
  return Status();
}

Result<Snapshot> RotatingKVCache::merge(std::optional<Snapshot>&& parent,
                                        std::optional<Snapshot>&& child) const {
  // A whole-window snapshot at c already holds everything [a, c) needs: the child's window.
  return detail::merge_whole_state(parent, child, snapshot_spec(options_), "RotatingKVCache.merge");
}

Result<SnapshotPair> RotatingKVCache::split(Snapshot&& s, int64_t at) const {
  if (Status st = detail::check_snapshot(s, snapshot_spec(options_), "RotatingKVCache.split", "s");
      !st.ok()) {
    return st;
  }
  // A window cannot be cut in time: the part before `at` is not a window of its own.
  static_cast<void>(at);
  SnapshotPair out;
  out.second.emplace(std::move(s));
  return out;
}

void RotatingKVCache::free() {
  keys_ = Buffer();
  values_ = Buffer();
  num_slots_ = 0;
  start_slot_ = 0;
  base_pos_ = options_.keep;
  offset_ = 0;
}

}  // namespace kvcache
