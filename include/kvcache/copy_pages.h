// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// copy_pages: page-to-page copies inside one paged cache, for copy-on-write (BlockManager's
// PageCopy list: pass each entry's src and dst) and compaction. For every i, all page_size slots
// of page src[i] (K, V and, for quantized storage, their scales) are copied to page dst[i],
// bit-exact. The copies are independent, so a dst may not be listed twice nor also be a src in the
// same call (split such a list into calls, in order). Nothing outside the dst pages changes.
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
  // invalid_argument: desc malformed (see check_paged_kv_desc); unavailable: Device::cuda (the
  // CUDA backend is issue 5) or a forced isa this CPU lacks. Every isa runs the same page copies
  // (memcpy, vectorized by the C library), so sku() is "cpu.portable" for all of them.
  static Result<CopyPagesPlan> select(const CopyPagesDesc& desc, Device device = Device::cpu(),
                                      CpuIsa isa = CpuIsa::best);
  // Every check of run(); writes nothing. invalid_argument: pools vs descriptor (dtypes, layout,
  // shapes, scales, contiguity, device), pools overlapping each other, src and dst of different
  // lengths, a dst listed twice or also a src; out_of_range: a page outside [0, num_pages).
  // Time O(num_copies + num_pages / 32768 * num_copies); no allocation.
  [[nodiscard]] Status can_implement(const CopyPagesArgs& args) const;
  [[nodiscard]] size_t workspace_size() const { return 0; }
  // can_implement, the workspace size and stream.device, then the copies, spread over stream.pool
  // by copies when set. A refused call writes nothing. Allocates nothing.
  Status run(const Stream& stream, std::span<std::byte> workspace, const CopyPagesArgs& args) const;
  [[nodiscard]] const char* sku() const { return "cpu.portable"; }
  // Bit-exact against reference::copy_pages.
  [[nodiscard]] Precision precision() const;
  [[nodiscard]] const CopyPagesDesc& desc() const { return desc_; }

 private:
  explicit CopyPagesPlan(const CopyPagesDesc& desc) : desc_(desc) {}

  CopyPagesDesc desc_;
};

}  // namespace kvcache
