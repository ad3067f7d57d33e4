// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The write cases of `kvcache bench ops --device cuda` (issue 5): Llama-3-8B heads (32 q / 8 kv,
// head_dim 128), pages of 16 (NHD). paged_append and qkv_rope_write write one token for each of
// 1 / 16 / 64 / 256 sequences (the decode step, whose target is per-call latency in a graph) and a
// 4096-token chunk (bandwidth), into bf16, int8 and fp8 pools; kv_append appends a bf16 chunk;
// copy_pages copies 256 pages; rope_shift re-rotates the K of a 4096-token sequence in place. Bytes
// counted: inputs read once + outputs written once (scales included; index arrays and RoPE tables
// left out), against the copy bound.
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvcache/copy_pages.h"
#include "kvcache/kv_append.h"
#include "kvcache/paged_append.h"
#include "kvcache/qkv_rope_write.h"
#include "kvcache/rope_shift.h"

#include "bench/cuda_arena.h"
#include "bench/cuda_cases.h"

namespace kvcache::bench {
namespace {

// The pools of a paged cache (NHD) with random contents, scales for quantized storage.
Result<PagedKV> random_pools(DeviceArena& arena, DType storage, int64_t num_pages) {
  PagedKV kv;
  for (TensorView* t : {&kv.k_pages, &kv.v_pages}) {
    Result<TensorView> r = arena.random(storage, {num_pages, kPageSize, kKVHeads, kHeadDim});
    if (!r.ok()) return r.status();
    *t = *r;
  }
  if (!is_quantized(storage)) return kv;
  for (TensorView* t : {&kv.k_scales, &kv.v_scales}) {
    Result<TensorView> r =
        arena.random(DType::f32, {num_pages, kPageSize, kKVHeads}, 0.002f, 0.01f);
    if (!r.ok()) return r.status();
    *t = *r;
  }
  return kv;
}

// Where `tokens` new tokens go: one per sequence (decode: `seqs` sequences of pages_each shuffled
// pages, each at a random position), or a chunk of consecutive positions of one sequence.
struct Placement {
  int64_t num_pages = 0;
  std::vector<int64_t> slot_mapping;
  std::vector<int32_t> batch_indices, positions, indptr, indices;
};

Placement decode_placement(int64_t seqs, int64_t pages_each) {
  Placement p;
  p.num_pages = seqs * pages_each;
  p.indices.resize(static_cast<size_t>(p.num_pages));
  std::iota(p.indices.begin(), p.indices.end(), 0);
  std::mt19937 rng(5);
  std::shuffle(p.indices.begin(), p.indices.end(), rng);
  p.indptr.push_back(0);
  for (int64_t b = 0; b < seqs; ++b) {
    p.indptr.push_back(static_cast<int32_t>((b + 1) * pages_each));
    const auto pos = static_cast<int32_t>(rng() % static_cast<uint32_t>(pages_each * kPageSize));
    p.batch_indices.push_back(static_cast<int32_t>(b));
    p.positions.push_back(pos);
    p.slot_mapping.push_back(
        int64_t{p.indices[static_cast<size_t>(b * pages_each + pos / kPageSize)]} * kPageSize +
        pos % kPageSize);
  }
  return p;
}

Placement chunk_placement(int64_t tokens) {
  const int64_t pages = tokens / kPageSize;
  Placement p = decode_placement(1, 2 * pages);  // a pool twice the chunk
  p.indptr = {0, static_cast<int32_t>(pages)};
  p.batch_indices.assign(static_cast<size_t>(tokens), 0);
  p.positions.resize(static_cast<size_t>(tokens));
  std::iota(p.positions.begin(), p.positions.end(), 0);
  p.slot_mapping.clear();
  for (int64_t i = 0; i < tokens; ++i) {
    p.slot_mapping.push_back(int64_t{p.indices[static_cast<size_t>(i / kPageSize)]} * kPageSize +
                             i % kPageSize);
  }
  return p;
}

// Device TokenSlots of a placement: the slot mapping, or batch indices + positions + table.
Result<TokenSlots> device_slots(DeviceArena& arena, const Placement& p, bool tabled) {
  TokenSlots s;
  if (!tabled) {
    Result<std::span<const int64_t>> m = arena.copy(p.slot_mapping);
    if (!m.ok()) return m.status();
    s.slot_mapping = *m;
    return s;
  }
  for (auto [to, from] :
       {std::pair{&s.batch_indices, &p.batch_indices}, std::pair{&s.positions, &p.positions},
        std::pair{&s.table.indptr, &p.indptr}, std::pair{&s.table.indices, &p.indices}}) {
    Result<std::span<const int32_t>> d = arena.copy(*from);
    if (!d.ok()) return d.status();
    *to = *d;
  }
  return s;
}

// Bytes of one token's K/V in storage (scales included).
double stored_token_bytes(DType storage) {
  return 2.0 * static_cast<double>(kKVHeads) *
         (static_cast<double>(kHeadDim * size_of(storage)) + (is_quantized(storage) ? 4.0 : 0.0));
}

std::string tokens_label(int64_t seqs, int64_t tokens) {
  std::string label = tokens == seqs ? "1 token x b" : "";  // built step by step (-Wrestrict)
  label += std::to_string(tokens == seqs ? seqs : tokens);
  if (tokens != seqs) label += " tokens";
  return label;
}

// The pools and the token slots of a paged write.
Status paged_outputs(DeviceArena& arena, DType storage, const Placement& place, bool tabled,
                     PagedKV* kv, TokenSlots* slots) {
  Result<PagedKV> pools = random_pools(arena, storage, place.num_pages);
  if (!pools.ok()) return pools.status();
  *kv = *pools;
  Result<TokenSlots> s = device_slots(arena, place, tabled);
  if (!s.ok()) return s.status();
  *slots = *s;
  return Status();
}

// The finished case, once the arena's data is in place and the plan accepts the arguments: its
// plan, its arguments and the memory they point into.
template <class Plan, class Args>
Result<CudaCase> make_case(std::string op, std::string shape, std::string dtype, double bytes,
                           const Plan& plan, const Stream& stream, const Args& args,
                           std::shared_ptr<DeviceArena> arena) {
  if (Status s = arena->ready(); !s.ok()) return s;
  if (Status s = plan.can_implement(args); !s.ok()) return s;
  CudaCase c;
  c.op = std::move(op);
  c.shape = std::move(shape);
  c.dtype = std::move(dtype);
  c.sku = plan.sku();
  c.bytes = bytes;
  c.copy_bound = true;
  c.call = [plan, stream, args] { return plan.run(stream, {}, args); };
  c.keep = std::move(arena);
  return c;
}

Result<CudaCase> kv_append_case(const CudaCaseOptions& o, int64_t batch, int64_t tokens) {
  auto arena = std::make_shared<DeviceArena>(o.stream);
  const int64_t capacity = 2 * tokens + 16;
  const KVAppendDesc desc{batch, kKVHeads, kHeadDim, 0, capacity, tokens, DType::bf16};
  Result<KVAppendPlan> plan = KVAppendPlan::select(desc, o.stream.device);
  if (!plan.ok()) return plan.status();
  KVAppendArgs args;
  for (auto [view, len] : {std::pair{&args.k_cache, capacity}, std::pair{&args.v_cache, capacity},
                           std::pair{&args.k_new, tokens}, std::pair{&args.v_new, tokens}}) {
    Result<TensorView> t = arena->random(DType::bf16, {batch, kKVHeads, len, kHeadDim});
    if (!t.ok()) return t.status();
    *view = *t;
  }
  std::vector<int32_t> offsets(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) offsets[static_cast<size_t>(b)] = static_cast<int32_t>(b % 7);
  Result<std::span<const int32_t>> d_offsets = arena->copy(offsets);
  if (!d_offsets.ok()) return d_offsets.status();
  args.offsets = *d_offsets;
  const double bytes = 4.0 * static_cast<double>(batch * tokens * kKVHeads * kHeadDim) * 2.0;
  std::string shape = "b";  // built step by step (-Wrestrict)
  shape += std::to_string(batch);
  shape += " x";
  shape += std::to_string(tokens);
  shape += " tokens head-major";
  return make_case("kv_append", shape, "bf16", bytes, *plan, o.stream, args, arena);
}

Result<CudaCase> paged_append_case(const CudaCaseOptions& o, int64_t seqs, int64_t tokens,
                                   DType storage, bool tabled) {
  auto arena = std::make_shared<DeviceArena>(o.stream);
  const Placement place = tokens == seqs ? decode_placement(seqs, 4) : chunk_placement(tokens);
  PagedAppendDesc desc;
  desc.cache.kv = {kKVHeads, kHeadDim, 0, storage, storage};
  desc.cache.pages = {place.num_pages, kPageSize, PageLayout::nhd};
  desc.input_dtype = DType::bf16;
  Result<PagedAppendPlan> plan = PagedAppendPlan::select(desc, o.stream.device);
  if (!plan.ok()) return plan.status();
  PagedAppendArgs args;
  for (TensorView* t : {&args.k, &args.v}) {
    Result<TensorView> r = arena->random(DType::bf16, {tokens, kKVHeads, kHeadDim});
    if (!r.ok()) return r.status();
    *t = *r;
  }
  if (Status s = paged_outputs(*arena, storage, place, tabled, &args.cache, &args.slots); !s.ok()) {
    return s;
  }
  const double bytes =
      static_cast<double>(tokens) *
      (2.0 * static_cast<double>(kKVHeads * kHeadDim) * 2.0 + stored_token_bytes(storage));
  return make_case("paged_append",
                   tokens_label(seqs, tokens) + (tabled ? " nhd16 table" : " nhd16 slots"),
                   std::string("bf16 -> ") + name(storage), bytes, *plan, o.stream, args, arena);
}

Result<CudaCase> qkv_rope_write_case(const CudaCaseOptions& o, int64_t seqs, int64_t tokens,
                                     DType storage, bool qk_norm) {
  auto arena = std::make_shared<DeviceArena>(o.stream);
  const Placement place = tokens == seqs ? decode_placement(seqs, 4) : chunk_placement(tokens);
  QkvRopeWriteDesc desc;
  desc.num_q_heads = kQHeads;
  desc.cache.kv = {kKVHeads, kHeadDim, 0, storage, storage};
  desc.cache.pages = {place.num_pages, kPageSize, PageLayout::nhd};
  desc.qkv_dtype = desc.q_dtype = DType::bf16;
  desc.qk_norm = qk_norm;
  desc.rope.base = 500000.0;
  desc.rope.scaling = RopeScaling::llama3;
  desc.rope.factor = 8.0;
  desc.rope.max_position = 8192;
  Result<QkvRopeWritePlan> plan = QkvRopeWritePlan::select(desc, o.stream.device);
  if (!plan.ok()) return plan.status();
  const int64_t width = (kQHeads + 2 * kKVHeads) * kHeadDim;
  QkvRopeWriteArgs args;
  Result<TensorView> qkv = arena->random(DType::bf16, {tokens, width});
  Result<TensorView> q_out = arena->random(DType::bf16, {tokens, kQHeads, kHeadDim});
  if (!qkv.ok()) return qkv.status();
  if (!q_out.ok()) return q_out.status();
  args.qkv = *qkv;
  args.q_out = *q_out;
  if (qk_norm) {
    for (TensorView* w : {&args.q_norm_weight, &args.k_norm_weight}) {
      Result<TensorView> r = arena->random(DType::f32, {kHeadDim}, 0.5f, 1.5f);
      if (!r.ok()) return r.status();
      *w = *r;
    }
  }
  Result<std::span<const int32_t>> positions = arena->copy(place.positions);
  if (!positions.ok()) return positions.status();
  args.positions = *positions;
  if (Status s = paged_outputs(*arena, storage, place, false, &args.kv, &args.slots); !s.ok()) {
    return s;
  }
  const double bytes =
      static_cast<double>(tokens) *
      (static_cast<double>(width + kQHeads * kHeadDim) * 2.0 + stored_token_bytes(storage));
  return make_case("qkv_rope_write",
                   tokens_label(seqs, tokens) + " 32q/8kv" + (qk_norm ? " qk-norm" : "") + " nhd16",
                   std::string("bf16 -> ") + name(storage), bytes, *plan, o.stream, args, arena);
}

Result<CudaCase> copy_pages_case(const CudaCaseOptions& o, int64_t copies, DType storage) {
  auto arena = std::make_shared<DeviceArena>(o.stream);
  CopyPagesDesc desc;
  desc.cache.kv = {kKVHeads, kHeadDim, 0, storage, storage};
  desc.cache.pages = {2 * copies, kPageSize, PageLayout::nhd};
  Result<CopyPagesPlan> plan = CopyPagesPlan::select(desc, o.stream.device);
  if (!plan.ok()) return plan.status();
  const Placement place = decode_placement(1, 2 * copies);  // shuffled page numbers
  const std::vector<int32_t> src(place.indices.begin(), place.indices.begin() + copies);
  const std::vector<int32_t> dst(place.indices.begin() + copies, place.indices.end());
  CopyPagesArgs args;
  Result<PagedKV> pools = random_pools(*arena, storage, 2 * copies);
  Result<std::span<const int32_t>> d_src = arena->copy(src);
  Result<std::span<const int32_t>> d_dst = arena->copy(dst);
  if (!pools.ok()) return pools.status();
  if (!d_src.ok()) return d_src.status();
  if (!d_dst.ok()) return d_dst.status();
  args.cache = *pools;
  args.src = *d_src;
  args.dst = *d_dst;
  const double bytes = 2.0 * static_cast<double>(copies * kPageSize) * stored_token_bytes(storage);
  return make_case("copy_pages", std::to_string(copies) + " pages of 16 nhd", name(storage), bytes,
                   *plan, o.stream, args, arena);
}

// The context shift of one sequence: K of all its `tokens` positions rotated by -1 in place (each
// call shifts again; rotations keep the values' size). Bytes: K and its scales read and written.
Result<CudaCase> rope_shift_case(const CudaCaseOptions& o, int64_t tokens, DType storage) {
  auto arena = std::make_shared<DeviceArena>(o.stream);
  const Placement place = chunk_placement(tokens);
  RopeShiftDesc desc;
  desc.kv = {kKVHeads, kHeadDim, 0, storage, storage};
  desc.pages = PageFormat{place.num_pages, kPageSize, PageLayout::nhd};
  desc.rope.base = 500000.0;
  desc.rope.max_position = 8192;
  Result<RopeShiftPlan> plan = RopeShiftPlan::select(desc, o.stream.device);
  if (!plan.ok()) return plan.status();
  RopeShiftArgs args;
  Result<PagedKV> pools = random_pools(*arena, storage, place.num_pages);
  if (!pools.ok()) return pools.status();
  args.kv = *pools;
  const auto n = static_cast<int32_t>(tokens);
  const std::vector<int32_t> zero = {0}, end = {n}, delta = {-1};
  for (auto [to, from] :
       {std::pair{&args.p0, &zero}, std::pair{&args.p1, &end}, std::pair{&args.delta, &delta},
        std::pair{&args.seq_lens, &end}, std::pair{&args.table.indptr, &place.indptr},
        std::pair{&args.table.indices, &place.indices}}) {
    Result<std::span<const int32_t>> d = arena->copy(*from);
    if (!d.ok()) return d.status();
    *to = *d;
  }
  const double bytes =
      static_cast<double>(tokens) * stored_token_bytes(storage);  // K: read + write
  return make_case("rope_shift", std::to_string(tokens) + " tokens 8kv nhd16", name(storage), bytes,
                   *plan, o.stream, args, arena);
}

}  // namespace

std::vector<CudaCaseBuilder> cuda_write_cases(const CudaCaseOptions& options) {
  std::vector<CudaCaseBuilder> b;
  const CudaCaseOptions o = options;
  if (o.quick) {
    b.push_back([o] { return kv_append_case(o, 1, 256); });
    b.push_back([o] { return paged_append_case(o, 16, 16, DType::int8, true); });
    b.push_back([o] { return qkv_rope_write_case(o, 16, 16, DType::bf16, true); });
    b.push_back([o] { return copy_pages_case(o, 16, DType::bf16); });
    b.push_back([o] { return rope_shift_case(o, 256, DType::bf16); });
    return b;
  }
  b.push_back([o] { return kv_append_case(o, 1, 4096); });
  b.push_back([o] { return kv_append_case(o, 256, 1); });
  for (int64_t seqs : {1, 16, 64, 256}) {
    b.push_back([o, seqs] { return paged_append_case(o, seqs, seqs, DType::bf16, false); });
  }
  b.push_back([o] { return paged_append_case(o, 64, 64, DType::bf16, true); });
  b.push_back([o] { return paged_append_case(o, 64, 64, DType::fp8_e4m3, false); });
  for (DType storage : {DType::bf16, DType::int8, DType::fp8_e4m3}) {
    b.push_back([o, storage] { return paged_append_case(o, 1, 4096, storage, false); });
  }
  for (int64_t seqs : {1, 16, 64, 256}) {
    b.push_back([o, seqs] { return qkv_rope_write_case(o, seqs, seqs, DType::bf16, false); });
  }
  b.push_back([o] { return qkv_rope_write_case(o, 64, 64, DType::bf16, true); });
  b.push_back([o] { return qkv_rope_write_case(o, 64, 64, DType::int8, false); });
  for (DType storage : {DType::bf16, DType::int8, DType::fp8_e4m3}) {
    b.push_back([o, storage] { return qkv_rope_write_case(o, 1, 4096, storage, false); });
  }
  b.push_back([o] { return qkv_rope_write_case(o, 1, 4096, DType::bf16, true); });
  for (DType storage : {DType::bf16, DType::int8}) {
    b.push_back([o, storage] { return copy_pages_case(o, 256, storage); });
  }
  for (DType storage : {DType::bf16, DType::int8}) {
    b.push_back([o, storage] { return rope_shift_case(o, 4096, storage); });
  }
  return b;
}

}  // namespace kvcache::bench
