// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The serving demo's check: the logits a request's decode steps produced from the paged cache,
// against TinyModel::forward_full over the same tokens (a recompute from scratch, no cache, the
// naive attention of src/model). Pure functions: thread-safe.

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kvcache/dtype.h"
#include "kvcache/status.h"

#include "model/tiny_model.h"

namespace kvcache::serving {

// The model's own storage dtype for a KV storage dtype: the same for f32 / f16 / bf16; bf16 for
// int8 and fp8_e4m3 (the recurrent states, and the reference's K/V rounding, stay bf16). So an
// int8 / fp8 run is checked against the bf16 model: its error is the quantization's cost.
[[nodiscard]] DType model_dtype(DType kv_dtype);

// Max |logit diff| allowed against forward_full. f32 / f16 / bf16: model::logit_tolerance (the
// ops' summation order against the naive recompute). int8 / fp8_e4m3: the quantization error
// against bf16, measured on the demo workload (see the .cpp for how), with headroom.
[[nodiscard]] float verify_tolerance(DType kv_dtype);

// The logits one decode step produced: row `position` of the sequence.
struct StepLogits {
  int64_t position = 0;
  std::vector<float> logits;  // [vocab]
};

struct VerifyResult {
  int64_t checks = 0;      // steps compared
  int64_t mismatches = 0;  // steps over the tolerance
  float max_error = 0.0f;  // max |diff| over every compared logit
  int64_t first_bad_position = -1;
  float first_bad_error = 0.0f;
};

// Compares each step with row step.position of forward_full(tokens). invalid_argument for a
// position outside tokens or a logits row of the wrong size; forward_full's errors.
[[nodiscard]] Result<VerifyResult> verify_steps(const model::TinyModel& model,
                                                std::span<const int32_t> tokens,
                                                std::span<const StepLogits> steps, float tolerance);

}  // namespace kvcache::serving
