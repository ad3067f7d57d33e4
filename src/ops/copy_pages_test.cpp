// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/copy_pages.h"

#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/thread_pool.h"

#include "reference/append.h"
#include "testing/paged_pools.h"
#include "testing/test_util.h"

namespace kvcache {
namespace {

using testing::has_error;
using testing::Pools;
using testing::seed_trace;
using testing::test_seed;

constexpr CpuIsa kIsas[] = {CpuIsa::portable, CpuIsa::avx2, CpuIsa::avx512, CpuIsa::best};
constexpr DType kStorage[] = {DType::f32, DType::f16, DType::bf16, DType::int8, DType::fp8_e4m3};

// count copies: distinct dst pages, src pages (repeats allowed) outside the dst set.
void random_copies(int64_t num_pages, int64_t count, std::mt19937& rng, std::vector<int32_t>& src,
                   std::vector<int32_t>& dst) {
  std::vector<int32_t> perm(static_cast<size_t>(num_pages));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  dst.assign(perm.begin(), perm.begin() + count);
  src.clear();
  for (int64_t i = 0; i < count; ++i) {
    src.push_back(perm[static_cast<size_t>(testing::uniform_int(rng, count, num_pages - 1))]);
  }
}

void expect_matches_reference(const CopyPagesDesc& desc, const Pools& pools,
                              const std::vector<int32_t>& src, const std::vector<int32_t>& dst,
                              CpuIsa isa, ThreadPool* pool) {
  auto plan = CopyPagesPlan::select(desc, Device::cpu(), isa);
  ASSERT_OK(plan);
  EXPECT_TRUE(plan->precision().bit_exact);
  Pools want = pools;
  reference::copy_pages(desc, CopyPagesArgs{want.kv(), src, dst});
  Pools got = pools;
  ASSERT_OK(plan->run(Stream{Device::cpu(), pool}, {}, CopyPagesArgs{got.kv(), src, dst}));
  EXPECT_TRUE(got == want);
  EXPECT_FALSE(got == pools);
}

TEST(CopyPages, MatchesReferenceAtOddSizes) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  ThreadPool two(2);
  for (DType k_dtype : kStorage) {
    for (DType v_dtype : kStorage) {
      for (PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
        const CopyPagesDesc desc{{{3, 5, 7, k_dtype, v_dtype}, {13, 3, layout}}};
        const Pools pools(desc.cache, rng);
        std::vector<int32_t> src, dst;
        random_copies(13, 5, rng, src, dst);
        for (CpuIsa isa : kIsas) {
          if (!cpu_supports(isa)) continue;
          for (ThreadPool* pool : {static_cast<ThreadPool*>(nullptr), &two}) {
            SCOPED_TRACE(std::string(name(k_dtype)) + " / " + name(v_dtype) + " " + name(layout) +
                         " isa " + name(isa) + (pool ? " pool" : ""));
            expect_matches_reference(desc, pools, src, dst, isa, pool);
          }
        }
      }
    }
  }
}

TEST(CopyPages, MatchesReferenceAtRealShape) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  ThreadPool two(2);
  for (auto [k_dtype, v_dtype] :
       {std::pair{DType::bf16, DType::bf16}, std::pair{DType::int8, DType::fp8_e4m3}}) {
    const CopyPagesDesc desc{{{8, 128, 0, k_dtype, v_dtype}, {32, 16, PageLayout::hnd}}};
    const Pools pools(desc.cache, rng);
    std::vector<int32_t> src, dst;
    random_copies(32, 9, rng, src, dst);
    expect_matches_reference(desc, pools, src, dst, CpuIsa::best, &two);
  }
}

TEST(CopyPages, EmptyListWritesNothing) {
  std::mt19937 rng(test_seed());
  const CopyPagesDesc desc{{{3, 5, 7, DType::bf16, DType::int8}, {13, 3, PageLayout::nhd}}};
  Pools pools(desc.cache, rng);
  const Pools before = pools;
  auto plan = CopyPagesPlan::select(desc);
  ASSERT_OK(plan);
  EXPECT_STREQ(plan->sku(), "cpu.portable");
  EXPECT_EQ(plan->workspace_size(), 0u);
  ASSERT_OK(plan->run(Stream{}, {}, CopyPagesArgs{pools.kv(), {}, {}}));
  EXPECT_TRUE(pools == before);
}

TEST(CopyPages, SelectRefusals) {
  const CopyPagesDesc good{{{3, 5, 7, DType::bf16, DType::int8}, {13, 3, PageLayout::nhd}}};
  EXPECT_OK(CopyPagesPlan::select(good));
  CopyPagesDesc d = good;
  d.cache.pages.num_pages = 0;
  EXPECT_TRUE(has_error(CopyPagesPlan::select(d), Code::invalid_argument,
                        "copy_pages: num_pages is 0, expected > 0"));
  d = good;
  d.cache.kv.k_dtype = DType::f64;
  EXPECT_TRUE(has_error(CopyPagesPlan::select(d), Code::invalid_argument, "k_dtype is f64"));
  // A GPU that is not there: unavailable in every build. cuda:0 where this machine has a GPU
  // (the CUDA tests cover that plan), else unavailable too.
  const int gpus = cuda_device_count();
  EXPECT_TRUE(has_error(CopyPagesPlan::select(good, Device::cuda(gpus)), Code::unavailable,
                        "copy_pages: "));
  if (gpus == 0) {
    EXPECT_TRUE(
        has_error(CopyPagesPlan::select(good, Device::cuda(0)), Code::unavailable, "copy_pages: "));
  } else {
    EXPECT_OK(CopyPagesPlan::select(good, Device::cuda(0)));
  }
  for (CpuIsa isa : kIsas) {
    if (!cpu_supports(isa)) {
      EXPECT_TRUE(has_error(CopyPagesPlan::select(good, Device::cpu(), isa), Code::unavailable,
                            "not supported by this CPU"));
    }
  }
}

// Every refusal of can_implement (and of run: the stream's device), with every pool unchanged.
TEST(CopyPages, RefusalsWriteNothing) {
  std::mt19937 rng(test_seed());
  const CopyPagesDesc desc{{{3, 5, 7, DType::bf16, DType::int8}, {13, 5, PageLayout::nhd}}};
  auto plan = CopyPagesPlan::select(desc);
  ASSERT_OK(plan);
  Pools pools(desc.cache, rng);
  const Pools before = pools;
  PagedKVDesc hnd_desc = desc.cache;
  hnd_desc.pages.layout = PageLayout::hnd;
  const Pools hnd(hnd_desc, rng);
  using List = std::vector<int32_t>;
  struct Refusal {
    std::string label;
    PagedKV kv;
    List src, dst;
    Code code;
    std::string fragment;
  };
  PagedKV aliased = pools.kv();
  aliased.v_scales.data = aliased.v_pages.data;
  PagedKV no_scales = pools.kv();
  no_scales.v_scales = TensorView{};
  const std::vector<Refusal> refusals = {
      {"layout",
       [&] {
         PagedKV kv = pools.kv();
         kv.k_pages = hnd.k.view;
         return kv;
       }(),
       {0},
       {1},
       Code::invalid_argument,
       "copy_pages: k_pages dim 1 (page_size) is 3, expected 5"},
      {"missing scales", no_scales, {0}, {1}, Code::invalid_argument, "v_scales"},
      {"pools overlap",
       aliased,
       {0},
       {1},
       Code::invalid_argument,
       "v_pages overlaps v_scales, expected separate memory"},
      {"lengths",
       pools.kv(),
       {0, 1},
       {2},
       Code::invalid_argument,
       "src has 2 entries and dst 1, expected as many"},
      {"src range",
       pools.kv(),
       {0, 13},
       {2, 3},
       Code::out_of_range,
       "src[1] is 13, expected in [0, 13)"},
      {"dst range",
       pools.kv(),
       {0, 1},
       {2, -1},
       Code::out_of_range,
       "dst[1] is -1, expected in [0, 13)"},
      {"dst twice",
       pools.kv(),
       {0, 1, 4},
       {2, 3, 2},
       Code::invalid_argument,
       "dst[2] is 2, as is dst[0], expected each dst page once"},
      {"dst also src",
       pools.kv(),
       {0, 3, 1},
       {2, 4, 3},
       Code::invalid_argument,
       "src[1] is 3, also dst[2], expected no page both read and written"},
      {"self copy", pools.kv(), {7}, {7}, Code::invalid_argument, "src[0] is 7, also dst[0]"},
  };
  for (const Refusal& r : refusals) {
    SCOPED_TRACE(r.label);
    const CopyPagesArgs args{r.kv, r.src, r.dst};
    EXPECT_TRUE(has_error(plan->can_implement(args), r.code, r.fragment));
    EXPECT_TRUE(has_error(plan->run(Stream{}, {}, args), r.code, r.fragment));
    EXPECT_TRUE(pools == before);
  }
  const List src{0, 1};
  const List dst{2, 3};
  const CopyPagesArgs good{pools.kv(), src, dst};
  EXPECT_TRUE(has_error(plan->run(Stream{Device::cuda(0)}, {}, good), Code::invalid_argument,
                        "copy_pages: stream is on cuda:0, expected cpu"));
  EXPECT_TRUE(pools == before);
  EXPECT_OK(plan->run(Stream{}, {}, good));
  EXPECT_FALSE(pools == before);
}

// Pools of more pages than one window of the duplicate check: a repeat far apart is still found.
TEST(CopyPages, DuplicatesFoundAcrossWindows) {
  std::mt19937 rng(test_seed());
  const CopyPagesDesc desc{{{1, 1, 0, DType::f32, DType::f32}, {70000, 1, PageLayout::nhd}}};
  auto plan = CopyPagesPlan::select(desc);
  ASSERT_OK(plan);
  Pools pools(desc.cache, rng);
  const std::vector<int32_t> src{5, 6, 7};
  EXPECT_TRUE(
      has_error(plan->can_implement({pools.kv(), src, std::vector<int32_t>{69000, 1, 69000}}),
                Code::invalid_argument, "dst[2] is 69000, as is dst[0]"));
  EXPECT_TRUE(has_error(plan->can_implement({pools.kv(), std::vector<int32_t>{5, 40000, 6},
                                             std::vector<int32_t>{40000, 1, 2}}),
                        Code::invalid_argument, "src[1] is 40000, also dst[0]"));
  EXPECT_OK(plan->can_implement({pools.kv(), src, std::vector<int32_t>{69000, 40000, 1}}));
}

}  // namespace
}  // namespace kvcache
