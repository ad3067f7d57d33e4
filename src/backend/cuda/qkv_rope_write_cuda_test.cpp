// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The CUDA qkv_rope_write against the CPU portable plan, bit for bit, on every byte of q_out and of
// the pools: odd shapes (the scalar kernel) and real head dims (the vector kernel), every RoPE
// style, scaling, partial rotary dimension and multi-section RoPE, QK-norm with both weight
// offsets, int8 / fp8 / 16- and 32-bit storage, NHD and HND, both TokenSlots forms; bad positions
// and slots skipped and reported; refusals that write nothing; a call captured in a CUDA graph.
// Skipped without a GPU.

#include <algorithm>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/device.h"
#include "kvcache/qkv_rope_write.h"

#include "backend/cuda_bench.h"
#include "backend/cuda_write_ops.h"
#include "ops/write_test_problems.h"
#include "testing/gpu_test.h"
#include "testing/test_util.h"

namespace kvcache {
namespace {

using testing::has_error;
using testing::host_bytes;
using testing::same_bytes;
using testing::seed_trace;
using testing::span_bytes;
using testing::test_seed;

using testing::kNumRopeVariants;
using testing::kQkvDTypes;
using testing::kQkvPoison;
using testing::QkvCase;
using testing::QkvDTypes;
using testing::QkvProblem;
using testing::rope_variant;

std::string label(const QkvCase& c) {
  std::string s = "q/kv heads ";  // built step by step (-Wrestrict)
  s += std::to_string(c.num_q_heads) + "/" + std::to_string(c.num_kv_heads);
  s += " dims " + std::to_string(c.head_dim) + "/" + std::to_string(c.head_dim_v);
  s += " tokens " + std::to_string(c.num_tokens) + " pad " + std::to_string(c.row_pad);
  s += std::string(" ") + name(c.qkv) + "->" + name(c.q) + "/" + name(c.k) + "/" + name(c.v);
  s += std::string(" ") + name(c.layout) + " " + name(c.rope.style) + " " + name(c.rope.scaling);
  s += " rotary " + std::to_string(c.rope.rotary_dim);
  s += " streams " + std::to_string(c.rope.num_position_streams());
  s += c.qk_norm ? " qk-norm" : "";
  s += c.slot_mapping ? " mapping" : " table";
  return s;
}

class QkvRopeWriteCuda : public testing::GpuTest {
 protected:
  QkvRopeWriteArgs upload_args(const QkvProblem& pr) {
    QkvRopeWriteArgs a = pr.args;
    a.qkv = upload(pr.args.qkv);
    a.positions = upload(pr.positions);
    a.q_norm_weight = upload(pr.args.q_norm_weight);
    a.k_norm_weight = upload(pr.args.k_norm_weight);
    a.q_out = upload(pr.args.q_out);
    const TokenSlots& s = pr.args.slots;
    a.slots = TokenSlots{upload(s.slot_mapping), upload(s.batch_indices), upload(s.positions),
                         PageTable{upload(s.table.indptr), upload(s.table.indices)}};
    const PagedKV& h = pr.args.kv;
    a.kv = {upload(h.k_pages), upload(h.v_pages), upload(h.k_scales), upload(h.v_scales)};
    return a;
  }

  // The problem of (c, seed) after the CPU portable plan ran on it: for finite inputs, the bits
  // the kernel must give.
  static std::unique_ptr<QkvProblem> run_cpu(const QkvCase& c, uint32_t seed) {
    std::mt19937 rng(seed);
    auto pr = std::make_unique<QkvProblem>(c, rng);
    Result<QkvRopeWritePlan> cpu =
        QkvRopeWritePlan::select(pr->desc, Device::cpu(), CpuIsa::portable);
    EXPECT_OK(cpu);
    if (cpu.ok()) EXPECT_OK(cpu->run(Stream{}, {}, pr->args));
    return pr;
  }

  // Every byte of q_out and of the pools (cells outside the written rows included).
  void expect_outputs(const QkvRopeWriteArgs& dev, const QkvRopeWriteArgs& want) {
    EXPECT_TRUE(same_bytes(download(dev.q_out), host_bytes(want.q_out))) << "q_out";
    const PagedKV& w = want.kv;
    EXPECT_TRUE(same_bytes(download(dev.kv.k_pages), host_bytes(w.k_pages))) << "k_pages";
    EXPECT_TRUE(same_bytes(download(dev.kv.v_pages), host_bytes(w.v_pages))) << "v_pages";
    if (w.k_scales.data != nullptr) {
      EXPECT_TRUE(same_bytes(download(dev.kv.k_scales), host_bytes(w.k_scales))) << "k_scales";
    }
    if (w.v_scales.data != nullptr) {
      EXPECT_TRUE(same_bytes(download(dev.kv.v_scales), host_bytes(w.v_scales))) << "v_scales";
    }
  }

  void expect_matches_cpu(const QkvCase& c, uint32_t seed) {
    SCOPED_TRACE(label(c));
    std::mt19937 rng(seed);
    const QkvProblem pr(c, rng);
    Result<QkvRopeWritePlan> plan = QkvRopeWritePlan::select(pr.desc, gpu());
    ASSERT_OK(plan);
    EXPECT_STREQ(plan->sku(), "cuda.sm90");
    const QkvRopeWriteArgs dev = upload_args(pr);
    ASSERT_OK(plan->run(stream(), {}, dev));
    expect_outputs(dev, run_cpu(c, seed)->args);
    EXPECT_OK(check_device_errors(stream()));
  }
};

TEST_F(QkvRopeWriteCuda, OddShapesMatchCpuBitForBit) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  int i = 0;
  for (const QkvDTypes& d : kQkvDTypes) {
    for (int variant = 0; variant < kNumRopeVariants; ++variant, ++i) {
      const QkvCase c = testing::odd_qkv_case(i, d, variant);
      expect_matches_cpu(c, seed + static_cast<uint32_t>(i));
    }
  }
}

TEST_F(QkvRopeWriteCuda, RealHeadDimsMatchCpuBitForBit) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  int i = 0;
  for (int64_t dim : {64, 96, 128, 256}) {  // 96: rows on 6 of a group's 8 lanes
    for (const QkvDTypes& d : kQkvDTypes) {
      for (int variant = 0; variant < kNumRopeVariants; ++variant, ++i) {
        QkvCase c;
        c.num_q_heads = dim == 128 && i % 4 == 0 ? 32 : 4 + i % 3;
        c.num_kv_heads = dim == 128 && i % 4 == 0 ? 8 : 1 + i % 3;
        c.head_dim = dim;
        c.head_dim_v = i % 5 == 0 ? 64 : dim;
        c.num_tokens = i % 3 == 0 ? 1 : (i % 3 == 1 ? 37 : 300);
        c.page_size = i % 4 == 0 ? 1 : 16;
        c.row_pad = i % 7 == 0 ? 3 : 8 * (i % 2);  // 3: the scalar kernel on real dims
        c.layout = i % 2 == 0 ? PageLayout::nhd : PageLayout::hnd;
        c.qkv = d.qkv, c.q = d.q, c.k = d.k, c.v = d.v;
        c.qk_norm = i % 3 != 1;
        c.offset = i % 4 < 2 ? 0.0f : 1.0f;
        c.slot_mapping = i % 5 < 3;
        c.rope = rope_variant(variant, dim);
        c.rope.max_position = 1000;
        expect_matches_cpu(c, seed + static_cast<uint32_t>(i));
      }
    }
  }
}

// Back to poison: the bytes of element [first, first + count) of a host view's array.
void poison(const TensorView& t, int64_t first, int64_t count) {
  const size_t elem = size_of(t.dtype);
  std::memset(static_cast<uint8_t*>(t.data) + static_cast<size_t>(first) * elem, kQkvPoison,
              static_cast<size_t>(count) * elem);
}

// A bad RoPE position skips the token's q and k writes, a bad slot its k and v writes; every other
// write happens, and check_device_errors names the entry.
TEST_F(QkvRopeWriteCuda, BadPositionsAndSlotsAreSkippedAndReported) {
  const uint32_t seed = test_seed();
  for (int64_t dim : {int64_t{10}, int64_t{128}}) {  // scalar and vector kernels
    for (int which = 0; which < 3; ++which) {
      QkvCase c;
      c.head_dim = dim;
      c.head_dim_v = dim == 10 ? 5 : 64;
      c.row_pad = dim == 10 ? 3 : 0;
      c.num_tokens = 9;
      c.page_size = 4;
      c.qkv = c.q = DType::bf16;
      c.k = DType::int8;
      c.v = DType::f16;
      c.qk_norm = true;
      c.slot_mapping = which != 2;
      c.rope.max_position = 500;
      if (which == 1) {
        c.rope.mrope_section = {static_cast<int32_t>(dim / 4),
                                static_cast<int32_t>(dim / 2 - dim / 4), 0, 0};
      }
      SCOPED_TRACE(label(c) + " case " + std::to_string(which));
      std::mt19937 rng(seed);
      QkvProblem pr(c, rng);
      Result<QkvRopeWritePlan> plan = QkvRopeWritePlan::select(pr.desc, gpu());
      ASSERT_OK(plan);
      const int64_t t = 3;
      std::string fragment;
      bool q_skipped = false, k_skipped = false, v_skipped = false;
      if (which == 0) {  // a RoPE position
        pr.positions[t] = 500;
        fragment = "qkv_rope_write: positions[3] is 500, expected in [0, 500)";
        q_skipped = k_skipped = true;
      } else if (which == 1) {  // a RoPE position of the second stream
        pr.positions[static_cast<size_t>(c.num_tokens + t)] = -2;
        fragment = "qkv_rope_write: positions[12] is -2, expected in [0, 500)";
        q_skipped = k_skipped = true;
      } else {  // the token's position in its sequence, past the sequence's pages
        pr.token_pos[t] = 1000;
        fragment = "qkv_rope_write: positions[3] is 1000, expected in [0, 8)";
        k_skipped = v_skipped = true;
      }
      const QkvRopeWriteArgs dev = upload_args(pr);
      ASSERT_OK(plan->run(stream(), {}, dev));
      // Expected: the CPU's outputs with token t's skipped rows still poisoned.
      const std::unique_ptr<QkvProblem> want = run_cpu(c, seed);
      const QkvRopeWriteArgs& w = want->args;
      const int64_t q_row = c.num_q_heads * dim;
      if (q_skipped) poison(w.q_out, t * q_row, q_row);
      const int64_t slot = pr.slot_mapping[t];
      const PageFormat& pf = pr.desc.cache.pages;
      for (auto [skip, view, d] : {std::tuple{k_skipped, w.kv.k_pages, dim},
                                   std::tuple{k_skipped, w.kv.k_scales, int64_t{1}},
                                   std::tuple{v_skipped, w.kv.v_pages, c.head_dim_v}}) {
        if (!skip || view.data == nullptr) continue;
        for (int64_t h = 0; h < c.num_kv_heads; ++h) {
          const int64_t row =
              pf.layout == PageLayout::nhd
                  ? slot * c.num_kv_heads + h
                  : (slot / pf.page_size * c.num_kv_heads + h) * pf.page_size + slot % pf.page_size;
          poison(view, row * d, d);
        }
      }
      expect_outputs(dev, w);
      EXPECT_TRUE(has_error(check_device_errors(stream()), Code::out_of_range, fragment));
      EXPECT_OK(check_device_errors(stream()));
    }
  }
}

TEST_F(QkvRopeWriteCuda, RefusalsWriteNothing) {
  std::mt19937 rng(test_seed());
  QkvCase c;
  c.qkv = c.q = DType::bf16;
  c.k = DType::int8;
  c.qk_norm = true;
  const QkvProblem pr(c, rng);
  Result<QkvRopeWritePlan> plan = QkvRopeWritePlan::select(pr.desc, gpu());
  ASSERT_OK(plan);
  const QkvRopeWriteArgs good = upload_args(pr);
  const std::vector<uint8_t> q_before = download(good.q_out);
  const std::vector<uint8_t> k_before = download(good.kv.k_pages);
  auto refused = [&](const char* label, const QkvRopeWriteArgs& a, const Stream& s,
                     const std::string& fragment) {
    SCOPED_TRACE(label);
    EXPECT_TRUE(has_error(plan->run(s, {}, a), Code::invalid_argument, fragment));
    EXPECT_TRUE(same_bytes(download(good.q_out), q_before));
    EXPECT_TRUE(same_bytes(download(good.kv.k_pages), k_before));
  };
  QkvRopeWriteArgs a = good;
  a.qkv = pr.args.qkv;
  refused("host qkv", a, stream(), "qkv_rope_write: qkv is on cpu, expected cuda:0");
  a = good;
  a.k_norm_weight = pr.args.k_norm_weight;
  refused("host weight", a, stream(), "k_norm_weight is on cpu, expected cuda:0");
  a = good;
  a.positions = a.positions.first(3);
  refused("positions", a, stream(), "positions has 3 entries, expected num_tokens = 7");
  a = good;
  a.slots.slot_mapping = a.slots.slot_mapping.first(6);
  refused("slots", a, stream(), "slot_mapping has 6 entries, expected num_tokens = 7");
  refused("cpu stream", good, Stream{}, "qkv_rope_write: stream is on cpu, expected cuda:0");
  EXPECT_TRUE(has_error(QkvRopeWritePlan::select(pr.desc, Device::cuda(cuda_device_count())),
                        Code::unavailable, "qkv_rope_write: device cuda:"));
}

TEST_F(QkvRopeWriteCuda, GraphCapturedRunMatchesCpu) {
  const uint32_t seed = test_seed();
  QkvCase c;
  c.num_q_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = c.head_dim_v = 128;
  c.num_tokens = 16;
  c.page_size = 16;
  c.row_pad = 0;
  c.qkv = c.q = DType::bf16;
  c.k = DType::fp8_e4m3;
  c.v = DType::bf16;
  c.qk_norm = true;
  c.slot_mapping = false;
  c.rope.max_position = 4096;
  std::mt19937 rng(seed);
  const QkvProblem pr(c, rng);
  Result<QkvRopeWritePlan> plan = QkvRopeWritePlan::select(pr.desc, gpu());
  ASSERT_OK(plan);
  const QkvRopeWriteArgs dev = upload_args(pr);
  ASSERT_OK(backend::cuda_run_graph(
      stream(), [&] { return plan->run(stream(), {}, dev); }, 3));
  expect_outputs(dev, run_cpu(c, seed)->args);
  EXPECT_OK(check_device_errors(stream()));
}

}  // namespace
}  // namespace kvcache
