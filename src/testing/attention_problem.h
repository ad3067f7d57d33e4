// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// A random attention problem for the attention tests (src/ops/attention_test.cpp on the CPU,
// src/backend/cuda/attention_cuda_test.cpp on the GPU): the K/V of every sequence as floats,
// stored (quantized if asked) in a contiguous cache AND in a shuffled page pool with the same bytes
// per row, plus q, poisoned outputs and sinks; the float64 reference and the tolerance check.
// Compiled into the test binaries that use it. Not thread-safe.

#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "kvcache/attention.h"

namespace kvcache::testing {

// One attention problem: the K/V of every sequence as floats, stored (quantized if asked) in a
// contiguous cache AND in a page pool with the same bytes per row, plus q, outputs and sinks.
struct Config {
  int64_t hq = 4;
  int64_t hkv = 2;
  int64_t dim = 8;
  int64_t dim_v = 0;
  DType k = DType::bf16;
  DType v = DType::bf16;
  DType q = DType::f32;
  DType o = DType::f32;
  std::vector<int32_t> seq_lens = {5, 17, 1};
  std::vector<int32_t> q_counts;  // extend when given (one per sequence)
  int64_t page_size = 0;          // 0: contiguous
  PageLayout layout = PageLayout::nhd;
  bool token_major = false;  // contiguous caches laid out [B, cap, H, D] in memory
  float scale = 0.0f;
  float soft_cap = 0.0f;
  int64_t window = 0;
  int64_t sink_tokens = 0;
  bool sinks = false;
  int64_t chunk = 0;
  int64_t max_seq_len = 0;  // 0: the longest sequence
};

// A uniform float in [lo, hi) other than 0.
float nonzero_uniform(std::mt19937& rng, float lo, float hi);
// Stores a float row as dtype (quantized rows return their scale).
float store_row(const float* x, int64_t n, DType dtype, void* dst);

class Problem {
 public:
  Problem(const Config& cfg, std::mt19937& rng);

  // o filled with 0x7f bytes, lse with NaN.
  void poison();

  [[nodiscard]] const AttentionDesc& desc() const { return desc_; }
  // Reads the page pool (when the config has pages) or the contiguous cache.
  void use_pages(bool on) { desc_.pages = on ? pages_ : std::nullopt; }
  [[nodiscard]] const Config& config() const { return cfg_; }

  // The arguments (host views into this problem): the page pool when desc().pages is set, else
  // the contiguous cache.
  AttentionArgs args();

  // Output element i of o as a double; lse element i.
  [[nodiscard]] double o_at(size_t i) const;
  [[nodiscard]] double lse_at(size_t i) const { return lse_[i]; }
  [[nodiscard]] size_t o_size() const { return o_.size() / size_of(cfg_.o); }
  // o, lse and q: what a refused call must leave alone.
  [[nodiscard]] std::vector<uint8_t> output_bytes() const;
  // The float originals (before storage) of side 0 (K) or 1 (V), in generation order.
  [[nodiscard]] const std::vector<float>& originals(int side) const { return originals_[side]; }

 private:
  int64_t contiguous_cell(int64_t b, int64_t h, int64_t t) const;
  int64_t paged_cell(int64_t b, int64_t h, int64_t t) const;
  static void put(std::vector<uint8_t>& data, std::vector<uint8_t>& scales, int64_t cell,
                  int64_t dim, DType dt, const std::vector<uint8_t>& stored, float sc);
  // [batch, hkv, cap, dim] over head-major or token-major storage.
  TensorView contiguous_view(void* data, DType dt, int64_t batch, int64_t dim) const;

  Config cfg_;
  AttentionDesc desc_;
  std::optional<PageFormat> pages_;
  int64_t cap_ = 0;
  int64_t rows_ = 0;
  std::vector<int32_t> q_indptr_, page_indptr_, page_indices_;
  std::vector<uint8_t> cont_[2], cont_scales_[2], pool_[2], pool_scales_[2];
  std::vector<float> originals_[2];
  std::vector<uint8_t> q_, o_;
  std::vector<float> lse_;
  std::vector<float> sinks_;
};

// |got - want| <= abs + rel * |want| for every element (o then lse); reports the first bad one.
void expect_close(const std::vector<double>& got, const std::vector<double>& want, double abs,
                  double rel, const std::string& what);
// The float64 reference of the problem as it stands (its desc, its args): o then lse.
std::vector<double> reference_of(Problem& p);

}  // namespace kvcache::testing
