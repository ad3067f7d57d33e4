// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The CUDA rope_shift against the CPU plan, bit for bit, on every byte of K and its scales:
// contiguous caches (head- and token-major) and NHD / HND pools, every storage dtype, odd head
// counts, lengths and page sizes, neox / gptj, partial rotary dims, YaRN (whose attention factor
// must not be applied twice) and multi-section RoPE, negative / zero / large deltas and empty
// ranges. Every row outside the shifted ranges, the unused pages and a poisoned V keep their bytes;
// bad device entries leave their sequence unchanged and are reported; a call captured in a CUDA
// graph; refusals. Skipped without a GPU.

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/device.h"
#include "kvcache/rope_shift.h"

#include "backend/cuda_bench.h"
#include "ops/quantize.h"
#include "ops/write_test_problems.h"
#include "testing/gpu_test.h"
#include "testing/test_util.h"

namespace kvcache {
namespace {

// The CPU plan the GPU matches bit for bit: the portable loops round every product of the
// rotation, as the kernel does; the AVX-512 loops fuse one multiply-add (1 ulp apart).
constexpr CpuIsa kCpuLikeGpu = CpuIsa::portable;

using testing::has_error;
using testing::host_bytes;
using testing::same_bytes;
using testing::seed_trace;
using testing::test_seed;

struct ShiftCase {
  int64_t num_kv_heads = 3;
  int64_t head_dim = 10;
  DType dtype = DType::bf16;
  bool paged = false;
  PageLayout layout = PageLayout::nhd;
  int64_t page_size = 5;
  bool token_major = false;  // contiguous: [B, cap, H, D] in memory
  int64_t length_scale = 1;  // lengths and ranges (not deltas) times this
  RopeConfig rope;
};

std::string label(const ShiftCase& c) {
  std::string s = "heads " + std::to_string(c.num_kv_heads);
  s += " dim " + std::to_string(c.head_dim) + " " + name(c.dtype);
  s += c.paged ? std::string(" paged ") + name(c.layout) + " page " + std::to_string(c.page_size)
               : std::string(c.token_major ? " token-major" : " head-major");
  s += std::string(" ") + name(c.rope.style) + " " + name(c.rope.scaling);
  s += " rotary " + std::to_string(c.rope.rotary_dim);
  s += " streams " + std::to_string(c.rope.num_position_streams());
  s += " lengths x" + std::to_string(c.length_scale);
  return s;
}

constexpr int64_t kCapacity = 37;  // times length_scale
constexpr uint8_t kVPoison = 0x7f;

// Random K stored in a cache (quantized rows by ops::quantize_row), per-sequence ranges, and the
// host views; a V array of poison that the op must never touch. Not copyable (views into itself):
// two problems made from equal generators are equal.
struct ShiftProblem {
  ShiftCase c;
  RopeShiftDesc desc;
  std::vector<int32_t> p0 = {3, 0, 5, 0, 2, 1};
  std::vector<int32_t> p1 = {30, 1, 5, 33, 29, 20};
  std::vector<int32_t> delta = {-3, 7, 2, 0, 100, 0};
  std::vector<int32_t> seq_lens = {37, 1, 20, 33, 29, 20};
  std::vector<int32_t> indptr, indices;
  std::vector<uint64_t> k, scales, v;  // storage (uint64_t: aligned)
  int64_t num_rows = 0;                // K rows of the storage, used or not
  TensorView k_view, scale_view, v_view;

  ShiftProblem(const ShiftCase& cs, std::mt19937& rng) : c(cs) {
    delta[4] = static_cast<int32_t>(c.rope.max_position - 1);  // the table's last row
    for (auto* v32 : {&p0, &p1, &seq_lens}) {
      for (int32_t& x : *v32) x = static_cast<int32_t>(x * c.length_scale);
    }
    const int64_t capacity = kCapacity * c.length_scale;
    desc.kv = {c.num_kv_heads, c.head_dim, 0, c.dtype, c.dtype};
    desc.rope = c.rope;
    const int64_t batch = static_cast<int64_t>(p0.size());
    const int64_t h = c.num_kv_heads;
    const int64_t d = c.head_dim;
    int64_t rows = batch * capacity * h;
    if (c.paged) {
      const int64_t per_seq = (capacity + c.page_size - 1) / c.page_size;
      desc.pages = PageFormat{batch * per_seq + 3, c.page_size, c.layout};  // 3 pages unused
      const int64_t n = desc.pages->num_pages;
      std::vector<int32_t> perm(static_cast<size_t>(n));
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      indptr.push_back(0);
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t pages = (seq_lens[static_cast<size_t>(b)] + c.page_size - 1) / c.page_size;
        indptr.push_back(static_cast<int32_t>(indptr.back() + pages));
      }
      indices.assign(perm.begin(), perm.begin() + indptr.back());
      rows = n * c.page_size * h;
    }
    num_rows = rows;
    k.resize(static_cast<size_t>(rows * d) * size_of(c.dtype) / 8 + 1);
    scales.resize(static_cast<size_t>(rows) / 2 + 1);
    v.assign(static_cast<size_t>(rows * d) / 2 + 1, 0x7f7f7f7f7f7f7f7fULL);
    if (c.paged) {
      const int64_t n = desc.pages->num_pages;
      const int64_t ps = c.page_size;
      const bool nhd = c.layout == PageLayout::nhd;
      const std::vector<int64_t> shape =
          nhd ? std::vector<int64_t>{n, ps, h, d} : std::vector<int64_t>{n, h, ps, d};
      k_view = TensorView::contiguous(k.data(), c.dtype, shape);
      v_view = TensorView::contiguous(v.data(), DType::f16, shape);
      scale_view = TensorView::contiguous(scales.data(), DType::f32,
                                          std::span<const int64_t>(shape).first(3));
    } else {
      k_view = contiguous(k.data(), c.dtype, {batch, h, capacity, d});
      scale_view = contiguous(scales.data(), DType::f32, {batch, h, capacity});
      v_view = contiguous(v.data(), DType::f16, {batch, h, capacity, d});
    }
    if (!is_quantized(c.dtype)) scale_view = TensorView{};
    fill(rng);
  }
  ShiftProblem(const ShiftProblem&) = delete;
  ShiftProblem& operator=(const ShiftProblem&) = delete;

  // [B, H, cap, ...] over head-major or token-major memory.
  TensorView contiguous(void* data, DType dt, std::vector<int64_t> shape) const {
    if (!c.token_major) return TensorView::contiguous(data, dt, shape);
    std::swap(shape[1], shape[2]);
    TensorView t = TensorView::contiguous(data, dt, shape);
    std::swap(t.shape[1], t.shape[2]);
    std::swap(t.strides[1], t.strides[2]);
    return t;
  }

  // Every row of the storage (used or not) random and finite; quantized rows with their scale.
  void fill(std::mt19937& rng) {
    const int64_t d = c.head_dim;
    const size_t row_bytes = static_cast<size_t>(d) * size_of(c.dtype);
    std::vector<float> x(static_cast<size_t>(d));
    std::uniform_real_distribution<float> mag(0.1f, 2.0f);
    auto* bytes = reinterpret_cast<uint8_t*>(k.data());
    auto* sc = reinterpret_cast<float*>(scales.data());
    for (size_t r = 0; r < static_cast<size_t>(num_rows); ++r) {
      for (float& e : x) e = (rng() & 1u) ? mag(rng) : -mag(rng);
      void* dst = bytes + r * row_bytes;
      if (c.dtype == DType::int8) {
        sc[r] = ops::quantize_row(x.data(), d, static_cast<int8_t*>(dst));
      } else if (c.dtype == DType::fp8_e4m3) {
        sc[r] = ops::quantize_row(x.data(), d, static_cast<fp8_e4m3_t*>(dst));
      } else {
        from_float(x.data(), c.dtype, dst, x.size());
      }
    }
  }

  RopeShiftArgs args(const TensorView& kk, const TensorView& ss, const TensorView& vv,
                     std::span<const int32_t> a0, std::span<const int32_t> a1,
                     std::span<const int32_t> ad, std::span<const int32_t> lens,
                     const PageTable& table) const {
    RopeShiftArgs a;
    a.p0 = a0;
    a.p1 = a1;
    a.delta = ad;
    a.seq_lens = lens;
    if (c.paged) {
      a.kv = {kk, vv, ss, TensorView{}};
      a.table = table;
    } else {
      a.caches = {kk, vv, ss, TensorView{}};
    }
    return a;
  }
  RopeShiftArgs host_args() {
    return args(k_view, scale_view, v_view, p0, p1, delta, seq_lens, PageTable{indptr, indices});
  }

  // Byte offsets of K(b, h, t) and of its scale.
  std::pair<size_t, size_t> row_at(int64_t b, int64_t h, int64_t t) const {
    int64_t page = b;
    int64_t slot = t;
    if (c.paged) {
      page = indices[static_cast<size_t>(indptr[static_cast<size_t>(b)] + t / c.page_size)];
      slot = t % c.page_size;
    }
    const bool nhd = !c.paged || c.layout == PageLayout::nhd;
    const int64_t ki[] = {page, c.paged && nhd ? slot : h, c.paged && nhd ? h : slot, 0};
    const int64_t si[] = {ki[0], ki[1], ki[2]};
    const auto* base = static_cast<const uint8_t*>(k_view.data);
    const size_t kb =
        static_cast<size_t>(static_cast<const uint8_t*>(k_view.element_ptr(ki)) - base);
    size_t sb = 0;
    if (scale_view.data != nullptr) {
      sb = static_cast<size_t>(static_cast<const uint8_t*>(scale_view.element_ptr(si)) -
                               static_cast<const uint8_t*>(scale_view.data));
    }
    return {kb, sb};
  }

  // `before` with the rows the ranges shift (delta != 0) taken from `after`: what a correct shift
  // leaves when `after` is correct there. Scales likewise.
  void expected(const std::vector<uint8_t>& k_after, const std::vector<uint8_t>& s_after,
                std::vector<uint8_t>& k_want, std::vector<uint8_t>& s_want) const {
    const size_t row_bytes = static_cast<size_t>(c.head_dim) * size_of(c.dtype);
    for (size_t b = 0; b < p0.size(); ++b) {
      if (delta[b] == 0) continue;
      for (int64_t t = p0[b]; t < p1[b]; ++t) {
        for (int64_t h = 0; h < c.num_kv_heads; ++h) {
          const auto [kb, sb] = row_at(static_cast<int64_t>(b), h, t);
          std::memcpy(k_want.data() + kb, k_after.data() + kb, row_bytes);
          if (!s_want.empty()) std::memcpy(s_want.data() + sb, s_after.data() + sb, 4);
        }
      }
    }
  }
};

class RopeShiftCuda : public testing::GpuTest {
 protected:
  struct DeviceCall {
    TensorView k, scales, v;
    RopeShiftArgs args;
  };

  // The problem's arrays on the GPU (the spans too).
  DeviceCall upload_problem(ShiftProblem& p) {
    DeviceCall d;
    d.k = upload(p.k_view);
    d.scales = upload(p.scale_view);
    d.v = upload(p.v_view);
    d.args = p.args(d.k, d.scales, d.v, upload(p.p0), upload(p.p1), upload(p.delta),
                    upload(p.seq_lens), PageTable{upload(p.indptr), upload(p.indices)});
    return d;
  }

  std::vector<uint8_t> bytes_of(const TensorView& device_view) {
    return device_view.data == nullptr ? std::vector<uint8_t>{} : download(device_view);
  }
  static std::vector<uint8_t> scale_bytes(const TensorView& host_view) {
    return host_view.data == nullptr ? std::vector<uint8_t>{} : host_bytes(host_view);
  }

  // CPU and GPU on the same inputs: the same bytes, changed only in the shifted rows.
  void check(const ShiftCase& c, uint32_t seed) {
    SCOPED_TRACE(label(c) + " " + seed_trace(seed));
    std::mt19937 rng(seed);
    ShiftProblem p(c, rng);
    const std::vector<uint8_t> k0 = host_bytes(p.k_view);
    const std::vector<uint8_t> s0 = scale_bytes(p.scale_view);
    const std::vector<uint8_t> v0 = host_bytes(p.v_view);
    DeviceCall d = upload_problem(p);

    const RopeShiftPlan cpu = RopeShiftPlan::select(p.desc, Device::cpu(), kCpuLikeGpu).value();
    ASSERT_OK(cpu.run(Stream{}, {}, p.host_args()));
    Result<RopeShiftPlan> gpu_plan = RopeShiftPlan::select(p.desc, gpu());
    ASSERT_OK(gpu_plan);
    EXPECT_STREQ(gpu_plan->sku(), "cuda.sm90");
    ASSERT_OK(gpu_plan->run(stream(), {}, d.args));
    ASSERT_OK(check_device_errors(stream()));

    const std::vector<uint8_t> k_cpu = host_bytes(p.k_view);
    const std::vector<uint8_t> s_cpu = scale_bytes(p.scale_view);
    std::vector<uint8_t> k_want = k0;
    std::vector<uint8_t> s_want = s0;
    p.expected(k_cpu, s_cpu, k_want, s_want);
    EXPECT_TRUE(same_bytes(k_cpu, k_want)) << "the CPU changed a row outside the ranges";
    EXPECT_TRUE(same_bytes(s_cpu, s_want)) << "the CPU changed a scale outside the ranges";
    EXPECT_TRUE(same_bytes(bytes_of(d.k), k_cpu)) << "K";
    EXPECT_TRUE(same_bytes(bytes_of(d.scales), s_cpu)) << "scales";
    EXPECT_TRUE(same_bytes(bytes_of(d.v), v0)) << "V";
    EXPECT_TRUE(std::all_of(v0.begin(), v0.end(), [](uint8_t b) { return b == kVPoison; }));
  }
};

RopeConfig rope_of(int variant, int64_t head_dim) {
  RopeConfig r;
  r.max_position = 4099;
  switch (variant) {
    case 1:
      r.style = RopeStyle::gptj;
      break;
    case 2:  // partial rotary dim
      r.rotary_dim = head_dim / 2 - (head_dim / 2) % 2;
      break;
    case 3:  // YaRN: K carries the attention factor; the shift must not apply it again
      r.scaling = RopeScaling::yarn;
      r.factor = 4.0;
      r.original_max_position = 1024;
      break;
    case 4:  // multi-section: every stream moves by delta
      r.mrope_section = {static_cast<int32_t>(head_dim / 4), static_cast<int32_t>(head_dim / 8),
                         static_cast<int32_t>(head_dim / 2 - head_dim / 4 - head_dim / 8), 0};
      break;
    default:
      break;
  }
  return r;
}

constexpr int kNumRopeVariants = 5;
const DType kStorage[] = {DType::f32, DType::f16, DType::bf16, DType::int8, DType::fp8_e4m3};

TEST_F(RopeShiftCuda, ContiguousMatchesCpuBitForBit) {
  const uint32_t seed = test_seed();
  int n = 0;
  for (DType dtype : kStorage) {
    for (int variant = 0; variant < kNumRopeVariants; ++variant) {
      ShiftCase c;
      c.num_kv_heads = n % 2 == 0 ? 3 : 1;
      c.head_dim = variant == 4 ? 16 : (n % 3 == 0 ? 10 : 128);
      c.dtype = dtype;
      c.token_major = n % 2 == 1;
      c.rope = rope_of(variant, c.head_dim);
      check(c, seed + static_cast<uint32_t>(n++));
    }
  }
}

TEST_F(RopeShiftCuda, PagedNhdAndHndMatchCpuBitForBit) {
  const uint32_t seed = test_seed();
  int n = 0;
  for (PageLayout layout : {PageLayout::nhd, PageLayout::hnd}) {
    for (DType dtype : kStorage) {
      for (int variant = 0; variant < kNumRopeVariants; ++variant) {
        ShiftCase c;
        c.num_kv_heads = n % 2 == 0 ? 5 : 2;
        c.head_dim = variant == 4 ? 32 : (n % 3 == 0 ? 6 : 64);
        c.dtype = dtype;
        c.paged = true;
        c.layout = layout;
        c.page_size = n % 3 == 0 ? 1 : (n % 3 == 1 ? 16 : 7);
        c.rope = rope_of(variant, c.head_dim);
        check(c, seed + static_cast<uint32_t>(n++));
      }
    }
  }
}

// Llama-like heads (8 x 128, pages of 16) and ranges of up to 1728 tokens: each warp shifts
// several rows (the grid's stride loop).
TEST_F(RopeShiftCuda, LongShiftOfRealHeads) {
  for (DType dtype : {DType::bf16, DType::int8}) {
    ShiftCase c;
    c.num_kv_heads = 8;
    c.head_dim = 128;
    c.dtype = dtype;
    c.paged = true;
    c.page_size = 16;
    c.length_scale = 64;
    c.rope = rope_of(0, 128);
    check(c, test_seed());
  }
}

// Entries only the kernel can read: a bad one leaves its whole sequence as it was (the others are
// shifted) and is reported once by check_device_errors.
TEST_F(RopeShiftCuda, BadDeviceEntriesLeaveTheirSequenceAndAreReported) {
  ShiftCase c;
  c.dtype = DType::int8;
  c.paged = true;
  c.rope = rope_of(0, c.head_dim);
  struct Bad {
    const char* want;
    void (*apply)(ShiftProblem&);
  };
  const Bad cases[] = {
      {"rope_shift: page_table.indices[", [](ShiftProblem& q) { q.indices[1] = 1 << 20; }},
      {"rope_shift: p1[0] is 38", [](ShiftProblem& q) { q.p1[0] = 38; }},
      {"rope_shift: p0[0] is -1", [](ShiftProblem& q) { q.p0[0] = -1; }},
      {"rope_shift: delta[0] is 5000", [](ShiftProblem& q) { q.delta[0] = 5000; }},
      {"rope_shift: seq_lens[0] is 41", [](ShiftProblem& q) { q.seq_lens[0] = 41; }},
      {"rope_shift: page_table.indptr[0] is -1", [](ShiftProblem& q) { q.indptr[0] = -1; }},
  };
  const uint32_t seed = test_seed();
  for (const Bad& bad : cases) {
    SCOPED_TRACE(bad.want);
    std::mt19937 rng_p(seed);
    std::mt19937 rng_q(seed);
    ShiftProblem p(c, rng_p);
    const std::vector<uint8_t> k0 = host_bytes(p.k_view);
    // The CPU on the same call without sequence 0: what the GPU must leave.
    ShiftProblem q(c, rng_q);
    q.p1[0] = q.p0[0];
    const RopeShiftPlan cpu = RopeShiftPlan::select(q.desc, Device::cpu(), kCpuLikeGpu).value();
    ASSERT_OK(cpu.run(Stream{}, {}, q.host_args()));
    const std::vector<uint8_t> want = host_bytes(q.k_view);
    ASSERT_NE(want, k0);
    bad.apply(p);
    DeviceCall d = upload_problem(p);
    const RopeShiftPlan plan = RopeShiftPlan::select(p.desc, gpu()).value();
    ASSERT_OK(plan.run(stream(), {}, d.args));
    EXPECT_TRUE(has_error(check_device_errors(stream()), Code::out_of_range, bad.want));
    EXPECT_OK(check_device_errors(stream()));  // reported once
    EXPECT_TRUE(same_bytes(bytes_of(d.k), want));
  }
}

// A shift captured in a CUDA graph: cuda_run_graph makes one call, captures a second and launches
// the graph, so K is shifted twice, as two CPU calls shift it.
TEST_F(RopeShiftCuda, GraphCapturedRunMatchesCpu) {
  std::mt19937 rng(test_seed());
  ShiftCase c;
  c.dtype = DType::fp8_e4m3;
  c.paged = true;
  c.layout = PageLayout::hnd;
  c.rope = rope_of(1, c.head_dim);
  ShiftProblem p(c, rng);
  DeviceCall d = upload_problem(p);
  const RopeShiftPlan plan = RopeShiftPlan::select(p.desc, gpu()).value();
  ASSERT_OK(backend::cuda_run_graph(
      stream(), [&] { return plan.run(stream(), {}, d.args); }, 1));
  EXPECT_OK(check_device_errors(stream()));
  const RopeShiftPlan cpu = RopeShiftPlan::select(p.desc, Device::cpu(), kCpuLikeGpu).value();
  ASSERT_OK(cpu.run(Stream{}, {}, p.host_args()));
  ASSERT_OK(cpu.run(Stream{}, {}, p.host_args()));
  EXPECT_TRUE(same_bytes(bytes_of(d.k), host_bytes(p.k_view)));
  EXPECT_TRUE(same_bytes(bytes_of(d.scales), host_bytes(p.scale_view)));
}

TEST_F(RopeShiftCuda, RefusalsWriteNothing) {
  std::mt19937 rng(test_seed());
  ShiftCase c;
  c.paged = true;
  c.rope = rope_of(0, c.head_dim);
  ShiftProblem p(c, rng);
  DeviceCall d = upload_problem(p);
  const std::vector<uint8_t> before = bytes_of(d.k);
  const RopeShiftPlan plan = RopeShiftPlan::select(p.desc, gpu()).value();
  RopeShiftArgs host_k = d.args;
  host_k.kv.k_pages = p.k_view;  // a host view given to a GPU plan
  EXPECT_TRUE(has_error(plan.run(stream(), {}, host_k), Code::invalid_argument, "on cpu"));
  RopeShiftArgs short_p1 = d.args;
  short_p1.p1 = short_p1.p1.first(2);
  EXPECT_TRUE(has_error(plan.run(stream(), {}, short_p1), Code::invalid_argument,
                        "p1 has 2 entries, expected batch = 6"));
  RopeShiftArgs short_table = d.args;
  short_table.table.indptr = short_table.table.indptr.first(3);
  EXPECT_TRUE(has_error(plan.run(stream(), {}, short_table), Code::invalid_argument, "indptr"));
  EXPECT_TRUE(has_error(plan.run(Stream{}, {}, d.args), Code::invalid_argument, "stream"));
  EXPECT_OK(check_device_errors(stream()));
  EXPECT_TRUE(same_bytes(bytes_of(d.k), before));

  RopeShiftDesc wide = p.desc;
  wide.kv.head_dim = 2048;
  wide.rope.rotary_dim = 0;
  EXPECT_TRUE(has_error(RopeShiftPlan::select(wide, gpu()), Code::invalid_argument, "head_dim"));
}

}  // namespace
}  // namespace kvcache
