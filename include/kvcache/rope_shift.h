// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// rope_shift: the context shift (llama.cpp's seq_add). Re-rotates cached K of positions [p0, p1)
// by delta in place, so K that was rotated for position p becomes K rotated for p + delta, without
// recomputing it. Per sequence b of a batch: positions [p0[b], p1[b]) (token indices of the cache)
// move by delta[b]; V is never touched. Quantized K (int8, fp8_e4m3) is dequantized, rotated and
// requantized with a fresh scale. Multi-section RoPE: every position stream shifts by delta.
// Caches: contiguous (ContiguousKV: k [batch, num_kv_heads, capacity, head_dim], any strides but
// unit on head_dim) or a paged pool with a page table. Only k and k_scales are read and written;
// v and v_scales may be empty.
// The plan holds its RoPE table, fetched in select(); run() allocates nothing.
// On CUDA (a plan selected for Device::cuda(i)) every view AND every span of RopeShiftArgs (p0, p1,
// delta, seq_lens, the page table) is memory of that GPU, never read on the host: can_implement
// checks their sizes, the kernel their values. A sequence with a bad entry (seq_lens past its
// capacity or pages, a range outside [0, seq_lens], p1 or |delta| past the table, a page_indptr or
// page index out of range) is left unchanged and counted in the GPU's error record, which
// check_device_errors() (device.h) turns into out_of_range naming the entry; the other sequences
// are shifted. select() uploads the table (once per configuration and GPU); run() is one kernel,
// no synchronization, graph-capturable. Its bytes are those of the cpu.portable plan for finite
// inputs (the same float operations in the same order).
// Plans are values: intentionally copyable; const methods are thread-safe.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>

#include "kvcache/device.h"
#include "kvcache/export.h"
#include "kvcache/op_plan.h"
#include "kvcache/paged_kv.h"
#include "kvcache/rope.h"
#include "kvcache/status.h"

namespace kvcache {

namespace ops {
struct RopeTable;
}  // namespace ops
namespace backend {
struct CudaRopeTable;
}  // namespace backend

struct RopeShiftDesc {
  KVFormat kv;  // num_kv_heads, head_dim, k_dtype (f32, f16, bf16, int8, fp8_e4m3)
  std::optional<PageFormat> pages;  // nullopt: contiguous caches
  RopeConfig rope;                  // as K was rotated with
};

struct RopeShiftArgs {
  // [batch] each: sequence b re-rotates its tokens [p0[b], p1[b]) by delta[b]. REQUIRES
  // (checked): 0 <= p0 <= p1 <= seq_lens[b], p1 <= rope.max_position and |delta| <
  // rope.max_position (the rotation by delta is a table row). What position a token holds is the
  // caller's: after a removal the tokens past the gap still carry their old rotation, so the
  // indices alone cannot say which p + delta is meant.
  std::span<const int32_t> p0;
  std::span<const int32_t> p1;
  std::span<const int32_t> delta;
  std::span<const int32_t> seq_lens;  // [batch]: tokens each sequence holds
  ContiguousKV caches;                // contiguous form: k (+ k_scales)
  PagedKV kv;                         // paged form: k_pages (+ k_scales)
  PageTable table;                    // paged form
};

class KVCACHE_API RopeShiftPlan {
 public:
  // Intentionally copyable.
  // invalid_argument: desc malformed (check_kv_format, check_paged_kv_desc when paged,
  // check_rope_config, head_dim <= 1024); unavailable: a forced isa this CPU lacks or whose
  // self-test failed, or Device::cuda(i) in a build without CUDA or for a GPU that does not exist
  // (isa is ignored on CUDA); resource_exhausted: the RoPE table cannot be allocated (on the host,
  // or on the GPU).
  static Result<RopeShiftPlan> select(const RopeShiftDesc& desc, Device device = Device::cpu(),
                                      CpuIsa isa = CpuIsa::best);
  // Every check of run() that reads no device memory; writes nothing. invalid_argument for shapes
  // / dtypes / layouts / devices (the plan's) / span sizes; on the CPU out_of_range for ranges,
  // positions and pages (on CUDA the kernel checks those values, see the header).
  [[nodiscard]] Status can_implement(const RopeShiftArgs& args) const;
  [[nodiscard]] size_t workspace_size() const { return 0; }
  // can_implement and stream.device (the plan's device, else invalid_argument), then the work: on
  // the CPU spread over stream.pool when set; on CUDA one kernel on stream.cuda_stream (internal
  // when the launch fails). A refused call writes nothing. Allocates nothing.
  Status run(const Stream& stream, std::span<std::byte> workspace, const RopeShiftArgs& args) const;
  // "cpu.avx512", "cpu.portable" or "cuda.sm90".
  [[nodiscard]] const char* sku() const;
  // Per element against reference::rope_shift (the stored K rotated by delta in double). The same
  // bound on CUDA, whose bytes are those of the cpu.portable plan.
  [[nodiscard]] Precision precision() const;
  [[nodiscard]] const RopeShiftDesc& desc() const { return desc_; }

 private:
  RopeShiftPlan() = default;
  static Result<RopeShiftPlan> select_cuda(const RopeShiftDesc& desc, Device device,
                                           int64_t rotary_dim);
  [[nodiscard]] bool on_gpu() const { return !device_.is_cpu(); }
  Status run_cuda(const Stream& stream, const RopeShiftArgs& args) const;

  RopeShiftDesc desc_;
  CpuIsa isa_ = CpuIsa::portable;
  std::shared_ptr<const ops::RopeTable> table_;
  Device device_ = Device::cpu();
  void* errors_ = nullptr;                                    // the GPU's error record (CUDA)
  std::shared_ptr<const backend::CudaRopeTable> cuda_table_;  // the table on that GPU (CUDA)
};

}  // namespace kvcache
