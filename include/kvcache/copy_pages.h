// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// copy_pages: page-to-page copies inside one paged cache, for copy-on-write (BlockManager's
// PageCopy list: pass each entry's src and dst) and compaction. For every i, all page_size slots
// of page src[i] (K, V and, for quantized storage, their scales) are copied to page dst[i],
// bit-exact. The copies are independent, so a dst may not be listed twice nor also be a src in the
// same call (split such a list into calls, in order). Nothing outside the dst pages changes.
// On CUDA (a plan selected for Device::cuda(i): pools and lists on that GPU) src and dst live in
// device memory: the kernel checks each page is in range (a copy with a bad one is skipped and
// counted in the GPU's error record, which check_device_errors() in device.h turns into
// out_of_range naming the entry), but the distinctness of the lists is the caller's duty there
// (REQUIRES, not checked: a repeated dst or a dst that is also a src gives unspecified pages).
// Plans are values: intentionally copyable; const methods are thread-safe; run() on one stream at a
// time (the pool is the stream's). The plan owns nothing; the views and spans are the caller's.

#include <cstddef>
#include <cstdint>
#include <span>

#include "kvcache/device.h"
#include "kvcache/export.h"
#include "kvcache/op_plan.h"
#include "kvcache/paged_kv.h"
#include "kvcache/status.h"

namespace kvcache {

struct CopyPagesDesc {
  PagedKVDesc cache;  // heads, dims, storage dtypes, pages and layout of the pools
};

struct CopyPagesArgs {
  PagedKV cache;                 // the pools (and scales for quantized storage)
  std::span<const int32_t> src;  // [num_copies], pages to read, each in [0, num_pages)
  std::span<const int32_t> dst;  // [num_copies], pages to write, distinct and none also a src
};

class KVCACHE_API CopyPagesPlan {
 public:
  // Intentionally copyable.
  // invalid_argument: desc malformed (see check_paged_kv_desc); unavailable: a forced isa this
  // CPU lacks, or Device::cuda(i) in a build without CUDA or for a GPU that does not exist. On
  // CUDA, select() fetches the GPU's error record (allocated once per GPU) and ignores isa. Every
  // CPU isa runs the same page copies (memcpy, vectorized by the C library).
  static Result<CopyPagesPlan> select(const CopyPagesDesc& desc, Device device = Device::cpu(),
                                      CpuIsa isa = CpuIsa::best);
  // Every check of run() that reads no device memory; writes nothing. invalid_argument: pools vs
  // descriptor (dtypes, layout, shapes, scales, contiguity, device: the plan's), pools overlapping
  // each other, src and dst of different lengths; on the CPU also a dst listed twice or also a
  // src, and out_of_range: a page outside [0, num_pages) (on CUDA the kernel checks the range,
  // see the header). Time O(num_copies + num_pages / 32768 * num_copies); no allocation.
  [[nodiscard]] Status can_implement(const CopyPagesArgs& args) const;
  [[nodiscard]] size_t workspace_size() const { return 0; }
  // can_implement, the workspace size and stream.device (the plan's device, else
  // invalid_argument), then the copies: on the CPU spread over stream.pool by copies when set; on
  // CUDA one kernel on stream.cuda_stream (16-byte units), no synchronization, graph-capturable
  // (internal when the launch fails). A refused call writes nothing. Allocates nothing.
  Status run(const Stream& stream, std::span<std::byte> workspace, const CopyPagesArgs& args) const;
  // "cpu.portable" or "cuda.sm90".
  [[nodiscard]] const char* sku() const;
  // Bit-exact against reference::copy_pages (both devices).
  [[nodiscard]] Precision precision() const;
  [[nodiscard]] const CopyPagesDesc& desc() const { return desc_; }

 private:
  explicit CopyPagesPlan(const CopyPagesDesc& desc) : desc_(desc) {}

  CopyPagesDesc desc_;
  Device device_ = Device::cpu();
  void* errors_ = nullptr;  // the GPU's error record (CUDA plans)
};

}  // namespace kvcache
