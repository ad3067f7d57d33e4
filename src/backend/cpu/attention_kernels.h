// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The inner loops of CPU attention, one set per instruction set. The driver (attention.cpp) walks
// each (sequence, kv head, chunk) work item over runs of consecutive cache rows (a page, or a
// block of a contiguous cache), keeps the online softmax, and calls these two loops per run; the
// query heads of one GQA group share every K/V row load. Rows are `stride` elements apart and
// hold head_dim contiguous elements of the storage dtype; quantized rows carry one scale each,
// `scale_stride` floats apart (scales == nullptr for unquantized storage).

#include <cstdint>
#include <type_traits>
#include <utility>

#include "kvcache/dtype.h"

namespace kvcache::cpu {

// Calls f(std::integral_constant<int, G>{}, g0) for passes of G in {kMax, ..., 2, 1} heads (powers
// of two) covering [0, group): the row loops' head tiles. (The score loops stop at 4 heads: an
// 8-head tile of AVX-512 holds only 2 rows per reduction and measured slower than two 4-head
// passes.)
template <int kMax, class F>
void for_each_pass(int64_t group, F&& f) {
  int64_t g = 0;
  for (; g + kMax <= group; g += kMax) f(std::integral_constant<int, kMax>{}, g);
  if constexpr (kMax > 4) {
    if (g + 4 <= group) f(std::integral_constant<int, 4>{}, std::exchange(g, g + 4));
  }
  if (g + 2 <= group) f(std::integral_constant<int, 2>{}, std::exchange(g, g + 2));
  if (g < group) f(std::integral_constant<int, 1>{}, g);
}

struct KVRows {
  const void* data = nullptr;  // row 0
  DType dtype = DType::bf16;   // f32, f16, bf16, int8 or fp8_e4m3
  int64_t stride = 0;          // elements between rows
  const float* scales = nullptr;
  int64_t scale_stride = 0;
  int64_t count = 0;  // rows
  int64_t dim = 0;    // elements per row
  // The rows that follow (the next page): the loops keep prefetching a few rows ahead into them
  // as these end. nullptr: none.
  const void* next = nullptr;
  const float* next_scales = nullptr;  // when scales != nullptr
  int64_t next_count = 0;              // rows of next, `stride` apart
};

// s[g * n + t] = sum_d q[g * dim + d] * k[t][d] * k_scale[t], for g < group, t < n = k.count.
// q: [group, dim] float32, or rows that prepare_q converted (rows stay dim floats apart).
using ScoreRowsFn = void (*)(const float* q, int64_t group, const KVRows& k, float* s);

// Converts one q row [dim] float32 in place into the form score() reads; called once per row
// before any score() call with it.
using PrepareQFn = void (*)(float* q, int64_t dim);

// acc[g * dim + d] += sum_t p[g * n + t] * v_scale[t] * v[t][d], for g < group, t < n = v.count.
using AccumulateRowsFn = void (*)(const float* p, int64_t group, const KVRows& v, float* acc);

struct AttentionRowKernels {
  ScoreRowsFn score = nullptr;
  AccumulateRowsFn accumulate = nullptr;
  const char* isa = "portable";
  PrepareQFn prepare_q = nullptr;  // nullptr: score() reads float q
};

// The portable loops (attention.cpp): always built, the oracle the fast paths are tested against.
[[nodiscard]] AttentionRowKernels portable_attention_rows();
// The AVX-512 loops (attention_avx512.cpp). REQUIRES cpu_supports(CpuIsa::avx512).
[[nodiscard]] AttentionRowKernels avx512_attention_rows();
// Runs the AVX-512 loops against the portable ones on fixed inputs for every dtype (once per
// process; later calls return the first answer). false when the CPU lacks AVX-512 or they differ
// by more than float rounding.
[[nodiscard]] bool avx512_attention_rows_self_test();

// The AVX-512 loops with dot-product instructions on 8-bit rows (attention_avx512_dot8.cpp), two
// multiply-adds per float lane: int8 rows by vpdpwssd against q and weights rounded to int16
// (q per row, weights per 64 rows, each to steps of its largest magnitude / 32767), fp8_e4m3
// rows by vdpbf16ps against q and weights rounded to bf16; float32 sums. Rows of other dtypes,
// and dims that are not a multiple of 64, go to avx512_attention_rows(). score() then reads q
// rows from prepare_q when dot8_applies(k_dtype, head_dim).
// REQUIRES cpu_has_dot8().
[[nodiscard]] AttentionRowKernels avx512_dot8_attention_rows(DType k_dtype, int64_t head_dim);
// Whether the dot-product loops take rows of this dtype and dim.
[[nodiscard]] bool dot8_applies(DType dtype, int64_t dim);
// Whether the CPU has AVX-512 (with BF16), AVX512_VNNI and AVX512_VBMI.
[[nodiscard]] bool cpu_has_dot8();
// Runs the dot-product loops against the portable ones on fixed inputs (once per process; later
// calls return the first answer). false when !cpu_has_dot8() or they differ by more than the
// rounding stated above.
[[nodiscard]] bool avx512_dot8_attention_rows_self_test();

// Rows of one kv head listed over the pages of a run (paged 8-bit K/V with the dot-product loops
// only; attention_avx512_dot8_listed.cpp): row t holds dim bytes at data + offsets[t], its scale
// is scales[scale_offsets[t]] (scales == nullptr: 1). One call covers a whole run of pages, so the
// driver neither calls the loops per page nor copies logits and weights between runs and pages.
// The rows walked after these are listed the same way (next, next_count == 0: none); the loops
// prefetch into them as these end.
struct ListedRows {
  const void* data = nullptr;
  DType dtype = DType::int8;  // int8 or fp8_e4m3
  const int64_t* offsets = nullptr;
  const float* scales = nullptr;
  const int64_t* scale_offsets = nullptr;
  int64_t count = 0;   // rows
  int64_t dim = 0;     // elements per row, a multiple of 64 (dot8_applies)
  bool apart = false;  // rows lie apart within a page (NHD): prefetch into L2, not L1
  const void* next = nullptr;
  const int64_t* next_offsets = nullptr;
  const float* next_scales = nullptr;
  const int64_t* next_scale_offsets = nullptr;
  int64_t next_count = 0;
};

// score() and accumulate() of AttentionRowKernels over listed rows, with the same results up to
// float rounding (the same q and weight steps: weights per 64 rows of one call).
using ScoreListedFn = void (*)(const float* q, int64_t group, const ListedRows& k, float* s);
using AccumulateListedFn = void (*)(const float* p, int64_t group, const ListedRows& v, float* acc);

struct ListedRowKernels {
  ScoreListedFn score = nullptr;
  AccumulateListedFn accumulate = nullptr;
};

// The dot-product loops over listed rows; q rows come from avx512_dot8_attention_rows' prepare_q.
// REQUIRES cpu_has_dot8() and dot8_applies(dtype, dim) for the rows passed.
[[nodiscard]] ListedRowKernels avx512_dot8_listed_rows(DType dtype);

}  // namespace kvcache::cpu
