// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal: the RoPE frequencies of a configuration, its cos/sin table (owned by the process-wide
// cache of rope.cpp, shared with the plans that hold it) and the position checks the RoPE ops
// share.

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "kvcache/device.h"
#include "kvcache/rope.h"
#include "kvcache/status.h"

namespace kvcache::backend {
struct CudaRopeTable;
}  // namespace kvcache::backend

namespace kvcache::ops {

// Immutable once built. cos and sin hold the pure rotation: cos(p * inv_freq[i]) at
// [p * num_freqs + i]; the attention factor is applied by the kernels.
struct RopeTable {
  int64_t max_position = 0;
  int64_t num_freqs = 0;  // rotary_dim / 2
  float attention_factor = 1.0f;
  std::vector<double> inv_freq;  // [num_freqs]
  std::vector<float> cos;        // [max_position, num_freqs]
  std::vector<float> sin;        // [max_position, num_freqs]

  [[nodiscard]] size_t bytes() const {
    return inv_freq.size() * sizeof(double) + (cos.size() + sin.size()) * sizeof(float);
  }
};

// The inverse frequencies [rotary_dim / 2] and the attention factor of a configuration.
// REQUIRES: check_rope_config passed for rotary_dim.
[[nodiscard]] std::vector<double> rope_inv_freq(const RopeConfig& config, int64_t rotary_dim);
[[nodiscard]] double rope_attention_factor(const RopeConfig& config);

// The table of a configuration from the cache (a hit), or built and inserted (a miss).
// resource_exhausted when it cannot be allocated. REQUIRES: check_rope_config passed.
[[nodiscard]] Result<std::shared_ptr<const RopeTable>> acquire_rope_table(const RopeConfig& config,
                                                                          int64_t rotary_dim);

// What a CUDA plan of a RoPE op holds: the GPU's error record, the host table and its copy on the
// GPU (times the attention factor when with_attention_factor: see backend::cuda_rope_table).
struct CudaRopePlanParts {
  void* errors = nullptr;
  std::shared_ptr<const RopeTable> table;
  std::shared_ptr<const backend::CudaRopeTable> cuda_table;
};
// unavailable for a GPU this build or machine lacks; resource_exhausted / internal from the
// allocations, naming op. REQUIRES: check_rope_config passed.
[[nodiscard]] Result<CudaRopePlanParts> acquire_cuda_rope(const RopeConfig& config,
                                                          int64_t rotary_dim, Device device,
                                                          std::string_view op,
                                                          bool with_attention_factor);

// positions holds num_position_streams() * num_tokens entries, each in [0, max_position):
// invalid_argument for the size, out_of_range for a value. Reads the span (host memory).
[[nodiscard]] Status check_rope_positions(const RopeConfig& config,
                                          std::span<const int32_t> positions, int64_t num_tokens,
                                          std::string_view op);

// The first frequency of each position stream, and num_freqs after the last:
// frequencies [begin[s], begin[s + 1]) use stream s. One stream: {0, num_freqs}.
struct RopeSections {
  int num_streams = 1;
  std::array<int64_t, kMaxRopeSections + 1> begin{};
};
[[nodiscard]] RopeSections rope_sections(const RopeConfig& config, int64_t num_freqs);

}  // namespace kvcache::ops
