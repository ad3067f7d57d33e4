// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// qkv_rope_write: select / can_implement / run plumbing; the kernels are in backend/cpu.

#include "kvcache/qkv_rope_write.h"

#include <algorithm>
#include <cmath>
#include <span>
#include <string>

#include "backend/cpu/rope_kernels.h"
#include "backend/cuda_write_ops.h"
#include "ops/paged_checks.h"
#include "ops/rope_table.h"

namespace kvcache {
namespace {

constexpr std::string_view kOp = "qkv_rope_write";

std::string str(int64_t v) { return std::to_string(v); }

Status bad(const std::string& what) {
  return Status::invalid_argument(std::string(kOp) + ": " + what);
}

bool is_io_type(DType d) {
  return std::find(std::begin(kQkvRopeWriteIoTypes), std::end(kQkvRopeWriteIoTypes), d) !=
         std::end(kQkvRopeWriteIoTypes);
}

int64_t row_width(const QkvRopeWriteDesc& d) {
  const KVFormat& f = d.cache.kv;
  return (d.num_q_heads + f.num_kv_heads) * f.head_dim + f.num_kv_heads * f.dim_v();
}

// Half an ulp of a float output dtype, relative.
double half_ulp(DType d) {
  if (d == DType::bf16) return std::ldexp(1.0, -8);
  if (d == DType::f16) return std::ldexp(1.0, -11);
  return std::ldexp(1.0, -24);
}

bool in(std::span<const DType> table, DType d) {
  return std::find(table.begin(), table.end(), d) != table.end();
}

Status check_weight(const TensorView& w, bool wanted, int64_t head_dim, const char* what,
                    Device device) {
  if (!wanted) {
    if (w.data == nullptr && w.rank == 0) return Status();
    return bad(std::string(what) + " is given without qk_norm, expected none");
  }
  if (Status s = check_dtype(w, DType::f32, kOp, what); !s.ok()) return s;
  if (Status s = check_shape(w, {{head_dim, "head_dim"}}, kOp, what); !s.ok()) return s;
  if (Status s = check_contiguous(w, kOp, what); !s.ok()) return s;
  if (Status s = check_device(w, device, kOp, what); !s.ok()) return s;
  return check_data(w, kOp, what);
}

// positions holds num_position_streams() * num_tokens entries (what check_rope_positions checks
// without reading them, for positions on a GPU).
Status check_position_count(const RopeConfig& rope, std::span<const int32_t> positions,
                            int64_t num_tokens) {
  const int64_t streams = rope.num_position_streams();
  if (static_cast<int64_t>(positions.size()) == streams * num_tokens) return Status();
  return bad(
      "positions has " + str(static_cast<int64_t>(positions.size())) + " entries, expected " +
      (streams == 1 ? "num_tokens = " + str(num_tokens)
                    : "num_sections * num_tokens = " + str(streams) + " * " + str(num_tokens)));
}

}  // namespace

Result<QkvRopeWritePlan> QkvRopeWritePlan::select(const QkvRopeWriteDesc& desc, Device device,
                                                  CpuIsa isa) {
  if (Status s = check_paged_kv_desc(desc.cache, kOp); !s.ok()) return s;
  const KVFormat& f = desc.cache.kv;
  if (desc.num_q_heads <= 0) {
    return bad("num_q_heads is " + str(desc.num_q_heads) + ", expected > 0");
  }
  for (auto [dim, what] : {std::pair{f.head_dim, "head_dim"}, std::pair{f.dim_v(), "head_dim_v"}}) {
    if (dim > cpu::kRopeMaxHeadDim) {
      return bad(std::string(what) + " is " + str(dim) +
                 ", expected <= " + str(cpu::kRopeMaxHeadDim));
    }
  }
  for (auto [d, what] :
       {std::pair{desc.qkv_dtype, "qkv_dtype"}, std::pair{desc.q_dtype, "q_dtype"}}) {
    if (!is_io_type(d)) {
      return bad(std::string(what) + " is " + name(d) + ", expected one of f32, f16, bf16");
    }
  }
  if (!(std::isfinite(desc.norm_eps) && desc.norm_eps >= 0.0f)) {
    return bad("norm_eps is " + std::to_string(desc.norm_eps) + ", expected finite and >= 0");
  }
  if (!std::isfinite(desc.norm_weight_offset)) {
    return bad("norm_weight_offset is not finite, expected 0 or 1 (Gemma)");
  }
  if (Status s = check_rope_config(desc.rope, f.head_dim, kOp); !s.ok()) return s;
  const int64_t rotary_dim = desc.rope.rotary_dim_for(f.head_dim);
  if (!device.is_cpu()) return select_cuda(desc, device, rotary_dim);
  if (cpu::rope_kernels(isa) == nullptr) {
    return Status::unavailable(std::string(kOp) + ": isa " + name(isa) +
                               " is not available (this CPU lacks it, its self-test failed, or "
                               "the op has no such path), expected one of best, portable" +
                               (cpu::rope_kernels(CpuIsa::avx512) ? ", avx512" : ""));
  }
  Result<std::shared_ptr<const ops::RopeTable>> table =
      ops::acquire_rope_table(desc.rope, rotary_dim);
  if (!table.ok()) return table.status();
  QkvRopeWritePlan plan;
  plan.desc_ = desc;
  plan.isa_ = cpu::rope_kernels(isa)->isa;
  plan.table_ = std::move(*table);
  return plan;
}

Result<QkvRopeWritePlan> QkvRopeWritePlan::select_cuda(const QkvRopeWriteDesc& desc, Device device,
                                                       int64_t rotary_dim) {
  for (auto [d, what] :
       {std::pair{desc.qkv_dtype, "qkv_dtype"}, std::pair{desc.q_dtype, "q_dtype"}}) {
    if (!in(backend::kCudaWriteInputTypes, d)) {
      return bad(std::string(what) + " " + name(d) + " has no CUDA kernel");
    }
  }
  for (auto [d, what] :
       {std::pair{desc.cache.kv.k_dtype, "k_dtype"}, std::pair{desc.cache.kv.v_dtype, "v_dtype"}}) {
    if (!in(backend::kCudaStorageTypes, d)) {
      return bad(std::string(what) + " " + name(d) + " has no CUDA kernel");
    }
  }
  Result<ops::CudaRopePlanParts> parts =
      ops::acquire_cuda_rope(desc.rope, rotary_dim, device, kOp, /*with_attention_factor=*/true);
  if (!parts.ok()) return parts.status();
  QkvRopeWritePlan plan;
  plan.desc_ = desc;
  plan.table_ = std::move(parts->table);
  plan.device_ = device;
  plan.errors_ = parts->errors;
  plan.cuda_table_ = std::move(parts->cuda_table);
  return plan;
}

Status QkvRopeWritePlan::can_implement(const QkvRopeWriteArgs& a) const {
  const QkvRopeWriteDesc& d = desc_;
  const KVFormat& f = d.cache.kv;
  const int64_t width = row_width(d);
  if (Status s = check_dtype(a.qkv, d.qkv_dtype, kOp, "qkv"); !s.ok()) return s;
  if (Status s = check_shape(a.qkv, {{-1, "num_tokens"}, {width, "row"}}, kOp, "qkv"); !s.ok()) {
    return s;
  }
  const int64_t n = a.qkv.shape[0];
  if (a.qkv.strides[1] != 1) {
    return bad("qkv has stride " + str(a.qkv.strides[1]) + " inside a row, expected 1");
  }
  if (n > 1 && a.qkv.strides[0] < width) {
    return bad("qkv has row stride " + str(a.qkv.strides[0]) + ", expected >= the row (" +
               str(width) + ")");
  }
  if (Status s = check_device(a.qkv, device_, kOp, "qkv"); !s.ok()) return s;
  if (Status s = check_data(a.qkv, kOp, "qkv"); !s.ok()) return s;
  const bool gpu = on_gpu();
  if (Status s = gpu ? check_position_count(d.rope, a.positions, n)
                     : ops::check_rope_positions(d.rope, a.positions, n, kOp);
      !s.ok()) {
    return s;
  }
  for (auto [w, what] : {std::pair{&a.q_norm_weight, "q_norm_weight"},
                         std::pair{&a.k_norm_weight, "k_norm_weight"}}) {
    if (Status s = check_weight(*w, d.qk_norm, f.head_dim, what, device_); !s.ok()) return s;
  }
  if (Status s = check_dtype(a.q_out, d.q_dtype, kOp, "q_out"); !s.ok()) return s;
  if (Status s = check_shape(
          a.q_out, {{n, "num_tokens"}, {d.num_q_heads, "num_q_heads"}, {f.head_dim, "head_dim"}},
          kOp, "q_out");
      !s.ok()) {
    return s;
  }
  if (Status s = check_contiguous(a.q_out, kOp, "q_out"); !s.ok()) return s;
  if (Status s = check_device(a.q_out, device_, kOp, "q_out"); !s.ok()) return s;
  if (Status s = check_data(a.q_out, kOp, "q_out"); !s.ok()) return s;
  if (n > 0 &&
      overlaps(a.q_out, a.qkv.data,
               static_cast<size_t>((n - 1) * a.qkv.strides[0] + width) * size_of(d.qkv_dtype))) {
    return bad("q_out overlaps qkv, expected separate buffers");
  }
  if (Status s = ops::check_paged_kv(d.cache, a.kv, device_, kOp); !s.ok()) return s;
  if (!gpu) return ops::check_token_slots(d.cache.pages, a.slots, n, kOp);
  const int64_t rows = n * (d.num_q_heads + 2 * f.num_kv_heads);
  if (rows > backend::kCudaMaxElements) {
    return bad("qkv has " + str(n) + " tokens of " + str(d.num_q_heads + 2 * f.num_kv_heads) +
               " heads, expected at most 2^31 - 1 rows per call on CUDA (split the call)");
  }
  return ops::check_token_slot_sizes(a.slots, n, kOp);  // the kernel checks the values
}

Status QkvRopeWritePlan::run(const Stream& stream, std::span<std::byte> workspace,
                             const QkvRopeWriteArgs& args) const {
  (void)workspace;  // workspace_size() is 0
  if (Status s = can_implement(args); !s.ok()) return s;
  if (stream.device != device_) {
    return bad("stream is on " + to_string(stream.device) + ", expected " + to_string(device_));
  }
  if (on_gpu()) return run_cuda(stream, args);
  cpu::qkv_rope_write(desc_, *table_, *cpu::rope_kernels(isa_), args, stream.pool);
  return Status();
}

Status QkvRopeWritePlan::run_cuda(const Stream& stream, const QkvRopeWriteArgs& args) const {
  const QkvRopeWriteDesc& d = desc_;
  const KVFormat& f = d.cache.kv;
  const PageLayout layout = d.cache.pages.layout;
  backend::CudaQkvRopeWriteParams p;
  p.num_tokens = args.qkv.shape[0];
  p.num_q_heads = d.num_q_heads;
  p.num_kv_heads = f.num_kv_heads;
  p.head_dim = f.head_dim;
  p.head_dim_v = f.dim_v();
  p.qkv_dtype = d.qkv_dtype;
  p.q_dtype = d.q_dtype;
  p.qkv = static_cast<const std::byte*>(args.qkv.data);
  p.qkv_row_stride = p.num_tokens > 1 ? args.qkv.strides[0] : row_width(d);
  p.q_out = static_cast<std::byte*>(args.q_out.data);
  if (d.qk_norm) {
    p.q_norm_weight = args.q_norm_weight.data_as<const float>();
    p.k_norm_weight = args.k_norm_weight.data_as<const float>();
  }
  p.norm_eps = d.norm_eps;
  p.norm_weight_offset = d.norm_weight_offset;
  p.gptj = d.rope.style == RopeStyle::gptj;
  p.rotary_dim = d.rope.rotary_dim_for(f.head_dim);
  const ops::RopeSections sections = ops::rope_sections(d.rope, table_->num_freqs);
  p.num_streams = sections.num_streams;
  for (int s = 0; s <= sections.num_streams; ++s) {
    p.section_begin[s] = sections.begin[static_cast<size_t>(s)];
  }
  p.positions = args.positions.data();
  p.k = backend::cuda_pool_side(args.kv.k_pages, args.kv.k_scales, layout);
  p.v = backend::cuda_pool_side(args.kv.v_pages, args.kv.v_scales, layout);
  p.slots = backend::cuda_token_slots(args.slots, d.cache.pages);
  p.errors = errors_;
  return backend::cuda_qkv_rope_write(p, *cuda_table_, stream);
}

const char* QkvRopeWritePlan::sku() const {
  if (on_gpu()) return "cuda.sm90";
  return isa_ == CpuIsa::avx512 ? "cpu.avx512" : "cpu.portable";
}

Precision QkvRopeWritePlan::precision() const {
  const KVFormat& f = desc_.cache.kv;
  double rounding = half_ulp(desc_.q_dtype);
  for (DType d : {f.k_dtype, f.v_dtype}) {
    if (!is_quantized(d)) rounding = std::max(rounding, half_ulp(d));
  }
  Precision p;
  p.rel_tol = rounding + std::ldexp(1.0, -17);
  p.abs_tol = std::ldexp(1.0, -15);
  p.note =
      std::string(on_gpu() ? "cuda: the bits of the cpu.portable plan for finite inputs; " : "") +
      "q_out and f32/f16/bf16 K/V: half an ulp of the output dtype (rel) plus float math "
      "(sum of squares, cos/sin rounded to float: 2^-17 rel, 2^-15 abs for operands up to 8 in "
      "magnitude); int8 K/V: within one step (the row's scale) of the reference, fp8_e4m3: 2^-3 "
      "relative or 2^-9 of the scale, plus the same float math";
  return p;
}

}  // namespace kvcache
