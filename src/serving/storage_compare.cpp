// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "serving/storage_compare.h"

#include <algorithm>

namespace kvcache::serving {

Result<std::vector<StorageError>> compare_storage(const EngineOptions& base,
                                                  std::span<const DType> kv_dtypes) {
  std::vector<StorageError> out;
  for (const DType dtype : kv_dtypes) {
    EngineOptions o = base;
    o.workload.num_conversations = std::min(o.workload.num_conversations, kCompareConversations);
    o.workload.num_turns = std::min(o.workload.num_turns, kCompareTurns);
    // Room for every conversation and a fork of each, so nothing is evicted or preempted: the
    // rerun is quick, and its error is the storage's alone.
    Result<Workload> w = make_workload(o.workload);
    if (!w.ok()) return w.status();
    int64_t needed = o.watermark_pages;
    for (const int64_t len : w->final_lengths()) needed += 2 * (len / o.page_size + 2);
    o.num_pages = std::max(o.num_pages, needed);
    o.kv_dtype = dtype;
    o.verify = VerifyMode::all;
    o.flip_k_page_at_step = -1;
    o.on_progress = nullptr;
    Result<EngineReport> r = run_engine(o);
    if (!r.ok()) return r.status();
    out.push_back({dtype, r->max_error, r->tolerance, r->checks, r->mismatches});
  }
  return out;
}

}  // namespace kvcache::serving
