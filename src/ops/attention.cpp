// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// decode_attention and extend_attention: descriptor checks, argument checks and dispatch. The CPU
// work lives in backend/cpu/attention.cpp.
//
// Precision, per element of o (and lse) against reference::attention on the same stored K/V:
//  - f32 logits: q is converted exactly and multiplied by scale * log2(e) (one rounding), then a
//    float dot product over head_dim (relative error ~ sqrt(head_dim) * 2^-24 of sum |q_d k_d|).
//  - exp2 by a degree-6 polynomial (relative error < 2^-22), running max/sum and acc in float over
//    at most chunk_size keys per chunk, chunks merged in float: ~ (chunk + chunks) * 2^-24.
//  - The output is a convex combination of V rows, so these errors scale with max |v|: for
//    |q|, |k|, |v| <= 1 (dequantized), head_dim <= 256 and contexts <= 32768 they stay below
//    2e-5 absolute (measured ~1e-6 on random data), the stated abs_tol.
//  - Output rounding: bf16 o adds 2^-8 relative (half an ulp is 2^-9), f16 2^-11, f32 nothing.
//  - cpu.avx512.dot8 (8-bit K or V rows by vpdpwssd / vdpbf16ps): fp8 rows meet q and the
//    softmax weights rounded to bf16 (2^-9 relative each), as the tensor-core path does: abs_tol
//    2^-7, as stated there. int8 rows meet q in int16 steps of max|q| / 32767 (logits move by at
//    most 2^-16 max|q| sum|k| * scale: ~2^-11 on o for head_dim 256) and weights in int16 steps
//    of their 64-key segment's largest (each segment's error <= 2^-16 * 64 * max|v| times its
//    share of the softmax sum: 2^-10 on o): abs_tol 2^-9.
//  - CUDA (ops/attention_cuda.cpp): the same f32 arithmetic in another order (dot products over
//    lane groups, exp2f with relative error < 2^-22, chunks by the schedule): the same bound.

#include "kvcache/attention.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "kvcache/thread_pool.h"

#include "ops/attention_cuda.h"
#include "ops/paged_checks.h"

namespace kvcache {

// The CPU backend (backend/cpu/attention.cpp). REQUIRES for run: the arguments passed
// can_implement and workspace holds attention_workspace_size(plan) bytes.
namespace cpu {
size_t attention_workspace_size(const detail::AttentionPlanState& plan);
bool attention_avx512_usable();
bool attention_avx2_usable();
// Whether an avx512 plan for desc reads its 8-bit K or V rows with the dot-product loops.
bool attention_dot8_applies(const AttentionDesc& desc);
void run_attention(const detail::AttentionPlanState& plan, const AttentionArgs& args,
                   std::span<std::byte> workspace, ThreadPool* pool);
}  // namespace cpu

namespace {

// The largest head_dim / head_dim_v: the driver keeps a tile of query rows on its stack.
constexpr int64_t kMaxHeadDim = 512;
constexpr int64_t kAutoChunk = 512;

std::string str(int64_t v) { return std::to_string(v); }

const char* op_name(bool extend) { return extend ? "extend_attention" : "decode_attention"; }

Status bad(bool extend, const std::string& what) {
  return Status::invalid_argument(std::string(op_name(extend)) + ": " + what);
}

bool is_io_dtype(DType d) { return d == DType::f32 || d == DType::f16 || d == DType::bf16; }

Status check_desc(const AttentionDesc& d, bool extend) {
  const std::string op = op_name(extend);
  if (Status s = check_kv_format(d.kv, op); !s.ok()) return s;
  if (d.pages) {
    if (Status s = check_paged_kv_desc(PagedKVDesc{d.kv, *d.pages}, op); !s.ok()) return s;
  }
  if (d.num_q_heads <= 0 || d.num_q_heads % d.kv.num_kv_heads != 0) {
    return bad(extend,
               "num_q_heads is " + str(d.num_q_heads) +
                   ", expected a positive multiple of num_kv_heads = " + str(d.kv.num_kv_heads));
  }
  if (d.kv.head_dim > kMaxHeadDim || d.kv.dim_v() > kMaxHeadDim) {
    return bad(extend, "head_dim " + str(d.kv.head_dim) + " / head_dim_v " + str(d.kv.dim_v()) +
                           " is not supported, expected each in [1, " + str(kMaxHeadDim) + "]");
  }
  for (auto [label, t] : {std::pair{"q_dtype", d.q_dtype}, std::pair{"o_dtype", d.o_dtype}}) {
    if (!is_io_dtype(t)) {
      return bad(extend,
                 std::string(label) + " is " + name(t) + ", expected one of f32, f16, bf16");
    }
  }
  if (!(d.scale >= 0.0f) || !std::isfinite(d.scale)) {
    return bad(extend, "scale is " + std::to_string(d.scale) +
                           ", expected finite and >= 0 (0 means 1 / sqrt(head_dim))");
  }
  if (!(d.soft_cap >= 0.0f) || !std::isfinite(d.soft_cap)) {
    return bad(extend, "soft_cap is " + std::to_string(d.soft_cap) + ", expected finite and >= 0");
  }
  if (d.window < 0) return bad(extend, "window is " + str(d.window) + ", expected >= 0");
  if (d.sink_tokens < 0 || (d.sink_tokens > 0 && d.window == 0)) {
    return bad(extend, "sink_tokens is " + str(d.sink_tokens) +
                           ", expected 0, or > 0 together with a window");
  }
  if (d.max_batch < 1) return bad(extend, "max_batch is " + str(d.max_batch) + ", expected >= 1");
  if (d.max_seq_len < 1) {
    return bad(extend, "max_seq_len is " + str(d.max_seq_len) + ", expected >= 1");
  }
  if (extend && d.max_q_tokens < 1) {
    return bad(extend, "max_q_tokens is " + str(d.max_q_tokens) + ", expected >= 1");
  }
  if (d.chunk_size < 0) {
    return bad(extend, "chunk_size is " + str(d.chunk_size) + ", expected >= 0 (0 means auto)");
  }
  return Status();
}

Result<detail::AttentionPlanState> select_state(const AttentionDesc& desc, Device device,
                                                CpuIsa isa, bool extend) {
  if (Status s = check_desc(desc, extend); !s.ok()) return s;
  const std::string op = op_name(extend);
  if (!device.is_cpu()) return ops::cuda_attention_state(desc, device, extend);
  detail::AttentionPlanState st;
  st.desc = desc;
  st.extend = extend;
  const bool avx512 = cpu::attention_avx512_usable();
  const bool avx2 = cpu::attention_avx2_usable();
  switch (isa) {
    case CpuIsa::best:
      st.isa = avx512 ? CpuIsa::avx512 : avx2 ? CpuIsa::avx2 : CpuIsa::portable;
      break;
    case CpuIsa::portable:
      break;
    case CpuIsa::avx2:
    case CpuIsa::avx512:
      if (!(isa == CpuIsa::avx512 ? avx512 : avx2)) {
        return Status::unavailable(op + ": isa " + name(isa) +
                                   " is unavailable (CPU lacks it or its self-test failed), "
                                   "expected best or portable");
      }
      st.isa = isa;
      break;
  }
  st.dot8 = st.isa == CpuIsa::avx512 && cpu::attention_dot8_applies(desc);
  const int64_t page = desc.pages ? desc.pages->page_size : 1;
  st.chunk = desc.chunk_size > 0 ? desc.chunk_size : std::max<int64_t>(1, kAutoChunk / page) * page;
  st.max_chunks = (desc.max_seq_len + st.chunk - 1) / st.chunk;
  return st;
}

// A q / o style view: dtype, [rows, heads, dim], unit stride on dim, device, data.
Status check_rows_view(const TensorView& t, DType dtype, int64_t rows, const char* rows_name,
                       int64_t heads, int64_t dim, const char* dim_name, bool extend, Device device,
                       const char* what) {
  const std::string op = op_name(extend);
  if (Status s = check_dtype(t, dtype, op, what); !s.ok()) return s;
  if (Status s =
          check_shape(t, {{rows, rows_name}, {heads, "num_q_heads"}, {dim, dim_name}}, op, what);
      !s.ok()) {
    return s;
  }
  if (dim > 1 && t.strides[2] != 1) {
    return bad(extend, std::string(what) + " has stride " + str(t.strides[2]) +
                           " on its last axis, expected 1");
  }
  if (Status s = check_device(t, device, op, what); !s.ok()) return s;
  return check_data(t, op, what);
}

// Bytes from the lowest to the highest byte a view reaches (its start: lowest_byte).
struct Extent {
  const void* lo = nullptr;
  size_t bytes = 0;
};
Extent extent(const TensorView& t) {
  if (t.data == nullptr || t.numel() == 0) return {};
  int64_t lo = 0;
  int64_t hi = 0;
  for (int axis = 0; axis < t.rank; ++axis) {
    const int64_t reach = t.strides[axis] * (t.shape[axis] - 1);
    (reach < 0 ? lo : hi) += reach;
  }
  const auto elem = static_cast<int64_t>(size_of(t.dtype));
  return {static_cast<const std::byte*>(t.data) + lo * elem,
          static_cast<size_t>((hi - lo + 1) * elem)};
}

bool is_empty_view(const TensorView& t) { return t.data == nullptr && t.rank == 0; }

// The lengths in q_indptr and seq_lens (host arrays: CPU plans only).
Status check_host_lengths(const detail::AttentionPlanState& plan, const AttentionArgs& a,
                          int64_t* rows) {
  const AttentionDesc& d = plan.desc;
  const bool ext = plan.extend;
  const auto batch = static_cast<int64_t>(a.seq_lens.size());
  if (ext) {
    if (a.q_indptr[0] != 0) {
      return bad(ext, "q_indptr[0] is " + str(a.q_indptr[0]) + ", expected 0");
    }
    for (int64_t b = 0; b < batch; ++b) {
      const int32_t n = a.q_indptr[static_cast<size_t>(b + 1)] - a.q_indptr[static_cast<size_t>(b)];
      if (n < 0) {
        return bad(ext, "q_indptr decreases at " + str(b + 1) + ", expected non-decreasing");
      }
      if (a.seq_lens[static_cast<size_t>(b)] < n) {
        return bad(ext, "seq_lens[" + str(b) + "] is " + str(a.seq_lens[static_cast<size_t>(b)]) +
                            ", expected >= its " + str(n) +
                            " queries (the cache holds the new tokens)");
      }
    }
    *rows = a.q_indptr[static_cast<size_t>(batch)];
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int32_t len = a.seq_lens[static_cast<size_t>(b)];
    if (!ext && len < 1) {
      return bad(ext, "seq_lens[" + str(b) + "] is " + str(len) +
                          ", expected >= 1 (a query sees at least itself)");
    }
    if (len > d.max_seq_len) {
      return bad(ext, "seq_lens[" + str(b) + "] is " + str(len) +
                          ", expected <= max_seq_len = " + str(d.max_seq_len));
    }
  }
  return Status();
}

// On a CPU plan every check, index arrays included; on a CUDA plan every check that does not read
// device memory (sizes of the index arrays; the kernel checks their entries).
Status check_args(const detail::AttentionPlanState& plan, const AttentionArgs& a) {
  const AttentionDesc& d = plan.desc;
  const bool ext = plan.extend;
  const bool host = plan.device.is_cpu();
  const Device dev = plan.device;
  const std::string op = op_name(ext);
  const auto batch = static_cast<int64_t>(a.seq_lens.size());
  if (batch > d.max_batch) {
    return bad(ext, "batch (seq_lens entries) is " + str(batch) +
                        ", expected <= max_batch = " + str(d.max_batch));
  }
  int64_t rows = batch;
  if (ext) {
    if (static_cast<int64_t>(a.q_indptr.size()) != batch + 1) {
      return bad(ext, "q_indptr has " + str(static_cast<int64_t>(a.q_indptr.size())) +
                          " entries, expected batch + 1 = " + str(batch + 1));
    }
    // On CUDA q_indptr[batch] cannot be read here: q's rows count, and the kernel checks it.
    rows = host ? 0 : (a.q.rank == 3 ? a.q.shape[0] : -1);
  } else if (!a.q_indptr.empty()) {
    return bad(ext, "q_indptr has " + str(static_cast<int64_t>(a.q_indptr.size())) +
                        " entries, expected none for decode (one query per sequence)");
  }
  if (host) {
    if (Status s = check_host_lengths(plan, a, &rows); !s.ok()) return s;
  }
  if (ext && rows > d.max_q_tokens) {
    return bad(ext, "total_q (q_indptr[batch]) is " + str(rows) +
                        ", expected <= max_q_tokens = " + str(d.max_q_tokens));
  }
  const char* rows_name = ext ? "total_q" : "batch";
  if (Status s = check_rows_view(a.q, d.q_dtype, rows, rows_name, d.num_q_heads, d.kv.head_dim,
                                 "head_dim", ext, dev, "q");
      !s.ok()) {
    return s;
  }
  rows = a.q.shape[0];
  if (Status s = check_rows_view(a.o, d.o_dtype, rows, rows_name, d.num_q_heads, d.kv.dim_v(),
                                 "head_dim_v", ext, dev, "o");
      !s.ok()) {
    return s;
  }
  const Extent q_extent = extent(a.q);
  if (overlaps(a.o, q_extent.lo, q_extent.bytes)) {
    return bad(ext, "o overlaps q, expected separate buffers");
  }
  if (!is_empty_view(a.lse)) {
    if (Status s = check_dtype(a.lse, DType::f32, op, "lse"); !s.ok()) return s;
    if (Status s =
            check_shape(a.lse, {{rows, rows_name}, {d.num_q_heads, "num_q_heads"}}, op, "lse");
        !s.ok()) {
      return s;
    }
    if (Status s = check_device(a.lse, dev, op, "lse"); !s.ok()) return s;
    if (Status s = check_data(a.lse, op, "lse"); !s.ok()) return s;
    const Extent o_extent = extent(a.o);
    if (overlaps(a.lse, q_extent.lo, q_extent.bytes) ||
        overlaps(a.lse, o_extent.lo, o_extent.bytes)) {
      return bad(ext, "lse overlaps q or o, expected separate buffers");
    }
  }
  if (d.has_sinks) {
    if (Status s = check_dtype(a.sinks, DType::f32, op, "sinks"); !s.ok()) return s;
    if (Status s = check_shape(a.sinks, {{d.num_q_heads, "num_q_heads"}}, op, "sinks"); !s.ok()) {
      return s;
    }
    if (Status s = check_device(a.sinks, dev, op, "sinks"); !s.ok()) return s;
    if (Status s = check_data(a.sinks, op, "sinks"); !s.ok()) return s;
  } else if (!is_empty_view(a.sinks)) {
    return bad(ext, "sinks is given, expected none (desc.has_sinks is false)");
  }
  if (d.pages) {
    const PagedKVDesc pd{d.kv, *d.pages};
    if (Status s = ops::check_paged_kv(pd, a.paged, dev, op); !s.ok()) return s;
    if (!host) return ops::check_page_table_sizes(a.page_table, batch, op);
    if (Status s = ops::check_page_table(*d.pages, a.page_table, batch, op); !s.ok()) return s;
    return ops::check_seq_lens_fit(*d.pages, a.page_table, a.seq_lens, op);
  }
  if (Status s = ops::check_contiguous_kv(d.kv, a.contiguous, batch, dev, op); !s.ok()) {
    return s;
  }
  if (!host) return Status();
  const int64_t capacity = a.contiguous.k.shape[2];
  for (int64_t b = 0; b < batch; ++b) {
    if (a.seq_lens[static_cast<size_t>(b)] > capacity) {
      return Status::out_of_range(op + ": seq_lens[" + str(b) + "] is " +
                                  str(a.seq_lens[static_cast<size_t>(b)]) +
                                  ", expected <= " + str(capacity) + " (the caches' capacity)");
    }
  }
  return Status();
}

// check_args, plus what only CUDA needs.
Status check_all(const detail::AttentionPlanState& plan, const AttentionArgs& a) {
  if (Status s = check_args(plan, a); !s.ok()) return s;
  return plan.device.is_cpu() ? Status() : ops::check_cuda_attention_args(plan, a);
}

size_t plan_workspace_size(const detail::AttentionPlanState& plan) {
  return plan.device.is_cpu() ? cpu::attention_workspace_size(plan)
                              : ops::cuda_attention_workspace_size(plan);
}

Status run_plan(const detail::AttentionPlanState& plan, const Stream& stream,
                std::span<std::byte> workspace, const AttentionArgs& args) {
  if (Status s = check_all(plan, args); !s.ok()) return s;
  const size_t need = plan_workspace_size(plan);
  if (workspace.size() < need) {
    return Status::resource_exhausted(
        std::string(op_name(plan.extend)) + ": workspace has " + std::to_string(workspace.size()) +
        " bytes, expected >= workspace_size() = " + std::to_string(need));
  }
  if (need > 0 && workspace.data() == nullptr) {
    return bad(plan.extend, "workspace has null data, expected a pointer");
  }
  if (stream.device != plan.device) {
    return bad(plan.extend, "stream is on " + to_string(stream.device) + ", expected " +
                                to_string(plan.device) + " (the plan's device)");
  }
  if (!plan.device.is_cpu()) return ops::run_cuda_attention(plan, stream, workspace, args);
  cpu::run_attention(plan, args, workspace, stream.pool);
  return Status();
}

Result<AttentionSchedule> plan_schedule(const detail::AttentionPlanState& plan,
                                        std::span<const int32_t> seq_lens,
                                        std::span<const int32_t> q_indptr) {
  const AttentionDesc& d = plan.desc;
  const bool ext = plan.extend;
  if (static_cast<int64_t>(seq_lens.size()) > d.max_batch) {
    return bad(ext, "schedule: seq_lens has " + str(static_cast<int64_t>(seq_lens.size())) +
                        " entries, expected <= max_batch = " + str(d.max_batch));
  }
  if (ext && q_indptr.size() != seq_lens.size() + 1) {
    return bad(ext, "schedule: q_indptr has " + str(static_cast<int64_t>(q_indptr.size())) +
                        " entries, expected batch + 1 = " +
                        str(static_cast<int64_t>(seq_lens.size()) + 1));
  }
  if (!ext && !q_indptr.empty()) {
    return bad(ext, "schedule: q_indptr is given, expected none for decode");
  }
  AttentionArgs lengths;
  lengths.seq_lens = seq_lens;
  lengths.q_indptr = q_indptr;
  int64_t rows = static_cast<int64_t>(seq_lens.size());
  if (Status s = check_host_lengths(plan, lengths, &rows); !s.ok()) return s;
  if (plan.device.is_cpu()) return AttentionSchedule{plan.chunk, plan.max_chunks};
  const auto visible = [&](int64_t pos) {
    const int64_t win_lo = d.window > 0 ? std::max<int64_t>(0, pos + 1 - d.window) : 0;
    const int64_t sinks = d.window > 0 ? std::min(d.sink_tokens, win_lo) : 0;
    return sinks + pos + 1 - win_lo;
  };
  // Packed extend: blocks of `pack` query tokens per sequence, each as long as its last token's
  // keys; used when the grid of batch x (most blocks of a sequence) fits the workspace.
  const int64_t pack = ops::cuda_attention_packing(plan);
  const auto batch = static_cast<int64_t>(seq_lens.size());
  int64_t max_blocks = 0;
  for (int64_t b = 0; ext && b < batch; ++b) {
    const int64_t n = q_indptr[static_cast<size_t>(b + 1)] - q_indptr[static_cast<size_t>(b)];
    max_blocks = std::max(max_blocks, (n + pack - 1) / pack);
  }
  const bool packed = pack > 1 && max_blocks > 0 && batch * max_blocks <= d.max_q_tokens;
  std::vector<int64_t> keys;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = seq_lens[static_cast<size_t>(b)];
    const int64_t n =
        ext ? q_indptr[static_cast<size_t>(b + 1)] - q_indptr[static_cast<size_t>(b)] : 1;
    if (packed) {
      for (int64_t first = 0; first < n; first += pack) {
        keys.push_back(visible(len - n + std::min(first + pack, n) - 1));
      }
      continue;
    }
    for (int64_t i = 0; i < n; ++i) keys.push_back(visible(len - n + i));
  }
  if (keys.empty()) keys.push_back(1);
  AttentionSchedule s =
      ops::cuda_attention_schedule(plan, keys, packed ? batch * max_blocks : rows);
  s.max_query_blocks = packed ? max_blocks : 0;
  return s;
}

Precision plan_precision(const detail::AttentionPlanState& plan) {
  if (plan.mma) return ops::cuda_mma_attention_precision(plan);
  Precision p;
  p.abs_tol = 2e-5;
  const DType o = plan.desc.o_dtype;
  p.rel_tol = o == DType::bf16 ? 0x1p-8 : o == DType::f16 ? 0x1p-11 : 0.0;
  if (plan.dot8) {
    const KVFormat& kv = plan.desc.kv;
    const bool fp8 = kv.k_dtype == DType::fp8_e4m3 || kv.v_dtype == DType::fp8_e4m3;
    p.abs_tol = fp8 ? 0x1p-7 : 0x1p-9;
    p.note = std::string(
                 "dot-product loops on 8-bit K/V: q and softmax weights rounded to bf16 (fp8) "
                 "or to int16 steps of their row / 64-key maximum (int8), f32 sums (abs_tol "
                 "for |q|,|k|,|v| <= 1; it scales with max |v|) + ") +
             name(o) + " output rounding; vs the reference on the stored K/V";
    return p;
  }
  p.note = std::string(plan.device.is_cpu() ? "" : "CUDA cores (any K / V dtype pair): ") +
           "f32 logits/softmax/accumulation (abs_tol for |q|,|k|,|v| <= 1; it scales with max "
           "|v|) + " +
           name(o) + " output rounding; vs the reference on the stored K/V";
  return p;
}

const char* plan_sku(const detail::AttentionPlanState& plan) {
  if (!plan.device.is_cpu()) return plan.mma ? "cuda.sm90.mma" : "cuda.sm90.simt";
  switch (plan.isa) {
    case CpuIsa::avx512:
      return plan.dot8 ? "cpu.avx512.dot8" : "cpu.avx512";
    case CpuIsa::avx2:
      return "cpu.avx2";
    default:
      return "cpu.portable";
  }
}

}  // namespace

Result<DecodeAttentionPlan> DecodeAttentionPlan::select(const AttentionDesc& desc, Device device,
                                                        CpuIsa isa) {
  Result<detail::AttentionPlanState> st = select_state(desc, device, isa, false);
  if (!st.ok()) return st.status();
  return DecodeAttentionPlan(*st);
}
Status DecodeAttentionPlan::can_implement(const AttentionArgs& args) const {
  return check_all(state_, args);
}
size_t DecodeAttentionPlan::workspace_size() const { return plan_workspace_size(state_); }
Result<AttentionSchedule> DecodeAttentionPlan::schedule(std::span<const int32_t> seq_lens,
                                                        std::span<const int32_t> q_indptr) const {
  return plan_schedule(state_, seq_lens, q_indptr);
}
Status DecodeAttentionPlan::run(const Stream& stream, std::span<std::byte> workspace,
                                const AttentionArgs& args) const {
  return run_plan(state_, stream, workspace, args);
}
const char* DecodeAttentionPlan::sku() const { return plan_sku(state_); }
Precision DecodeAttentionPlan::precision() const { return plan_precision(state_); }

Result<ExtendAttentionPlan> ExtendAttentionPlan::select(const AttentionDesc& desc, Device device,
                                                        CpuIsa isa) {
  Result<detail::AttentionPlanState> st = select_state(desc, device, isa, true);
  if (!st.ok()) return st.status();
  return ExtendAttentionPlan(*st);
}
Status ExtendAttentionPlan::can_implement(const AttentionArgs& args) const {
  return check_all(state_, args);
}
size_t ExtendAttentionPlan::workspace_size() const { return plan_workspace_size(state_); }
Result<AttentionSchedule> ExtendAttentionPlan::schedule(std::span<const int32_t> seq_lens,
                                                        std::span<const int32_t> q_indptr) const {
  return plan_schedule(state_, seq_lens, q_indptr);
}
Status ExtendAttentionPlan::run(const Stream& stream, std::span<std::byte> workspace,
                                const AttentionArgs& args) const {
  return run_plan(state_, stream, workspace, args);
}
const char* ExtendAttentionPlan::sku() const { return plan_sku(state_); }
Precision ExtendAttentionPlan::precision() const { return plan_precision(state_); }

}  // namespace kvcache
