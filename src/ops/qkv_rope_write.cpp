// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// qkv_rope_write: select / can_implement / run plumbing; the kernels are in backend/cpu.

#include "kvcache/qkv_rope_write.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "backend/cpu/rope_kernels.h"
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

Status check_weight(const TensorView& w, bool wanted, int64_t head_dim, const char* what) {
  if (!wanted) {
    if (w.data == nullptr && w.rank == 0) return Status();
    return bad(std::string(what) + " is given without qk_norm, expected none");
  }
  if (Status s = check_dtype(w, DType::f32, kOp, what); !s.ok()) return s;
  if (Status s = check_shape(w, {{head_dim, "head_dim"}}, kOp, what); !s.ok()) return s;
  if (Status s = check_contiguous(w, kOp, what); !s.ok()) return s;
  if (Status s = check_device(w, Device::cpu(), kOp, what); !s.ok()) return s;
  return check_data(w, kOp, what);
}

}  // namespace

Result<QkvRopeWritePlan> QkvRopeWritePlan::select(const QkvRopeWriteDesc& desc, Device device,
                                                  CpuIsa isa) {
  if (!device.is_cpu()) {
    return Status::unavailable(std::string(kOp) + ": device is " + to_string(device) +
                               ", expected cpu (the CUDA backend is not built yet)");
  }
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
  if (cpu::rope_kernels(isa) == nullptr) {
    return Status::unavailable(std::string(kOp) + ": isa " + name(isa) +
                               " is not available (this CPU lacks it, its self-test failed, or "
                               "the op has no such path), expected one of best, portable" +
                               (cpu::rope_kernels(CpuIsa::avx512) ? ", avx512" : ""));
  }
  const int64_t rotary_dim = desc.rope.rotary_dim_for(f.head_dim);
  Result<std::shared_ptr<const ops::RopeTable>> table =
      ops::acquire_rope_table(desc.rope, rotary_dim);
  if (!table.ok()) return table.status();
  QkvRopeWritePlan plan;
  plan.desc_ = desc;
  plan.isa_ = cpu::rope_kernels(isa)->isa;
  plan.table_ = std::move(*table);
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
  if (Status s = check_device(a.qkv, Device::cpu(), kOp, "qkv"); !s.ok()) return s;
  if (Status s = check_data(a.qkv, kOp, "qkv"); !s.ok()) return s;
  if (Status s = ops::check_rope_positions(d.rope, a.positions, n, kOp); !s.ok()) return s;
  if (Status s = check_weight(a.q_norm_weight, d.qk_norm, f.head_dim, "q_norm_weight"); !s.ok()) {
    return s;
  }
  if (Status s = check_weight(a.k_norm_weight, d.qk_norm, f.head_dim, "k_norm_weight"); !s.ok()) {
    return s;
  }
  if (Status s = check_dtype(a.q_out, d.q_dtype, kOp, "q_out"); !s.ok()) return s;
  if (Status s = check_shape(
          a.q_out, {{n, "num_tokens"}, {d.num_q_heads, "num_q_heads"}, {f.head_dim, "head_dim"}},
          kOp, "q_out");
      !s.ok()) {
    return s;
  }
  if (Status s = check_contiguous(a.q_out, kOp, "q_out"); !s.ok()) return s;
  if (Status s = check_device(a.q_out, Device::cpu(), kOp, "q_out"); !s.ok()) return s;
  if (Status s = check_data(a.q_out, kOp, "q_out"); !s.ok()) return s;
  if (n > 0 &&
      overlaps(a.q_out, a.qkv.data,
               static_cast<size_t>((n - 1) * a.qkv.strides[0] + width) * size_of(d.qkv_dtype))) {
    return bad("q_out overlaps qkv, expected separate buffers");
  }
  if (Status s = ops::check_paged_kv(d.cache, a.kv, Device::cpu(), kOp); !s.ok()) return s;
  return ops::check_token_slots(d.cache.pages, a.slots, n, kOp);
}

Status QkvRopeWritePlan::run(const Stream& stream, std::span<std::byte> workspace,
                             const QkvRopeWriteArgs& args) const {
  (void)workspace;  // workspace_size() is 0
  if (!stream.device.is_cpu()) {
    return Status::unavailable(std::string(kOp) + ": stream device is " + to_string(stream.device) +
                               ", expected cpu");
  }
  if (Status s = can_implement(args); !s.ok()) return s;
  cpu::qkv_rope_write(desc_, *table_, *cpu::rope_kernels(isa_), args, stream.pool);
  return Status();
}

const char* QkvRopeWritePlan::sku() const {
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
      "q_out and f32/f16/bf16 K/V: half an ulp of the output dtype (rel) plus float math "
      "(sum of squares, cos/sin rounded to float: 2^-17 rel, 2^-15 abs for operands up to 8 in "
      "magnitude); int8 K/V: within one step (the row's scale) of the reference, fp8_e4m3: 2^-3 "
      "relative or 2^-9 of the scale, plus the same float math";
  return p;
}

}  // namespace kvcache
