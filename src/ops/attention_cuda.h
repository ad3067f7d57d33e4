// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The CUDA half of the attention plans (src/ops/attention.cpp holds the descriptor and argument
// checks both devices share): the CUDA support table, the schedule, the workspace and the launch.

#include <cstddef>
#include <span>

#include "kvcache/attention.h"

namespace kvcache::ops {

// The plan state for a GPU: the support table (head_dim == head_dim_v in
// backend::kCudaAttentionHeadDims, k_dtype and v_dtype each in kCudaAttentionKVDTypes; the
// tensor-core kernel when cuda_attention_has_mma, else the CUDA-core one), the device
// error record, the multiprocessor count, the workspace capacity and the default schedule.
// REQUIRES: the descriptor passed the shared checks.
[[nodiscard]] Result<detail::AttentionPlanState> cuda_attention_state(const AttentionDesc& desc,
                                                                      Device device, bool extend);

// The chunking of work units (query rows, or packed query blocks) whose visible key counts are
// `unit_keys` (host); grid_units: the units the grid holds (the workspace must fit them all).
[[nodiscard]] AttentionSchedule cuda_attention_schedule(const detail::AttentionPlanState& plan,
                                                        std::span<const int64_t> unit_keys,
                                                        int64_t grid_units);

// Query tokens per work item when extend packs them (tensor cores, group <= 8, no window), else 1.
[[nodiscard]] int64_t cuda_attention_packing(const detail::AttentionPlanState& plan);

// The tensor-core kernel's guarantee: q and the softmax weights are rounded to bf16 (bf16 K/V)
// or f16 (f16, int8, fp8 K/V) before their products.
[[nodiscard]] Precision cuda_mma_attention_precision(const detail::AttentionPlanState& plan);

[[nodiscard]] size_t cuda_attention_workspace_size(const detail::AttentionPlanState& plan);

// What the shared checks cannot see for CUDA: 16-byte aligned K/V rows, and a schedule that fits
// the workspace.
[[nodiscard]] Status check_cuda_attention_args(const detail::AttentionPlanState& plan,
                                               const AttentionArgs& args);

// REQUIRES: the arguments passed every check; workspace holds workspace_size() bytes.
[[nodiscard]] Status run_cuda_attention(const detail::AttentionPlanState& plan,
                                        const Stream& stream, std::span<std::byte> workspace,
                                        const AttentionArgs& args);

}  // namespace kvcache::ops
