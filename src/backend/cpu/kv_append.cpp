// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// kv_append on the CPU: row copies. The work splits into (sample, head, token block) items so that
// a batch of one with few heads still spreads over the pool.

#include <algorithm>
#include <cstring>

#include "backend/cpu/append_kernels.h"

namespace kvcache::cpu {
namespace {

constexpr int64_t kTokenBlock = 256;  // tokens per work item: ~64 KiB of bf16 rows at head_dim 128

// Tokens [l0, l1) of sample b, head h, written at cache position offset + l.
void copy_rows(const AppendSide& s, int64_t b, int64_t h, int64_t heads, int64_t max_new,
               int64_t offset, int64_t l0, int64_t l1) {
  const std::byte* from = s.src + ((b * heads + h) * max_new + l0) * s.row_bytes;
  std::byte* to =
      s.cache + b * s.sample_stride + h * s.head_stride + (offset + l0) * s.token_stride;
  if (s.token_stride == s.row_bytes) {  // rows adjacent in the cache: one block
    std::memcpy(to, from, static_cast<size_t>((l1 - l0) * s.row_bytes));
    return;
  }
  for (int64_t l = l0; l < l1; ++l) {
    std::memcpy(to, from, static_cast<size_t>(s.row_bytes));
    from += s.row_bytes;
    to += s.token_stride;
  }
}

}  // namespace

void kv_append(const KVAppendParams& p, ThreadPool* pool) {
  const int64_t blocks = (p.max_new_tokens + kTokenBlock - 1) / kTokenBlock;
  const int64_t items = p.batch * p.num_kv_heads * blocks;
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item % blocks;
      const int64_t h = item / blocks % p.num_kv_heads;
      const int64_t b = item / blocks / p.num_kv_heads;
      const int64_t len =
          p.new_lens.empty() ? p.max_new_tokens : p.new_lens[static_cast<size_t>(b)];
      const int64_t l0 = block * kTokenBlock;
      const int64_t l1 = std::min(len, l0 + kTokenBlock);
      if (l0 >= l1) continue;
      const int64_t offset = p.offsets[static_cast<size_t>(b)];
      copy_rows(p.k, b, h, p.num_kv_heads, p.max_new_tokens, offset, l0, l1);
      copy_rows(p.v, b, h, p.num_kv_heads, p.max_new_tokens, offset, l0, l1);
    }
  };
  if (pool != nullptr && items > 1) {
    pool->parallel_for(items, work);
  } else {
    work(0, items);
  }
}

}  // namespace kvcache::cpu
