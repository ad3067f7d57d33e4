// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Reads of one stored element as a double, for the float64 references and the tests that compare
// with them: through the scalar conversions of kvcache/dtype.h only (the references share no other
// code with the kernels). An int8 / fp8 element reads as its code's value, not dequantized: the
// caller multiplies by the scale. Header-only, pure functions; thread-safe.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <span>

#include "kvcache/dtype.h"
#include "kvcache/tensor.h"

namespace kvcache::reference {

// Element `index` (counted in elements from base) of a dense array of dtype, exactly (f64 too).
// REQUIRES: base points at least index + 1 elements of dtype.
[[nodiscard]] inline double read_element(const void* base, DType dtype, int64_t index) {
  const auto* p =
      static_cast<const std::byte*>(base) + index * static_cast<int64_t>(size_of(dtype));
  switch (dtype) {
    case DType::f64: {
      double v;
      std::memcpy(&v, p, sizeof v);
      return v;
    }
    case DType::f16:
    case DType::bf16: {
      uint16_t bits;
      std::memcpy(&bits, p, sizeof bits);
      return dtype == DType::f16 ? f16_to_float(bits) : bf16_to_float(bits);
    }
    case DType::int8: {
      int8_t v;
      std::memcpy(&v, p, sizeof v);
      return v;
    }
    case DType::fp8_e4m3:
      return fp8_e4m3_to_float(std::to_integer<uint8_t>(*p));
    case DType::fp8_e5m2:
      return fp8_e5m2_to_float(std::to_integer<uint8_t>(*p));
    case DType::f32:
      break;
  }
  float v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The element of a (possibly strided) view at `index` [rank].
// REQUIRES: index is within the view's shape.
[[nodiscard]] inline double read_element(const TensorView& t,
                                         std::initializer_list<int64_t> index) {
  return read_element(t.element_ptr(std::span<const int64_t>(index.begin(), index.size())), t.dtype,
                      0);
}

}  // namespace kvcache::reference
