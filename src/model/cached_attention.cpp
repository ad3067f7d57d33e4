// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "model/cached_attention.h"

#include <cstddef>
#include <span>

#include "kvcache/attention.h"

namespace kvcache::model {

Result<std::vector<float>> cached_attention(const LayerConfig& layer, const std::vector<float>& q,
                                            int64_t n, const CacheViews& views) {
  const AttentionConfig& c = layer.attention;
  const int64_t rows = views.keys.dim(2);
  AttentionDesc desc;
  desc.num_q_heads = c.num_q_heads;
  desc.kv = {c.num_kv_heads, c.head_dim, c.head_dim, views.keys.dtype, views.values.dtype};
  desc.q_dtype = desc.o_dtype = DType::f32;
  if (layer.kind == LayerKind::sliding_window) {
    desc.window = c.window - c.keep;
    desc.sink_tokens = c.keep;
  }
  desc.max_batch = 1;
  desc.max_seq_len = rows;
  desc.max_q_tokens = n;
  Result<ExtendAttentionPlan> plan = ExtendAttentionPlan::select(desc);
  if (!plan.ok()) return plan.status();

  std::vector<float> o(q.size());
  const int32_t q_indptr[] = {0, static_cast<int32_t>(n)};
  const int32_t seq_lens[] = {static_cast<int32_t>(rows)};
  AttentionArgs args;
  // The op only reads q.
  args.q = TensorView::contiguous(const_cast<float*>(q.data()), DType::f32,
                                  {n, c.num_q_heads, c.head_dim});
  args.o = TensorView::contiguous(o.data(), DType::f32, {n, c.num_q_heads, c.head_dim});
  args.q_indptr = q_indptr;
  args.seq_lens = seq_lens;
  args.contiguous.k = views.keys;
  args.contiguous.v = views.values;
  std::vector<std::byte> workspace(plan->workspace_size());
  if (Status s = plan->run(Stream{}, workspace, args); !s.ok()) return s;
  return o;
}

}  // namespace kvcache::model
