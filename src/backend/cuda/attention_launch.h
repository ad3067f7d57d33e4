// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// One launcher per kernel and K/V storage type, each compiled in its own translation unit
// (instances/attention_*.cu, generated), so that the instantiations build in parallel.
// simt: group_pad is the kernel's query heads per CTA (1, 4 or 8). mma: 16 heads per CTA, head_dim
// 64 (16-bit only), 128 or 256. Each returns the launch's error. The *_occupancy functions give
// the CTAs one multiprocessor holds at once (the schedule sizes its waves by it).

#include <cuda_runtime_api.h>

#include "backend/cuda/device/attention_params.cuh"

namespace kvcache::cuda {

cudaError_t launch_attention_simt_f32(const AttnKernelParams& p, int group_pad, cudaStream_t s);
cudaError_t launch_attention_simt_f16(const AttnKernelParams& p, int group_pad, cudaStream_t s);
cudaError_t launch_attention_simt_bf16(const AttnKernelParams& p, int group_pad, cudaStream_t s);
cudaError_t launch_attention_simt_int8(const AttnKernelParams& p, int group_pad, cudaStream_t s);
cudaError_t launch_attention_simt_fp8(const AttnKernelParams& p, int group_pad, cudaStream_t s);

cudaError_t attention_simt_occupancy_f32(int group_pad, int* ctas_per_sm);
cudaError_t attention_simt_occupancy_f16(int group_pad, int* ctas_per_sm);
cudaError_t attention_simt_occupancy_bf16(int group_pad, int* ctas_per_sm);
cudaError_t attention_simt_occupancy_int8(int group_pad, int* ctas_per_sm);
cudaError_t attention_simt_occupancy_fp8(int group_pad, int* ctas_per_sm);

cudaError_t launch_attention_mma_f16(const AttnKernelParams& p, cudaStream_t s);
cudaError_t launch_attention_mma_bf16(const AttnKernelParams& p, cudaStream_t s);
cudaError_t launch_attention_mma_int8(const AttnKernelParams& p, cudaStream_t s);
cudaError_t launch_attention_mma_fp8(const AttnKernelParams& p, cudaStream_t s);

cudaError_t attention_mma_occupancy_f16(int head_dim, int* ctas_per_sm);
cudaError_t attention_mma_occupancy_bf16(int head_dim, int* ctas_per_sm);
cudaError_t attention_mma_occupancy_int8(int head_dim, int* ctas_per_sm);
cudaError_t attention_mma_occupancy_fp8(int head_dim, int* ctas_per_sm);

}  // namespace kvcache::cuda
