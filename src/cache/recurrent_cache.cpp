// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/recurrent_cache.h"

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "cache/snapshot_checks.h"
#include "core/check.h"

namespace kvcache {
namespace {

constexpr size_t kNumArrays = 2;  // conv state, delta state

TensorView conv_view(const RecurrentCacheOptions& o, void* data) {
  return TensorView::contiguous(data, o.dtype, {o.batch, o.conv_tail, o.conv_dim});
}
TensorView delta_view(const RecurrentCacheOptions& o, void* data) {
  return TensorView::contiguous(data, o.dtype,
                                {o.batch, o.num_v_heads, o.head_v_dim, o.head_k_dim});
}
// REQUIRES: options that create() accepted (the products fit).
size_t conv_bytes(const RecurrentCacheOptions& o) { return conv_view(o, nullptr).num_bytes(); }
size_t delta_bytes(const RecurrentCacheOptions& o) { return delta_view(o, nullptr).num_bytes(); }

// The shape signature snapshots carry (see Snapshot::layout).
std::vector<int64_t> layout_of(const RecurrentCacheOptions& o) {
  return {o.conv_tail,
          o.conv_dim,
          o.num_v_heads,
          o.head_v_dim,
          o.head_k_dim,
          o.batch,
          static_cast<int64_t>(o.dtype)};
}

// The product of dims times the element size, or false when it does not fit in an int64_t
// element count (which TensorView needs) or a size_t byte count.
bool checked_bytes(std::initializer_list<int64_t> dims, DType dtype, size_t* bytes) {
  int64_t numel = 0;
  return detail::checked_product(dims, &numel) &&
         !__builtin_mul_overflow(static_cast<size_t>(numel), size_of(dtype), bytes);
}

// Zero-byte states (conv_tail == 0) stay as empty Buffers: no allocation, null data.
Result<Buffer> allocate_bytes(size_t num_bytes) {
  if (num_bytes == 0) return Buffer();
  return Buffer::allocate(Device::cpu(), num_bytes);
}

Result<Buffer> allocate_zeroed(size_t num_bytes) {
  Result<Buffer> buffer = allocate_bytes(num_bytes);
  if (buffer.ok() && num_bytes > 0) std::memset(buffer->data(), 0, num_bytes);
  return buffer;
}

Result<Buffer> copy_of(const Buffer& src) {
  if (src.empty()) return Buffer();
  return src.clone();
}

Status check_state_input(const TensorView& t, DType dtype, std::initializer_list<DimSpec> dims,
                         std::string_view name) {
  constexpr std::string_view kOp = "RecurrentCache.update";
  const int64_t batch = dims.begin()->size;
  // Named on its own: a new batch size must never look like a plain shape slip.
  if (t.rank == static_cast<int>(dims.size()) && t.dim(0) != batch) {
    return Status::invalid_argument(std::string(kOp) + ": " + std::string(name) + " batch is " +
                                    std::to_string(t.dim(0)) + ", expected batch " +
                                    std::to_string(batch) +
                                    " (a change of batch size is an error, not a reset)");
  }
  if (Status s = check_shape(t, dims, kOp, name); !s.ok()) return s;
  if (Status s = check_dtype(t, dtype, kOp, name); !s.ok()) return s;
  if (Status s = check_device(t, Device::cpu(), kOp, name); !s.ok()) return s;
  return check_data(t, kOp, name);
}

// What this cache reads as a snapshot: [conv state, delta state], never an empty range (a
// snapshot of nothing is none).
detail::SnapshotSpec snapshot_spec(const RecurrentCacheOptions& o) {
  return {
      CacheKind::recurrent,
      layout_of(o),
      "(conv_tail, conv_dim, num_v_heads, head_v_dim, head_k_dim, batch, dtype)",
      /*allow_empty=*/false,
      kNumArrays,
      [&o](const Snapshot&, size_t array) { return array == 0 ? conv_bytes(o) : delta_bytes(o); }};
}

}  // namespace

Result<std::unique_ptr<RecurrentCache>> RecurrentCache::create(
    const RecurrentCacheOptions& options) {
  constexpr std::string_view kOp = "RecurrentCache.create";
  const std::string op = std::string(kOp) + ": ";
  if (options.conv_tail < 0) {
    return Status::invalid_argument(op + "conv_tail is " + std::to_string(options.conv_tail) +
                                    ", expected >= 0");
  }
  if (options.conv_tail > 0) {
    if (Status s = detail::check_positive(kOp, "conv_dim", options.conv_dim); !s.ok()) {
      return Status::invalid_argument(s.message() + " when conv_tail > 0");
    }
  } else if (options.conv_dim < 0) {
    return Status::invalid_argument(op + "conv_dim is " + std::to_string(options.conv_dim) +
                                    ", expected >= 0");
  }
  for (const auto& [value, label] :
       {std::pair{options.num_v_heads, "num_v_heads"}, std::pair{options.head_v_dim, "head_v_dim"},
        std::pair{options.head_k_dim, "head_k_dim"}, std::pair{options.batch, "batch"}}) {
    if (Status s = detail::check_positive(kOp, label, value); !s.ok()) return s;
  }
  if (Status s = detail::check_float_dtype(kOp, options.dtype); !s.ok()) return s;
  size_t num_conv_bytes = 0;
  size_t num_delta_bytes = 0;
  if (!checked_bytes({options.batch, options.conv_tail, options.conv_dim}, options.dtype,
                     &num_conv_bytes) ||
      !checked_bytes({options.batch, options.num_v_heads, options.head_v_dim, options.head_k_dim},
                     options.dtype, &num_delta_bytes)) {
    return Status::invalid_argument(op +
                                    "state size overflows, expected dims whose product fits "
                                    "in 64 bits");
  }
  Result<Buffer> conv = allocate_zeroed(num_conv_bytes);
  if (!conv.ok()) return conv.status();
  Result<Buffer> delta = allocate_zeroed(num_delta_bytes);
  if (!delta.ok()) return delta.status();

  // The constructor is private, so no make_unique.
  std::unique_ptr<RecurrentCache> cache(new RecurrentCache(options));
  cache->conv_ = std::move(*conv);
  cache->delta_ = std::move(*delta);
  return cache;
}

RecurrentCache::RecurrentCache(const RecurrentCacheOptions& options) : options_(options) {}

RecurrentCache::~RecurrentCache() = default;

// The delta state always has bytes (its dims are positive), so an empty delta_ means free()d.
TensorView RecurrentCache::conv_state() const {
  // Views are non-owning and writable by design; const_cast only hands out our own storage.
  void* data = delta_.empty() ? nullptr : const_cast<void*>(conv_.data());
  return conv_view(options_, data);
}

TensorView RecurrentCache::delta_state() const {
  return delta_view(options_, const_cast<void*>(delta_.data()));
}

Result<CacheViews> RecurrentCache::update(const TensorView& conv_state,
                                          const TensorView& delta_state) {
  const int64_t b = options_.batch;
  if (Status s = check_state_input(
          conv_state, options_.dtype,
          {{b, "batch"}, {options_.conv_tail, "conv_tail"}, {options_.conv_dim, "conv_dim"}},
          "conv_state");
      !s.ok()) {
    return s;
  }
  if (Status s = check_state_input(delta_state, options_.dtype,
                                   {{b, "batch"},
                                    {options_.num_v_heads, "num_v_heads"},
                                    {options_.head_v_dim, "head_v_dim"},
                                    {options_.head_k_dim, "head_k_dim"}},
                                   "delta_state");
      !s.ok()) {
    return s;
  }

  // Inputs that alias our own storage (e.g. views update() returned) go through fresh buffers,
  // because copy_into requires disjoint source and destination.
  bool fresh = delta_.empty();
  for (const TensorView* in : {&conv_state, &delta_state}) {
    fresh = fresh || overlaps(*in, conv_.data(), conv_.num_bytes()) ||
            overlaps(*in, delta_.data(), delta_.num_bytes());
  }
  if (fresh) {
    Result<Buffer> conv = allocate_bytes(conv_bytes(options_));
    if (!conv.ok()) return conv.status();
    Result<Buffer> delta = allocate_bytes(delta_bytes(options_));
    if (!delta.ok()) return delta.status();
    KV_CHECK(copy_into(conv_state, conv_view(options_, conv->data())).ok());
    KV_CHECK(copy_into(delta_state, delta_view(options_, delta->data())).ok());
    conv_ = std::move(*conv);
    delta_ = std::move(*delta);
  } else {
    KV_CHECK(copy_into(conv_state, this->conv_state()).ok());
    KV_CHECK(copy_into(delta_state, this->delta_state()).ok());
  }
  return CacheViews{this->conv_state(), this->delta_state(), 0, 0};
}

Status RecurrentCache::advance(int64_t n) {
  if (n < 0) {
    return Status::invalid_argument("RecurrentCache.advance: n is " + std::to_string(n) +
                                    ", expected n >= 0");
  }
  if (n > std::numeric_limits<int64_t>::max() - offset_) {
    return Status::invalid_argument("RecurrentCache.advance: n is " + std::to_string(n) +
                                    ", expected at most " +
                                    std::to_string(std::numeric_limits<int64_t>::max() - offset_) +
                                    " (the offset would overflow)");
  }
  offset_ += n;
  return Status();
}

std::vector<TensorView> RecurrentCache::state() const { return {conv_state(), delta_state()}; }

Result<std::optional<Snapshot>> RecurrentCache::snapshot(int64_t from) const {
  if (Status s = detail::check_position("RecurrentCache.snapshot", "from", from, offset_);
      !s.ok()) {
    return s;
  }
  if (from == offset_) return std::optional<Snapshot>();
  // After free() the state is zero by definition (advance() may have moved the offset since).
  const bool freed = delta_.empty();
  Result<Buffer> conv = freed ? allocate_zeroed(conv_bytes(options_)) : copy_of(conv_);
  if (!conv.ok()) return conv.status();
  Result<Buffer> delta = freed ? allocate_zeroed(delta_bytes(options_)) : copy_of(delta_);
  if (!delta.ok()) return delta.status();
  std::vector<Buffer> arrays;
  arrays.reserve(kNumArrays);
  arrays.push_back(std::move(*conv));
  arrays.push_back(std::move(*delta));
  return std::optional<Snapshot>(
      Snapshot(CacheKind::recurrent, id(), layout_of(options_), from, offset_, std::move(arrays)));
}

Status RecurrentCache::restore(int64_t target) {
  if (target == offset_) return Status();
  return Status::invalid_argument("RecurrentCache.restore: target is " + std::to_string(target) +
                                  ", expected target == offset() = " + std::to_string(offset_) +
                                  " (a recurrent state cannot rewind without a snapshot)");
}

Status RecurrentCache::restore(const Snapshot& snapshot, int64_t target) {
  constexpr std::string_view kOp = "RecurrentCache.restore";
  if (Status s = detail::check_snapshot(snapshot, snapshot_spec(options_), kOp, "snapshot");
      !s.ok()) {
    return s;
  }
  if (target != snapshot.end()) {
    return Status::invalid_argument(
        std::string(kOp) + ": target is " + std::to_string(target) +
        ", expected target == snapshot end " + std::to_string(snapshot.end()) +
        " (a recurrent snapshot is restored only to exactly that offset)");
  }
  const Buffer& src_conv = snapshot.arrays()[0];
  const Buffer& src_delta = snapshot.arrays()[1];
  if (delta_.empty()) {
    Result<Buffer> conv = copy_of(src_conv);
    if (!conv.ok()) return conv.status();
    Result<Buffer> delta = copy_of(src_delta);
    if (!delta.ok()) return delta.status();
    conv_ = std::move(*conv);
    delta_ = std::move(*delta);
  } else {
    // Snapshots own their arrays, so they never alias the live state.
    if (!conv_.empty()) std::memcpy(conv_.data(), src_conv.data(), conv_.num_bytes());
    std::memcpy(delta_.data(), src_delta.data(), delta_.num_bytes());
  }
  offset_ = snapshot.end();
  return Status();
}

Result<Snapshot> RecurrentCache::merge(std::optional<Snapshot>&& parent,
                                       std::optional<Snapshot>&& child) const {
  // A whole state at c already holds everything [a, c) needs: the child's state.
  return detail::merge_whole_state(parent, child, snapshot_spec(options_), "RecurrentCache.merge");
}

Result<SnapshotPair> RecurrentCache::split(Snapshot&& s, int64_t /*at*/) const {
  if (Status st =
          detail::check_kind_and_layout(s, snapshot_spec(options_), "RecurrentCache.split", "s");
      !st.ok()) {
    return st;
  }
  // A whole state cannot be cut at a token: the second half keeps all of it.
  SnapshotPair pair;
  pair.second.emplace(std::move(s));
  return pair;
}

void RecurrentCache::free() {
  conv_ = Buffer();
  delta_ = Buffer();
  offset_ = 0;
}

}  // namespace kvcache
