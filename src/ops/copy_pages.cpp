// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/copy_pages.h"

#include <algorithm>
#include <bitset>
#include <iterator>
#include <string>

#include "backend/cpu/append_kernels.h"
#include "backend/cuda_write_ops.h"
#include "ops/paged_checks.h"

namespace kvcache {
namespace {

constexpr std::string_view kOp = "copy_pages";
// Pages per window of the duplicate check: a bitset of this many bits lives on the stack.
constexpr int64_t kWindow = 32768;

std::string str(int64_t v) { return std::to_string(v); }

Status bad(const std::string& what) {
  return Status::invalid_argument(std::string(kOp) + ": " + what);
}

// The first index j < i with list[j] == list[i]. REQUIRES one exists.
size_t earlier(std::span<const int32_t> list, size_t i) {
  return static_cast<size_t>(std::find(list.begin(), list.end(), list[i]) - list.begin());
}

// No dst twice, no dst also a src: a bitset of the dst pages per window of page numbers, so the
// check needs no allocation. REQUIRES every page in [0, num_pages).
Status check_distinct(std::span<const int32_t> src, std::span<const int32_t> dst,
                      int64_t num_pages) {
  std::bitset<kWindow> marked;
  for (int64_t lo = 0; lo < num_pages; lo += kWindow) {
    marked.reset();
    for (size_t i = 0; i < dst.size(); ++i) {
      const int64_t page = dst[i] - lo;
      if (page < 0 || page >= kWindow) continue;
      if (marked[static_cast<size_t>(page)]) {
        return bad("dst[" + str(static_cast<int64_t>(i)) + "] is " + str(dst[i]) + ", as is dst[" +
                   str(static_cast<int64_t>(earlier(dst, i))) + "], expected each dst page once");
      }
      marked.set(static_cast<size_t>(page));
    }
    for (size_t i = 0; i < src.size(); ++i) {
      const int64_t page = src[i] - lo;
      if (page < 0 || page >= kWindow || !marked[static_cast<size_t>(page)]) continue;
      const auto j = static_cast<size_t>(std::find(dst.begin(), dst.end(), src[i]) - dst.begin());
      return bad("src[" + str(static_cast<int64_t>(i)) + "] is " + str(src[i]) + ", also dst[" +
                 str(static_cast<int64_t>(j)) +
                 "], expected no page both read and written (split the list into calls)");
    }
  }
  return Status();
}

// Bytes of one page of a pool: everything but the page axis.
int64_t page_bytes(const TensorView& t) {
  return t.numel() / t.shape[0] * static_cast<int64_t>(size_of(t.dtype));
}

}  // namespace

Result<CopyPagesPlan> CopyPagesPlan::select(const CopyPagesDesc& desc, Device device, CpuIsa isa) {
  if (Status s = check_paged_kv_desc(desc.cache, kOp); !s.ok()) return s;
  if (!device.is_cpu()) {
    for (auto [d, what] : {std::pair{desc.cache.kv.k_dtype, "k_dtype"},
                           std::pair{desc.cache.kv.v_dtype, "v_dtype"}}) {
      if (std::find(std::begin(backend::kCudaStorageTypes), std::end(backend::kCudaStorageTypes),
                    d) == std::end(backend::kCudaStorageTypes)) {
        return bad(std::string(what) + " " + name(d) + " has no CUDA kernel");
      }
    }
    Result<void*> errors = backend::cuda_write_error_record(device, kOp);
    if (!errors.ok()) return errors.status();
    CopyPagesPlan plan(desc);
    plan.device_ = device;
    plan.errors_ = *errors;
    return plan;
  }
  if (Status s = cpu::check_select_target(kOp, device, isa); !s.ok()) return s;
  return CopyPagesPlan(desc);
}

Status CopyPagesPlan::can_implement(const CopyPagesArgs& args) const {
  if (Status s = ops::check_paged_kv(desc_.cache, args.cache, device_, kOp); !s.ok()) return s;
  const std::pair<const TensorView*, const char*> arrays[] = {{&args.cache.k_pages, "k_pages"},
                                                              {&args.cache.v_pages, "v_pages"},
                                                              {&args.cache.k_scales, "k_scales"},
                                                              {&args.cache.v_scales, "v_scales"}};
  for (size_t a = 0; a < 4; ++a) {
    for (size_t b = a + 1; b < 4; ++b) {
      const TensorView& other = *arrays[b].first;
      if (overlaps(*arrays[a].first, other.data, other.num_bytes())) {
        return bad(std::string(arrays[a].second) + " overlaps " + arrays[b].second +
                   ", expected separate memory");
      }
    }
  }
  if (args.src.size() != args.dst.size()) {
    return bad("src has " + str(static_cast<int64_t>(args.src.size())) + " entries and dst " +
               str(static_cast<int64_t>(args.dst.size())) + ", expected as many");
  }
  if (!device_.is_cpu()) {  // the lists live on the GPU: the kernel checks their range
    int64_t bytes = 0;
    for (const TensorView& t : {args.cache.k_pages, args.cache.v_pages}) bytes += page_bytes(t);
    if (bytes > backend::kCudaMaxElements / 2) {
      return bad("a page holds " + str(bytes) +
                 " bytes of K and V, expected at most 2^30 - 1 on CUDA");
    }
    return Status();
  }
  const int64_t num_pages = desc_.cache.pages.num_pages;
  for (auto [list, what] : {std::pair{args.src, "src"}, std::pair{args.dst, "dst"}}) {
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i] < 0 || list[i] >= num_pages) {
        return Status::out_of_range(std::string(kOp) + ": " + what + "[" +
                                    str(static_cast<int64_t>(i)) + "] is " + str(list[i]) +
                                    ", expected in [0, " + str(num_pages) + ")");
      }
    }
  }
  return check_distinct(args.src, args.dst, num_pages);
}

Status CopyPagesPlan::run(const Stream& stream, std::span<std::byte> /*workspace*/,
                          const CopyPagesArgs& args) const {
  if (Status s = can_implement(args); !s.ok()) return s;
  const TensorView* arrays[] = {&args.cache.k_pages, &args.cache.v_pages, &args.cache.k_scales,
                                &args.cache.v_scales};
  if (!device_.is_cpu()) {
    if (stream.device != device_) {
      return bad("stream is on " + to_string(stream.device) + ", expected " + to_string(device_));
    }
    backend::CudaCopyPagesParams p;
    for (int a = 0; a < 4; ++a) {
      if (arrays[a]->data == nullptr) continue;  // scales of unquantized storage
      p.base[a] = static_cast<std::byte*>(arrays[a]->data);
      p.page_bytes[a] = page_bytes(*arrays[a]);
    }
    p.src = args.src.data();
    p.dst = args.dst.data();
    p.num_copies = static_cast<int64_t>(args.src.size());
    p.num_pages = desc_.cache.pages.num_pages;
    p.errors = errors_;
    return backend::cuda_copy_pages(p, stream);
  }
  if (Status s = cpu::check_stream(kOp, stream); !s.ok()) return s;
  cpu::CopyPagesParams p;
  for (int a = 0; a < 4; ++a) {
    if (arrays[a]->data == nullptr) continue;  // scales of unquantized storage
    p.base[a] = static_cast<std::byte*>(arrays[a]->data);
    p.page_bytes[a] = page_bytes(*arrays[a]);
  }
  p.src = args.src;
  p.dst = args.dst;
  cpu::copy_pages(p, stream.pool);
  return Status();
}

const char* CopyPagesPlan::sku() const { return device_.is_cpu() ? "cpu.portable" : "cuda.sm90"; }

Precision CopyPagesPlan::precision() const {
  return Precision{true, 0.0, 0.0, "bit-exact: pages are copied"};
}

}  // namespace kvcache
