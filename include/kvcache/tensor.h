// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// TensorView: a non-owning description of an array (pointer, dtype, shape, strides, device).
// Strides count elements, not bytes. A view never frees or allocates; whoever made the memory
// owns it (a Buffer, a cache, the caller). Intentionally copyable. The check_* helpers produce
// the project's one error format: "<op>: <name> <what was wrong>, expected <what>".

#include <array>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>

#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/export.h"
#include "kvcache/status.h"

namespace kvcache {

inline constexpr int kMaxRank = 6;

struct KVCACHE_API TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  int rank = 0;
  std::array<int64_t, kMaxRank> shape{};
  std::array<int64_t, kMaxRank> strides{};  // in elements
  Device device = Device::cpu();

  // A row-major (C-contiguous) view. REQUIRES: shape.size() <= kMaxRank, every dim >= 0.
  static TensorView contiguous(void* data, DType dtype, std::span<const int64_t> shape,
                               Device device = Device::cpu());
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               Device device = Device::cpu()) {
    return contiguous(data, dtype, std::span<const int64_t>(shape.begin(), shape.size()), device);
  }

  [[nodiscard]] int64_t dim(int axis) const { return shape[axis]; }
  [[nodiscard]] int64_t stride(int axis) const { return strides[axis]; }
  [[nodiscard]] int64_t numel() const;
  // numel() * size_of(dtype): the bytes the elements occupy, not the span the strides cover.
  [[nodiscard]] size_t num_bytes() const;
  [[nodiscard]] bool is_contiguous() const;
  // The address of element (i0, i1, ...). REQUIRES: index.size() == rank, each index in range.
  [[nodiscard]] void* element_ptr(std::span<const int64_t> index) const;
  template <class T>
  [[nodiscard]] T* data_as() const {
    return static_cast<T*>(data);
  }
  // "[2, 8, 5, 64]"
  [[nodiscard]] std::string shape_string() const;
};

// One expected dimension for check_shape: size -1 accepts any size.
struct DimSpec {
  int64_t size;
  const char* name;  // "num_kv_heads", shown in messages
};

// --- validation helpers: OK, or invalid_argument in the project format ---

// "update: keys has dtype f32, expected bf16"
[[nodiscard]] KVCACHE_API Status check_dtype(const TensorView& t, DType expected,
                                             std::string_view op, std::string_view name);
// Rank and every dimension. "update: keys has shape [1, 7, 3, 64], expected
// [batch=1, num_kv_heads=8, L, head_dim=64]: dim 1 (num_kv_heads) is 7"
[[nodiscard]] KVCACHE_API Status check_shape(const TensorView& t, std::span<const DimSpec> expected,
                                             std::string_view op, std::string_view name);
[[nodiscard]] inline Status check_shape(const TensorView& t,
                                        std::initializer_list<DimSpec> expected,
                                        std::string_view op, std::string_view name) {
  return check_shape(t, std::span<const DimSpec>(expected.begin(), expected.size()), op, name);
}
// "append: k is not contiguous (strides [..]), expected row-major strides [..]"
[[nodiscard]] KVCACHE_API Status check_contiguous(const TensorView& t, std::string_view op,
                                                  std::string_view name);
[[nodiscard]] KVCACHE_API Status check_device(const TensorView& t, Device expected,
                                              std::string_view op, std::string_view name);
// Non-null data unless the view is empty.
[[nodiscard]] KVCACHE_API Status check_data(const TensorView& t, std::string_view op,
                                            std::string_view name);

// Whether the bytes the view's elements span intersect [data, data + num_bytes).
[[nodiscard]] KVCACHE_API bool overlaps(const TensorView& t, const void* data, size_t num_bytes);

// Copies the elements of src into dst (CPU, any strides, same dtype and shape): the one strided
// copy the caches build on. invalid_argument (op "copy") on a dtype, shape or device mismatch.
// REQUIRES: src and dst do not overlap.
[[nodiscard]] KVCACHE_API Status copy_into(const TensorView& src, const TensorView& dst);

}  // namespace kvcache
