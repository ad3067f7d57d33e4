// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The CUDA kv_append, paged_append and copy_pages against their CPU plans, bit for bit, on every
// byte of the outputs (cells outside the written rows included): fresh random inputs, odd and
// real sizes, every dtype of the CUDA support tables, NHD and HND, both TokenSlots forms, the
// vector and the scalar paths; out-of-range device indices skipped and reported by
// check_device_errors; refusals that write nothing; a call captured in a CUDA graph. Skipped
// without a GPU.

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/copy_pages.h"
#include "kvcache/device.h"
#include "kvcache/kv_append.h"
#include "kvcache/paged_append.h"

#include "backend/cuda_bench.h"
#include "backend/cuda_write_ops.h"
#include "ops/write_test_problems.h"
#include "testing/gpu_test.h"
#include "testing/paged_pools.h"
#include "testing/test_util.h"

namespace kvcache {
namespace {

using testing::has_error;
using testing::host_bytes;
using testing::Pools;
using testing::same_bytes;
using testing::seed_trace;
using testing::span_bytes;
using testing::test_seed;
using testing::uniform_int;

class WriteOpsCuda : public testing::GpuTest {
 protected:
  // Device copies of every array of host pools (absent scales stay absent).
  PagedKV upload_pools(const Pools& pools) {
    const PagedKV h = pools.kv();
    return {upload(h.k_pages), upload(h.v_pages), upload(h.k_scales), upload(h.v_scales)};
  }
  // Every device pool equals the host pool, byte for byte.
  void expect_pools(const PagedKV& got, const PagedKV& want) {
    EXPECT_TRUE(same_bytes(download(got.k_pages), host_bytes(want.k_pages))) << "k_pages";
    EXPECT_TRUE(same_bytes(download(got.v_pages), host_bytes(want.v_pages))) << "v_pages";
    if (want.k_scales.data != nullptr) {
      EXPECT_TRUE(same_bytes(download(got.k_scales), host_bytes(want.k_scales))) << "k_scales";
    }
    if (want.v_scales.data != nullptr) {
      EXPECT_TRUE(same_bytes(download(got.v_scales), host_bytes(want.v_scales))) << "v_scales";
    }
  }
  // check_device_errors reports `fragment` (out_of_range), then nothing.
  void expect_device_error(const std::string& fragment) {
    EXPECT_TRUE(has_error(check_device_errors(stream()), Code::out_of_range, fragment));
    EXPECT_OK(check_device_errors(stream()));
  }
};

// =============================== kv_append ===============================

using testing::Array;
using testing::CacheLayout;
using testing::KVAppendCase;
using testing::KVAppendFixture;
using testing::SlotLists;

class KVAppendCuda : public WriteOpsCuda {
 protected:
  KVAppendArgs upload_args(const KVAppendFixture& pr) {
    return {upload(pr.k_cache.view), upload(pr.v_cache.view), upload(pr.k_new.view),
            upload(pr.v_new.view),   upload(pr.offsets),      upload(pr.new_lens)};
  }
  // The device caches equal the CPU plan's on host copies of pr's, every byte (padding and cells
  // outside the written rows included). new_lens: the CPU's, when not pr's.
  void expect_caches(const KVAppendArgs& dev, const KVAppendFixture& pr,
                     std::span<const int32_t> new_lens = {}) {
    Array want_k = pr.k_cache.clone();
    Array want_v = pr.v_cache.clone();
    KVAppendArgs want = pr.args();
    want.k_cache = want_k.view;
    want.v_cache = want_v.view;
    if (!new_lens.empty()) want.new_lens = new_lens;
    ASSERT_OK(KVAppendPlan::select(pr.desc)->run(Stream{}, {}, want));
    EXPECT_TRUE(same_bytes(download(dev.k_cache), host_bytes(want_k.view))) << "k_cache";
    EXPECT_TRUE(same_bytes(download(dev.v_cache), host_bytes(want_v.view))) << "v_cache";
  }
  // The CUDA plan on device copies against the CPU plan on host copies.
  void expect_matches_cpu(const KVAppendFixture& pr) {
    Result<KVAppendPlan> plan = KVAppendPlan::select(pr.desc, gpu());
    ASSERT_OK(plan);
    EXPECT_STREQ(plan->sku(), "cuda.sm90");
    EXPECT_TRUE(plan->precision().bit_exact);
    const KVAppendArgs dev = upload_args(pr);
    ASSERT_OK(plan->run(stream(), {}, dev));
    expect_caches(dev, pr);
    EXPECT_OK(check_device_errors(stream()));
  }
};

TEST_F(KVAppendCuda, MatchesCpuBitForBit) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const KVAppendCase cases[] = {
      {3, 5, 7, 3, 41, 9},          // odd rows: 1- to 8-byte units
      {2, 8, 128, 64, 300, 37},     // 16-byte units, K and V rows of different widths
      {1, 3, 64, 0, 1100, 1000},    // a long chunk
      {4, 8, 128, 0, 2048, 1024}};  // over 2^18 units: four per thread
  for (const KVAppendCase& c : cases) {
    for (DType dtype : backend::kCudaKVAppendTypes) {
      for (CacheLayout layout :
           {CacheLayout::head_major, CacheLayout::token_major, CacheLayout::padded}) {
        for (bool ragged : {false, true}) {
          if (c.max_new >= 1000 && (dtype == DType::f64 || layout == CacheLayout::padded)) continue;
          SCOPED_TRACE("batch " + std::to_string(c.batch) + " dim " + std::to_string(c.head_dim) +
                       " new " + std::to_string(c.max_new) + " " + name(dtype) + " layout " +
                       std::to_string(static_cast<int>(layout)) + (ragged ? " ragged" : ""));
          const KVAppendFixture pr(c, dtype, layout, ragged, rng);
          expect_matches_cpu(pr);
        }
      }
    }
  }
}

// A view whose data sits one element past an aligned address: the kernel falls back to narrower
// units and still copies every bit.
TEST_F(KVAppendCuda, UnalignedViewsMatchCpu) {
  std::mt19937 rng(test_seed());
  const KVAppendFixture pr({2, 4, 64, 0, 50, 17}, DType::bf16, CacheLayout::head_major, true, rng);
  Result<KVAppendPlan> plan = KVAppendPlan::select(pr.desc, gpu());
  ASSERT_OK(plan);
  KVAppendArgs dev = upload_args(pr);
  // The same new tokens, uploaded one element further.
  std::vector<uint8_t> shifted(span_bytes(pr.k_new.view) + 2);
  std::memcpy(shifted.data() + 2, pr.k_new.view.data, span_bytes(pr.k_new.view));
  dev.k_new.data = static_cast<uint8_t*>(upload_bytes(shifted.data(), shifted.size())) + 2;
  ASSERT_OK(plan->run(stream(), {}, dev));
  expect_caches(dev, pr);
}

// An offsets or new_lens entry out of range: that sample is skipped, the others written, and
// check_device_errors names the entry once.
TEST_F(KVAppendCuda, BadOffsetsAndLensAreSkippedAndReported) {
  std::mt19937 rng(test_seed());
  const KVAppendCase c{3, 5, 16, 0, 41, 9};
  for (int which = 0; which < 3; ++which) {
    SCOPED_TRACE("case " + std::to_string(which));
    KVAppendFixture pr(c, DType::f16, CacheLayout::token_major, true, rng);
    pr.new_lens[1] = 4;
    pr.offsets[1] = 10;
    std::vector<int32_t> bad_offsets = pr.offsets;
    std::vector<int32_t> bad_lens = pr.new_lens;
    std::string fragment;
    if (which == 0) {
      bad_offsets[1] = 41;
      fragment = "kv_append: offsets[1] is 41, expected in [0, 38)";
    } else if (which == 1) {
      bad_offsets[1] = -3;
      fragment = "kv_append: offsets[1] is -3";
    } else {
      bad_lens[1] = 10;
      fragment = "kv_append: new_lens[1] is 10, expected in [0, 10)";
    }
    Result<KVAppendPlan> plan = KVAppendPlan::select(pr.desc, gpu());
    ASSERT_OK(plan);
    KVAppendArgs dev = upload_args(pr);
    dev.offsets = upload(bad_offsets);
    dev.new_lens = upload(bad_lens);
    ASSERT_OK(plan->run(stream(), {}, dev));  // run() cannot see device values
    std::vector<int32_t> lens = pr.new_lens;
    lens[1] = 0;  // expected: sample 1 appends nothing
    expect_caches(dev, pr, lens);
    expect_device_error(fragment);
  }
}

TEST_F(KVAppendCuda, RefusalsWriteNothing) {
  std::mt19937 rng(test_seed());
  const KVAppendFixture pr({2, 3, 8, 0, 20, 5}, DType::bf16, CacheLayout::head_major, false, rng);
  Result<KVAppendPlan> plan = KVAppendPlan::select(pr.desc, gpu());
  ASSERT_OK(plan);
  const KVAppendArgs good = upload_args(pr);
  const std::vector<uint8_t> before = download(good.k_cache);
  auto refused = [&](const char* label, KVAppendArgs a, const Stream& s, const char* fragment) {
    SCOPED_TRACE(label);
    EXPECT_TRUE(has_error(plan->run(s, {}, a), Code::invalid_argument, fragment));
    EXPECT_TRUE(same_bytes(download(good.k_cache), before));
  };
  KVAppendArgs a = good;
  a.k_new = pr.k_new.view;  // host memory
  refused("host view", a, stream(), "kv_append: k_new is on cpu, expected cuda:0");
  a = good;
  a.offsets = a.offsets.first(1);
  refused("offsets size", a, stream(), "offsets has 1 entries, expected batch = 2");
  refused("cpu stream", good, Stream{}, "kv_append: stream is on cpu, expected cuda:0");
  EXPECT_TRUE(has_error(KVAppendPlan::select(pr.desc, Device::cuda(cuda_device_count())),
                        Code::unavailable, "kv_append: device cuda:"));
  // The CPU plan refuses device memory.
  EXPECT_TRUE(has_error(KVAppendPlan::select(pr.desc)->run(Stream{}, {}, good),
                        Code::invalid_argument, "is on cuda:0, expected cpu"));
}

TEST_F(KVAppendCuda, GraphCapturedRunMatchesCpu) {
  std::mt19937 rng(test_seed());
  const KVAppendFixture pr({3, 4, 128, 0, 64, 7}, DType::bf16, CacheLayout::token_major, true, rng);
  Result<KVAppendPlan> plan = KVAppendPlan::select(pr.desc, gpu());
  ASSERT_OK(plan);
  const KVAppendArgs dev = upload_args(pr);
  ASSERT_OK(backend::cuda_run_graph(
      stream(), [&] { return plan->run(stream(), {}, dev); }, 3));
  expect_caches(dev, pr);
  EXPECT_OK(check_device_errors(stream()));
}

// =============================== paged_append ===============================

class PagedAppendCuda : public WriteOpsCuda {
 protected:
  TokenSlots upload_slots(const TokenSlots& s) {
    return {upload(s.slot_mapping), upload(s.batch_indices), upload(s.positions),
            PageTable{upload(s.table.indptr), upload(s.table.indices)}};
  }
  // The CUDA plan on device copies against the CPU plan on host copies (`cpu_args`, which may
  // name fewer tokens than `args`: those the kernel must skip).
  void expect_matches_cpu(const PagedAppendDesc& desc, const PagedAppendArgs& args,
                          const PagedAppendArgs& cpu_args, const Pools& pools,
                          const TensorView* k_on_gpu = nullptr) {
    Result<PagedAppendPlan> plan = PagedAppendPlan::select(desc, gpu());
    ASSERT_OK(plan);
    EXPECT_STREQ(plan->sku(), "cuda.sm90");
    EXPECT_TRUE(plan->precision().bit_exact);
    PagedAppendArgs dev{k_on_gpu != nullptr ? *k_on_gpu : upload(args.k), upload(args.v),
                        upload_slots(args.slots), upload_pools(pools)};
    ASSERT_OK(plan->run(stream(), {}, dev));
    Pools want = pools;
    PagedAppendArgs w = cpu_args;
    w.cache = want.kv();
    ASSERT_OK(PagedAppendPlan::select(desc)->run(Stream{}, {}, w));
    expect_pools(dev.cache, want.kv());
  }
};

struct PagedShape {
  int64_t heads, dim, dim_v, page_size, num_pages, batch, pages_each, tokens;
};

TEST_F(PagedAppendCuda, MatchesCpuBitForBit) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const PagedShape shapes[] = {
      {3, 5, 7, 3, 13, 3, 4, 24},       // odd dims: a warp per row
      {8, 128, 128, 16, 80, 3, 20, 1},  // one token
      {8, 128, 128, 16, 80, 3, 20, 37}, {8, 128, 128, 1, 1100, 2, 550, 1000},  // pages of one slot
      {5, 64, 256, 16, 20, 2, 8, 100},  // K and V rows of different group widths
      {3, 96, 8, 5, 30, 3, 9, 60}};     // 12 of 16 lanes; 1-lane V rows
  for (const PagedShape& sh : shapes) {
    const bool big = sh.tokens >= 1000;
    for (DType input : backend::kCudaWriteInputTypes) {
      for (DType k_dtype : backend::kCudaStorageTypes) {
        for (DType v_dtype : backend::kCudaStorageTypes) {
          if (big && (k_dtype != v_dtype || input == DType::f16)) continue;
          for (PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
            const PagedAppendDesc desc{{{sh.heads, sh.dim, sh.dim_v, k_dtype, v_dtype},
                                        {sh.num_pages, sh.page_size, layout}},
                                       input};
            const Pools pools(desc.cache, rng);
            const SlotLists slots(desc.cache.pages, sh.batch, sh.pages_each, sh.tokens, rng);
            const testing::RandomTensor k =
                testing::random_tensor(input, {sh.tokens, sh.heads, sh.dim}, rng);
            const testing::RandomTensor v =
                testing::random_tensor(input, {sh.tokens, sh.heads, sh.dim_v}, rng);
            for (bool tabled : {false, true}) {
              SCOPED_TRACE("dims " + std::to_string(sh.dim) + "/" + std::to_string(sh.dim_v) +
                           " tokens " + std::to_string(sh.tokens) + " " + name(input) + " -> " +
                           name(k_dtype) + " / " + name(v_dtype) + " " + name(layout) +
                           (tabled ? " table" : " mapping"));
              const PagedAppendArgs args{k.view, v.view, slots.view(tabled), pools.kv()};
              expect_matches_cpu(desc, args, args, pools);
            }
          }
        }
      }
    }
  }
}

// k one element past an aligned address: the scalar path, same bits.
TEST_F(PagedAppendCuda, UnalignedInputMatchesCpu) {
  std::mt19937 rng(test_seed());
  const PagedAppendDesc desc{{{8, 128, 0, DType::int8, DType::bf16}, {40, 16, PageLayout::hnd}},
                             DType::bf16};
  const Pools pools(desc.cache, rng);
  const SlotLists slots(desc.cache.pages, 2, 20, 50, rng);
  const testing::RandomTensor k = testing::random_tensor(DType::bf16, {50, 8, 128}, rng);
  const testing::RandomTensor v = testing::random_tensor(DType::bf16, {50, 8, 128}, rng);
  std::vector<uint8_t> shifted(k.view.num_bytes() + 2);
  std::memcpy(shifted.data() + 2, k.view.data, k.view.num_bytes());
  TensorView k_dev = k.view;
  k_dev.device = gpu();
  k_dev.data = static_cast<uint8_t*>(upload_bytes(shifted.data(), shifted.size())) + 2;
  const PagedAppendArgs args{k.view, v.view, slots.view(false), pools.kv()};
  expect_matches_cpu(desc, args, args, pools, &k_dev);
}

// Every f16 and bf16 bit pattern, and f32 specials (NaN with payloads and signs, infinities,
// denormals, rounding ties), into every storage dtype: the device conversions and quantization
// give the CPU's bits, NaN signs included.
TEST_F(PagedAppendCuda, EveryBitPatternMatchesCpu) {
  std::mt19937 rng(test_seed());
  const uint32_t f32_specials[] = {0x7fc00000u, 0xffc01234u, 0x7f800000u, 0xff800000u,
                                   0x00000001u, 0x807fffffu, 0x80000000u, 0x3f808000u,
                                   0x3f818000u, 0x477ff000u, 0x33000000u, 0x387fc000u,
                                   0x7f800001u, 0xff812345u, 0x43e00000u, 0x42fe0000u};
  for (DType input : backend::kCudaWriteInputTypes) {
    for (DType storage : backend::kCudaStorageTypes) {
      SCOPED_TRACE(std::string(name(input)) + " -> " + name(storage));
      const int64_t tokens = 64;  // 64 tokens * 8 heads * 128 = 65536 values
      const PagedAppendDesc desc{{{8, 128, 0, storage, storage}, {8, 16, PageLayout::nhd}}, input};
      const Pools pools(desc.cache, rng);
      const SlotLists slots(desc.cache.pages, 1, 8, tokens, rng);
      testing::RandomTensor k = testing::random_tensor(input, {tokens, 8, 128}, rng);
      testing::RandomTensor v = testing::random_tensor(input, {tokens, 8, 128}, rng);
      auto* kb = static_cast<uint8_t*>(k.view.data);
      auto* vb = static_cast<uint8_t*>(v.view.data);
      for (uint32_t i = 0; i < 65536; ++i) {
        if (input == DType::f32) {
          // Rows of random values with a special in most of them.
          if (i % 3 == 0) {
            const uint32_t bits = f32_specials[(i / 3) % 16];
            std::memcpy(kb + 4 * i, &bits, 4);
            std::memcpy(vb + 4 * ((i * 7919u) % 65536u), &bits, 4);
          }
        } else {
          const auto bits = static_cast<uint16_t>(i);
          std::memcpy(kb + 2 * i, &bits, 2);
          const auto rev = static_cast<uint16_t>(65535u - i);
          std::memcpy(vb + 2 * i, &rev, 2);
        }
      }
      const PagedAppendArgs args{k.view, v.view, slots.view(false), pools.kv()};
      expect_matches_cpu(desc, args, args, pools);
    }
  }
}

// f32 rows holding NaNs (signaling and quiet) into int8 / fp8: the row maximum skips every NaN
// (ops::absmax_step), so where they sit must not matter: last, before a run of quiet NaNs, before
// smaller numbers, first, in pairs, before an infinity, through a whole NaN row. Dims 7 (the
// scalar path), 96, 128 and 256 (rows over 6, 8 and 16 lanes of two chunks each).
TEST_F(PagedAppendCuda, SignalingNanRowsMatchCpu) {
  std::mt19937 rng(test_seed());
  const uint32_t kSignaling = 0x7f800001u, kSignaling2 = 0xff812345u, kQuiet = 0x7fc01234u;
  const uint32_t kInf = 0x7f800000u;
  for (int64_t dim : {int64_t{7}, int64_t{96}, int64_t{128}, int64_t{256}}) {
    for (DType storage : {DType::int8, DType::fp8_e4m3}) {
      SCOPED_TRACE("dim " + std::to_string(dim) + " f32 -> " + name(storage));
      const int64_t tokens = 12, heads = 4;
      const PagedAppendDesc desc{{{heads, dim, 0, storage, storage}, {8, 4, PageLayout::nhd}},
                                 DType::f32};
      const Pools pools(desc.cache, rng);
      const SlotLists slots(desc.cache.pages, 2, 4, tokens, rng);
      testing::RandomTensor k = testing::random_tensor(DType::f32, {tokens, heads, dim}, rng);
      testing::RandomTensor v = testing::random_tensor(DType::f32, {tokens, heads, dim}, rng);
      for (testing::RandomTensor* t : {&k, &v}) {
        auto* bits = static_cast<uint32_t*>(t->view.data);
        for (int64_t row = 0; row < tokens * heads; ++row) {
          uint32_t* x = bits + row * dim;
          const int64_t n = dim;
          const auto kind = static_cast<int>((row + (t == &v ? 5 : 0)) % 10);
          switch (kind) {
            case 0:  // last
              x[n - 1] = kSignaling;
              break;
            case 1:  // then quiet NaNs only
              for (int64_t i = n / 2; i < n; ++i) x[i] = i == n / 2 ? kSignaling2 : kQuiet;
              break;
            case 2:  // then smaller numbers
              x[n / 3] = kSignaling;
              for (int64_t i = 0; i < n / 3; ++i) x[i] = 0x42c80000u;  // 100, before
              break;
            case 3:  // first
              x[0] = kSignaling2;
              break;
            case 4:  // two, different payloads, at the end
              x[n - 1] = kSignaling2;
              if (n > 1) x[n - 2] = kSignaling;
              break;
            case 5:  // then an infinity
              x[n / 4] = kSignaling;
              x[n - 1] = kInf | 0x80000000u;
              break;
            case 6:  // a NaN run with two signaling NaNs
              for (int64_t i = n / 2; i < n; ++i) x[i] = kQuiet;
              if (n / 2 + 1 < n) x[n / 2 + 1] = kSignaling2;
              x[n - 1] = kSignaling;
              break;
            case 7:  // NaN only
              for (int64_t i = 0; i < n; ++i) x[i] = i % 3 == 1 ? kSignaling : kQuiet;
              break;
            case 8:  // at every chunk boundary
              for (int64_t i = 0; i < n; i += 8) x[i] = kSignaling;
              break;
            default:  // none: the plain maximum
              break;
          }
        }
      }
      const PagedAppendArgs args{k.view, v.view, slots.view(false), pools.kv()};
      expect_matches_cpu(desc, args, args, pools);
    }
  }
}

// An out-of-range entry in each device array: the tokens that need it are skipped, every other
// token is written, and check_device_errors names the entry.
TEST_F(PagedAppendCuda, BadIndicesAreSkippedAndReported) {
  std::mt19937 rng(test_seed());
  for (PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
    for (int64_t dim : {int64_t{7}, int64_t{64}}) {  // scalar and vector paths
      const PagedAppendDesc desc{{{4, dim, 0, DType::fp8_e4m3, DType::bf16}, {13, 4, layout}},
                                 DType::f16};
      const PageFormat& pf = desc.cache.pages;
      const Pools pools(desc.cache, rng);
      const SlotLists slots(pf, 3, 4, 30, rng);
      const testing::RandomTensor k = testing::random_tensor(DType::f16, {30, 4, dim}, rng);
      const testing::RandomTensor v = testing::random_tensor(DType::f16, {30, 4, dim}, rng);
      for (int which = 0; which < 5; ++which) {
        SCOPED_TRACE(std::string(name(layout)) + " dim " + std::to_string(dim) + " case " +
                     std::to_string(which));
        SlotLists bad = slots;
        std::string fragment;
        std::vector<bool> skipped(30, false);
        const int32_t t = 5;  // the token whose entry goes bad
        const int32_t b = bad.batch_indices[t];
        switch (which) {
          case 0:
            bad.mapping[t] = pf.num_pages * pf.page_size;
            fragment = "paged_append: slot_mapping[5] is 52, expected in [0, 52)";
            skipped[t] = true;
            break;
          case 1:
            bad.batch_indices[t] = 3;
            fragment = "paged_append: batch_indices[5] is 3, expected in [0, 3)";
            skipped[t] = true;
            break;
          case 2:
            bad.positions[t] = 16;
            fragment = "paged_append: positions[5] is 16, expected in [0, 16)";
            skipped[t] = true;
            break;
          case 3:  // sequence b's page list ends past the indices
            bad.indptr[static_cast<size_t>(b + 1)] = 100;
            fragment = "paged_append: page_table.indptr[" + std::to_string(b + 1) + "] is 100";
            for (size_t i = 0; i < 30; ++i) {  // sequences b and b + 1 read the entry
              skipped[i] = bad.batch_indices[i] == b || bad.batch_indices[i] == b + 1;
            }
            break;
          default: {  // the page holding token t
            const size_t at = static_cast<size_t>(slots.indptr[static_cast<size_t>(b)] +
                                                  slots.positions[t] / pf.page_size);
            bad.indices[at] = 13;
            fragment = "paged_append: page_table.indices[" + std::to_string(at) +
                       "] is 13, expected in [0, 13)";
            for (int i = 0; i < 30; ++i) {
              const auto u = static_cast<size_t>(i);
              skipped[u] = bad.batch_indices[u] == b &&
                           slots.positions[u] / pf.page_size == slots.positions[t] / pf.page_size;
            }
            break;
          }
        }
        // The CPU writes the tokens the kernel must keep, at their (good) slots.
        std::vector<int64_t> kept_slots;
        std::vector<uint8_t> kept_k, kept_v;
        const size_t row_k = static_cast<size_t>(4 * dim) * 2;
        for (size_t i = 0; i < 30; ++i) {
          if (skipped[i]) continue;
          kept_slots.push_back(slots.mapping[i]);
          const auto* kp = static_cast<const uint8_t*>(k.view.data) + i * row_k;
          const auto* vp = static_cast<const uint8_t*>(v.view.data) + i * row_k;
          kept_k.insert(kept_k.end(), kp, kp + row_k);
          kept_v.insert(kept_v.end(), vp, vp + row_k);
        }
        const auto kept = static_cast<int64_t>(kept_slots.size());
        PagedAppendArgs cpu_args{TensorView::contiguous(kept_k.data(), DType::f16, {kept, 4, dim}),
                                 TensorView::contiguous(kept_v.data(), DType::f16, {kept, 4, dim}),
                                 TokenSlots{kept_slots, {}, {}, {}}, pools.kv()};
        const PagedAppendArgs args{k.view, v.view, bad.view(which != 0), pools.kv()};
        expect_matches_cpu(desc, args, cpu_args, pools);
        expect_device_error(fragment);
      }
    }
  }
}

TEST_F(PagedAppendCuda, RefusalsWriteNothing) {
  std::mt19937 rng(test_seed());
  const PagedAppendDesc desc{{{2, 16, 0, DType::int8, DType::bf16}, {6, 4, PageLayout::nhd}},
                             DType::bf16};
  Result<PagedAppendPlan> plan = PagedAppendPlan::select(desc, gpu());
  ASSERT_OK(plan);
  const Pools pools(desc.cache, rng);
  const SlotLists slots(desc.cache.pages, 2, 3, 5, rng);
  const testing::RandomTensor k = testing::random_tensor(DType::bf16, {5, 2, 16}, rng);
  const testing::RandomTensor v = testing::random_tensor(DType::bf16, {5, 2, 16}, rng);
  const PagedAppendArgs good{upload(k.view), upload(v.view), upload_slots(slots.view(true)),
                             upload_pools(pools)};
  auto refused = [&](const char* label, const PagedAppendArgs& a, const Stream& s,
                     const char* fragment) {
    SCOPED_TRACE(label);
    EXPECT_TRUE(has_error(plan->run(s, {}, a), Code::invalid_argument, fragment));
    expect_pools(good.cache, pools.kv());
  };
  PagedAppendArgs a = good;
  a.v = v.view;
  refused("host view", a, stream(), "paged_append: v is on cpu, expected cuda:0");
  a = good;
  a.cache.k_scales = pools.k_scales.view;
  refused("host scales", a, stream(), "k_scales is on cpu, expected cuda:0");
  a = good;
  a.slots.positions = a.slots.positions.first(4);
  refused("positions size", a, stream(), "positions has 4 entries");
  a = good;
  a.slots = TokenSlots{};
  refused("no slots", a, stream(), "neither");
  refused("cpu stream", good, Stream{}, "paged_append: stream is on cpu, expected cuda:0");
}

TEST_F(PagedAppendCuda, GraphCapturedRunMatchesCpu) {
  std::mt19937 rng(test_seed());
  const PagedAppendDesc desc{{{8, 128, 0, DType::bf16, DType::fp8_e4m3}, {32, 16, PageLayout::nhd}},
                             DType::bf16};
  const Pools pools(desc.cache, rng);
  const SlotLists slots(desc.cache.pages, 4, 8, 64, rng);
  const testing::RandomTensor k = testing::random_tensor(DType::bf16, {64, 8, 128}, rng);
  const testing::RandomTensor v = testing::random_tensor(DType::bf16, {64, 8, 128}, rng);
  Result<PagedAppendPlan> plan = PagedAppendPlan::select(desc, gpu());
  ASSERT_OK(plan);
  const PagedAppendArgs dev{upload(k.view), upload(v.view), upload_slots(slots.view(true)),
                            upload_pools(pools)};
  ASSERT_OK(backend::cuda_run_graph(
      stream(), [&] { return plan->run(stream(), {}, dev); }, 3));
  Pools want = pools;
  const PagedAppendArgs w{k.view, v.view, slots.view(true), want.kv()};
  ASSERT_OK(PagedAppendPlan::select(desc)->run(Stream{}, {}, w));
  expect_pools(dev.cache, want.kv());
  EXPECT_OK(check_device_errors(stream()));
}

// =============================== copy_pages ===============================

class CopyPagesCuda : public WriteOpsCuda {
 protected:
  // The CUDA plan against the CPU plan (on the lists `cpu_src` / `cpu_dst`: the copies the kernel
  // must do).
  void expect_matches_cpu(const CopyPagesDesc& desc, const Pools& pools,
                          const std::vector<int32_t>& src, const std::vector<int32_t>& dst,
                          const std::vector<int32_t>& cpu_src,
                          const std::vector<int32_t>& cpu_dst) {
    Result<CopyPagesPlan> plan = CopyPagesPlan::select(desc, gpu());
    ASSERT_OK(plan);
    EXPECT_STREQ(plan->sku(), "cuda.sm90");
    const CopyPagesArgs dev{upload_pools(pools), upload(src), upload(dst)};
    ASSERT_OK(plan->run(stream(), {}, dev));
    Pools want = pools;
    ASSERT_OK(CopyPagesPlan::select(desc)->run(Stream{}, {}, {want.kv(), cpu_src, cpu_dst}));
    expect_pools(dev.cache, want.kv());
  }
};

// n distinct pages out of num_pages: the first half sources, the second destinations.
std::vector<int32_t> distinct_pages(int64_t num_pages, int64_t n, std::mt19937& rng) {
  std::vector<int32_t> perm(static_cast<size_t>(num_pages));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  perm.resize(static_cast<size_t>(n));
  return perm;
}

TEST_F(CopyPagesCuda, MatchesCpuBitForBit) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  struct Shape {
    int64_t heads, dim, dim_v, page_size, num_pages, copies;
  };
  for (const Shape& sh :
       {Shape{3, 5, 7, 3, 13, 5}, Shape{8, 128, 0, 16, 40, 17}, Shape{2, 64, 32, 1, 300, 140}}) {
    for (DType k_dtype : backend::kCudaStorageTypes) {
      for (DType v_dtype : backend::kCudaStorageTypes) {
        for (PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
          SCOPED_TRACE("dim " + std::to_string(sh.dim) + " " + name(k_dtype) + " / " +
                       name(v_dtype) + " " + name(layout));
          const CopyPagesDesc desc{{{sh.heads, sh.dim, sh.dim_v, k_dtype, v_dtype},
                                    {sh.num_pages, sh.page_size, layout}}};
          const Pools pools(desc.cache, rng);
          const std::vector<int32_t> pages = distinct_pages(sh.num_pages, 2 * sh.copies, rng);
          const std::vector<int32_t> src(pages.begin(), pages.begin() + sh.copies);
          const std::vector<int32_t> dst(pages.begin() + sh.copies, pages.end());
          expect_matches_cpu(desc, pools, src, dst, src, dst);
        }
      }
    }
  }
}

TEST_F(CopyPagesCuda, BadPagesAreSkippedAndReported) {
  std::mt19937 rng(test_seed());
  const CopyPagesDesc desc{{{2, 16, 0, DType::int8, DType::f16}, {13, 4, PageLayout::hnd}}};
  const Pools pools(desc.cache, rng);
  const std::vector<int32_t> pages = distinct_pages(13, 8, rng);
  const std::vector<int32_t> src(pages.begin(), pages.begin() + 4);
  const std::vector<int32_t> dst(pages.begin() + 4, pages.end());
  for (bool bad_src : {true, false}) {
    SCOPED_TRACE(bad_src ? "src" : "dst");
    std::vector<int32_t> s = src, d = dst;
    (bad_src ? s : d)[2] = bad_src ? 13 : -1;
    std::vector<int32_t> cpu_s = src, cpu_d = dst;
    cpu_s.erase(cpu_s.begin() + 2);
    cpu_d.erase(cpu_d.begin() + 2);
    expect_matches_cpu(desc, pools, s, d, cpu_s, cpu_d);
    expect_device_error(bad_src ? "copy_pages: src_pages[2] is 13, expected in [0, 13)"
                                : "copy_pages: dst_pages[2] is -1, expected in [0, 13)");
  }
}

TEST_F(CopyPagesCuda, RefusalsWriteNothingAndGraphCaptureMatches) {
  std::mt19937 rng(test_seed());
  const CopyPagesDesc desc{{{8, 128, 0, DType::bf16, DType::fp8_e4m3}, {20, 16, PageLayout::nhd}}};
  Result<CopyPagesPlan> plan = CopyPagesPlan::select(desc, gpu());
  ASSERT_OK(plan);
  const Pools pools(desc.cache, rng);
  const std::vector<int32_t> src{3, 9, 0};
  const std::vector<int32_t> dst{4, 17, 11};
  const CopyPagesArgs good{upload_pools(pools), upload(src), upload(dst)};
  CopyPagesArgs a = good;
  a.dst = a.dst.first(2);
  EXPECT_TRUE(has_error(plan->run(stream(), {}, a), Code::invalid_argument,
                        "src has 3 entries and dst 2, expected as many"));
  a = good;
  a.cache.v_pages = pools.v.view;
  EXPECT_TRUE(has_error(plan->run(stream(), {}, a), Code::invalid_argument,
                        "copy_pages: v_pages is on cpu, expected cuda:0"));
  EXPECT_TRUE(has_error(plan->run(Stream{}, {}, good), Code::invalid_argument,
                        "copy_pages: stream is on cpu, expected cuda:0"));
  expect_pools(good.cache, pools.kv());
  ASSERT_OK(backend::cuda_run_graph(
      stream(), [&] { return plan->run(stream(), {}, good); }, 3));
  Pools want = pools;
  ASSERT_OK(CopyPagesPlan::select(desc)->run(Stream{}, {}, {want.kv(), src, dst}));
  expect_pools(good.cache, want.kv());
  EXPECT_OK(check_device_errors(stream()));
}

}  // namespace
}  // namespace kvcache
