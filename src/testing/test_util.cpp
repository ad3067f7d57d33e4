// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "testing/test_util.h"

#include <cstring>

#include "core/check.h"

namespace kvcache::testing {

std::vector<uint8_t> view_bytes(const TensorView& t) {
  KV_CHECK(t.device.is_cpu());
  const size_t elem = size_of(t.dtype);
  std::vector<uint8_t> out(t.num_bytes());
  if (out.empty()) return out;
  std::array<int64_t, kMaxRank> index{};
  for (size_t i = 0; i < out.size(); i += elem) {
    std::memcpy(out.data() + i, t.element_ptr(std::span<const int64_t>(index.data(), t.rank)),
                elem);
    for (int axis = t.rank - 1; axis >= 0; --axis) {
      if (++index[axis] < t.shape[axis]) break;
      index[axis] = 0;
    }
  }
  return out;
}

}  // namespace kvcache::testing
