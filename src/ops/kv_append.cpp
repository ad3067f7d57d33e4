// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/kv_append.h"

#include <algorithm>
#include <iterator>
#include <string>

#include "backend/cpu/append_kernels.h"
#include "backend/cuda_write_ops.h"

namespace kvcache {
namespace {

constexpr std::string_view kOp = "kv_append";
constexpr DType kDTypes[] = {DType::f32, DType::f64, DType::f16, DType::bf16};

std::string str(int64_t v) { return std::to_string(v); }

Status bad(const std::string& what) {
  return Status::invalid_argument(std::string(kOp) + ": " + what);
}

Status check_desc(const KVAppendDesc& d) {
  for (auto [value, label] :
       {std::pair{d.batch, "batch"}, std::pair{d.num_kv_heads, "num_kv_heads"},
        std::pair{d.head_dim, "head_dim"}, std::pair{d.capacity, "capacity"},
        std::pair{d.max_new_tokens, "max_new_tokens"}}) {
    if (value <= 0) return bad(std::string(label) + " is " + str(value) + ", expected > 0");
  }
  if (d.head_dim_v < 0) {
    return bad("head_dim_v is " + str(d.head_dim_v) + ", expected > 0 (or 0 for head_dim)");
  }
  for (DType t : kDTypes) {
    if (d.dtype == t) return Status();
  }
  return bad(std::string("dtype is ") + name(d.dtype) + ", expected one of f32, f64, f16, bf16");
}

// A cache: [batch, num_kv_heads, capacity, dim], unit stride on dim.
Status check_cache(const KVAppendDesc& d, const TensorView& t, int64_t dim, const char* dim_name,
                   const char* what, Device device) {
  if (Status s = check_dtype(t, d.dtype, kOp, what); !s.ok()) return s;
  if (Status s = check_shape(t,
                             {{d.batch, "batch"},
                              {d.num_kv_heads, "num_kv_heads"},
                              {d.capacity, "capacity"},
                              {dim, dim_name}},
                             kOp, what);
      !s.ok()) {
    return s;
  }
  if (dim > 1 && t.strides[3] != 1) {
    return bad(std::string(what) + " has stride " + str(t.strides[3]) + " on " + dim_name +
               ", expected 1");
  }
  if (Status s = check_device(t, device, kOp, what); !s.ok()) return s;
  return check_data(t, kOp, what);
}

// New tokens: [batch, num_kv_heads, max_new_tokens, dim], contiguous.
Status check_new(const KVAppendDesc& d, const TensorView& t, int64_t dim, const char* dim_name,
                 const char* what, Device device) {
  if (Status s = check_dtype(t, d.dtype, kOp, what); !s.ok()) return s;
  if (Status s = check_shape(t,
                             {{d.batch, "batch"},
                              {d.num_kv_heads, "num_kv_heads"},
                              {d.max_new_tokens, "max_new_tokens"},
                              {dim, dim_name}},
                             kOp, what);
      !s.ok()) {
    return s;
  }
  if (Status s = check_contiguous(t, kOp, what); !s.ok()) return s;
  if (Status s = check_device(t, device, kOp, what); !s.ok()) return s;
  return check_data(t, kOp, what);
}

backend::CudaKVAppendSide cuda_side(const TensorView& cache, const TensorView& src, int64_t dim) {
  const auto size = static_cast<int64_t>(size_of(cache.dtype));
  backend::CudaKVAppendSide s;
  s.cache = static_cast<std::byte*>(cache.data);
  s.sample_stride = cache.strides[0] * size;
  s.head_stride = cache.strides[1] * size;
  s.token_stride = cache.strides[2] * size;
  s.src = static_cast<const std::byte*>(src.data);
  s.row_bytes = dim * size;
  return s;
}

cpu::AppendSide side(const TensorView& cache, const TensorView& src, int64_t dim) {
  const auto size = static_cast<int64_t>(size_of(cache.dtype));
  return {static_cast<std::byte*>(cache.data),
          cache.strides[0] * size,
          cache.strides[1] * size,
          cache.strides[2] * size,
          static_cast<const std::byte*>(src.data),
          dim * size};
}

// CUDA: the new tokens fit the kernel's 32-bit indexing.
Status check_cuda_sizes(const KVAppendArgs& args) {
  for (auto [t, what] : {std::pair{&args.k_new, "k_new"}, std::pair{&args.v_new, "v_new"}}) {
    if (t->numel() > backend::kCudaMaxElements) {
      return bad(std::string(what) + " has " + str(t->numel()) +
                 " elements, expected at most 2^31 - 1 per call on CUDA (split the call)");
    }
  }
  return Status();
}

}  // namespace

Result<KVAppendPlan> KVAppendPlan::select(const KVAppendDesc& desc, Device device, CpuIsa isa) {
  if (Status s = check_desc(desc); !s.ok()) return s;
  if (!device.is_cpu()) {
    if (std::find(std::begin(backend::kCudaKVAppendTypes), std::end(backend::kCudaKVAppendTypes),
                  desc.dtype) == std::end(backend::kCudaKVAppendTypes)) {
      return bad(std::string("dtype ") + name(desc.dtype) + " has no CUDA kernel");
    }
    Result<void*> errors = backend::cuda_write_error_record(device, kOp);
    if (!errors.ok()) return errors.status();
    KVAppendPlan plan(desc);
    plan.device_ = device;
    plan.errors_ = *errors;
    return plan;
  }
  if (Status s = cpu::check_select_target(kOp, device, isa); !s.ok()) return s;
  return KVAppendPlan(desc);
}

Status KVAppendPlan::can_implement(const KVAppendArgs& args) const {
  const KVAppendDesc& d = desc_;
  const Device dev = device_;
  if (Status s = check_cache(d, args.k_cache, d.head_dim, "head_dim", "k_cache", dev); !s.ok()) {
    return s;
  }
  if (Status s = check_cache(d, args.v_cache, d.dim_v(), "head_dim_v", "v_cache", dev); !s.ok()) {
    return s;
  }
  if (Status s = check_new(d, args.k_new, d.head_dim, "head_dim", "k_new", dev); !s.ok()) return s;
  if (Status s = check_new(d, args.v_new, d.dim_v(), "head_dim_v", "v_new", dev); !s.ok()) {
    return s;
  }
  for (auto [src, src_name] : {std::pair{&args.k_new, "k_new"}, std::pair{&args.v_new, "v_new"}}) {
    for (auto [cache, cache_name] :
         {std::pair{&args.k_cache, "k_cache"}, std::pair{&args.v_cache, "v_cache"}}) {
      if (overlaps(*cache, src->data, src->num_bytes())) {
        return bad(std::string(src_name) + " overlaps " + cache_name +
                   ", expected separate memory");
      }
    }
  }
  if (static_cast<int64_t>(args.offsets.size()) != d.batch) {
    return bad("offsets has " + str(static_cast<int64_t>(args.offsets.size())) +
               " entries, expected batch = " + str(d.batch));
  }
  const bool ragged = !args.new_lens.empty();
  if (ragged && static_cast<int64_t>(args.new_lens.size()) != d.batch) {
    return bad("new_lens has " + str(static_cast<int64_t>(args.new_lens.size())) +
               " entries, expected batch = " + str(d.batch) + " (or none)");
  }
  if (!device_.is_cpu()) return check_cuda_sizes(args);  // the values live on the GPU
  for (int64_t b = 0; b < d.batch; ++b) {
    const int64_t len = ragged ? args.new_lens[static_cast<size_t>(b)] : d.max_new_tokens;
    const int64_t off = args.offsets[static_cast<size_t>(b)];
    if (len < 0 || len > d.max_new_tokens) {
      return bad("new_lens[" + str(b) + "] is " + str(len) +
                 ", expected in [0, max_new_tokens = " + str(d.max_new_tokens) + "]");
    }
    if (off < 0) {
      return Status::out_of_range(std::string(kOp) + ": offsets[" + str(b) + "] is " + str(off) +
                                  ", expected >= 0");
    }
    if (off + len > d.capacity) {
      return Status::out_of_range(std::string(kOp) + ": offsets[" + str(b) + "] + " +
                                  (ragged ? "new_lens[" + str(b) + "]" : "max_new_tokens") +
                                  " is " + str(off) + " + " + str(len) + " = " + str(off + len) +
                                  ", expected <= capacity = " + str(d.capacity));
    }
  }
  return Status();
}

Status KVAppendPlan::run(const Stream& stream, std::span<std::byte> /*workspace*/,
                         const KVAppendArgs& args) const {
  if (Status s = can_implement(args); !s.ok()) return s;
  if (!device_.is_cpu()) {
    if (stream.device != device_) {
      return bad("stream is on " + to_string(stream.device) + ", expected " + to_string(device_));
    }
    backend::CudaKVAppendParams p;
    p.batch = desc_.batch;
    p.num_kv_heads = desc_.num_kv_heads;
    p.max_new_tokens = desc_.max_new_tokens;
    p.capacity = desc_.capacity;
    p.offsets = args.offsets.data();
    p.new_lens = args.new_lens.empty() ? nullptr : args.new_lens.data();
    p.k = cuda_side(args.k_cache, args.k_new, desc_.head_dim);
    p.v = cuda_side(args.v_cache, args.v_new, desc_.dim_v());
    p.errors = errors_;
    return backend::cuda_kv_append(p, stream);
  }
  if (Status s = cpu::check_stream(kOp, stream); !s.ok()) return s;
  cpu::KVAppendParams p;
  p.batch = desc_.batch;
  p.num_kv_heads = desc_.num_kv_heads;
  p.max_new_tokens = desc_.max_new_tokens;
  p.offsets = args.offsets;
  p.new_lens = args.new_lens;
  p.k = side(args.k_cache, args.k_new, desc_.head_dim);
  p.v = side(args.v_cache, args.v_new, desc_.dim_v());
  cpu::kv_append(p, stream.pool);
  return Status();
}

const char* KVAppendPlan::sku() const { return device_.is_cpu() ? "cpu.portable" : "cuda.sm90"; }

Precision KVAppendPlan::precision() const {
  return Precision{true, 0.0, 0.0, "bit-exact: rows are copied"};
}

}  // namespace kvcache
