// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/tensor.h"

#include <cstring>
#include <string>

#include "core/check.h"

namespace kvcache {
namespace {

std::string join(std::span<const int64_t> values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(values[i]);
  }
  return out + "]";
}

std::string expected_shape_string(std::span<const DimSpec> expected) {
  std::string out = "[";
  for (size_t i = 0; i < expected.size(); ++i) {
    if (i) out += ", ";
    out += expected[i].name;
    if (expected[i].size >= 0) {
      out += '=';  // appended separately: GCC 12 warns (-Wrestrict) on "=" + std::string
      out += std::to_string(expected[i].size);
    }
  }
  return out + "]";
}

std::string prefix(std::string_view op, std::string_view name) {
  return std::string(op) + ": " + std::string(name);
}

}  // namespace

TensorView TensorView::contiguous(void* data, DType dtype, std::span<const int64_t> shape,
                                  Device device) {
  KV_CHECK(shape.size() <= static_cast<size_t>(kMaxRank));
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.rank = static_cast<int>(shape.size());
  t.device = device;
  int64_t stride = 1;
  for (int axis = t.rank - 1; axis >= 0; --axis) {
    KV_CHECK(shape[axis] >= 0);
    t.shape[axis] = shape[axis];
    t.strides[axis] = stride;
    stride *= shape[axis];
  }
  return t;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int axis = 0; axis < rank; ++axis) n *= shape[axis];
  return n;
}

size_t TensorView::num_bytes() const { return static_cast<size_t>(numel()) * size_of(dtype); }

bool TensorView::is_contiguous() const {
  int64_t stride = 1;
  for (int axis = rank - 1; axis >= 0; --axis) {
    if (shape[axis] != 1 && strides[axis] != stride) return false;
    stride *= shape[axis];
  }
  return true;
}

void* TensorView::element_ptr(std::span<const int64_t> index) const {
  KV_CHECK(static_cast<int>(index.size()) == rank);
  int64_t offset = 0;
  for (int axis = 0; axis < rank; ++axis) {
    KV_CHECK(index[axis] >= 0 && index[axis] < shape[axis]);
    offset += index[axis] * strides[axis];
  }
  return static_cast<char*>(data) + offset * static_cast<int64_t>(size_of(dtype));
}

std::string TensorView::shape_string() const {
  return join(std::span<const int64_t>(shape.data(), rank));
}

Status check_dtype(const TensorView& t, DType expected, std::string_view op,
                   std::string_view name) {
  if (t.dtype == expected) return Status();
  return Status::invalid_argument(prefix(op, name) + " has dtype " + kvcache::name(t.dtype) +
                                  ", expected " + kvcache::name(expected));
}

Status check_shape(const TensorView& t, std::span<const DimSpec> expected, std::string_view op,
                   std::string_view name) {
  // Messages are built only on failure: the ops call this on every run(), which allocates nothing.
  if (t.rank != static_cast<int>(expected.size())) {
    const std::string want = expected_shape_string(expected);
    return Status::invalid_argument(prefix(op, name) + " has rank " + std::to_string(t.rank) +
                                    " (shape " + t.shape_string() + "), expected rank " +
                                    std::to_string(expected.size()) + " " + want);
  }
  for (int axis = 0; axis < t.rank; ++axis) {
    const DimSpec& d = expected[axis];
    if (t.shape[axis] < 0 || (d.size >= 0 && t.shape[axis] != d.size)) {
      const std::string want = expected_shape_string(expected);
      return Status::invalid_argument(prefix(op, name) + " dim " + std::to_string(axis) + " (" +
                                      d.name + ") is " + std::to_string(t.shape[axis]) +
                                      ", expected " +
                                      (d.size >= 0 ? std::to_string(d.size) : ">= 0") + "; shape " +
                                      t.shape_string() + ", expected " + want);
    }
  }
  return Status();
}

Status check_contiguous(const TensorView& t, std::string_view op, std::string_view name) {
  if (t.is_contiguous()) return Status();
  const TensorView want = TensorView::contiguous(
      nullptr, t.dtype, std::span<const int64_t>(t.shape.data(), t.rank), t.device);
  return Status::invalid_argument(prefix(op, name) + " is not contiguous (strides " +
                                  join(std::span<const int64_t>(t.strides.data(), t.rank)) +
                                  "), expected row-major strides " +
                                  join(std::span<const int64_t>(want.strides.data(), t.rank)));
}

Status check_device(const TensorView& t, Device expected, std::string_view op,
                    std::string_view name) {
  if (t.device == expected) return Status();
  return Status::invalid_argument(prefix(op, name) + " is on " + to_string(t.device) +
                                  ", expected " + to_string(expected));
}

Status check_data(const TensorView& t, std::string_view op, std::string_view name) {
  if (t.data != nullptr || t.numel() == 0) return Status();
  return Status::invalid_argument(prefix(op, name) + " has null data with " +
                                  std::to_string(t.numel()) + " elements, expected a pointer");
}

bool overlaps(const TensorView& t, const void* data, size_t num_bytes) {
  if (data == nullptr || num_bytes == 0 || t.data == nullptr || t.numel() == 0) return false;
  int64_t lo = 0;  // element offsets of the lowest and highest element the view reaches
  int64_t hi = 0;
  for (int axis = 0; axis < t.rank; ++axis) {
    const int64_t reach = t.strides[axis] * (t.shape[axis] - 1);
    (reach < 0 ? lo : hi) += reach;
  }
  const auto elem = static_cast<int64_t>(size_of(t.dtype));
  const auto base = reinterpret_cast<uintptr_t>(t.data);
  const uintptr_t view_lo = base + static_cast<uintptr_t>(lo * elem);
  const uintptr_t view_hi = base + static_cast<uintptr_t>((hi + 1) * elem);
  const auto buf_lo = reinterpret_cast<uintptr_t>(data);
  return view_lo < buf_lo + num_bytes && buf_lo < view_hi;
}

Status copy_into(const TensorView& src, const TensorView& dst) {
  if (Status s = check_dtype(src, dst.dtype, "copy", "src"); !s.ok()) return s;
  if (!src.device.is_cpu() || !dst.device.is_cpu()) {
    return Status::invalid_argument("copy: src is on " + to_string(src.device) + " and dst on " +
                                    to_string(dst.device) + ", expected both on cpu");
  }
  bool same_shape = src.rank == dst.rank;
  for (int axis = 0; same_shape && axis < src.rank; ++axis) {
    same_shape = src.shape[axis] == dst.shape[axis];
  }
  if (!same_shape) {
    return Status::invalid_argument("copy: src has shape " + src.shape_string() +
                                    ", expected dst's shape " + dst.shape_string());
  }
  if (src.numel() == 0) return Status();
  if (Status s = check_data(src, "copy", "src"); !s.ok()) return s;
  if (Status s = check_data(dst, "copy", "dst"); !s.ok()) return s;

  // Rows along the last axis are copied with memcpy when both are unit-stride there.
  const int rank = src.rank;
  const int64_t elem = static_cast<int64_t>(size_of(src.dtype));
  const int last = rank - 1;
  const bool rows = rank > 0 && src.strides[last] == 1 && dst.strides[last] == 1;
  const int outer_rank = rows ? last : rank;
  const int64_t inner = rows ? src.shape[last] : 1;
  std::array<int64_t, kMaxRank> index{};
  const auto* s_base = static_cast<const char*>(src.data);
  auto* d_base = static_cast<char*>(dst.data);
  for (;;) {
    int64_t s_off = 0;
    int64_t d_off = 0;
    for (int axis = 0; axis < outer_rank; ++axis) {
      s_off += index[axis] * src.strides[axis];
      d_off += index[axis] * dst.strides[axis];
    }
    std::memcpy(d_base + d_off * elem, s_base + s_off * elem, static_cast<size_t>(inner * elem));
    int axis = outer_rank - 1;
    for (; axis >= 0; --axis) {
      if (++index[axis] < src.shape[axis]) break;
      index[axis] = 0;
    }
    if (axis < 0) break;
  }
  return Status();
}

}  // namespace kvcache
