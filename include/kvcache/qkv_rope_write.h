// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// qkv_rope_write: the fused step between the QKV projection and attention, in one pass over the
// packed QKV rows. Per token: split the row into q heads, k heads and v heads -> optional RMS-norm
// of every q and k head (Qwen3 / Gemma QK-norm) -> RoPE at the token's position(s) -> q to q_out;
// k (quantized for int8 / fp8_e4m3 storage, one scale per (token, kv head)) and v (converted or
// quantized; no norm, no rope) into the page pools at the token's slot.
//   RMS-norm: y = x / sqrt(mean(x^2) + norm_eps) * (norm_weight_offset + w), computed in float.
// The plan holds its RoPE table (see rope.h), fetched in select(); run() allocates nothing.
// On CUDA (a plan selected for Device::cuda(i): every view and span on that GPU) select() also
// uploads the table to the GPU (once per configuration and GPU, shared by the plans holding it),
// and the kernel computes with the CPU's portable float operations in their order (RMS-norm's
// sum of squares included), so its outputs are the bits of the cpu.portable plan for finite
// inputs. positions and the slot arrays live in device memory and are checked by the kernel: a
// bad RoPE position skips the token's q and k writes, a bad slot (or batch index, position,
// page_indptr, page index) its k and v writes; each is counted in the GPU's error record, which
// check_device_errors() (device.h) turns into out_of_range naming the entry.
// Plans are values: intentionally copyable; const methods are thread-safe; run() on one stream at a
// time (the pool is the stream's).

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/export.h"
#include "kvcache/op_plan.h"
#include "kvcache/paged_kv.h"
#include "kvcache/rope.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

namespace kvcache {

namespace ops {
struct RopeTable;
}  // namespace ops
namespace backend {
struct CudaRopeTable;
}  // namespace backend

// The dtypes of the packed input and of q_out (the support table can_implement and the tests read).
inline constexpr DType kQkvRopeWriteIoTypes[] = {DType::f32, DType::f16, DType::bf16};

struct QkvRopeWriteDesc {
  int64_t num_q_heads = 0;
  PagedKVDesc cache;              // num_kv_heads, head_dim (of q and k), head_dim_v, storage dtypes
  DType qkv_dtype = DType::bf16;  // of the packed input: f32, f16 or bf16
  DType q_dtype = DType::bf16;    // of q_out: f32, f16 or bf16
  bool qk_norm = false;           // RMS-norm every q and k head before RoPE
  float norm_eps = 1e-6f;         // inside the square root
  float norm_weight_offset = 0.0f;  // 0 (Qwen3: w) or 1 (Gemma: 1 + w)
  RopeConfig rope;
};

struct QkvRopeWriteArgs {
  // [num_tokens, num_q_heads * head_dim + num_kv_heads * head_dim + num_kv_heads * head_dim_v]:
  // q heads, then k heads, then v heads; any row stride >= the row, unit stride inside it.
  TensorView qkv;
  // [num_tokens], or [num_sections, num_tokens] stream-major for multi-section RoPE; each in
  // [0, rope.max_position).
  std::span<const int32_t> positions;
  TensorView q_norm_weight;  // float32 [head_dim]; given iff qk_norm
  TensorView k_norm_weight;  // float32 [head_dim]; given iff qk_norm
  TensorView q_out;          // [num_tokens, num_q_heads, head_dim], q_dtype, contiguous
  TokenSlots slots;          // where token i's K/V go (either form)
  PagedKV kv;                // the pools (NHD or HND, per the descriptor)
};

class KVCACHE_API QkvRopeWritePlan {
 public:
  // Intentionally copyable.
  // invalid_argument: desc malformed (check_paged_kv_desc, check_rope_config, num_q_heads > 0,
  // head_dim and head_dim_v <= 1024, norm_eps >= 0) or dtypes outside the supported set;
  // unavailable: a forced isa this CPU lacks or whose self-test failed, or Device::cuda(i) in a
  // build without CUDA or for a GPU that does not exist (isa is ignored on CUDA);
  // resource_exhausted: the RoPE table cannot be allocated (on the host, or on the GPU).
  static Result<QkvRopeWritePlan> select(const QkvRopeWriteDesc& desc,
                                         Device device = Device::cpu(), CpuIsa isa = CpuIsa::best);
  // Every check of run() that reads no device memory; writes nothing. invalid_argument for
  // shapes / dtypes / layouts / devices (the plan's) / span sizes, on CUDA also more than 2^31 - 1
  // rows (num_tokens * (num_q_heads + 2 num_kv_heads)); on the CPU out_of_range for positions and
  // slots (on CUDA the kernel checks those values, see the header).
  [[nodiscard]] Status can_implement(const QkvRopeWriteArgs& args) const;
  [[nodiscard]] size_t workspace_size() const { return 0; }
  // can_implement and stream.device (the plan's device, else invalid_argument), then the work: on
  // the CPU spread over stream.pool over tokens when set; on CUDA one kernel on
  // stream.cuda_stream, no synchronization, graph-capturable (internal when the launch fails). A
  // refused call writes nothing. Allocates nothing.
  Status run(const Stream& stream, std::span<std::byte> workspace,
             const QkvRopeWriteArgs& args) const;
  // "cpu.avx512", "cpu.portable" or "cuda.sm90".
  [[nodiscard]] const char* sku() const;
  // Per output element against reference::qkv_rope_write: q_out and unquantized K/V within
  // abs_tol + rel_tol * |ref| (rel_tol: half an ulp of the output dtype plus float math); int8 /
  // fp8 K/V within one quantization step (see note). The same bound on CUDA, whose outputs are
  // those of the cpu.portable plan.
  [[nodiscard]] Precision precision() const;
  [[nodiscard]] const QkvRopeWriteDesc& desc() const { return desc_; }

 private:
  QkvRopeWritePlan() = default;
  static Result<QkvRopeWritePlan> select_cuda(const QkvRopeWriteDesc& desc, Device device,
                                              int64_t rotary_dim);
  [[nodiscard]] bool on_gpu() const { return !device_.is_cpu(); }
  Status run_cuda(const Stream& stream, const QkvRopeWriteArgs& args) const;

  QkvRopeWriteDesc desc_;
  CpuIsa isa_ = CpuIsa::portable;
  std::shared_ptr<const ops::RopeTable> table_;
  Device device_ = Device::cpu();
  void* errors_ = nullptr;                                    // the GPU's error record (CUDA)
  std::shared_ptr<const backend::CudaRopeTable> cuda_table_;  // the table on that GPU (CUDA)
};

}  // namespace kvcache
