// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// Host side of the CUDA attention: kernel parameters, workspace layout, the launch.
//
// Workspace: [counters: one uint32 per (row, kv head, sub-group), 256-byte aligned]
//            [partials: item_floats floats per (row, kv head, sub-group, chunk)]
#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include <cuda_runtime.h>

#include "backend/cuda/attention_launch.h"
#include "backend/cuda/device_errors.h"
#include "backend/cuda_attention_ops.h"
#include "backend/device_memory.h"

namespace kvcache::backend {
namespace {

constexpr size_t kAlign = 256;
constexpr int64_t kWideMinChunk = 512;  // keys: 8 warps x 4 tiles of 16

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

static_assert(kCudaAttentionMaxChunks == cuda::kAttnMaxChunks);

cuda::IoType io_type(DType t) {
  return t == DType::f32   ? cuda::IoType::f32
         : t == DType::f16 ? cuda::IoType::f16
                           : cuda::IoType::bf16;
}

cuda::AttnSide side(const CudaKVSide& s) {
  cuda::AttnSide a;
  a.base = reinterpret_cast<const uint8_t*>(s.base);
  a.page_stride = s.page_stride;
  a.slot_stride = s.slot_stride;
  a.head_stride = s.head_stride;
  a.scales = s.scales;
  a.scale_page_stride = s.scale_page_stride;
  a.scale_slot_stride = s.scale_slot_stride;
  a.scale_head_stride = s.scale_head_stride;
  return a;
}

std::optional<cuda::KVStorage> storage_of(DType t) {
  switch (t) {
    case DType::f32:
      return cuda::KVStorage::f32;
    case DType::f16:
      return cuda::KVStorage::f16;
    case DType::bf16:
      return cuda::KVStorage::bf16;
    case DType::int8:
      return cuda::KVStorage::int8;
    case DType::fp8_e4m3:
      return cuda::KVStorage::fp8_e4m3;
    default:
      return std::nullopt;
  }
}

// The CUDA-core kernel of one (K, V) storage pair (instances/attention_simt_*.cu).
struct SimtKernel {
  cudaError_t (*launch)(const cuda::AttnKernelParams&, int, cudaStream_t);
  cudaError_t (*occupancy)(int, int*);
};

// Every pair, at [K * kNumKVStorage + V].
template <size_t... kPair>
constexpr std::array<SimtKernel, sizeof...(kPair)> simt_table(std::index_sequence<kPair...>) {
  constexpr int n = cuda::kNumKVStorage;
  return {SimtKernel{
      cuda::launch_attention_simt<cuda::KVStorage(kPair / n), cuda::KVStorage(kPair % n)>,
      cuda::attention_simt_occupancy<cuda::KVStorage(kPair / n), cuda::KVStorage(kPair % n)>}...};
}
constexpr auto kSimtKernels =
    simt_table(std::make_index_sequence<cuda::kNumKVStorage * cuda::kNumKVStorage>{});

// The tensor-core kernel of one storage type (K == V; instances/attention_mma_*.cu).
struct MmaKernel {
  cudaError_t (*launch)(const cuda::AttnKernelParams&, bool wide, cudaStream_t);
  cudaError_t (*occupancy)(int, int*);
};

// The kernels of a K and V dtype pair; a null member: no such kernel.
struct KernelSet {
  const SimtKernel* simt = nullptr;
  const MmaKernel* mma = nullptr;
};

KernelSet kernels_of(DType k, DType v) {
  static constexpr MmaKernel kMmaF16{cuda::launch_attention_mma_f16,
                                     cuda::attention_mma_occupancy_f16};
  static constexpr MmaKernel kMmaBf16{cuda::launch_attention_mma_bf16,
                                      cuda::attention_mma_occupancy_bf16};
  static constexpr MmaKernel kMmaInt8{cuda::launch_attention_mma_int8,
                                      cuda::attention_mma_occupancy_int8};
  static constexpr MmaKernel kMmaFp8{cuda::launch_attention_mma_fp8,
                                     cuda::attention_mma_occupancy_fp8};
  const std::optional<cuda::KVStorage> ks = storage_of(k);
  const std::optional<cuda::KVStorage> vs = storage_of(v);
  if (!ks || !vs) return {};
  KernelSet set;
  set.simt = &kSimtKernels[static_cast<size_t>(static_cast<int>(*ks) * cuda::kNumKVStorage +
                                               static_cast<int>(*vs))];
  if (k != v) return set;
  switch (k) {
    case DType::f16:
      set.mma = &kMmaF16;
      break;
    case DType::bf16:
      set.mma = &kMmaBf16;
      break;
    case DType::int8:
      set.mma = &kMmaInt8;
      break;
    case DType::fp8_e4m3:
      set.mma = &kMmaFp8;
      break;
    default:
      break;
  }
  return set;
}

bool fits_int(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

}  // namespace

size_t cuda_attention_workspace_bytes(bool mma, int64_t rows_per_item, int64_t items,
                                      int64_t max_rows, int64_t num_q_heads, int64_t num_kv_heads,
                                      int64_t head_dim) {
  const int64_t row_groups =
      max_rows * num_kv_heads * cuda_attention_subgroups(mma, num_q_heads, num_kv_heads);
  return align_up(static_cast<size_t>(row_groups) * sizeof(uint32_t)) +
         static_cast<size_t>(items * rows_per_item * (head_dim + cuda::kAttnPartialExtra)) *
             sizeof(float);
}

Status cuda_attention(const CudaAttentionParams& p, const Stream& stream) {
  const char* op = p.extend ? "extend_attention" : "decode_attention";
  if (p.num_rows == 0) return Status();
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  const bool packed = p.q_per_cta > 1;
  const int64_t subgroups =
      packed ? 1 : cuda_attention_subgroups(p.mma, p.num_q_heads, p.num_kv_heads);
  const int64_t blocks = packed ? p.batch * p.max_q_blocks : p.num_rows;
  const int64_t row_groups = blocks * p.num_kv_heads * subgroups;
  for (int64_t v : {p.num_rows, p.batch, p.num_pages, p.capacity, p.num_indices, p.window,
                    p.sink_tokens, p.chunk_size * p.max_chunks, row_groups * p.max_chunks}) {
    if (!fits_int(v)) {
      return Status::invalid_argument(std::string(op) + ": a size is " + std::to_string(v) +
                                      ", expected below 2^31 on CUDA");
    }
  }
  cuda::AttnKernelParams k;
  k.q = reinterpret_cast<const uint8_t*>(p.q);
  k.q_type = io_type(p.q_dtype);
  k.q_row_stride = p.q_row_stride;
  k.q_head_stride = p.q_head_stride;
  k.o = reinterpret_cast<uint8_t*>(p.o);
  k.o_type = io_type(p.o_dtype);
  k.o_row_stride = p.o_row_stride;
  k.o_head_stride = p.o_head_stride;
  k.lse = p.lse;
  k.lse_row_stride = p.lse_row_stride;
  k.lse_head_stride = p.lse_head_stride;
  k.num_rows = static_cast<int>(p.num_rows);
  k.batch = static_cast<int>(p.batch);
  k.num_kv_heads = static_cast<int>(p.num_kv_heads);
  k.group = static_cast<int>(group);
  k.subgroups = static_cast<int>(subgroups);
  k.head_dim = static_cast<int>(p.head_dim);
  k.lanes_per_key = static_cast<int>(p.head_dim / 8);
  k.k = side(p.k);
  k.v = side(p.v);
  k.paged = p.paged;
  k.page_size = static_cast<int>(p.page_size);
  k.page_shift = -1;
  for (int s = 0; s < 31; ++s) {
    if (int64_t{1} << s == p.page_size) k.page_shift = s;
  }
  k.num_pages = static_cast<int>(p.num_pages);
  k.capacity = static_cast<int>(p.capacity);
  k.indptr = p.indptr;
  k.indices = p.indices;
  k.num_indices = static_cast<int>(p.num_indices);
  k.seq_lens = p.seq_lens;
  k.q_indptr = p.q_indptr;
  constexpr float kLog2e = 1.4426950408889634f;
  k.q_scale = p.soft_cap > 0.0f ? p.sm_scale : p.sm_scale * kLog2e;
  k.soft_cap_log2 = p.soft_cap > 0.0f ? p.soft_cap * kLog2e : 0.0f;
  k.inv_soft_cap = p.soft_cap > 0.0f ? 1.0f / p.soft_cap : 0.0f;
  k.window = static_cast<int>(p.window);
  k.sink_tokens = static_cast<int>(p.sink_tokens);
  k.sinks = p.sinks;
  k.chunk_size = static_cast<int>(p.chunk_size);
  k.max_chunks = static_cast<int>(p.max_chunks);
  const size_t counter_bytes = align_up(static_cast<size_t>(row_groups) * sizeof(uint32_t));
  k.counters = reinterpret_cast<unsigned*>(p.workspace);
  k.partials = reinterpret_cast<float*>(p.workspace + counter_bytes);
  k.item_floats = static_cast<int>(cuda_attention_rows_per_item(p.mma, p.extend, group) *
                                   (p.head_dim + cuda::kAttnPartialExtra));
  k.q_per_cta = static_cast<int>(p.q_per_cta);
  k.max_q_blocks = static_cast<int>(p.max_q_blocks);
  k.errors = static_cast<cuda::DeviceErrorRecord*>(p.errors);
  k.op = p.extend ? cuda::ErrorOp::extend_attention : cuda::ErrorOp::decode_attention;

  auto* s = static_cast<cudaStream_t>(stream.cuda_stream);
  if (p.max_chunks > 1) {
    if (cudaError_t err = cudaMemsetAsync(p.workspace, 0, counter_bytes, s); err != cudaSuccess) {
      return Status::internal(std::string(op) +
                              ": cudaMemsetAsync failed: " + cudaGetErrorString(err));
    }
  }
  const KernelSet set = kernels_of(p.k_dtype, p.v_dtype);
  if (set.simt == nullptr || (p.mma && set.mma == nullptr)) {
    return Status::invalid_argument(std::string(op) + ": K/V dtypes " + name(p.k_dtype) + " / " +
                                    name(p.v_dtype) + " have no CUDA " +
                                    (p.mma ? "tensor-core" : "CUDA-core") +
                                    " kernel, expected each of f32, f16, bf16, int8, fp8_e4m3 "
                                    "(tensor cores: K and V of one type)");
  }
  const int pad = static_cast<int>(cuda_attention_group_pad(p.mma, group));
  // At most one CTA per multiprocessor, with chunks of at least 4 tiles per warp: the tensor-core
  // kernel's 8-warp CTAs (attention_launch.h; H100: b16 x 4096 1.7% faster, b1 x 32768 0.8%,
  // b1 x 512's 64-key chunks 3% slower with half the warps idle).
  const bool wide = row_groups * p.max_chunks <= p.num_sms && p.chunk_size >= kWideMinChunk;
  const cudaError_t err = p.mma ? set.mma->launch(k, wide, s) : set.simt->launch(k, pad, s);
  if (err != cudaSuccess) {
    return Status::internal(std::string(op) + ": kernel launch failed: " + cudaGetErrorName(err) +
                            " (" + cudaGetErrorString(err) + ")");
  }
  return Status();
}

Result<int> cuda_attention_ctas_per_sm(Device device, bool mma, DType k_dtype, DType v_dtype,
                                       int64_t head_dim, int64_t group) {
  if (device.is_cpu() || device.index >= cuda_device_count()) {
    return Status::unavailable("cuda_attention_ctas_per_sm: " + to_string(device) +
                               " is not a GPU of this machine");
  }
  if (cudaError_t err = cudaSetDevice(device.index); err != cudaSuccess) {
    return Status::internal(std::string("cudaSetDevice: ") + cudaGetErrorString(err));
  }
  const KernelSet set = kernels_of(k_dtype, v_dtype);
  int ctas = 0;
  cudaError_t err = cudaErrorInvalidValue;
  if (mma && set.mma != nullptr) {
    err = set.mma->occupancy(static_cast<int>(head_dim), &ctas);
  } else if (!mma && set.simt != nullptr) {
    err = set.simt->occupancy(static_cast<int>(cuda_attention_group_pad(mma, group)), &ctas);
  }
  if (err != cudaSuccess || ctas < 1) {
    return Status::internal(std::string("cuda_attention_ctas_per_sm: occupancy query failed: ") +
                            cudaGetErrorString(err));
  }
  return ctas;
}

Result<void*> cuda_error_record(Device device) {
  Result<cuda::DeviceErrorRecord*> r = cuda::device_error_record(device);
  if (!r.ok()) return r.status();
  return static_cast<void*>(*r);
}

Result<int> cuda_multiprocessor_count(Device device) {
  if (device.is_cpu() || device.index >= cuda_device_count()) {
    return Status::unavailable("cuda_multiprocessor_count: " + to_string(device) +
                               " is not a GPU of this machine");
  }
  int count = 0;
  if (cudaError_t err =
          cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index);
      err != cudaSuccess) {
    return Status::internal(std::string("cuda_multiprocessor_count: ") + cudaGetErrorString(err));
  }
  return count;
}

}  // namespace kvcache::backend
