// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "bench/ops_bench.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "kvcache/attention.h"
#include "kvcache/buffer.h"
#include "kvcache/copy_pages.h"
#include "kvcache/kv_append.h"
#include "kvcache/paged_append.h"
#include "kvcache/qkv_rope_write.h"
#include "kvcache/rope_shift.h"
#include "kvcache/thread_pool.h"

#include "bench/bandwidth.h"
#include "bench/cuda_ops_bench.h"

namespace kvcache::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Llama-3-8B attention heads.
constexpr int64_t kQHeads = 32;
constexpr int64_t kKVHeads = 8;
constexpr int64_t kHeadDim = 128;
constexpr int64_t kPageSize = 16;

enum class Bound { read, copy };

// One row: what to call and how many bytes one call moves (inputs read once, outputs written once).
struct Case {
  std::string op, shape, dtype, sku;
  double bytes = 0;
  Bound bound = Bound::read;
  std::function<Status()> call;
};

// Owned host arrays that a case's views point into.
class Arena {
 public:
  // bytes of valid, non-zero values of dtype (a random 1 MiB pattern, tiled: filling GiBs with
  // fresh random numbers would dominate the run).
  void* make(DType dtype, int64_t elements) {
    const size_t bytes = static_cast<size_t>(elements) * size_of(dtype);
    Result<Buffer> b = Buffer::allocate(Device::cpu(), std::max<size_t>(bytes, 64));
    if (!b.ok()) return nullptr;
    advise_huge_pages(b->data(), bytes);
    const std::vector<std::byte>& pattern = pattern_of(dtype);
    auto* out = static_cast<std::byte*>(b->data());
    for (size_t at = 0; at < bytes; at += pattern.size()) {
      std::memcpy(out + at, pattern.data(), std::min(pattern.size(), bytes - at));
    }
    buffers_.push_back(std::move(*b));
    return buffers_.back().data();
  }
  TensorView tensor(DType dtype, std::initializer_list<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return TensorView::contiguous(make(dtype, n), dtype, shape);
  }

 private:
  const std::vector<std::byte>& pattern_of(DType dtype) {
    auto& p = patterns_[static_cast<size_t>(dtype)];
    if (!p.empty()) return p;
    constexpr size_t kCount = size_t{1} << 18;
    std::mt19937 rng(static_cast<uint32_t>(dtype) + 7);
    std::uniform_real_distribution<float> value(-1.0f, 1.0f);
    std::vector<float> f(kCount);
    for (float& x : f) x = value(rng);
    if (dtype == DType::int8 || dtype == DType::fp8_e4m3) {
      for (float& x : f) x *= 100.0f;  // a spread of stored values, saturating at the ends
    }
    p.resize(kCount * size_of(dtype));
    if (dtype == DType::int8) {
      for (size_t i = 0; i < kCount; ++i) p[i] = static_cast<std::byte>(float_to_int8(f[i]));
    } else {
      from_float(f.data(), dtype, p.data(), kCount, Saturation::finite);
    }
    return p;
  }

  std::vector<Buffer> buffers_;
  std::vector<std::byte> patterns_[8];
};

// A shuffled page table: sequence b owns pages_per_seq pages scattered over the pool.
struct Table {
  std::vector<int32_t> indptr, indices;
};
Table shuffled_table(int64_t batch, int64_t pages_per_seq, uint32_t seed) {
  Table t;
  t.indices.resize(static_cast<size_t>(batch * pages_per_seq));
  std::iota(t.indices.begin(), t.indices.end(), 0);
  std::shuffle(t.indices.begin(), t.indices.end(), std::mt19937(seed));
  for (int64_t b = 0; b <= batch; ++b) t.indptr.push_back(static_cast<int32_t>(b * pages_per_seq));
  return t;
}

TensorView scales_or_empty(Arena& arena, DType dtype, std::initializer_list<int64_t> shape) {
  if (!is_quantized(dtype)) return TensorView{};
  TensorView t = arena.tensor(DType::f32, shape);
  auto* s = t.data_as<float>();
  for (int64_t i = 0; i < t.numel(); ++i) s[i] = 0.01f + 0.001f * static_cast<float>(i % 7);
  return t;
}

// --- attention ---

Result<Case> attention_case(Stream stream, int64_t batch, int64_t context, DType kv_dtype,
                            std::optional<PageLayout> layout, int64_t new_tokens) {
  const bool paged = layout.has_value();
  const bool nhd = layout == PageLayout::nhd;
  auto arena = std::make_shared<Arena>();
  AttentionDesc d;
  d.num_q_heads = kQHeads;
  d.kv = {kKVHeads, kHeadDim, kHeadDim, kv_dtype, kv_dtype};
  d.q_dtype = d.o_dtype = DType::bf16;
  d.max_batch = batch;
  d.max_seq_len = context;
  d.max_q_tokens = batch * new_tokens;
  const int64_t pages_per_seq = (context + kPageSize - 1) / kPageSize;
  if (paged) d.pages = PageFormat{batch * pages_per_seq, kPageSize, *layout};
  const bool extend = new_tokens > 1;

  auto args = std::make_shared<AttentionArgs>();
  const int64_t rows = batch * new_tokens;
  args->q = arena->tensor(DType::bf16, {rows, kQHeads, kHeadDim});
  args->o = arena->tensor(DType::bf16, {rows, kQHeads, kHeadDim});
  auto seq_lens = std::make_shared<std::vector<int32_t>>(static_cast<size_t>(batch),
                                                         static_cast<int32_t>(context));
  auto q_indptr = std::make_shared<std::vector<int32_t>>();
  for (int64_t b = 0; b <= batch; ++b) q_indptr->push_back(static_cast<int32_t>(b * new_tokens));
  auto table = std::make_shared<Table>(shuffled_table(batch, pages_per_seq, 11));
  args->seq_lens = *seq_lens;
  if (extend) args->q_indptr = *q_indptr;
  if (paged) {
    const int64_t n = d.pages->num_pages;
    const int64_t a = nhd ? kPageSize : kKVHeads, b = nhd ? kKVHeads : kPageSize;
    args->paged.k_pages = arena->tensor(kv_dtype, {n, a, b, kHeadDim});
    args->paged.v_pages = arena->tensor(kv_dtype, {n, a, b, kHeadDim});
    args->paged.k_scales = scales_or_empty(*arena, kv_dtype, {n, a, b});
    args->paged.v_scales = scales_or_empty(*arena, kv_dtype, {n, a, b});
    args->page_table = {table->indptr, table->indices};
  } else {
    args->contiguous.k = arena->tensor(kv_dtype, {batch, kKVHeads, context, kHeadDim});
    args->contiguous.v = arena->tensor(kv_dtype, {batch, kKVHeads, context, kHeadDim});
    args->contiguous.k_scales = scales_or_empty(*arena, kv_dtype, {batch, kKVHeads, context});
    args->contiguous.v_scales = scales_or_empty(*arena, kv_dtype, {batch, kKVHeads, context});
  }
  if (args->q.data == nullptr || args->o.data == nullptr) {
    return Status::resource_exhausted("bench ops: out of memory for attention buffers");
  }

  Case c;
  c.op = extend ? "extend_attention" : "decode_attention";
  c.shape = (extend ? "b" + std::to_string(batch) + " q" + std::to_string(new_tokens) + " ctx"
                    : "b" + std::to_string(batch) + " ctx") +
            std::to_string(context) +
            (paged ? (nhd ? " paged16 nhd" : " paged16 hnd") : " contiguous");
  c.dtype = std::string("kv ") + name(kv_dtype);
  const double kv_elems = static_cast<double>(batch * context * kKVHeads * kHeadDim);
  const double scale_bytes =
      is_quantized(kv_dtype) ? 2.0 * static_cast<double>(batch * context * kKVHeads) * 4 : 0.0;
  c.bytes = 2.0 * kv_elems * static_cast<double>(size_of(kv_dtype)) + scale_bytes +
            2.0 * static_cast<double>(rows * kQHeads * kHeadDim) * 2.0;
  c.bound = Bound::read;
  auto make_call = [&](auto plan) -> Result<Case> {
    c.sku = plan.sku();
    auto workspace = std::make_shared<std::vector<std::byte>>(plan.workspace_size());
    c.call = [plan, stream, workspace, args, arena, seq_lens, q_indptr, table]() {
      return plan.run(stream, *workspace, *args);
    };
    return c;
  };
  if (extend) {
    Result<ExtendAttentionPlan> plan = ExtendAttentionPlan::select(d);
    if (!plan.ok()) return plan.status();
    return make_call(*plan);
  }
  Result<DecodeAttentionPlan> plan = DecodeAttentionPlan::select(d);
  if (!plan.ok()) return plan.status();
  return make_call(*plan);
}

// --- writes: the append ops, the fused write, copies, the context shift ---

Result<Case> kv_append_case(Stream stream, int64_t tokens, DType dtype) {
  auto arena = std::make_shared<Arena>();
  KVAppendDesc d{1, kKVHeads, kHeadDim, kHeadDim, 2 * tokens, tokens, dtype};
  Result<KVAppendPlan> plan = KVAppendPlan::select(d);
  if (!plan.ok()) return plan.status();
  auto args = std::make_shared<KVAppendArgs>();
  auto offsets = std::make_shared<std::vector<int32_t>>(1, static_cast<int32_t>(tokens / 2));
  args->k_cache = arena->tensor(dtype, {1, kKVHeads, 2 * tokens, kHeadDim});
  args->v_cache = arena->tensor(dtype, {1, kKVHeads, 2 * tokens, kHeadDim});
  args->k_new = arena->tensor(dtype, {1, kKVHeads, tokens, kHeadDim});
  args->v_new = arena->tensor(dtype, {1, kKVHeads, tokens, kHeadDim});
  args->offsets = *offsets;
  Case c{"kv_append",
         "b1 " + std::to_string(tokens) + " tokens",
         name(dtype),
         plan->sku(),
         4.0 * static_cast<double>(tokens * kKVHeads * kHeadDim * size_of(dtype)),
         Bound::copy,
         {}};
  c.call = [p = *plan, stream, args, arena, offsets]() { return p.run(stream, {}, *args); };
  return c;
}

// Token slots of `tokens` new tokens spread over shuffled pages of a pool twice that size.
std::shared_ptr<std::vector<int64_t>> shuffled_slots(int64_t tokens, int64_t num_pages) {
  auto slots = std::make_shared<std::vector<int64_t>>();
  Table t = shuffled_table(1, num_pages, 5);
  for (int64_t i = 0; i < tokens; ++i) {
    slots->push_back(int64_t{t.indices[static_cast<size_t>(i / kPageSize)]} * kPageSize +
                     i % kPageSize);
  }
  return slots;
}

PagedKV make_pools(Arena& arena, const PagedKVDesc& d) {
  const int64_t n = d.pages.num_pages;
  PagedKV kv;
  kv.k_pages = arena.tensor(d.kv.k_dtype, {n, kPageSize, kKVHeads, kHeadDim});
  kv.v_pages = arena.tensor(d.kv.v_dtype, {n, kPageSize, kKVHeads, kHeadDim});
  kv.k_scales = scales_or_empty(arena, d.kv.k_dtype, {n, kPageSize, kKVHeads});
  kv.v_scales = scales_or_empty(arena, d.kv.v_dtype, {n, kPageSize, kKVHeads});
  return kv;
}

// Bytes of one token's K/V in storage (scales included).
double stored_token_bytes(DType storage) {
  return 2.0 * static_cast<double>(kKVHeads) *
         (static_cast<double>(kHeadDim * size_of(storage)) + (is_quantized(storage) ? 4.0 : 0.0));
}

Result<Case> paged_append_case(Stream stream, int64_t tokens, DType storage) {
  auto arena = std::make_shared<Arena>();
  PagedAppendDesc d;
  d.cache.kv = {kKVHeads, kHeadDim, kHeadDim, storage, storage};
  d.cache.pages = {2 * tokens / kPageSize, kPageSize, PageLayout::nhd};
  d.input_dtype = DType::bf16;
  Result<PagedAppendPlan> plan = PagedAppendPlan::select(d);
  if (!plan.ok()) return plan.status();
  auto slots = shuffled_slots(tokens, d.cache.pages.num_pages);
  auto args = std::make_shared<PagedAppendArgs>();
  args->k = arena->tensor(DType::bf16, {tokens, kKVHeads, kHeadDim});
  args->v = arena->tensor(DType::bf16, {tokens, kKVHeads, kHeadDim});
  args->slots.slot_mapping = *slots;
  args->cache = make_pools(*arena, d.cache);
  Case c{"paged_append",
         std::to_string(tokens) + " tokens nhd16",
         std::string("bf16 -> ") + name(storage),
         plan->sku(),
         static_cast<double>(tokens) *
             (2.0 * static_cast<double>(kKVHeads * kHeadDim) * 2.0 + stored_token_bytes(storage)),
         Bound::copy,
         {}};
  c.call = [p = *plan, stream, args, arena, slots]() { return p.run(stream, {}, *args); };
  return c;
}

Result<Case> qkv_rope_write_case(Stream stream, int64_t tokens, DType storage) {
  auto arena = std::make_shared<Arena>();
  QkvRopeWriteDesc d;
  d.num_q_heads = kQHeads;
  d.cache.kv = {kKVHeads, kHeadDim, kHeadDim, storage, storage};
  d.cache.pages = {2 * tokens / kPageSize, kPageSize, PageLayout::nhd};
  d.qkv_dtype = d.q_dtype = DType::bf16;
  d.qk_norm = true;
  d.rope.base = 500000.0;
  d.rope.max_position = 2 * tokens;
  Result<QkvRopeWritePlan> plan = QkvRopeWritePlan::select(d);
  if (!plan.ok()) return plan.status();
  auto slots = shuffled_slots(tokens, d.cache.pages.num_pages);
  auto positions = std::make_shared<std::vector<int32_t>>(static_cast<size_t>(tokens));
  std::iota(positions->begin(), positions->end(), 0);
  const int64_t width = (kQHeads + 2 * kKVHeads) * kHeadDim;
  auto args = std::make_shared<QkvRopeWriteArgs>();
  args->qkv = arena->tensor(DType::bf16, {tokens, width});
  args->positions = *positions;
  args->q_norm_weight = arena->tensor(DType::f32, {kHeadDim});
  args->k_norm_weight = arena->tensor(DType::f32, {kHeadDim});
  args->q_out = arena->tensor(DType::bf16, {tokens, kQHeads, kHeadDim});
  args->slots.slot_mapping = *slots;
  args->kv = make_pools(*arena, d.cache);
  const double qkv_bytes = static_cast<double>(tokens * width) * 2.0;
  const double q_bytes = static_cast<double>(tokens * kQHeads * kHeadDim) * 2.0;
  Case c{"qkv_rope_write",
         std::to_string(tokens) + " tokens 32q/8kv qk-norm nhd16",
         std::string("bf16 -> ") + name(storage),
         plan->sku(),
         qkv_bytes + q_bytes + static_cast<double>(tokens) * stored_token_bytes(storage),
         Bound::copy,
         {}};
  c.call = [p = *plan, stream, args, arena, slots, positions]() {
    return p.run(stream, {}, *args);
  };
  return c;
}

Result<Case> copy_pages_case(Stream stream, int64_t copies, DType storage) {
  auto arena = std::make_shared<Arena>();
  CopyPagesDesc d;
  d.cache.kv = {kKVHeads, kHeadDim, kHeadDim, storage, storage};
  d.cache.pages = {2 * copies, kPageSize, PageLayout::nhd};
  Result<CopyPagesPlan> plan = CopyPagesPlan::select(d);
  if (!plan.ok()) return plan.status();
  Table t = shuffled_table(1, 2 * copies, 3);
  auto src = std::make_shared<std::vector<int32_t>>(t.indices.begin(), t.indices.begin() + copies);
  auto dst = std::make_shared<std::vector<int32_t>>(t.indices.begin() + copies, t.indices.end());
  auto args = std::make_shared<CopyPagesArgs>();
  args->cache = make_pools(*arena, d.cache);
  args->src = *src;
  args->dst = *dst;
  Case c{"copy_pages",
         std::to_string(copies) + " pages of 16",
         name(storage),
         plan->sku(),
         2.0 * static_cast<double>(copies * kPageSize) * stored_token_bytes(storage),
         Bound::copy,
         {}};
  c.call = [p = *plan, stream, args, arena, src, dst]() { return p.run(stream, {}, *args); };
  return c;
}

Result<Case> rope_shift_case(Stream stream, int64_t tokens, DType dtype) {
  auto arena = std::make_shared<Arena>();
  RopeShiftDesc d;
  d.kv = {kKVHeads, kHeadDim, kHeadDim, dtype, dtype};
  d.rope.base = 500000.0;
  d.rope.max_position = 2 * tokens;
  Result<RopeShiftPlan> plan = RopeShiftPlan::select(d);
  if (!plan.ok()) return plan.status();
  auto spans = std::make_shared<std::vector<int32_t>>(
      std::vector<int32_t>{0, static_cast<int32_t>(tokens), 7, static_cast<int32_t>(tokens)});
  auto args = std::make_shared<RopeShiftArgs>();
  args->p0 = std::span<const int32_t>(spans->data(), 1);
  args->p1 = std::span<const int32_t>(spans->data() + 1, 1);
  args->delta = std::span<const int32_t>(spans->data() + 2, 1);
  args->seq_lens = std::span<const int32_t>(spans->data() + 3, 1);
  args->caches.k = arena->tensor(dtype, {1, kKVHeads, tokens, kHeadDim});
  args->caches.v = arena->tensor(dtype, {1, kKVHeads, tokens, kHeadDim});
  args->caches.k_scales = scales_or_empty(*arena, dtype, {1, kKVHeads, tokens});
  args->caches.v_scales = scales_or_empty(*arena, dtype, {1, kKVHeads, tokens});
  Case c{"rope_shift",
         std::to_string(tokens) + " tokens contiguous",
         std::string("k ") + name(dtype),
         plan->sku(),
         2.0 * static_cast<double>(tokens) * stored_token_bytes(dtype) / 2.0,
         Bound::copy,
         {}};
  c.call = [p = *plan, stream, args, arena, spans]() { return p.run(stream, {}, *args); };
  return c;
}

struct Timing {
  double us = 0;     // median microseconds per call
  double bound = 0;  // median bound of the passes before each call, GB/s
};

// `repeats` calls after two warm-up calls, each call right after one pass of the case's bound
// over the probe's buffer (which also evicts the caches, as a decode step finds them).
Result<Timing> time_case(const Case& c, int64_t repeats, BandwidthProbe& probe) {
  std::vector<double> us, bounds;
  for (int64_t i = 0; i < repeats + 2; ++i) {
    const double bound = c.bound == Bound::read ? probe.read_gbps() : probe.copy_gbps();
    const auto t0 = Clock::now();
    if (Status s = c.call(); !s.ok()) return s;
    if (i < 2) continue;
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    bounds.push_back(bound);
  }
  return Timing{median(us), median(bounds)};
}

}  // namespace

bool case_selected(const OpsBenchOptions& options, const std::string& op, const std::string& shape,
                   const std::string& dtype) {
  const std::string& f = options.filter;
  return f.empty() || op.find(f) != std::string::npos || shape.find(f) != std::string::npos ||
         dtype.find(f) != std::string::npos;
}

Result<Report> run_ops_bench(const OpsBenchOptions& options) {
  if (options.repeats < 1 || options.threads < 0) {
    return Status::invalid_argument(
        "bench ops: repeats < 1 or threads < 0, expected >= 1 and >= 0");
  }
  if (!options.device.is_cpu()) return run_cuda_ops_bench(options);
  const int threads = options.threads > 0
                          ? options.threads
                          : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  ThreadPool pool(threads);
  const Stream stream{Device::cpu(), &pool, nullptr};

  BandwidthOptions bw_options;
  if (options.quick) bw_options.bytes = int64_t{16} << 20;
  Result<BandwidthProbe> probe = BandwidthProbe::create(pool, bw_options);
  if (!probe.ok()) return probe.status();

  std::vector<std::function<Result<Case>()>> cases;
  const std::vector<int64_t> contexts =
      options.quick ? std::vector<int64_t>{512} : std::vector<int64_t>{512, 4096, 32768};
  for (int64_t batch : {1, 8}) {
    for (int64_t context : contexts) {
      for (DType dtype : {DType::bf16, DType::f16, DType::int8, DType::fp8_e4m3}) {
        for (std::optional<PageLayout> layout :
             {std::optional<PageLayout>(), std::optional(PageLayout::nhd),
              std::optional(PageLayout::hnd)}) {
          cases.push_back([=] { return attention_case(stream, batch, context, dtype, layout, 1); });
        }
      }
    }
  }
  const int64_t chunk = options.quick ? 256 : 4096;
  for (DType dtype : {DType::bf16, DType::int8}) {
    cases.push_back(
        [=] { return attention_case(stream, 1, chunk, dtype, PageLayout::nhd, chunk / 8); });
  }
  for (DType dtype : {DType::bf16, DType::f32}) {
    cases.push_back([=] { return kv_append_case(stream, chunk, dtype); });
  }
  for (DType dtype : {DType::bf16, DType::int8, DType::fp8_e4m3}) {
    cases.push_back([=] { return paged_append_case(stream, chunk, dtype); });
  }
  for (DType dtype : {DType::bf16, DType::int8, DType::fp8_e4m3}) {
    cases.push_back([=] { return qkv_rope_write_case(stream, chunk, dtype); });
  }
  for (DType dtype : {DType::bf16, DType::int8}) {
    cases.push_back([=] { return copy_pages_case(stream, chunk / kPageSize, dtype); });
    cases.push_back([=] { return rope_shift_case(stream, chunk, dtype); });
  }

  Report report({"op", "shape", "dtype", "sku", "timing", "median_us", "gbps", "bound_gbps",
                 "bound_kind", "fraction"});
  for (const auto& make : cases) {
    Result<Case> c = make();
    if (!c.ok()) return c.status();
    if (!case_selected(options, c->op, c->shape, c->dtype)) continue;
    Result<Timing> t = time_case(*c, options.repeats, *probe);
    if (!t.ok()) return t.status();
    const double us = t->us, bound = t->bound;
    const double gbps = c->bytes / (us * 1e-6) * 1e-9;
    report.add_row({c->op, c->shape, c->dtype, c->sku, std::string("wall"), us, gbps, bound,
                    std::string(c->bound == Bound::read ? "read" : "copy"), gbps / bound});
  }
  return report;
}

}  // namespace kvcache::bench
