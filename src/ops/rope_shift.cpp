// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// rope_shift: select / can_implement / run plumbing; the kernels are in backend/cpu and
// backend/cuda (rope_shift.cu).

#include "kvcache/rope_shift.h"

#include <cmath>
#include <string>

#include "backend/cpu/rope_kernels.h"
#include "backend/cuda_write_ops.h"
#include "ops/paged_checks.h"
#include "ops/rope_table.h"

namespace kvcache {
namespace {

constexpr std::string_view kOp = "rope_shift";

// Every descriptor check_kv_format accepts has a CUDA kernel: the storage dtypes are
// backend::kCudaStorageTypes and head_dim is bounded by the CPU's limit.
static_assert(backend::kCudaRopeShiftMaxHeadDim >= cpu::kRopeMaxHeadDim);

std::string str(int64_t v) { return std::to_string(v); }

Status bad(const std::string& what) {
  return Status::invalid_argument(std::string(kOp) + ": " + what);
}

// The format with V described as K: the shared checks then validate k (and k_scales) twice over,
// and never look at the V arrays the op does not touch.
KVFormat k_only(const KVFormat& kv) {
  KVFormat f = kv;
  f.head_dim_v = kv.head_dim;
  f.v_dtype = kv.k_dtype;
  return f;
}

// Sequence b moves [p0, p1) by delta: in range of its tokens and of the table.
Status check_range(const RopeShiftArgs& a, size_t b, int64_t max_position) {
  const int64_t p0 = a.p0[b];
  const int64_t p1 = a.p1[b];
  const int64_t delta = a.delta[b];
  const int64_t len = a.seq_lens[b];
  if (p0 < 0 || p0 > p1 || p1 > len) {
    const std::string seq = std::to_string(b);
    return Status::out_of_range(std::string(kOp) + ": sequence " + seq + " shifts [p0, p1) = [" +
                                str(p0) + ", " + str(p1) +
                                "), expected 0 <= p0 <= p1 <= seq_lens[" + seq + "] = " + str(len));
  }
  if (p0 == p1) return Status();
  if (p1 > max_position || delta <= -max_position || delta >= max_position) {
    return Status::out_of_range(std::string(kOp) + ": sequence " + std::to_string(b) +
                                " moves positions [" + str(p0) + ", " + str(p1) + ") by delta " +
                                str(delta) + ", expected p1 <= max_position and |delta| < " +
                                "max_position = " + str(max_position));
  }
  return Status();
}

}  // namespace

Result<RopeShiftPlan> RopeShiftPlan::select(const RopeShiftDesc& desc, Device device, CpuIsa isa) {
  if (Status s = check_kv_format(desc.kv, kOp); !s.ok()) return s;
  if (desc.pages) {
    if (Status s = check_paged_kv_desc(PagedKVDesc{desc.kv, *desc.pages}, kOp); !s.ok()) return s;
  }
  if (desc.kv.head_dim > cpu::kRopeMaxHeadDim) {
    return bad("head_dim is " + str(desc.kv.head_dim) +
               ", expected <= " + str(cpu::kRopeMaxHeadDim));
  }
  if (Status s = check_rope_config(desc.rope, desc.kv.head_dim, kOp); !s.ok()) return s;
  const int64_t rotary_dim = desc.rope.rotary_dim_for(desc.kv.head_dim);
  if (!device.is_cpu()) return select_cuda(desc, device, rotary_dim);
  const cpu::RopeKernels* kernels = cpu::rope_kernels(isa);
  if (kernels == nullptr) {
    return Status::unavailable(std::string(kOp) + ": isa " + name(isa) +
                               " is not available (this CPU lacks it, its self-test failed, or "
                               "the op has no such path), expected one of best, portable" +
                               (cpu::rope_kernels(CpuIsa::avx512) ? ", avx512" : ""));
  }
  Result<std::shared_ptr<const ops::RopeTable>> table =
      ops::acquire_rope_table(desc.rope, rotary_dim);
  if (!table.ok()) return table.status();
  RopeShiftPlan plan;
  plan.desc_ = desc;
  plan.isa_ = kernels->isa;
  plan.table_ = std::move(*table);
  return plan;
}

Result<RopeShiftPlan> RopeShiftPlan::select_cuda(const RopeShiftDesc& desc, Device device,
                                                 int64_t rotary_dim) {
  // K already carries the attention factor: the shift is the pure rotation.
  Result<ops::CudaRopePlanParts> parts =
      ops::acquire_cuda_rope(desc.rope, rotary_dim, device, kOp, /*with_attention_factor=*/false);
  if (!parts.ok()) return parts.status();
  RopeShiftPlan plan;
  plan.desc_ = desc;
  plan.table_ = std::move(parts->table);
  plan.device_ = device;
  plan.errors_ = parts->errors;
  plan.cuda_table_ = std::move(parts->cuda_table);
  return plan;
}

Status RopeShiftPlan::can_implement(const RopeShiftArgs& a) const {
  const int64_t batch = static_cast<int64_t>(a.p0.size());
  for (auto [span, what] :
       {std::pair{a.p1, "p1"}, std::pair{a.delta, "delta"}, std::pair{a.seq_lens, "seq_lens"}}) {
    if (static_cast<int64_t>(span.size()) != batch) {
      return bad(std::string(what) + " has " + str(static_cast<int64_t>(span.size())) +
                 " entries, expected batch = " + str(batch) + " (as p0)");
    }
  }
  const bool gpu = on_gpu();
  if (gpu && batch > backend::kCudaMaxElements) {
    return bad("batch is " + str(batch) + ", expected at most 2^31 - 1 sequences per call on CUDA");
  }
  for (int64_t b = 0; b < batch && !gpu; ++b) {
    if (a.seq_lens[static_cast<size_t>(b)] < 0) {
      return bad("seq_lens[" + str(b) + "] is " + str(a.seq_lens[static_cast<size_t>(b)]) +
                 ", expected >= 0");
    }
  }
  const KVFormat f = k_only(desc_.kv);
  if (desc_.pages) {
    const PagedKV kv{a.kv.k_pages, a.kv.k_pages, a.kv.k_scales, a.kv.k_scales};
    if (Status s = ops::check_paged_kv(PagedKVDesc{f, *desc_.pages}, kv, device_, kOp); !s.ok()) {
      return s;
    }
    if (gpu) return ops::check_page_table_sizes(a.table, batch, kOp);  // the kernel checks values
    if (Status s = ops::check_page_table(*desc_.pages, a.table, batch, kOp); !s.ok()) return s;
    if (Status s = ops::check_seq_lens_fit(*desc_.pages, a.table, a.seq_lens, kOp); !s.ok()) {
      return s;
    }
  } else {
    const ContiguousKV kv{a.caches.k, a.caches.k, a.caches.k_scales, a.caches.k_scales};
    if (Status s = ops::check_contiguous_kv(f, kv, batch, device_, kOp); !s.ok()) return s;
    if (gpu) return Status();  // the kernel checks seq_lens and the ranges
    const int64_t capacity = a.caches.k.shape[2];
    for (int64_t b = 0; b < batch; ++b) {
      if (a.seq_lens[static_cast<size_t>(b)] > capacity) {
        return Status::out_of_range(std::string(kOp) + ": seq_lens[" + str(b) + "] is " +
                                    str(a.seq_lens[static_cast<size_t>(b)]) +
                                    ", expected <= " + "capacity = " + str(capacity));
      }
    }
  }
  for (size_t b = 0; b < a.p0.size(); ++b) {
    if (Status s = check_range(a, b, desc_.rope.max_position); !s.ok()) return s;
  }
  return Status();
}

Status RopeShiftPlan::run(const Stream& stream, std::span<std::byte> workspace,
                          const RopeShiftArgs& args) const {
  (void)workspace;  // workspace_size() is 0
  if (Status s = can_implement(args); !s.ok()) return s;
  if (stream.device != device_) {
    return bad("stream is on " + to_string(stream.device) + ", expected " + to_string(device_));
  }
  if (on_gpu()) return run_cuda(stream, args);
  cpu::rope_shift(desc_, *table_, *cpu::rope_kernels(isa_), args, stream.pool);
  return Status();
}

Status RopeShiftPlan::run_cuda(const Stream& stream, const RopeShiftArgs& args) const {
  const RopeShiftDesc& d = desc_;
  backend::CudaRopeShiftParams p;
  p.batch = static_cast<int64_t>(args.p0.size());
  p.num_kv_heads = d.kv.num_kv_heads;
  p.gptj = d.rope.style == RopeStyle::gptj;
  if (d.pages) {
    p.k = backend::cuda_pool_side(args.kv.k_pages, args.kv.k_scales, d.pages->layout);
    p.paged = true;
    p.page_size = d.pages->page_size;
    p.num_pages = d.pages->num_pages;
    p.indptr = args.table.indptr.data();
    p.indices = args.table.indices.data();
    p.num_indices = static_cast<int64_t>(args.table.indices.size());
  } else {
    // [batch, num_kv_heads, capacity, head_dim] as a pool of one page per sequence.
    const TensorView& k = args.caches.k;
    const TensorView& s = args.caches.k_scales;
    p.k.pool = static_cast<std::byte*>(k.data);
    p.k.dtype = d.kv.k_dtype;
    p.k.dim = d.kv.head_dim;
    p.k.page_stride = k.strides[0];
    p.k.head_stride = k.strides[1];
    p.k.slot_stride = k.strides[2];
    if (s.data != nullptr) {
      p.k.scales = static_cast<float*>(s.data);
      p.k.scale_page_stride = s.strides[0];
      p.k.scale_head_stride = s.strides[1];
      p.k.scale_slot_stride = s.strides[2];
    }
    p.capacity = k.shape[2];
  }
  p.p0 = args.p0.data();
  p.p1 = args.p1.data();
  p.delta = args.delta.data();
  p.seq_lens = args.seq_lens.data();
  p.errors = errors_;
  return backend::cuda_rope_shift(p, *cuda_table_, stream);
}

const char* RopeShiftPlan::sku() const {
  if (on_gpu()) return "cuda.sm90";
  return isa_ == CpuIsa::avx512 ? "cpu.avx512" : "cpu.portable";
}

Precision RopeShiftPlan::precision() const {
  const DType d = desc_.kv.k_dtype;
  const double rounding = d == DType::bf16  ? std::ldexp(1.0, -8)
                          : d == DType::f16 ? std::ldexp(1.0, -11)
                                            : std::ldexp(1.0, -24);
  Precision p;
  p.rel_tol = (is_quantized(d) ? 0.0 : rounding) + std::ldexp(1.0, -17);
  p.abs_tol = std::ldexp(1.0, -15);
  p.note =
      std::string(on_gpu() ? "cuda: the bits of the cpu.portable plan for finite inputs; " : "") +
      "f32/f16/bf16 K: half an ulp of the dtype (rel) plus float math (cos/sin rounded to "
      "float: 2^-17 rel, 2^-15 abs for values up to 8 in magnitude); int8 K: within one step (the "
      "new scale) of the reference, fp8_e4m3: 2^-3 relative or 2^-9 of the scale, plus the same "
      "float math";
  return p;
}

}  // namespace kvcache
