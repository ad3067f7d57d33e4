// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// What quantized K/V storage costs: the serving engine rerun at a small size with int8 or fp8
// pages, every decode step compared with the bf16 model's recompute without cache. The demo
// prints it beside the main run, whatever that run's storage. Pure function over its options:
// thread-compatible.

#include <cstdint>
#include <span>
#include <vector>

#include "kvcache/dtype.h"
#include "kvcache/status.h"

#include "serving/engine.h"

namespace kvcache::serving {

struct StorageError {
  DType kv_dtype = DType::int8;
  float max_error = 0.0f;  // max |logit diff| against the bf16 model, no cache
  float tolerance = 0.0f;  // verify_tolerance(kv_dtype)
  int64_t checks = 0;
  int64_t mismatches = 0;
};

// The conversations and turns of the small rerun (at most; fewer when `base` has fewer).
inline constexpr int64_t kCompareConversations = 4;
inline constexpr int64_t kCompareTurns = 2;

// Runs base's workload cut to kCompareConversations x kCompareTurns, every step verified, with a
// page budget that holds every conversation (nothing evicted or preempted), once per dtype in
// kv_dtypes. base's fault injection and progress callback are not used. run_engine()'s errors.
[[nodiscard]] Result<std::vector<StorageError>> compare_storage(const EngineOptions& base,
                                                                std::span<const DType> kv_dtypes);

}  // namespace kvcache::serving
