// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/paged_append.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/thread_pool.h"

#include "backend/cpu/append_kernels.h"
#include "ops/write_test_problems.h"
#include "reference/append.h"
#include "testing/paged_pools.h"
#include "testing/test_util.h"

namespace kvcache {
namespace {

using testing::has_error;
using testing::Pools;
using testing::random_tensor;
using testing::RandomTensor;
using testing::seed_trace;
using testing::test_seed;

constexpr CpuIsa kIsas[] = {CpuIsa::portable, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::best};
constexpr DType kInputs[] = {DType::f32, DType::f16, DType::bf16};
constexpr DType kStorage[] = {DType::f32, DType::f16, DType::bf16, DType::int8, DType::fp8_e4m3};

using Slots = testing::SlotLists;

// The plan (isa, pool) against the reference on copies of `pools`: every byte of every pool.
void expect_matches_reference(const PagedAppendDesc& desc, const PagedAppendArgs& args,
                              const Pools& pools, CpuIsa isa, ThreadPool* pool) {
  auto plan = PagedAppendPlan::select(desc, Device::cpu(), isa);
  ASSERT_OK(plan);
  EXPECT_TRUE(plan->precision().bit_exact);
  const bool fast = isa == CpuIsa::avx512 || (isa == CpuIsa::best && cpu_supports(CpuIsa::avx512));
  EXPECT_STREQ(plan->sku(), fast ? "cpu.avx512" : "cpu.portable");
  Pools want = pools;
  PagedAppendArgs want_args = args;
  want_args.cache = want.kv();
  reference::paged_append(desc, want_args);
  Pools got = pools;
  PagedAppendArgs got_args = args;
  got_args.cache = got.kv();
  ASSERT_OK(plan->run(Stream{Device::cpu(), pool}, {}, got_args));
  EXPECT_TRUE(got == want);
  EXPECT_FALSE(got == pools);  // something was written
}

PagedAppendDesc odd_desc(DType input, DType k_dtype, DType v_dtype, PageLayout layout) {
  return {{{3, 5, 7, k_dtype, v_dtype}, {13, 3, layout}}, input};
}

TEST(PagedAppend, MatchesReferenceAtOddSizes) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  ThreadPool two(2);
  for (DType input : kInputs) {
    for (DType k_dtype : kStorage) {
      for (DType v_dtype : kStorage) {
        for (PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
          const PagedAppendDesc desc = odd_desc(input, k_dtype, v_dtype, layout);
          const Pools pools(desc.cache, rng);
          const int64_t tokens = 24;  // 72 rows: enough for the kernel to use the pool
          const Slots slots(desc.cache.pages, 3, 4, tokens, rng);
          RandomTensor k = random_tensor(input, {tokens, 3, 5}, rng);
          RandomTensor v = random_tensor(input, {tokens, 3, 7}, rng);
          for (bool tabled : {false, true}) {
            for (CpuIsa isa : kIsas) {
              if (!cpu_supports(isa)) continue;
              for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &two}) {
                SCOPED_TRACE(std::string(name(input)) + " -> " + name(k_dtype) + " / " +
                             name(v_dtype) + " " + name(layout) + (tabled ? " table" : " mapping") +
                             " isa " + name(isa) + (pool ? " pool" : ""));
                const PagedAppendArgs args{k.view, v.view, slots.view(tabled), pools.kv()};
                expect_matches_reference(desc, args, pools, isa, pool);
              }
            }
          }
        }
      }
    }
  }
}

TEST(PagedAppend, MatchesReferenceAtRealShape) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  ThreadPool two(2);
  for (auto [k_dtype, v_dtype] :
       {std::pair{DType::bf16, DType::bf16}, std::pair{DType::int8, DType::fp8_e4m3}}) {
    for (PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
      const PagedAppendDesc desc{{{8, 128, 0, k_dtype, v_dtype}, {40, 16, layout}}, DType::bf16};
      const Pools pools(desc.cache, rng);
      const Slots slots(desc.cache.pages, 2, 20, 300, rng);
      RandomTensor k = random_tensor(DType::bf16, {300, 8, 128}, rng);
      RandomTensor v = random_tensor(DType::bf16, {300, 8, 128}, rng);
      for (bool tabled : {false, true}) {
        const PagedAppendArgs args{k.view, v.view, slots.view(tabled), pools.kv()};
        expect_matches_reference(desc, args, pools, CpuIsa::best, tabled ? &two : nullptr);
        expect_matches_reference(desc, args, pools, CpuIsa::portable, &two);
      }
    }
  }
}

// Inputs with NaN (quiet and signaling), infinities, denormals, signed zeros and rounding ties
// mixed into random values: every path still matches the reference bit for bit.
TEST(PagedAppend, SpecialValuesMatchReference) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  const uint32_t f32_specials[] = {0x7fc00000u, 0xffc01234u, 0x7f800000u, 0xff800000u, 0x00000001u,
                                   0x807fffffu, 0x80000000u, 0x3f808000u, 0x3f818000u, 0x477ff000u,
                                   0x33000000u, 0x387fc000u, 0x7f800001u, 0xff812345u};
  const uint16_t f16_specials[] = {0x7e00u, 0x7c01u, 0xfd55u, 0x7c00u, 0x0001u, 0x83ffu, 0x8000u};
  const uint16_t bf16_specials[] = {0x7fc0u, 0x7f81u, 0xffa5u, 0x7f80u, 0x0001u, 0x807fu, 0x8000u};
  for (DType input : kInputs) {
    for (DType storage : kStorage) {
      const PagedAppendDesc desc = odd_desc(input, storage, storage, PageLayout::nhd);
      const Pools pools(desc.cache, rng);
      const Slots slots(desc.cache.pages, 3, 4, 30, rng);
      RandomTensor k = random_tensor(input, {30, 3, 5}, rng);
      RandomTensor v = random_tensor(input, {30, 3, 7}, rng);
      for (RandomTensor* t : {&k, &v}) {
        auto* bytes = reinterpret_cast<uint8_t*>(t->view.data);
        const size_t elem = size_of(input);
        for (int64_t i = 0; i < t->view.numel(); ++i) {
          if (testing::uniform_int(rng, 0, 2) != 0) continue;
          const auto pick = static_cast<size_t>(testing::uniform_int(rng, 0, 6));
          const uint32_t bits = input == DType::f32 ? f32_specials[rng() % std::size(f32_specials)]
                                : input == DType::f16 ? f16_specials[pick]
                                                      : bf16_specials[pick];
          std::memcpy(bytes + static_cast<size_t>(i) * elem, &bits, elem);
        }
      }
      for (CpuIsa isa : kIsas) {
        if (!cpu_supports(isa)) continue;
        SCOPED_TRACE(std::string(name(input)) + " -> " + name(storage) + " isa " + name(isa));
        const PagedAppendArgs args{k.view, v.view, slots.view(false), pools.kv()};
        expect_matches_reference(desc, args, pools, isa, nullptr);
      }
    }
  }
}

// The AVX-512 rows against the portable ones: every f16 / bf16 bit pattern, and f32 bit patterns
// plus values of every magnitude, in rows of several lengths (tails included).
TEST(PagedAppendRows, Avx512MatchesPortable) {
  if (!cpu_supports(CpuIsa::avx512)) GTEST_SKIP() << "no AVX-512 on this CPU";
  EXPECT_TRUE(cpu::avx512_write_row_self_test());
  std::mt19937 rng(test_seed());
  std::vector<uint32_t> f32(1 << 17);
  for (size_t i = 0; i < f32.size(); ++i) {
    f32[i] = i % 2 == 0 ? static_cast<uint32_t>(rng())
                        : (static_cast<uint32_t>(rng()) & 0x807fffffu) |
                              ((90u + static_cast<uint32_t>(rng()) % 60u) << 23);
  }
  std::vector<uint16_t> all16(1 << 16);
  std::iota(all16.begin(), all16.end(), uint16_t{0});
  std::vector<uint8_t> a(128 * 4);
  std::vector<uint8_t> b(128 * 4);
  for (DType input : kInputs) {
    const void* data = input == DType::f32 ? static_cast<const void*>(f32.data()) : all16.data();
    const auto count = static_cast<int64_t>(input == DType::f32 ? f32.size() : all16.size());
    for (DType storage : kStorage) {
      SCOPED_TRACE(std::string(name(input)) + " -> " + name(storage));
      const cpu::WriteRowFn fast = cpu::avx512_write_row(input, storage);
      const cpu::WriteRowFn slow = cpu::portable_write_row(input, storage);
      int64_t mismatches = 0;
      for (int64_t start = 0, n = 1; start + n <= count; start += n, n = (n * 5 + 3) % 128 + 1) {
        const void* row =
            static_cast<const uint8_t*>(data) + start * static_cast<int64_t>(size_of(input));
        const float sa = fast(row, n, a.data());
        const float sb = slow(row, n, b.data());
        mismatches += a != b || std::memcmp(&sa, &sb, sizeof sa) != 0;
      }
      EXPECT_EQ(mismatches, 0);
    }
  }
}

TEST(PagedAppend, SelectRefusals) {
  const PagedAppendDesc good = odd_desc(DType::bf16, DType::int8, DType::bf16, PageLayout::hnd);
  EXPECT_OK(PagedAppendPlan::select(good));
  PagedAppendDesc d = good;
  d.input_dtype = DType::f64;
  EXPECT_TRUE(has_error(PagedAppendPlan::select(d), Code::invalid_argument,
                        "paged_append: input_dtype is f64, expected one of f32, f16, bf16"));
  d = good;
  d.cache.kv.v_dtype = DType::fp8_e5m2;
  EXPECT_TRUE(has_error(PagedAppendPlan::select(d), Code::invalid_argument, "v_dtype is fp8_e5m2"));
  d = good;
  d.cache.pages.page_size = 0;
  EXPECT_TRUE(has_error(PagedAppendPlan::select(d), Code::invalid_argument, "page_size is 0"));
  // A GPU that is not there: unavailable in every build. cuda:0 where this machine has a GPU
  // (the CUDA tests cover that plan), else unavailable too.
  const int gpus = cuda_device_count();
  EXPECT_TRUE(has_error(PagedAppendPlan::select(good, Device::cuda(gpus)), Code::unavailable,
                        "paged_append: "));
  if (gpus == 0) {
    EXPECT_TRUE(has_error(PagedAppendPlan::select(good, Device::cuda(0)), Code::unavailable,
                          "paged_append: "));
  } else {
    EXPECT_OK(PagedAppendPlan::select(good, Device::cuda(0)));
  }
  for (CpuIsa isa : kIsas) {
    if (!cpu_supports(isa)) {
      EXPECT_TRUE(has_error(PagedAppendPlan::select(good, Device::cpu(), isa), Code::unavailable,
                            "not supported by this CPU"));
    }
  }
}

// Every refusal of can_implement (and of run: the stream's device), with every pool unchanged.
TEST(PagedAppend, RefusalsWriteNothing) {
  std::mt19937 rng(test_seed());
  // page_size 5 != num_kv_heads 3, so that an HND pool does not fit an NHD descriptor.
  PagedAppendDesc desc = odd_desc(DType::bf16, DType::int8, DType::f16, PageLayout::nhd);
  desc.cache.pages.page_size = 5;
  auto plan = PagedAppendPlan::select(desc);
  ASSERT_OK(plan);
  Pools pools(desc.cache, rng);
  const Pools before = pools;
  const Slots slots(desc.cache.pages, 3, 4, 6, rng);
  RandomTensor k = random_tensor(DType::bf16, {6, 3, 5}, rng);
  RandomTensor v = random_tensor(DType::bf16, {6, 3, 7}, rng);
  RandomTensor k_f32 = random_tensor(DType::f32, {6, 3, 5}, rng);
  RandomTensor v_short = random_tensor(DType::bf16, {5, 3, 7}, rng);
  RandomTensor k_strided = random_tensor(DType::bf16, {6, 3, 5}, rng, true);
  PagedKVDesc hnd_desc = desc.cache;
  hnd_desc.pages.layout = PageLayout::hnd;
  const Pools hnd(hnd_desc, rng);
  TensorView on_gpu = v.view;
  on_gpu.device = Device::cuda(0);
  TensorView inside_pool = k.view;
  inside_pool.data = pools.k.view.data;
  const std::vector<int64_t> bad_slot{0, 1, 2, 65, 4, 5};
  const std::vector<int64_t> five_slots{0, 1, 2, 3, 4};
  const std::vector<int32_t> bad_batch{0, 1, 2, 3, 1, 0};
  const std::vector<int32_t> bad_position{0, 1, 20, 0, 1, 2};
  const std::vector<int32_t> bad_indices{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13};

  struct Refusal {
    std::string label;
    PagedAppendArgs args;
    Code code;
    std::string fragment;
  };
  std::vector<Refusal> refusals;
  auto with = [&](const char* label, Code code, const char* fragment, auto edit) {
    PagedAppendArgs a{k.view, v.view, slots.view(true), pools.kv()};
    edit(a);
    refusals.push_back({label, a, code, fragment});
  };
  with("k dtype", Code::invalid_argument, "paged_append: k has dtype f32, expected bf16",
       [&](PagedAppendArgs& a) { a.k = k_f32.view; });
  with("num_tokens", Code::invalid_argument, "v dim 0 (num_tokens) is 5, expected 6",
       [&](PagedAppendArgs& a) { a.v = v_short.view; });
  with("contiguous", Code::invalid_argument, "k is not contiguous",
       [&](PagedAppendArgs& a) { a.k = k_strided.view; });
  with("device", Code::invalid_argument, "v", [&](PagedAppendArgs& a) { a.v = on_gpu; });
  with("layout", Code::invalid_argument, "k_pages dim 1 (page_size) is 3, expected 5",
       [&](PagedAppendArgs& a) { a.cache.k_pages = hnd.k.view; });
  with("missing scales", Code::invalid_argument, "k_scales",
       [&](PagedAppendArgs& a) { a.cache.k_scales = TensorView{}; });
  with("extra scales", Code::invalid_argument, "v_scales is given for f16 storage",
       [&](PagedAppendArgs& a) { a.cache.v_scales = pools.k_scales.view; });
  with("overlap", Code::invalid_argument, "k overlaps k_pages, expected separate memory",
       [&](PagedAppendArgs& a) { a.k = inside_pool; });
  with("pools overlap", Code::invalid_argument, "k_pages overlaps v_pages",
       [&](PagedAppendArgs& a) { a.cache.v_pages.data = pools.k.view.data; });
  with("both forms", Code::invalid_argument, "both a slot_mapping and batch_indices/positions",
       [&](PagedAppendArgs& a) { a.slots.slot_mapping = slots.mapping; });
  with("neither form", Code::invalid_argument, "neither",
       [&](PagedAppendArgs& a) { a.slots = TokenSlots{}; });
  with("mapping size", Code::invalid_argument,
       "slot_mapping has 5 entries, expected num_tokens = 6", [&](PagedAppendArgs& a) {
         a.slots = TokenSlots{five_slots, {}, {}, {}};
       });
  with("slot range", Code::out_of_range,
       "slot_mapping[3] is 65, expected in [0, num_pages * page_size = 65)",
       [&](PagedAppendArgs& a) {
         a.slots = TokenSlots{bad_slot, {}, {}, {}};
       });
  with("batch index", Code::out_of_range, "batch_indices[3] is 3, expected in [0, 3)",
       [&](PagedAppendArgs& a) { a.slots.batch_indices = bad_batch; });
  with("position", Code::out_of_range, "positions[2] is 20, expected in [0, 20)",
       [&](PagedAppendArgs& a) { a.slots.positions = bad_position; });
  with("page index", Code::out_of_range, "page_indices[11] is 13, expected in [0, 13)",
       [&](PagedAppendArgs& a) { a.slots.table.indices = bad_indices; });

  for (const Refusal& r : refusals) {
    SCOPED_TRACE(r.label);
    EXPECT_TRUE(has_error(plan->can_implement(r.args), r.code, r.fragment));
    EXPECT_TRUE(has_error(plan->run(Stream{}, {}, r.args), r.code, r.fragment));
    EXPECT_TRUE(pools == before);
  }
  const PagedAppendArgs good{k.view, v.view, slots.view(false), pools.kv()};
  EXPECT_TRUE(has_error(plan->run(Stream{Device::cuda(0)}, {}, good), Code::invalid_argument,
                        "paged_append: stream is on cuda:0, expected cpu"));
  EXPECT_TRUE(pools == before);
  EXPECT_OK(plan->run(Stream{}, {}, good));
  EXPECT_FALSE(pools == before);
}

}  // namespace
}  // namespace kvcache
