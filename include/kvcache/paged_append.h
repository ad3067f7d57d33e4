// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// paged_append: writes new tokens' K/V into page pools (NHD or HND, see paged_kv.h) at the slots
// TokenSlots names (a slot mapping, or batch indices + positions through a page table). Per token i
// and kv head h, k[i, h, :] goes to the slot's row of k_pages (v likewise):
//   - f32 / f16 / bf16 storage: converted from input_dtype, rounding to nearest even exactly as
//     dtype.h's scalar conversions (Saturation::none) do;
//   - int8 / fp8_e4m3 storage: quantized per (token, kv head) with the rule of ops/quantize.h
//     (scale = absmax / qmax), the scale written to k_scales / v_scales at the same slot.
// K and V storage dtypes are independent. Nothing outside the written slots changes.
// On CUDA (a plan selected for Device::cuda(i): every view and span on that GPU) the same values
// are written, bit for bit. The slot arrays live in device memory and are checked by the kernel:
// a token whose slot, batch index, position, page_indptr or page index is out of range is skipped
// (none of its rows written) and counted in the GPU's error record, which check_device_errors()
// (device.h) turns into out_of_range naming the entry. Nothing is dropped silently.
// Plans are values: intentionally copyable; const methods are thread-safe; run() on one stream at a
// time (the pool is the stream's). The plan owns nothing; the views and spans are the caller's.

#include <cstddef>
#include <cstdint>
#include <span>

#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/export.h"
#include "kvcache/op_plan.h"
#include "kvcache/paged_kv.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

namespace kvcache {

struct PagedAppendDesc {
  PagedKVDesc cache;                // heads, dims, storage dtypes, pages and layout of the pools
  DType input_dtype = DType::bf16;  // of k and v: f32, f16 or bf16
};

struct PagedAppendArgs {
  TensorView k;      // [num_tokens, num_kv_heads, head_dim], input_dtype, contiguous
  TensorView v;      // [num_tokens, num_kv_heads, head_dim_v], input_dtype, contiguous
  TokenSlots slots;  // where token i goes: exactly one of the two forms
  PagedKV cache;     // the pools (and scales for quantized storage) the descriptor describes
};

class KVCACHE_API PagedAppendPlan {
 public:
  // Intentionally copyable.
  // invalid_argument: desc malformed (see check_paged_kv_desc) or input_dtype outside {f32, f16,
  // bf16}; unavailable: a forced isa this CPU lacks, avx512 whose known-answer self-test failed,
  // or Device::cuda(i) in a build without CUDA or for a GPU that does not exist. best: avx512 when
  // usable, else portable; avx2 has no path of its own and runs the portable one. On CUDA,
  // select() fetches the GPU's error record (allocated once per GPU) and ignores isa.
  static Result<PagedAppendPlan> select(const PagedAppendDesc& desc, Device device = Device::cpu(),
                                        CpuIsa isa = CpuIsa::best);
  // Every check of run() that reads no device memory; writes nothing. invalid_argument: dtypes,
  // shapes, contiguity, devices (the plan's), null data, pools vs descriptor (layout, scales),
  // both or neither slot forms, span sizes, k / v overlapping a pool or scales, pools or scales
  // overlapping each other, on CUDA more than 2^31 - 1 elements in k or v; on the CPU also
  // out_of_range: a slot, batch index, page index or position outside what exists (on CUDA the
  // kernel checks these values, see the header).
  // REQUIRES: the tokens of one call name distinct slots (not checked: the result for a repeated
  // slot would depend on the order the threads run).
  [[nodiscard]] Status can_implement(const PagedAppendArgs& args) const;
  [[nodiscard]] size_t workspace_size() const { return 0; }
  // can_implement, the workspace size and stream.device (the plan's device, else
  // invalid_argument), then the writes: on the CPU spread over stream.pool by token ranges when
  // set; on CUDA one kernel on stream.cuda_stream, no synchronization, graph-capturable (internal
  // when the launch fails). A refused call writes nothing. Allocates nothing.
  Status run(const Stream& stream, std::span<std::byte> workspace,
             const PagedAppendArgs& args) const;
  // "cpu.avx512", "cpu.portable" or "cuda.sm90".
  [[nodiscard]] const char* sku() const;
  // Bit-exact against reference::paged_append (data and scales), on every device.
  [[nodiscard]] Precision precision() const;
  [[nodiscard]] const PagedAppendDesc& desc() const { return desc_; }

 private:
  PagedAppendPlan(const PagedAppendDesc& desc, CpuIsa isa) : desc_(desc), isa_(isa) {}
  Status run_cuda(const Stream& stream, const PagedAppendArgs& args) const;

  PagedAppendDesc desc_;
  CpuIsa isa_ = CpuIsa::portable;  // portable or avx512 (CPU plans)
  Device device_ = Device::cpu();
  void* errors_ = nullptr;  // the GPU's error record (CUDA plans)
};

}  // namespace kvcache
