// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The attention a Session runs: n new queries over the K/V a layer's cache returned from
// update(), through the extend_attention op (contiguous caches). forward_full keeps the naive
// attention() of tiny_model.h, so the demo's check compares the op against an independent
// recompute.

#include <cstdint>
#include <vector>

#include "kvcache/cache.h"
#include "kvcache/status.h"

#include "model/tiny_model.h"

namespace kvcache::model {

// q: [n, num_q_heads * head_dim] float, the last n rows of `views` are the queries' own K/V.
// Returns o [n, num_q_heads * head_dim]. The rotating cache's views hold its sinks first, then
// consecutive positions, so the layer's mask (sinks + window) maps onto the op's sink_tokens and
// window counted in view rows. Errors are the op's (a bug here, not a user error).
[[nodiscard]] Result<std::vector<float>> cached_attention(const LayerConfig& layer,
                                                          const std::vector<float>& q, int64_t n,
                                                          const CacheViews& views);

}  // namespace kvcache::model
