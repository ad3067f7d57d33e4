// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The attention kernel's parameters (device/attention.cuh): plain data with everything the
// kernel needs precomputed by the host launcher (backend/cuda/attention_ops.cpp), which fills it
// from backend::CudaAttentionParams. Element strides; int where the host checked the range.

#include <cstdint>

#include "errors.cuh"

namespace kvcache::cuda {

// The most chunks one row may be split into (the last CTA's merge keeps a weight per chunk).
inline constexpr int kAttnMaxChunks = 64;
// Floats per row of a chunk's partial result past head_dim: max, sum, 2 of padding (rows start on
// 16-byte boundaries: the merge reads them as float4).
inline constexpr int kAttnPartialExtra = 4;

// q / o element types, decided at run time (they are read and written once per CTA).
enum class IoType : int { f32, f16, bf16 };

// K / V storage types, fixed at compile time (the kernels are templates on them); the host names
// a kernel instance by them (backend/cuda/attention_launch.h).
enum class KVStorage : int { f32, f16, bf16, int8, fp8_e4m3 };
inline constexpr int kNumKVStorage = 5;

struct AttnSide {
  const uint8_t* base = nullptr;
  int64_t page_stride = 0, slot_stride = 0, head_stride = 0;
  const float* scales = nullptr;  // quantized storage only
  int64_t scale_page_stride = 0, scale_slot_stride = 0, scale_head_stride = 0;
};

struct AttnKernelParams {
  const uint8_t* q = nullptr;
  IoType q_type = IoType::bf16;
  int64_t q_row_stride = 0, q_head_stride = 0;
  uint8_t* o = nullptr;
  IoType o_type = IoType::bf16;
  int64_t o_row_stride = 0, o_head_stride = 0;
  float* lse = nullptr;
  int64_t lse_row_stride = 0, lse_head_stride = 0;

  int num_rows = 0;
  int batch = 0;
  int num_kv_heads = 0;
  int group = 0;          // query heads per kv head
  int subgroups = 1;      // ceil(group / kGroup): CTAs per (row, kv head, chunk)
  int head_dim = 0;       // of K and V; lanes_per_key * 8
  int lanes_per_key = 0;  // a power of two in [2, 32]
  AttnSide k, v;

  bool paged = false;
  int page_size = 0;
  int page_shift = -1;  // log2(page_size) when a power of two, else -1
  int num_pages = 0;
  int capacity = 0;  // contiguous: tokens per sequence
  const int32_t* indptr = nullptr;
  const int32_t* indices = nullptr;
  int num_indices = 0;
  const int32_t* seq_lens = nullptr;
  const int32_t* q_indptr = nullptr;  // extend; null for decode

  float q_scale = 0.0f;        // sm_scale * log2(e), or sm_scale with a soft cap
  float soft_cap_log2 = 0.0f;  // soft_cap * log2(e); 0: no cap
  float inv_soft_cap = 0.0f;
  int window = 0;
  int sink_tokens = 0;
  const float* sinks = nullptr;

  int chunk_size = 0;
  int max_chunks = 1;
  // Extend with packed query tokens (tensor cores, no window): a CTA serves q_per_cta consecutive
  // query tokens of one sequence (x heads_per_cta heads = the MMA's rows); the grid covers
  // max_q_blocks blocks per sequence. q_per_cta 1: a CTA serves one query row.
  int q_per_cta = 1;
  int max_q_blocks = 0;
  float* partials = nullptr;     // [rows * subgroups * num_kv_heads * max_chunks][item_floats]
  unsigned* counters = nullptr;  // [rows * subgroups * num_kv_heads]
  int item_floats = 0;           // rows per item * (head_dim + kAttnPartialExtra)
  DeviceErrorRecord* errors = nullptr;
  ErrorOp op = ErrorOp::decode_attention;
};

}  // namespace kvcache::cuda
