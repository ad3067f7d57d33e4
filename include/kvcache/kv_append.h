// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// kv_append: the ragged batched append into contiguous per-sequence caches. For every sample b,
// kv head h and l < len_b (new_lens[b], or max_new_tokens when new_lens is empty):
//   k_cache[b, h, offsets[b] + l, :] = k_new[b, h, l, :]   (and v likewise, head_dim_v wide)
// Bit-exact copies; caches and new tokens share one dtype. Nothing outside the written rows
// changes. On the CPU an append past the capacity is refused before any write. On CUDA (a plan
// selected for Device::cuda(i): every view and span on that GPU) offsets and new_lens live in
// device memory and are checked by the kernel: a sample whose entry is out of range is skipped
// (nothing of it written) and counted in the GPU's error record, which check_device_errors()
// (device.h) turns into out_of_range naming the entry. Nothing is dropped silently.
// Plans are values: intentionally copyable; const methods are thread-safe; run() on one stream at a
// time (the pool is the stream's). The plan owns nothing; the views are the caller's.

#include <cstddef>
#include <cstdint>
#include <span>

#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/export.h"
#include "kvcache/op_plan.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

namespace kvcache {

struct KVAppendDesc {
  int64_t batch = 0;  // samples (sequences)
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;        // of K
  int64_t head_dim_v = 0;      // of V; 0 means head_dim
  int64_t capacity = 0;        // tokens each cache row holds
  int64_t max_new_tokens = 0;  // L: the token axis of k_new / v_new
  DType dtype = DType::bf16;   // of caches and new tokens: f32, f64, f16 or bf16

  [[nodiscard]] int64_t dim_v() const { return head_dim_v == 0 ? head_dim : head_dim_v; }
};

struct KVAppendArgs {
  // [batch, num_kv_heads, capacity, head_dim]: any strides on the first three axes, unit stride on
  // the last (head-major arrays and a token-major cache viewed with permuted strides both fit).
  TensorView k_cache;
  TensorView v_cache;  // [batch, num_kv_heads, capacity, head_dim_v], likewise
  TensorView k_new;    // [batch, num_kv_heads, max_new_tokens, head_dim], contiguous
  TensorView v_new;    // [batch, num_kv_heads, max_new_tokens, head_dim_v], contiguous
  std::span<const int32_t> offsets;   // [batch]: the cache position of sample b's first new token
  std::span<const int32_t> new_lens;  // [batch], each in [0, max_new_tokens]; empty: all L
};

class KVCACHE_API KVAppendPlan {
 public:
  // Intentionally copyable.
  // invalid_argument: desc malformed (batch, num_kv_heads, head_dim, capacity, max_new_tokens
  // > 0, head_dim_v >= 0) or dtype outside {f32, f64, f16, bf16}; unavailable: a forced isa this
  // CPU lacks, or Device::cuda(i) in a build without CUDA or for a GPU that does not exist. On
  // CUDA, select() fetches the GPU's error record (allocated once per GPU) and ignores isa. Every
  // CPU isa runs the same row copies (memcpy, vectorized by the C library).
  static Result<KVAppendPlan> select(const KVAppendDesc& desc, Device device = Device::cpu(),
                                     CpuIsa isa = CpuIsa::best);
  // Every check of run() that reads no device memory; writes nothing. invalid_argument: dtypes,
  // shapes, strides, devices (the plan's), null data, span sizes, new tokens overlapping a cache
  // (by the address range it spans), on CUDA more than 2^31 - 1 new elements per side; on the CPU
  // also a new_lens entry outside [0, max_new_tokens], and out_of_range: an offset < 0 or
  // offsets[b] + len_b > capacity (on CUDA the kernel checks these values, see the header).
  // REQUIRES: no two cache elements written by one call share memory (k_cache and v_cache may
  // interleave in one buffer, but not alias).
  [[nodiscard]] Status can_implement(const KVAppendArgs& args) const;
  [[nodiscard]] size_t workspace_size() const { return 0; }
  // can_implement, the workspace size and stream.device (the plan's device, else
  // invalid_argument), then the copies: on the CPU spread over stream.pool by (sample, head, token
  // block) when set; on CUDA one kernel on stream.cuda_stream (16-byte loads and stores where the
  // rows, strides and pointers allow), no synchronization, graph-capturable; internal when the
  // launch fails. A refused call writes nothing. Allocates nothing.
  Status run(const Stream& stream, std::span<std::byte> workspace, const KVAppendArgs& args) const;
  // "cpu.portable" or "cuda.sm90".
  [[nodiscard]] const char* sku() const;
  // Bit-exact against reference::kv_append (both devices).
  [[nodiscard]] Precision precision() const;
  [[nodiscard]] const KVAppendDesc& desc() const { return desc_; }

 private:
  explicit KVAppendPlan(const KVAppendDesc& desc) : desc_(desc) {}

  KVAppendDesc desc_;
  Device device_ = Device::cpu();
  void* errors_ = nullptr;  // the GPU's error record (CUDA plans)
};

}  // namespace kvcache
