// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The cases of `kvcache bench ops --device cuda`: each builder allocates its device buffers, fills
// them with valid random data and returns one call to time (bench/cuda_ops_bench.cpp times it
// cold and inside a CUDA graph, against bounds measured in the same run). Builders run one at a
// time, so a case's memory is freed before the next is built.

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "kvcache/device.h"
#include "kvcache/status.h"

namespace kvcache::bench {

struct CudaCase {
  std::string op, shape, dtype, sku;
  double bytes = 0;              // one call's traffic: inputs read once + outputs written once
  bool copy_bound = false;       // false: set against the read bound; true: against the copy bound
  std::function<Status()> call;  // issues one call on the stream; never synchronizes
  std::shared_ptr<void> keep;    // owns what `call` uses
};

struct CudaCaseOptions {
  Stream stream;       // a non-default stream on the GPU (graph capture needs one)
  bool quick = false;  // small shapes only: a smoke test of every case
};

using CudaCaseBuilder = std::function<Result<CudaCase>()>;

// decode_attention (the matrix: bf16 / int8 / fp8 K/V, paged and contiguous, uniform and
// ragged batches) and extend_attention.
[[nodiscard]] std::vector<CudaCaseBuilder> cuda_attention_cases(const CudaCaseOptions& options);
// kv_append, paged_append, qkv_rope_write (one token x batch, and a 4096-token chunk), copy_pages.
[[nodiscard]] std::vector<CudaCaseBuilder> cuda_write_cases(const CudaCaseOptions& options);

}  // namespace kvcache::bench
