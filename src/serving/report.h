// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The serving demo's outputs: what runs (printed first), the summary table printed at the end of
// `kvcache demo`, and the JSON summary of --json (every key is documented in docs/CLI.md). Each
// takes the main run's report and the small int8 / fp8 reruns of compare_storage(). Pure
// functions: thread-safe.

#include <span>
#include <string>

#include "serving/engine.h"
#include "serving/storage_compare.h"

namespace kvcache::serving {

// A few lines: the model's layers, the workload and the cache configuration (ends with a newline).
[[nodiscard]] std::string run_header(const EngineOptions& options);

// The multi-line summary table (ends with a newline).
[[nodiscard]] std::string summary_table(const EngineReport& report, const EngineOptions& options,
                                        std::span<const StorageError> storage);

// One JSON object (ends with a newline). Numbers are plain JSON numbers; non-finite ones (a NaN
// logit error) are written as null.
[[nodiscard]] std::string summary_json(const EngineReport& report, const EngineOptions& options,
                                       std::span<const StorageError> storage);

// Decode steps compared and steps over the tolerance, the main run and the reruns together.
[[nodiscard]] int64_t total_checks(const EngineReport& report,
                                   std::span<const StorageError> storage);
[[nodiscard]] int64_t total_mismatches(const EngineReport& report,
                                       std::span<const StorageError> storage);

// True when everything passed: no mismatch, at least one check, no page leaked.
[[nodiscard]] bool passed(const EngineReport& report, std::span<const StorageError> storage);

}  // namespace kvcache::serving
