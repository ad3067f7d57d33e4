// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The CUDA half of decode_attention / extend_attention: support table, schedule, workspace and
// the mapping of the arguments onto backend::CudaAttentionParams.
//
// Schedule: a CTA serves an item (row, kv head, sub-group, chunk of chunk_size visible keys) and
// costs about its keys plus kItemOverheadKeys (prologue, epilogue, share of the merge). The
// tensor-core kernel on 16-bit K/V streams at the multiprocessor's share of DRAM bandwidth with
// one CTA or two, so the GPU is num_sms machines; 8-bit K/V and the CUDA-core kernel are limited
// per CTA (instruction issue), so it is num_sms * ctas_per_sm. Items go to whichever machine is
// free, so a step takes about ceil(total / (machines * largest)) * largest: the schedule tries
// every chunk count of the longest row and keeps the cheapest. Fitted to H100 timings of forced
// chunk counts (docs/PERFORMANCE.md): 16-bit b16 x 4096 runs 5% faster unsplit than in two
// chunks (one CTA per SM streams as fast as two); 8-bit runs 20% slower unsplit.
#include "ops/attention_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "backend/cuda_attention_ops.h"
#include "ops/paged_checks.h"

namespace kvcache::ops {
namespace {

constexpr int64_t kItemOverheadKeys = 128;  // ~3 us at a multiprocessor's bf16 streaming rate
constexpr int64_t kItemsPerSm = 128;  // partial results the workspace holds per multiprocessor
constexpr int64_t kMinChunk = 64;     // keys: smaller chunks cost more in merging than they win
constexpr int64_t kChunkAlign = 64;   // 4 warps x 16-key tiles of the tensor-core kernel

std::string str(int64_t v) { return std::to_string(v); }

const char* op_name(bool extend) { return extend ? "extend_attention" : "decode_attention"; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t head_groups(const detail::AttentionPlanState& plan) {
  const AttentionDesc& d = plan.desc;
  return d.kv.num_kv_heads *
         backend::cuda_attention_subgroups(plan.mma, d.num_q_heads, d.kv.num_kv_heads);
}

int64_t max_rows(const detail::AttentionPlanState& plan) {
  return plan.extend ? plan.desc.max_q_tokens : plan.desc.max_batch;
}

// Keys a query at position pos sees (the window part and the sinks before it).
int64_t visible_keys(const AttentionDesc& d, int64_t pos) {
  if (d.window <= 0) return pos + 1;
  const int64_t win_lo = std::max<int64_t>(0, pos + 1 - d.window);
  return std::min(d.sink_tokens, win_lo) + (pos + 1 - win_lo);
}

// Rows of t (its last axis) start on 16-byte boundaries (8 for 8-bit K/V): the address and the
// strides of its first outer_axes axes.
Status check_aligned_rows(const TensorView& t, DType dtype, int outer_axes, std::string_view op,
                          const char* what) {
  const int64_t align = dtype == DType::int8 || dtype == DType::fp8_e4m3 ? 8 : 16;
  const auto elem = static_cast<int64_t>(size_of(dtype));
  if (reinterpret_cast<uintptr_t>(t.data) % static_cast<uintptr_t>(align) != 0) {
    return Status::invalid_argument(std::string(op) + ": " + what +
                                    " starts at an address that is not " + str(align) +
                                    "-byte aligned, expected aligned rows on CUDA");
  }
  for (int a = 0; a < outer_axes; ++a) {
    if (t.strides[a] * elem % align != 0) {
      return Status::invalid_argument(std::string(op) + ": " + what + " has stride " +
                                      str(t.strides[a]) + " on axis " + str(a) +
                                      ", expected a multiple of " + str(align / elem) +
                                      " elements (aligned rows on CUDA)");
    }
  }
  return Status();
}

}  // namespace

int64_t cuda_attention_packing(const detail::AttentionPlanState& plan) {
  const AttentionDesc& d = plan.desc;
  if (!plan.extend || d.window > 0) return 1;
  return backend::cuda_attention_q_per_cta(plan.mma, d.num_q_heads / d.kv.num_kv_heads);
}

AttentionSchedule cuda_attention_schedule(const detail::AttentionPlanState& plan,
                                          std::span<const int64_t> row_keys, int64_t grid_units) {
  const int64_t groups = head_groups(plan);
  const DType kv = plan.desc.kv.k_dtype;
  const bool per_sm = plan.mma && (kv == DType::bf16 || kv == DType::f16);
  const int64_t machines = per_sm ? plan.num_sms : plan.num_sms * plan.ctas_per_sm;
  int64_t longest = 1;
  for (int64_t k : row_keys) longest = std::max(longest, k);
  AttentionSchedule best{longest, 1};
  int64_t best_cost = -1;
  for (int64_t chunks = 1; chunks <= backend::kCudaAttentionMaxChunks; ++chunks) {
    const int64_t chunk =
        std::max(kMinChunk, ceil_div(ceil_div(longest, chunks), kChunkAlign) * kChunkAlign);
    const int64_t need = ceil_div(longest, chunk);
    if (need != chunks) continue;  // the same split as a smaller count
    int64_t total = 0;             // keys plus overheads of every item
    for (int64_t k : row_keys) {
      const int64_t keys = std::max<int64_t>(k, 1);
      total += keys + ceil_div(keys, chunk) * kItemOverheadKeys;
    }
    total *= groups;
    if (chunks > 1 && grid_units * groups * chunks > plan.workspace_items) {
      break;  // more chunks need more workspace than the plan has
    }
    const int64_t largest = std::min(chunk, longest) + kItemOverheadKeys;
    const int64_t cost = ceil_div(total, machines * largest) * largest;
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = {chunks == 1 ? longest : chunk, chunks};
    }
    if (chunk == kMinChunk) break;
  }
  return best;
}

Result<detail::AttentionPlanState> cuda_attention_state(const AttentionDesc& desc, Device device,
                                                        bool extend) {
  const std::string op = op_name(extend);
  Result<int> sms = backend::cuda_multiprocessor_count(device);
  if (!sms.ok()) return Status::unavailable(op + ": " + sms.status().message());
  const KVFormat& kv = desc.kv;
  bool dim_ok = false;
  for (int64_t d : backend::kCudaAttentionHeadDims) dim_ok = dim_ok || d == kv.head_dim;
  if (!dim_ok || kv.dim_v() != kv.head_dim) {
    return Status::invalid_argument(op + ": head_dim " + str(kv.head_dim) + " / head_dim_v " +
                                    str(kv.dim_v()) +
                                    " has no CUDA kernel, expected head_dim == head_dim_v in "
                                    "{16, 32, 64, 128, 256}");
  }
  for (auto [label, dtype] : {std::pair{"k_dtype", kv.k_dtype}, std::pair{"v_dtype", kv.v_dtype}}) {
    bool dtype_ok = false;
    for (DType t : backend::kCudaAttentionKVDTypes) dtype_ok = dtype_ok || t == dtype;
    if (!dtype_ok) {
      return Status::invalid_argument(op + ": " + label + " " + name(dtype) +
                                      " has no CUDA kernel, expected one of f32, f16, bf16, "
                                      "int8, fp8_e4m3 (K and V chosen independently)");
    }
  }
  Result<void*> errors = backend::cuda_error_record(device);
  if (!errors.ok()) return errors.status();

  detail::AttentionPlanState st;
  st.desc = desc;
  st.extend = extend;
  st.device = device;
  st.errors = *errors;
  st.num_sms = *sms;
  st.mma = backend::cuda_attention_has_mma(kv.k_dtype, kv.v_dtype, kv.head_dim);
  Result<int> ctas = backend::cuda_attention_ctas_per_sm(
      device, st.mma, kv.k_dtype, kv.v_dtype, kv.head_dim, desc.num_q_heads / kv.num_kv_heads);
  if (!ctas.ok()) return ctas.status();
  st.ctas_per_sm = *ctas;
  const int64_t rows = max_rows(st);
  // Room for chunks down to 16 keys on small plans (a caller's schedule may split finely).
  const int64_t most_items = rows * head_groups(st) * ceil_div(desc.max_seq_len, 16);
  st.workspace_items = std::min(most_items, kItemsPerSm * st.num_sms);
  // The default schedule: every row as long as the bounds allow.
  std::vector<int64_t> keys(static_cast<size_t>(std::min<int64_t>(rows, 1 << 16)),
                            visible_keys(desc, desc.max_seq_len - 1));
  st.default_schedule = cuda_attention_schedule(st, keys, rows);
  return st;
}

Precision cuda_mma_attention_precision(const detail::AttentionPlanState& plan) {
  // q and P rounded to 2^-9 (bf16) or 2^-11 (f16) relative: the logits move by that fraction of
  // sum |q k| * scale and o by that of max |v|; for |q|, |k|, |v| <= 1 and head_dim <= 256 this
  // stays below 4 ulp of the MMA type at |o| ~ 1 (stated), plus the output rounding.
  const bool bf16 = plan.desc.kv.k_dtype == DType::bf16;
  Precision p;
  p.abs_tol = bf16 ? 0x1p-7 : 0x1p-9;
  const DType o = plan.desc.o_dtype;
  p.rel_tol = o == DType::bf16 ? 0x1p-8 : o == DType::f16 ? 0x1p-11 : 0.0;
  p.note = std::string("tensor cores: q and softmax weights rounded to ") +
           (bf16 ? "bf16" : "f16") + ", f32 accumulation (abs_tol for |q|,|k|,|v| <= 1) + " +
           name(o) + " output rounding; vs the reference on the stored K/V";
  return p;
}

size_t cuda_attention_workspace_size(const detail::AttentionPlanState& plan) {
  const AttentionDesc& d = plan.desc;
  const int64_t rows_per_item = backend::cuda_attention_rows_per_item(
      plan.mma, plan.extend, d.num_q_heads / d.kv.num_kv_heads);
  return backend::cuda_attention_workspace_bytes(plan.mma, rows_per_item, plan.workspace_items,
                                                 max_rows(plan), d.num_q_heads, d.kv.num_kv_heads,
                                                 d.kv.head_dim);
}

Status check_cuda_attention_args(const detail::AttentionPlanState& plan,
                                 const AttentionArgs& args) {
  const AttentionDesc& d = plan.desc;
  const char* op = op_name(plan.extend);
  const bool paged = d.pages.has_value();
  const TensorView& k = paged ? args.paged.k_pages : args.contiguous.k;
  const TensorView& v = paged ? args.paged.v_pages : args.contiguous.v;
  const int kv_axes = paged ? 0 : 3;
  if (Status s = check_aligned_rows(k, d.kv.k_dtype, kv_axes, op, "k"); !s.ok()) return s;
  if (Status s = check_aligned_rows(v, d.kv.v_dtype, kv_axes, op, "v"); !s.ok()) return s;
  if (plan.mma) {  // the tensor-core kernel reads q rows with 16-byte loads
    if (Status s = check_aligned_rows(args.q, d.q_dtype, 2, op, "q"); !s.ok()) return s;
  }
  const AttentionSchedule sched = args.schedule.value_or(plan.default_schedule);
  if (sched.chunk_size < 1 || sched.max_chunks < 1 ||
      sched.max_chunks > backend::kCudaAttentionMaxChunks) {
    return Status::invalid_argument(
        std::string(op) + ": schedule is {chunk_size " + str(sched.chunk_size) + ", max_chunks " +
        str(sched.max_chunks) + "}, expected chunk_size >= 1 and max_chunks in [1, " +
        str(backend::kCudaAttentionMaxChunks) + "]");
  }
  int64_t units = args.q.shape[0];
  if (sched.max_query_blocks > 0) {
    if (cuda_attention_packing(plan) < 2) {
      return Status::invalid_argument(std::string(op) +
                                      ": schedule packs query tokens (max_query_blocks " +
                                      str(sched.max_query_blocks) +
                                      "), expected 0: this plan cannot (decode, a window, CUDA "
                                      "cores or a group over 8)");
    }
    units = static_cast<int64_t>(args.seq_lens.size()) * sched.max_query_blocks;
    if (units > max_rows(plan)) {
      return Status::invalid_argument(std::string(op) + ": schedule needs " + str(units) +
                                      " query blocks, expected <= max_q_tokens = " +
                                      str(max_rows(plan)) + " (use plan.schedule())");
    }
  }
  const int64_t items = units * head_groups(plan) * sched.max_chunks;
  if (sched.max_chunks > 1 && items > plan.workspace_items) {
    return Status::invalid_argument(std::string(op) + ": schedule needs " + str(items) +
                                    " work items for " + str(args.q.shape[0]) +
                                    " rows, expected <= the plan's workspace_items = " +
                                    str(plan.workspace_items) + " (use plan.schedule())");
  }
  return Status();
}

Status run_cuda_attention(const detail::AttentionPlanState& plan, const Stream& stream,
                          std::span<std::byte> workspace, const AttentionArgs& args) {
  const AttentionDesc& d = plan.desc;
  const AttentionSchedule sched = args.schedule.value_or(plan.default_schedule);
  backend::CudaAttentionParams p;
  p.q = static_cast<const std::byte*>(args.q.data);
  p.q_dtype = d.q_dtype;
  p.q_row_stride = args.q.strides[0];
  p.q_head_stride = args.q.strides[1];
  p.o = static_cast<std::byte*>(args.o.data);
  p.o_dtype = d.o_dtype;
  p.o_row_stride = args.o.strides[0];
  p.o_head_stride = args.o.strides[1];
  if (args.lse.data != nullptr) {
    p.lse = args.lse.data_as<float>();
    p.lse_row_stride = args.lse.strides[0];
    p.lse_head_stride = args.lse.strides[1];
  }
  p.num_rows = args.q.shape[0];
  p.batch = static_cast<int64_t>(args.seq_lens.size());
  p.num_q_heads = d.num_q_heads;
  p.num_kv_heads = d.kv.num_kv_heads;
  p.head_dim = d.kv.head_dim;
  p.k_dtype = d.kv.k_dtype;
  p.v_dtype = d.kv.v_dtype;
  if (d.pages) {
    const PoolStrides data = pool_strides(*d.pages, d.kv.num_kv_heads, d.kv.head_dim);
    const PoolStrides scales = pool_strides(*d.pages, d.kv.num_kv_heads, 1);
    const auto side = [&](const TensorView& pool, const TensorView& s, DType dtype) {
      backend::CudaKVSide out;
      out.base = static_cast<const std::byte*>(pool.data);
      out.page_stride = data.page;
      out.slot_stride = data.slot;
      out.head_stride = data.head;
      if (is_quantized(dtype)) {
        out.scales = s.data_as<const float>();
        out.scale_page_stride = scales.page;
        out.scale_slot_stride = scales.slot;
        out.scale_head_stride = scales.head;
      }
      return out;
    };
    p.k = side(args.paged.k_pages, args.paged.k_scales, d.kv.k_dtype);
    p.v = side(args.paged.v_pages, args.paged.v_scales, d.kv.v_dtype);
    p.paged = true;
    p.page_size = d.pages->page_size;
    p.num_pages = d.pages->num_pages;
    p.indptr = args.page_table.indptr.data();
    p.indices = args.page_table.indices.data();
    p.num_indices = static_cast<int64_t>(args.page_table.indices.size());
  } else {
    const auto side = [&](const TensorView& t, const TensorView& s, DType dtype) {
      backend::CudaKVSide out;
      out.base = static_cast<const std::byte*>(t.data);
      out.page_stride = t.strides[0];
      out.head_stride = t.strides[1];
      out.slot_stride = t.strides[2];
      if (is_quantized(dtype)) {
        out.scales = s.data_as<const float>();
        out.scale_page_stride = s.strides[0];
        out.scale_head_stride = s.strides[1];
        out.scale_slot_stride = s.strides[2];
      }
      return out;
    };
    p.k = side(args.contiguous.k, args.contiguous.k_scales, d.kv.k_dtype);
    p.v = side(args.contiguous.v, args.contiguous.v_scales, d.kv.v_dtype);
    p.capacity = args.contiguous.k.shape[2];
  }
  p.seq_lens = args.seq_lens.data();
  p.q_indptr = plan.extend ? args.q_indptr.data() : nullptr;
  p.sm_scale = d.scale > 0.0f ? d.scale : 1.0f / std::sqrt(static_cast<float>(d.kv.head_dim));
  p.soft_cap = d.soft_cap;
  p.window = d.window;
  p.sink_tokens = d.sink_tokens;
  p.sinks = d.has_sinks ? args.sinks.data_as<const float>() : nullptr;
  p.chunk_size = sched.chunk_size;
  p.max_chunks = sched.max_chunks;
  p.workspace = workspace.data();
  p.errors = plan.errors;
  p.extend = plan.extend;
  p.mma = plan.mma;
  p.num_sms = plan.num_sms;
  if (sched.max_query_blocks > 0) {
    p.q_per_cta = cuda_attention_packing(plan);
    p.max_q_blocks = sched.max_query_blocks;
  }
  return backend::cuda_attention(p, stream);
}

}  // namespace kvcache::ops
