// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/rope_shift.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/thread_pool.h"

#include "ops/quantize.h"
#include "reference/rope.h"
#include "testing/test_util.h"

namespace kvcache {
namespace {

using testing::has_error;
using testing::seed_trace;
using testing::test_seed;

constexpr int64_t kBatch = 4;
constexpr int64_t kCapacity = 11;
constexpr int32_t kSeqLens[kBatch] = {11, 7, 9, 10};
// Per sequence: [p0, p1) moved by delta (an empty range and a zero delta included).
constexpr int32_t kP0[kBatch] = {2, 0, 3, 1};
constexpr int32_t kP1[kBatch] = {9, 7, 3, 10};
constexpr int32_t kDelta[kBatch] = {-2, 5, 4, 0};

struct Case {
  int64_t num_kv_heads = 2;
  int64_t head_dim = 6;
  DType dtype = DType::f32;
  bool paged = false;
  PageLayout layout = PageLayout::nhd;
  int64_t page_size = 3;
  RopeConfig rope;
};

// The stream positions K of cache index p was rotated at: distinct per stream for mrope.
std::vector<int64_t> stream_positions(const RopeConfig& rope, int64_t p) {
  std::vector<int64_t> out;
  for (int s = 0; s < rope.num_position_streams(); ++s) out.push_back(p + 2 * s);
  return out;
}

struct Problem {
  RopeShiftDesc desc;
  std::vector<uint64_t> k, scales;  // storage (uint64_t for alignment)
  std::vector<int32_t> p0, p1, delta, seq_lens, indptr, indices;
  std::vector<std::vector<double>> k0;  // un-rotated K per (b, h, p)
  RopeShiftArgs args;

  Problem(const Case& c, std::mt19937& rng) {
    desc.kv = {c.num_kv_heads, c.head_dim, 0, c.dtype, c.dtype};
    desc.rope = c.rope;
    p0.assign(kP0, kP0 + kBatch);
    p1.assign(kP1, kP1 + kBatch);
    delta.assign(kDelta, kDelta + kBatch);
    seq_lens.assign(kSeqLens, kSeqLens + kBatch);
    args.p0 = p0;
    args.p1 = p1;
    args.delta = delta;
    args.seq_lens = seq_lens;
    const int64_t h = c.num_kv_heads;
    const int64_t d = c.head_dim;
    const size_t esize = size_of(c.dtype);
    if (c.paged) {
      const int64_t per_seq = (kCapacity + c.page_size - 1) / c.page_size;
      desc.pages = PageFormat{kBatch * per_seq + 2, c.page_size, c.layout};
      const int64_t n = desc.pages->num_pages;
      std::vector<int32_t> perm(static_cast<size_t>(n));
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int64_t b = 0; b <= kBatch; ++b) indptr.push_back(static_cast<int32_t>(b * per_seq));
      indices.assign(perm.begin(), perm.begin() + kBatch * per_seq);
      args.table = {indptr, indices};
      k.resize(static_cast<size_t>(n * c.page_size * h * d) * esize / 8 + 1);
      scales.resize(static_cast<size_t>(n * c.page_size * h) / 2 + 1);
      const bool nhd = c.layout == PageLayout::nhd;
      args.kv.k_pages = nhd ? TensorView::contiguous(k.data(), c.dtype, {n, c.page_size, h, d})
                            : TensorView::contiguous(k.data(), c.dtype, {n, h, c.page_size, d});
      if (is_quantized(c.dtype)) {
        args.kv.k_scales =
            nhd ? TensorView::contiguous(scales.data(), DType::f32, {n, c.page_size, h})
                : TensorView::contiguous(scales.data(), DType::f32, {n, h, c.page_size});
      }
    } else {
      // Token-major storage [B, cap, H, D] seen as [B, H, cap, D], as KVCache holds it.
      k.resize(static_cast<size_t>(kBatch * kCapacity * h * d) * esize / 8 + 1);
      scales.resize(static_cast<size_t>(kBatch * kCapacity * h) / 2 + 1);
      TensorView t = TensorView::contiguous(k.data(), c.dtype, {kBatch, kCapacity, h, d});
      std::swap(t.shape[1], t.shape[2]);
      std::swap(t.strides[1], t.strides[2]);
      args.caches.k = t;
      if (is_quantized(c.dtype)) {
        TensorView s = TensorView::contiguous(scales.data(), DType::f32, {kBatch, kCapacity, h});
        std::swap(s.shape[1], s.shape[2]);
        std::swap(s.strides[1], s.strides[2]);
        args.caches.k_scales = s;
      }
    }
    std::memset(k.data(), 0x7f, k.size() * 8);
    std::memset(scales.data(), 0x7f, scales.size() * 8);
    std::uniform_real_distribution<double> mag(0.1, 2.0);
    for (int64_t b = 0; b < kBatch; ++b) {
      for (int64_t hh = 0; hh < h; ++hh) {
        for (int64_t p = 0; p < kSeqLens[b]; ++p) {
          std::vector<double> x(static_cast<size_t>(d));
          for (double& v : x) v = (rng() & 1u) ? mag(rng) : -mag(rng);
          k0.push_back(x);
          reference::rope_apply(c.rope, x, stream_positions(c.rope, p));
          store(b, hh, p, x);
        }
      }
    }
  }

  // Element pointers of K(b, h, p) and its scale.
  std::pair<void*, float*> at(int64_t b, int64_t h, int64_t p) const {
    if (!desc.pages) {
      const int64_t i[] = {b, h, p, 0};
      const int64_t j[] = {b, h, p};
      return {args.caches.k.element_ptr(i),
              args.caches.k_scales.data ? static_cast<float*>(args.caches.k_scales.element_ptr(j))
                                        : nullptr};
    }
    const int64_t ps = desc.pages->page_size;
    const int64_t page = indices[static_cast<size_t>(indptr[static_cast<size_t>(b)] + p / ps)];
    const bool nhd = desc.pages->layout == PageLayout::nhd;
    const int64_t i4[] = {page, nhd ? p % ps : h, nhd ? h : p % ps, 0};
    const int64_t i3[] = {page, nhd ? p % ps : h, nhd ? h : p % ps};
    return {
        args.kv.k_pages.element_ptr(i4),
        args.kv.k_scales.data ? static_cast<float*>(args.kv.k_scales.element_ptr(i3)) : nullptr};
  }

  void store(int64_t b, int64_t h, int64_t p, const std::vector<double>& x) {
    std::vector<float> f(x.begin(), x.end());
    auto [data, scale] = at(b, h, p);
    const auto n = static_cast<int64_t>(f.size());
    if (desc.kv.k_dtype == DType::int8) {
      *scale = ops::quantize_row(f.data(), n, static_cast<int8_t*>(data));
    } else if (desc.kv.k_dtype == DType::fp8_e4m3) {
      *scale = ops::quantize_row(f.data(), n, static_cast<fp8_e4m3_t*>(data));
    } else {
      from_float(f.data(), desc.kv.k_dtype, data, f.size());
    }
  }

  const std::vector<double>& original(int64_t b, int64_t h, int64_t p) const {
    int64_t i = 0;
    for (int64_t bb = 0; bb < b; ++bb) i += desc.kv.num_kv_heads * kSeqLens[bb];
    return k0[static_cast<size_t>(i + h * kSeqLens[b] + p)];
  }
};

double half_ulp(DType d) {
  if (d == DType::bf16) return std::ldexp(1.0, -8);
  if (d == DType::f16) return std::ldexp(1.0, -11);
  if (d == DType::int8) return 1.0 / 127.0;  // half a step, relative to the row's absmax
  if (d == DType::fp8_e4m3) return std::ldexp(1.0, -4) * 1.5;  // of the pair's magnitude
  return std::ldexp(1.0, -24);
}

void run_case(const Case& c, uint32_t seed) {
  for (CpuIsa isa : {CpuIsa::portable, CpuIsa::avx512}) {
    if (!cpu_supports(isa)) continue;
    for (bool threaded : {false, true}) {
      SCOPED_TRACE(std::string("isa ") + name(isa) + (threaded ? ", ThreadPool(2)" : ", inline"));
      std::mt19937 rng(seed);
      Problem pr(c, rng);
      Result<RopeShiftPlan> plan = RopeShiftPlan::select(pr.desc, Device::cpu(), isa);
      ASSERT_OK(plan);
      const std::vector<double> ref = reference::rope_shift(pr.desc, pr.args);
      const std::vector<uint64_t> before = pr.k;
      // What every untouched token holds, to compare after the run.
      std::vector<std::vector<double>> kept;
      for (int64_t b = 0; b < kBatch; ++b) {
        for (int64_t h = 0; h < c.num_kv_heads; ++h) {
          for (int64_t p = 0; p < kSeqLens[b]; ++p) {
            kept.push_back(reference::stored_k(pr.desc, pr.args, b, h, p));
          }
        }
      }
      ThreadPool pool(2);
      Stream stream;
      if (threaded) stream.pool = &pool;
      ASSERT_OK(plan->run(stream, {}, pr.args));
      const Precision prec = plan->precision();
      size_t r = 0;
      size_t kept_i = 0;
      for (int64_t b = 0; b < kBatch; ++b) {
        for (int64_t p = kP0[b]; p < kP1[b]; ++p) {
          for (int64_t h = 0; h < c.num_kv_heads; ++h) {
            const std::vector<double> got = reference::stored_k(pr.desc, pr.args, b, h, p);
            // (1) against the op's reference: the stored K rotated by delta.
            double scale = 0.0;
            for (size_t i = 0; i < got.size(); ++i) {
              scale = std::max(scale, std::fabs(ref[r + i]));
            }
            for (size_t i = 0; i < got.size(); ++i, ++r) {
              double tol = prec.abs_tol + prec.rel_tol * std::fabs(ref[r]);
              if (c.dtype == DType::int8) tol += scale / 127.0;
              if (c.dtype == DType::fp8_e4m3)
                tol += std::ldexp(1.0, -3) * std::fabs(ref[r]) + scale / 448.0 / 512.0;
              ASSERT_NEAR(got[i], ref[r], tol)
                  << "b " << b << " p " << p << " h " << h << " i " << i;
            }
            // (2) against K recomputed at the new positions from the un-rotated K: both
            // roundings of the storage dtype, relative to the head's magnitude.
            std::vector<double> x = pr.original(b, h, p);
            std::vector<int64_t> pos = stream_positions(c.rope, p);
            for (int64_t& q : pos) q += kDelta[b];
            reference::rope_apply(c.rope, x, pos);
            double mag = 0.0;
            for (double v : x) mag = std::max(mag, std::fabs(v));
            for (size_t i = 0; i < x.size(); ++i) {
              ASSERT_NEAR(got[i], x[i], 2.0 * half_ulp(c.dtype) * 1.5 * mag + 1e-4)
                  << "recompute b " << b << " p " << p << " h " << h << " i " << i;
            }
          }
        }
      }
      // Tokens outside [p0, p1) are unchanged; so is every page outside the table.
      for (int64_t b = 0; b < kBatch; ++b) {
        for (int64_t h = 0; h < c.num_kv_heads; ++h) {
          for (int64_t p = 0; p < kSeqLens[b]; ++p, ++kept_i) {
            if (p >= kP0[b] && p < kP1[b] && kDelta[b] != 0) continue;
            EXPECT_EQ(reference::stored_k(pr.desc, pr.args, b, h, p), kept[kept_i])
                << "b " << b << " h " << h << " p " << p;
          }
        }
      }
      if (c.paged) {
        const size_t page_bytes =
            static_cast<size_t>(c.page_size * c.num_kv_heads * c.head_dim) * size_of(c.dtype);
        for (int32_t page = 0; page < pr.desc.pages->num_pages; ++page) {
          if (std::find(pr.indices.begin(), pr.indices.end(), page) != pr.indices.end()) continue;
          EXPECT_EQ(std::memcmp(reinterpret_cast<const char*>(pr.k.data()) + page * page_bytes,
                                reinterpret_cast<const char*>(before.data()) + page * page_bytes,
                                page_bytes),
                    0);
        }
      }
    }
  }
}

RopeConfig variant(int i, int64_t head_dim) {
  RopeConfig r;
  r.max_position = 64;
  switch (i % 6) {
    case 1:
      r.style = RopeStyle::gptj;
      r.scaling = RopeScaling::linear;
      r.factor = 3.0;
      break;
    case 2:
      r.scaling = RopeScaling::llama3;
      r.factor = 8.0;
      r.original_max_position = 32;
      break;
    case 3:
      r.style = RopeStyle::gptj;
      r.scaling = RopeScaling::yarn;
      r.factor = 4.0;
      r.original_max_position = 16;
      break;
    case 4:
      r.mrope_section = {static_cast<int32_t>(head_dim / 2 - 1), 1, 0, 0};
      break;
    case 5:
      r.rotary_dim = head_dim / 2 % 2 == 0 ? head_dim / 2 : head_dim / 2 + 1;
      break;
    default:
      break;
  }
  return r;
}

TEST(RopeShift, MatchesReferenceAndRecompute) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  int i = 0;
  for (DType dtype : {DType::f32, DType::f16, DType::bf16, DType::int8, DType::fp8_e4m3}) {
    for (int form = 0; form < 3; ++form) {
      for (int v = 0; v < 6; v += (dtype == DType::f32 || form == 0) ? 1 : 2, ++i) {
        Case c;
        c.num_kv_heads = 1 + i % 3;
        c.head_dim = i % 2 == 0 ? 6 : 10;
        c.dtype = dtype;
        c.paged = form != 0;
        c.layout = form == 2 ? PageLayout::hnd : PageLayout::nhd;
        c.page_size = 1 + i % 4;
        c.rope = variant(v + form, c.head_dim);
        SCOPED_TRACE("case " + std::to_string(i) + " " + name(dtype) + " form " +
                     std::to_string(form) + " variant " + std::to_string((v + form) % 6));
        run_case(c, seed + static_cast<uint32_t>(i));
      }
    }
  }
}

TEST(RopeShift, RealHeadDims) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  int i = 0;
  for (int64_t dim : {64, 128, 256}) {
    for (DType dtype : {DType::bf16, DType::int8}) {
      Case c;
      c.num_kv_heads = 2;
      c.head_dim = dim;
      c.dtype = dtype;
      c.paged = i % 2 == 1;
      c.page_size = 16;
      c.rope = variant(i, dim);
      SCOPED_TRACE("head_dim " + std::to_string(dim) + " " + name(dtype));
      run_case(c, seed + static_cast<uint32_t>(i++));
    }
  }
}

TEST(RopeShift, Refusals) {
  std::mt19937 rng(test_seed());
  for (bool paged : {false, true}) {
    SCOPED_TRACE(paged ? "paged" : "contiguous");
    Case c;
    c.dtype = DType::int8;
    c.paged = paged;
    Problem pr(c, rng);
    Result<RopeShiftPlan> plan = RopeShiftPlan::select(pr.desc);
    ASSERT_OK(plan);
    const std::vector<uint64_t> k_before = pr.k;
    const std::vector<uint64_t> s_before = pr.scales;
    auto refused = [&](auto edit, Code code, const std::string& fragment) {
      RopeShiftArgs a = pr.args;
      std::vector<int32_t> p0 = pr.p0, p1 = pr.p1, delta = pr.delta, lens = pr.seq_lens;
      std::vector<int32_t> indices = pr.indices;
      a.p0 = p0;
      a.p1 = p1;
      a.delta = delta;
      a.seq_lens = lens;
      if (paged) a.table.indices = indices;
      edit(a, p0, p1, delta, lens, indices);
      EXPECT_TRUE(has_error(plan->can_implement(a), code, fragment));
      EXPECT_TRUE(has_error(plan->run(Stream{}, {}, a), code, fragment));
      EXPECT_EQ(pr.k, k_before) << fragment;
      EXPECT_EQ(pr.scales, s_before) << fragment;
    };
    using V = std::vector<int32_t>;
    refused([](RopeShiftArgs&, V&, V& p1, V&, V&, V&) { p1[1] = 8; }, Code::out_of_range,
            "rope_shift: sequence 1 shifts [p0, p1) = [0, 8), expected 0 <= p0 <= p1 <= "
            "seq_lens[1] = 7");
    refused([](RopeShiftArgs&, V& p0, V&, V&, V&, V&) { p0[0] = 10; }, Code::out_of_range,
            "sequence 0 shifts [p0, p1) = [10, 9)");
    refused([](RopeShiftArgs&, V& p0, V&, V&, V&, V&) { p0[0] = -1; }, Code::out_of_range,
            "[-1, 9)");
    refused([](RopeShiftArgs&, V&, V&, V& d, V&, V&) { d[0] = -8192; }, Code::out_of_range,
            "rope_shift: sequence 0 moves positions [2, 9) by delta -8192, expected p1 <= "
            "max_position and |delta| < max_position = 8192");
    refused([](RopeShiftArgs&, V&, V&, V& d, V&, V&) { d[1] = 8192; }, Code::out_of_range,
            "by delta 8192");
    refused([](RopeShiftArgs& a, V& p0, V&, V&, V&, V&) { a.p0 = std::span(p0).first(2); },
            Code::invalid_argument, "p1 has 4 entries, expected batch = 2 (as p0)");
    refused([](RopeShiftArgs&, V&, V&, V&, V& l, V&) { l[2] = -1; }, Code::invalid_argument,
            "seq_lens[2] is -1, expected >= 0");
    if (paged) {
      refused([](RopeShiftArgs&, V&, V&, V&, V& l, V&) { l[0] = 13; }, Code::out_of_range,
              "seq_lens[0] is 13, expected <= 12");
      refused([](RopeShiftArgs&, V&, V&, V&, V&, V& idx) { idx[3] = 99; }, Code::out_of_range,
              "page_indices[3] is 99");
      refused([](RopeShiftArgs& a, V&, V&, V&, V&, V&) { a.kv.k_pages.dtype = DType::bf16; },
              Code::invalid_argument, "k_pages has dtype bf16, expected int8");
      refused([](RopeShiftArgs& a, V&, V&, V&, V&, V&) { a.kv.k_scales = TensorView(); },
              Code::invalid_argument, "k_scales");
    } else {
      refused([](RopeShiftArgs&, V&, V&, V&, V& l, V&) { l[0] = 12; }, Code::out_of_range,
              "seq_lens[0] is 12, expected <= capacity = 11");
      refused([](RopeShiftArgs& a, V&, V&, V&, V&, V&) { a.caches.k.strides[3] = 2; },
              Code::invalid_argument, "k has stride 2 on head_dim, expected 1");
      refused([](RopeShiftArgs& a, V&, V&, V&, V&, V&) { a.caches.k.shape[1] = 3; },
              Code::invalid_argument, "k dim 1 (num_kv_heads) is 3");
      refused([](RopeShiftArgs& a, V&, V&, V&, V&, V&) { a.caches.k_scales = TensorView(); },
              Code::invalid_argument, "k_scales");
    }
  }
  {
    // Tokens past the table: sequence 0 moves [2, 9) with max_position 8.
    Case c;
    c.rope.max_position = 8;
    Problem pr(c, rng);
    Result<RopeShiftPlan> plan = RopeShiftPlan::select(pr.desc);
    ASSERT_OK(plan);
    const std::vector<uint64_t> before = pr.k;
    EXPECT_TRUE(has_error(plan->run(Stream{}, {}, pr.args), Code::out_of_range,
                          "moves positions [2, 9) by delta -2, expected p1 <= max_position"));
    EXPECT_EQ(pr.k, before);
  }
  RopeShiftDesc d;
  d.kv = {2, 8, 0, DType::bf16, DType::bf16};
  // A GPU that is not there: unavailable in every build (cuda:0 where this machine has one is
  // covered by the CUDA tests).
  EXPECT_TRUE(has_error(RopeShiftPlan::select(d, Device::cuda(cuda_device_count())),
                        Code::unavailable, "rope_shift: "));
  d.rope.rotary_dim = 12;
  EXPECT_TRUE(has_error(RopeShiftPlan::select(d), Code::invalid_argument,
                        "rope_shift: rope rotary_dim is 12"));
  d.rope.rotary_dim = 0;
  d.kv.k_dtype = DType::f64;
  EXPECT_TRUE(has_error(RopeShiftPlan::select(d), Code::invalid_argument, "k_dtype is f64"));
  d.kv.k_dtype = DType::bf16;
  d.pages = PageFormat{0, 16, PageLayout::nhd};
  EXPECT_TRUE(has_error(RopeShiftPlan::select(d), Code::invalid_argument, "num_pages is 0"));
  EXPECT_TRUE(has_error(RopeShiftPlan::select(RopeShiftDesc{}, Device::cpu(), CpuIsa::avx2),
                        Code::invalid_argument, "num_kv_heads is 0"));
}

}  // namespace
}  // namespace kvcache
