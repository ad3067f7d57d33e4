// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/paged_append.h"

#include <algorithm>
#include <span>
#include <string>

#include "backend/cpu/append_kernels.h"
#include "backend/cuda_write_ops.h"
#include "ops/paged_checks.h"

namespace kvcache {
namespace {

constexpr std::string_view kOp = "paged_append";
constexpr DType kInputDTypes[] = {DType::f32, DType::f16, DType::bf16};

Status bad(const std::string& what) {
  return Status::invalid_argument(std::string(kOp) + ": " + what);
}

// New tokens: [num_tokens, num_kv_heads, dim], contiguous, input_dtype.
Status check_input(const PagedAppendDesc& d, const TensorView& t, int64_t num_tokens, int64_t dim,
                   const char* what, Device device) {
  if (Status s = check_dtype(t, d.input_dtype, kOp, what); !s.ok()) return s;
  if (Status s = check_shape(t,
                             {{num_tokens, "num_tokens"},
                              {d.cache.kv.num_kv_heads, "num_kv_heads"},
                              {dim, "head_dim"}},
                             kOp, what);
      !s.ok()) {
    return s;
  }
  if (Status s = check_contiguous(t, kOp, what); !s.ok()) return s;
  if (Status s = check_device(t, device, kOp, what); !s.ok()) return s;
  if (!device.is_cpu() && t.numel() > backend::kCudaMaxElements) {
    return bad(std::string(what) + " has " + std::to_string(t.numel()) +
               " elements, expected at most 2^31 - 1 per call on CUDA (split the call)");
  }
  return check_data(t, kOp, what);
}

bool in(std::span<const DType> table, DType d) {
  return std::find(table.begin(), table.end(), d) != table.end();
}

cpu::PagedAppendSide side(const PagedAppendDesc& d, const TensorView& src, const TensorView& pool,
                          const TensorView& scales, DType dtype, int64_t dim) {
  cpu::PagedAppendSide s;
  s.src = static_cast<const std::byte*>(src.data);
  s.src_dtype = d.input_dtype;
  s.dim = dim;
  s.pool = static_cast<std::byte*>(pool.data);
  s.dtype = dtype;
  s.strides = ops::pool_strides(d.cache.pages, d.cache.kv.num_kv_heads, dim);
  if (is_quantized(dtype)) {
    s.scales = scales.data_as<float>();
    s.scale_strides = ops::pool_strides(d.cache.pages, d.cache.kv.num_kv_heads, 1);
  }
  return s;
}

}  // namespace

Result<PagedAppendPlan> PagedAppendPlan::select(const PagedAppendDesc& desc, Device device,
                                                CpuIsa isa) {
  if (Status s = check_paged_kv_desc(desc.cache, kOp); !s.ok()) return s;
  bool known = false;
  for (DType t : kInputDTypes) known = known || desc.input_dtype == t;
  if (!known) {
    return bad(std::string("input_dtype is ") + name(desc.input_dtype) +
               ", expected one of f32, f16, bf16");
  }
  if (!device.is_cpu()) {
    if (!in(backend::kCudaWriteInputTypes, desc.input_dtype)) {
      return bad(std::string("input_dtype ") + name(desc.input_dtype) + " has no CUDA kernel");
    }
    for (auto [d, what] : {std::pair{desc.cache.kv.k_dtype, "k_dtype"},
                           std::pair{desc.cache.kv.v_dtype, "v_dtype"}}) {
      if (!in(backend::kCudaStorageTypes, d)) {
        return bad(std::string(what) + " " + name(d) + " has no CUDA kernel");
      }
    }
    Result<void*> errors = backend::cuda_write_error_record(device, kOp);
    if (!errors.ok()) return errors.status();
    PagedAppendPlan plan(desc, CpuIsa::portable);
    plan.device_ = device;
    plan.errors_ = *errors;
    return plan;
  }
  if (Status s = cpu::check_select_target(kOp, device, isa); !s.ok()) return s;
  const bool fast = cpu::avx512_write_row_self_test();
  if (isa == CpuIsa::avx512 && !fast) {
    return Status::unavailable(std::string(kOp) +
                               ": the avx512 path failed its known-answer self-test on this CPU, "
                               "expected isa best or portable");
  }
  const bool use_avx512 = isa == CpuIsa::avx512 || (isa == CpuIsa::best && fast);
  return PagedAppendPlan(desc, use_avx512 ? CpuIsa::avx512 : CpuIsa::portable);
}

Status PagedAppendPlan::can_implement(const PagedAppendArgs& args) const {
  const PagedAppendDesc& d = desc_;
  if (Status s = ops::check_paged_kv(d.cache, args.cache, device_, kOp); !s.ok()) return s;
  if (Status s = check_input(d, args.k, -1, d.cache.kv.head_dim, "k", device_); !s.ok()) return s;
  const int64_t num_tokens = args.k.shape[0];
  if (Status s = check_input(d, args.v, num_tokens, d.cache.kv.dim_v(), "v", device_); !s.ok()) {
    return s;
  }
  const std::pair<const TensorView*, const char*> outputs[] = {{&args.cache.k_pages, "k_pages"},
                                                               {&args.cache.v_pages, "v_pages"},
                                                               {&args.cache.k_scales, "k_scales"},
                                                               {&args.cache.v_scales, "v_scales"}};
  for (size_t a = 0; a < 4; ++a) {
    for (auto [input, input_name] : {std::pair{&args.k, "k"}, std::pair{&args.v, "v"}}) {
      if (overlaps(*outputs[a].first, input->data, input->num_bytes())) {
        return bad(std::string(input_name) + " overlaps " + outputs[a].second +
                   ", expected separate memory");
      }
    }
    for (size_t b = a + 1; b < 4; ++b) {
      const TensorView& other = *outputs[b].first;
      if (overlaps(*outputs[a].first, other.data, other.num_bytes())) {
        return bad(std::string(outputs[a].second) + " overlaps " + outputs[b].second +
                   ", expected separate memory");
      }
    }
  }
  if (!device_.is_cpu()) {  // the slot arrays live on the GPU: the kernel checks their values
    return ops::check_token_slot_sizes(args.slots, num_tokens, kOp);
  }
  return ops::check_token_slots(d.cache.pages, args.slots, num_tokens, kOp);
}

Status PagedAppendPlan::run(const Stream& stream, std::span<std::byte> /*workspace*/,
                            const PagedAppendArgs& args) const {
  if (Status s = can_implement(args); !s.ok()) return s;
  if (!device_.is_cpu()) return run_cuda(stream, args);
  if (Status s = cpu::check_stream(kOp, stream); !s.ok()) return s;
  const KVFormat& kv = desc_.cache.kv;
  cpu::PagedAppendParams p;
  p.pages = desc_.cache.pages;
  p.slots = args.slots;
  p.num_tokens = args.k.shape[0];
  p.num_kv_heads = kv.num_kv_heads;
  p.k = side(desc_, args.k, args.cache.k_pages, args.cache.k_scales, kv.k_dtype, kv.head_dim);
  p.v = side(desc_, args.v, args.cache.v_pages, args.cache.v_scales, kv.v_dtype, kv.dim_v());
  cpu::paged_append(p, isa_ == CpuIsa::avx512, stream.pool);
  return Status();
}

Status PagedAppendPlan::run_cuda(const Stream& stream, const PagedAppendArgs& args) const {
  if (stream.device != device_) {
    return bad("stream is on " + to_string(stream.device) + ", expected " + to_string(device_));
  }
  const PageLayout layout = desc_.cache.pages.layout;
  backend::CudaPagedAppendParams p;
  p.num_tokens = args.k.shape[0];
  p.num_kv_heads = desc_.cache.kv.num_kv_heads;
  p.src_dtype = desc_.input_dtype;
  p.k_src = static_cast<const std::byte*>(args.k.data);
  p.v_src = static_cast<const std::byte*>(args.v.data);
  p.k = backend::cuda_pool_side(args.cache.k_pages, args.cache.k_scales, layout);
  p.v = backend::cuda_pool_side(args.cache.v_pages, args.cache.v_scales, layout);
  p.slots = backend::cuda_token_slots(args.slots, desc_.cache.pages);
  p.errors = errors_;
  return backend::cuda_paged_append(p, stream);
}

const char* PagedAppendPlan::sku() const {
  if (!device_.is_cpu()) return "cuda.sm90";
  return isa_ == CpuIsa::avx512 ? "cpu.avx512" : "cpu.portable";
}

Precision PagedAppendPlan::precision() const {
  return Precision{true, 0.0, 0.0,
                   "bit-exact: conversions round to nearest even as dtype.h does; int8 / fp8 "
                   "follow ops/quantize.h's rule"};
}

}  // namespace kvcache
