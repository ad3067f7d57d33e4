// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "serving/verify.h"

#include <algorithm>
#include <cstddef>

#include "kvcache/paged_kv.h"

namespace kvcache::serving {

DType model_dtype(DType kv_dtype) { return is_quantized(kv_dtype) ? DType::bf16 : kv_dtype; }

float verify_tolerance(DType kv_dtype) {
  // int8 / fp8_e4m3 against the bf16 model: the max |logit diff| of `kvcache demo --verify all
  // --kv-dtype int8|fp8` over seeds 1-8 (default workload) was 2.3e-2 (int8) and 6.1e-2 (fp8);
  // the bounds leave 2.6x and 3.3x headroom. A flipped cached page moves logits by far more (the
  // negative test, Engine.CorruptedPageIsCaught).
  switch (kv_dtype) {
    case DType::int8:
      return 6e-2f;
    case DType::fp8_e4m3:
      return 2e-1f;
    default:
      return model::logit_tolerance(kv_dtype);
  }
}

Result<VerifyResult> verify_steps(const model::TinyModel& model, std::span<const int32_t> tokens,
                                  std::span<const StepLogits> steps, float tolerance) {
  VerifyResult out;
  if (steps.empty()) return out;
  int64_t last = 0;
  const int64_t vocab = model.config().vocab;
  for (const StepLogits& s : steps) {
    if (s.position < 0 || s.position >= static_cast<int64_t>(tokens.size()) ||
        static_cast<int64_t>(s.logits.size()) != vocab) {
      return Status::invalid_argument(
          "verify_steps: a step at position " + std::to_string(s.position) + " with " +
          std::to_string(s.logits.size()) + " logits, expected a position in [0, " +
          std::to_string(tokens.size()) + ") and " + std::to_string(vocab) + " logits");
    }
    last = std::max(last, s.position);
  }
  // Causal: rows [0, last] need only the tokens up to last.
  Result<std::vector<float>> full = model.forward_full(tokens.first(static_cast<size_t>(last + 1)));
  if (!full.ok()) return full.status();
  for (const StepLogits& s : steps) {
    const std::span<const float> row = std::span<const float>(*full).subspan(
        static_cast<size_t>(s.position * vocab), static_cast<size_t>(vocab));
    const float diff = model::max_abs_diff(s.logits, row);
    ++out.checks;
    out.max_error = std::max(out.max_error, diff);
    if (!(diff <= tolerance)) {
      if (out.mismatches == 0) {
        out.first_bad_position = s.position;
        out.first_bad_error = diff;
      }
      ++out.mismatches;
    }
  }
  return out;
}

}  // namespace kvcache::serving
