// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// `kvcache bench ops --device cuda`: the cases of bench/cuda_cases.h, each timed two ways against
// bounds measured in the same run on the same GPU (docs/CLI.md):
//  - cold: 256 MiB read before each call (evicts the 50 MB L2, leaving clean lines), CUDA events
//  around one call,
//    the median of max(25, repeats) calls;
//  - graph: 20 calls captured into one CUDA graph, replayed max(10, repeats) times, the median
//    replay time / 20 (what a serving loop that replays graphs sees).
// Bounds: the read bandwidth of a 4 GiB device buffer (each byte read once) and a 2 GiB
// device-to-device copy (read + write counted).

#include "kvcache/status.h"

#include "bench/ops_bench.h"
#include "bench/report.h"

namespace kvcache::bench {

// unavailable when built without CUDA or when options.device is not a GPU here; the first error a
// case returned otherwise, or the device error record's if a case tripped it.
[[nodiscard]] Result<Report> run_cuda_ops_bench(const OpsBenchOptions& options);

}  // namespace kvcache::bench
