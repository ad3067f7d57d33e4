// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "testing/test_util.h"

#include <array>
#include <cstring>
#include <numeric>
#include <tuple>

#include "core/check.h"

namespace kvcache::testing {

int64_t uniform_int(std::mt19937& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

uint32_t random_finite_bits(DType dtype, std::mt19937& rng) {
  for (;;) {
    const auto r = static_cast<uint32_t>(rng());
    switch (dtype) {
      case DType::f32:
        if (((r >> 23) & 0xffu) != 0xffu && (r & 0x7fffffffu) != 0) return r;
        break;
      case DType::f16:
        if (((r >> 10) & 0x1fu) != 0x1fu && (r & 0x7fffu) != 0) return r & 0xffffu;
        break;
      case DType::bf16:
        if (((r >> 7) & 0xffu) != 0xffu && (r & 0x7fffu) != 0) return r & 0xffffu;
        break;
      default:
        KV_CHECK(false && "random_finite_bits: f32, f16 or bf16 only");
    }
  }
}

TensorLayout strided_layout(int rank) {
  TensorLayout layout;
  layout.order.resize(static_cast<size_t>(rank));
  std::iota(layout.order.begin(), layout.order.end(), 0);
  if (rank >= 2) std::swap(layout.order[0], layout.order[1]);
  layout.pad = 1;
  return layout;
}

RandomTensor random_tensor(DType dtype, std::span<const int64_t> shape, std::mt19937& rng,
                           const TensorLayout& layout) {
  const int rank = static_cast<int>(shape.size());
  KV_CHECK(rank <= kMaxRank);
  std::vector<int> order = layout.order;
  if (order.empty()) {
    order.resize(shape.size());
    std::iota(order.begin(), order.end(), 0);
  }
  KV_CHECK(order.size() == shape.size());
  RandomTensor t;
  int64_t numel = 1;  // in memory, padding included
  for (int m = rank - 1; m >= 0; --m) {
    const int axis = order[static_cast<size_t>(m)];
    t.view.strides[axis] = numel;
    numel *= shape[static_cast<size_t>(axis)] + (m == rank - 1 ? layout.pad : 0);
  }
  const size_t elem = size_of(dtype);
  t.storage.resize((static_cast<size_t>(numel) * elem + 7) / 8 + 1);
  auto* bytes = reinterpret_cast<uint8_t*>(t.storage.data());
  for (size_t i = 0; i < static_cast<size_t>(numel); ++i) {
    const uint32_t bits = random_finite_bits(dtype, rng);
    std::memcpy(bytes + i * elem, &bits, elem);
  }
  t.view.data = t.storage.data();
  t.view.dtype = dtype;
  t.view.rank = rank;
  for (int i = 0; i < rank; ++i) t.view.shape[i] = shape[static_cast<size_t>(i)];
  return t;
}

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

std::vector<uint8_t> buffer_bytes(const Buffer& b) {
  const auto* p = static_cast<const uint8_t*>(b.data());
  return p == nullptr ? std::vector<uint8_t>() : std::vector<uint8_t>(p, p + b.num_bytes());
}

std::vector<std::vector<uint8_t>> state_bytes(const Cache& cache) {
  std::vector<std::vector<uint8_t>> out;
  for (const TensorView& v : cache.state()) out.push_back(view_bytes(v));
  return out;
}

CacheFingerprint fingerprint(const Cache& cache) {
  CacheFingerprint f;
  for (const TensorView& v : cache.state()) {
    if (v.data == nullptr && v.numel() > 0) {
      f.arrays.emplace_back();
    } else {
      f.arrays.emplace_back(view_bytes(v));
    }
  }
  f.offset = cache.offset();
  return f;
}

void PrintTo(const CacheFingerprint& f, std::ostream* os) {
  *os << "{offset " << f.offset << ", arrays of";
  for (const auto& a : f.arrays) {
    if (a) {
      *os << " " << a->size() << " bytes";
    } else {
      *os << " null data";
    }
  }
  *os << "}";
}

TokenHistory::TokenHistory(DType dtype, int64_t batch, int64_t num_kv_heads, int64_t head_dim,
                           int64_t head_dim_v)
    : dtype_(dtype),
      batch_(batch),
      num_kv_heads_(num_kv_heads),
      head_dim_(head_dim),
      head_dim_v_(head_dim_v) {}

TokenHistory::Input TokenHistory::next(int64_t count, std::mt19937& rng, bool strided) {
  Input in;
  for (auto [tensor, dim, tokens] :
       {std::tuple{&in.k_tensor, head_dim_, &k_}, std::tuple{&in.v_tensor, head_dim_v_, &v_}}) {
    TensorLayout layout;
    if (strided) layout.order = {0, 2, 1, 3};
    const int64_t shape[] = {batch_, num_kv_heads_, count, dim};
    *tensor = random_tensor(dtype_, shape, rng, layout);
    for (int64_t i = 0; i < count; ++i) {
      TensorView token = tensor->view;
      token.shape[2] = 1;
      token.data = static_cast<char*>(token.data) +
                   i * token.strides[2] * static_cast<int64_t>(size_of(dtype_));
      tokens->push_back(view_bytes(token));
    }
  }
  in.k = in.k_tensor.view;
  in.v = in.v_tensor.view;
  return in;
}

void TokenHistory::truncate(int64_t n) {
  k_.resize(static_cast<size_t>(n));
  v_.resize(static_cast<size_t>(n));
}

std::vector<uint8_t> TokenHistory::keys(const std::vector<int64_t>& positions,
                                        bool heads_first) const {
  return gather(k_, head_dim_, positions, heads_first);
}

std::vector<uint8_t> TokenHistory::values(const std::vector<int64_t>& positions,
                                          bool heads_first) const {
  return gather(v_, head_dim_v_, positions, heads_first);
}

std::vector<uint8_t> TokenHistory::gather(const std::vector<std::vector<uint8_t>>& tokens,
                                          int64_t dim, const std::vector<int64_t>& positions,
                                          bool heads_first) const {
  std::vector<uint8_t> out;
  const size_t row = static_cast<size_t>(dim) * size_of(dtype_);
  const auto append = [&](int64_t pos, int64_t b, int64_t h) {
    const uint8_t* src =
        tokens[static_cast<size_t>(pos)].data() + static_cast<size_t>(b * num_kv_heads_ + h) * row;
    out.insert(out.end(), src, src + row);
  };
  for (int64_t b = 0; b < batch_; ++b) {
    if (heads_first) {
      for (int64_t h = 0; h < num_kv_heads_; ++h) {
        for (int64_t pos : positions) append(pos, b, h);
      }
    } else {
      for (int64_t pos : positions) {
        for (int64_t h = 0; h < num_kv_heads_; ++h) append(pos, b, h);
      }
    }
  }
  return out;
}

}  // namespace kvcache::testing
