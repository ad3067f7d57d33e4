// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/recurrent_cache.h"

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "core/check.h"

namespace kvcache {
namespace {

constexpr size_t kNumArrays = 2;  // conv state, delta state

std::string list_string(const std::vector<int64_t>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(values[i]);
  }
  return out + "]";
}

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
  int64_t numel = 1;
  for (int64_t d : dims) {
    if (__builtin_mul_overflow(numel, d, &numel)) return false;
  }
  return !__builtin_mul_overflow(static_cast<size_t>(numel), size_of(dtype), bytes);
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

// Kind, layout, arrays and range of a snapshot handed to restore() or merge().
Status check_snapshot(const Snapshot& s, const RecurrentCacheOptions& o, std::string_view op,
                      std::string_view label) {
  const std::string prefix = std::string(op) + ": " + std::string(label);
  if (s.kind() != CacheKind::recurrent) {
    return Status::invalid_argument(prefix + " is a " + name(s.kind()) +
                                    " snapshot, expected a recurrent one");
  }
  const std::vector<int64_t> layout = layout_of(o);
  if (s.layout() != layout) {
    return Status::invalid_argument(
        prefix + " has layout " + list_string(s.layout()) + ", expected " + list_string(layout) +
        " (conv_tail, conv_dim, num_v_heads, head_v_dim, head_k_dim, batch, dtype)");
  }
  // A Snapshot can be built by hand, so its arrays are checked like any other input.
  const std::vector<Buffer>& arrays = s.arrays();
  if (arrays.size() != kNumArrays || arrays[0].num_bytes() != conv_bytes(o) ||
      arrays[1].num_bytes() != delta_bytes(o) || !arrays[0].device().is_cpu() ||
      !arrays[1].device().is_cpu()) {
    return Status::invalid_argument(prefix +
                                    " arrays do not match its layout, expected a CPU conv "
                                    "state of " +
                                    std::to_string(conv_bytes(o)) +
                                    " bytes and a CPU delta state of " +
                                    std::to_string(delta_bytes(o)) + " bytes");
  }
  if (s.begin() < 0 || s.begin() >= s.end()) {
    return Status::invalid_argument(prefix + " covers [" + std::to_string(s.begin()) + ", " +
                                    std::to_string(s.end()) +
                                    "), expected a non-empty range at or after 0");
  }
  return Status();
}

}  // namespace

Result<std::unique_ptr<RecurrentCache>> RecurrentCache::create(
    const RecurrentCacheOptions& options) {
  constexpr std::string_view kOp = "RecurrentCache.create: ";
  const auto positive = [&](int64_t value, const char* label) -> Status {
    if (value > 0) return Status();
    return Status::invalid_argument(std::string(kOp) + label + " is " + std::to_string(value) +
                                    ", expected > 0");
  };
  if (options.conv_tail < 0) {
    return Status::invalid_argument(std::string(kOp) + "conv_tail is " +
                                    std::to_string(options.conv_tail) + ", expected >= 0");
  }
  if (options.conv_tail > 0) {
    if (Status s = positive(options.conv_dim, "conv_dim"); !s.ok()) {
      return Status::invalid_argument(s.message() + " when conv_tail > 0");
    }
  } else if (options.conv_dim < 0) {
    return Status::invalid_argument(std::string(kOp) + "conv_dim is " +
                                    std::to_string(options.conv_dim) + ", expected >= 0");
  }
  for (const auto& [value, label] :
       {std::pair{options.num_v_heads, "num_v_heads"}, std::pair{options.head_v_dim, "head_v_dim"},
        std::pair{options.head_k_dim, "head_k_dim"}, std::pair{options.batch, "batch"}}) {
    if (Status s = positive(value, label); !s.ok()) return s;
  }
  if (options.dtype != DType::f32 && options.dtype != DType::f16 && options.dtype != DType::bf16) {
    return Status::invalid_argument(std::string(kOp) + "dtype is " + name(options.dtype) +
                                    ", expected f32, f16 or bf16");
  }
  size_t num_conv_bytes = 0;
  size_t num_delta_bytes = 0;
  if (!checked_bytes({options.batch, options.conv_tail, options.conv_dim}, options.dtype,
                     &num_conv_bytes) ||
      !checked_bytes({options.batch, options.num_v_heads, options.head_v_dim, options.head_k_dim},
                     options.dtype, &num_delta_bytes)) {
    return Status::invalid_argument(std::string(kOp) +
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
  if (from < 0 || from > offset_) {
    return Status::invalid_argument(
        "RecurrentCache.snapshot: from is " + std::to_string(from) +
        ", expected 0 <= from <= offset() = " + std::to_string(offset_));
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
  if (Status s = check_snapshot(snapshot, options_, kOp, "snapshot"); !s.ok()) return s;
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
  constexpr std::string_view kOp = "RecurrentCache.merge";
  for (const auto& [side, label] : {std::pair{&parent, "parent"}, std::pair{&child, "child"}}) {
    if (!side->has_value()) {
      return Status::invalid_argument(std::string(kOp) + ": " + label +
                                      " is none, expected a snapshot");
    }
    if (Status s = check_snapshot(**side, options_, kOp, label); !s.ok()) return s;
  }
  if (parent->cache_id() != child->cache_id()) {
    return Status::invalid_argument(
        std::string(kOp) + ": child comes from cache " + std::to_string(child->cache_id()) +
        ", expected the parent's cache " + std::to_string(parent->cache_id()));
  }
  if (parent->end() != child->begin()) {
    return Status::invalid_argument(
        std::string(kOp) + ": parent covers [" + std::to_string(parent->begin()) + ", " +
        std::to_string(parent->end()) + ") and child [" + std::to_string(child->begin()) + ", " +
        std::to_string(child->end()) + "), expected child to begin where parent ends");
  }
  // Snapshot exposes its arrays read-only, so the child's state is copied, then both consumed.
  std::vector<Buffer> arrays;
  arrays.reserve(kNumArrays);
  for (const Buffer& array : child->arrays()) {
    Result<Buffer> copy = copy_of(array);
    if (!copy.ok()) return copy.status();
    arrays.push_back(std::move(*copy));
  }
  Snapshot merged(CacheKind::recurrent, parent->cache_id(), layout_of(options_), parent->begin(),
                  child->end(), std::move(arrays));
  parent.reset();
  child.reset();
  return merged;
}

Result<SnapshotPair> RecurrentCache::split(Snapshot&& s, int64_t /*at*/) const {
  constexpr std::string_view kOp = "RecurrentCache.split";
  if (s.kind() != CacheKind::recurrent) {
    return Status::invalid_argument(std::string(kOp) + ": s is a " + name(s.kind()) +
                                    " snapshot, expected a recurrent one");
  }
  const std::vector<int64_t> layout = layout_of(options_);
  if (s.layout() != layout) {
    return Status::invalid_argument(std::string(kOp) + ": s has layout " + list_string(s.layout()) +
                                    ", expected " + list_string(layout));
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
