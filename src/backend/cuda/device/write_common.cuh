// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Device helpers the write kernels (kv_append, paged_append, copy_pages, qkv_rope_write) share:
// programmatic dependent launch, division by a run-time constant, lane groups, token -> slot
// lookup in rounds of loads with the index checks, pool addressing, rows as 8-element chunks spread
// over a group of lanes (ChunkMap) and their conversion to and from every storage dtype, the group
// reductions, and the float operations of ops/quantize.h with the host's NaN results. Include from
// .cu files only.
//
// Float arithmetic that must agree with the CPU is written with the _rn intrinsics: nvcc would
// otherwise contract a * b + c into one fma, which the CPU's portable kernels (built without FMA
// contraction) do not.

#include <cstdint>

#include "backend/cuda/device/convert.cuh"
#include "backend/cuda/device/errors.cuh"

namespace kvcache::cuda {

inline constexpr unsigned kFullMask = 0xffffffffu;

// --- programmatic dependent launch (sm_90) ---
// Every write kernel starts with wait_for_previous_grid(): nothing it reads or writes is touched
// before the kernel ahead of it in the stream has finished and its writes are visible. It then lets
// the next kernel launch (allow_next_grid), so that the next launch's setup overlaps this one.
// Without the launch attribute both are no-ops.
__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The start of every write kernel: wait for the kernel ahead, let the next one launch.
__device__ __forceinline__ void begin_write_kernel() {
  wait_for_previous_grid();
  allow_next_grid();
}

// This thread's lane, and its warp's index over a 1-D grid.
__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & 31; }

// This lane's place in its warp split into groups of `width` lanes (a power of two, a kernel
// parameter): shifts, where a division by width would cost a dependent chain of ~40 instructions
// ahead of a kernel's first load.
struct LaneGroup {
  int idx;    // the lane in its group
  int group;  // the group in the warp
  int shift;  // log2 width: 32 >> shift groups per warp
};
__device__ __forceinline__ LaneGroup lane_group(int width) {
  const int lane = lane_id();
  const int shift = __popc(width - 1);
  return {lane & (width - 1), lane >> shift, shift};
}
__device__ __forceinline__ int64_t grid_warp() {
  return static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
}

// --- n / d for a divisor fixed at launch: one wide multiply and a shift ---
// multiplier = ceil(2^(31 + l) / d) with l = ceil(log2 d) fits 32 bits, and the quotient is exact
// for every n < 2^31 (the error n * e / 2^(31 + l), e < 1, stays below 1 / d).
struct FastDiv {
  uint32_t divisor = 1;
  uint32_t multiplier = 0x80000000u;
  uint32_t shift = 31;

  // REQUIRES: 1 <= d <= 2^31.
  __host__ __device__ static FastDiv make(uint32_t d) {
    uint32_t l = 0;
    while ((uint64_t{1} << l) < d) ++l;
    FastDiv f;
    f.divisor = d;
    f.multiplier = static_cast<uint32_t>(((uint64_t{1} << (31 + l)) + d - 1) / d);
    f.shift = 31 + l;
    return f;
  }
  // REQUIRES: n < 2^31.
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> shift);
  }
};

// --- element types of pools and inputs: the DTypes the ops store, with kvcache::DType's numbers
// (write_launch.cuh's to_elem checks them) ---
enum class Elem : uint8_t { f32 = 0, f16 = 2, bf16 = 3, e4m3 = 4, int8 = 6 };

__device__ __forceinline__ bool is_quantized(Elem e) { return e == Elem::int8 || e == Elem::e4m3; }
__device__ __forceinline__ float quantized_max(Elem e) { return e == Elem::int8 ? 127.0f : 448.0f; }

template <class T>
struct elem_of;
template <>
struct elem_of<float> {
  static constexpr Elem value = Elem::f32;
};
template <>
struct elem_of<F16> {
  static constexpr Elem value = Elem::f16;
};
template <>
struct elem_of<BF16> {
  static constexpr Elem value = Elem::bf16;
};

// --- where a token's K/V go ---

// TokenSlots with device pointers: slot_mapping, or batch_indices + positions through a page table.
struct DeviceSlots {
  const int64_t* slot_mapping = nullptr;   // [num_tokens]
  const int32_t* batch_indices = nullptr;  // [num_tokens]
  const int32_t* positions = nullptr;      // [num_tokens]
  const int32_t* indptr = nullptr;         // [batch + 1]
  const int32_t* indices = nullptr;        // [num_indices]
  int64_t batch = 0;
  int64_t num_indices = 0;
  int64_t num_pages = 0;
  int64_t page_size = 0;
  FastDiv page_div;  // of page_size
};

// The first out-of-range index met while following an argument, as record_error takes it.
struct BadIndex {
  ErrorArg arg = ErrorArg::slot_mapping;
  int64_t index = 0;
  int64_t value = 0;
  int64_t lo = 0;
  int64_t hi = 0;
};

__device__ __forceinline__ void record(DeviceErrorRecord* errors, ErrorOp op, const BadIndex& b) {
  record_error(errors, op, b.arg, b.index, b.value, b.lo, b.hi);
}

__device__ __forceinline__ void split_slot(const DeviceSlots& s, int64_t slot, int64_t* page,
                                           int64_t* in_page) {
  if (slot < (int64_t{1} << 31)) {
    const int64_t q = s.page_div.div(static_cast<uint32_t>(slot));
    *page = q;
    *in_page = slot - q * s.page_size;
  } else {
    *page = slot / s.page_size;
    *in_page = slot - *page * s.page_size;
  }
}

// Token i's slot, looked up in rounds of loads so that a kernel can issue each round together with
// its other loads before it waits for any: slot_mapping needs one round (slot_load), a page table
// three (slot_load, slot_load_range, slot_finish). No load waits for a check: an index read from
// device memory is clamped into the array it indexes, and slot_finish's checks decide whether the
// slot is used.
struct SlotLookup {
  int64_t slot = 0;   // slot_mapping[i]
  int32_t batch = 0;  // batch_indices[i]
  int32_t pos = 0;    // positions[i]
  int32_t begin = 0;  // indptr[batch], indptr[batch + 1] (batch clamped)
  int32_t end = 0;
};

__device__ __forceinline__ int64_t clamp_index(int64_t v, int64_t size) {
  return v < 0 ? 0 : (v >= size ? size - 1 : v);
}

// Round 1: the token's own entries.
__device__ __forceinline__ void slot_load(const DeviceSlots& s, int64_t i, SlotLookup* l) {
  if (s.slot_mapping != nullptr) {
    l->slot = s.slot_mapping[i];
    return;
  }
  l->batch = s.batch_indices[i];
  l->pos = s.positions[i];
}

// Round 2 (page table): the sequence's page range.
__device__ __forceinline__ void slot_load_range(const DeviceSlots& s, SlotLookup* l) {
  if (s.slot_mapping != nullptr || s.batch <= 0) return;
  const int64_t b = clamp_index(l->batch, s.batch);
  l->begin = s.indptr[b];
  l->end = s.indptr[b + 1];
}

// Round 3 (page table: the page's entry), then the checks of ops::check_token_slots in their
// order: the page and the slot in it, or false (and *bad) at the first index out of range.
__device__ __forceinline__ bool slot_finish(const DeviceSlots& s, int64_t i, const SlotLookup& l,
                                            int64_t* page, int64_t* in_page, BadIndex* bad) {
  if (s.slot_mapping != nullptr) {
    const int64_t num_slots = s.num_pages * s.page_size;
    if (l.slot < 0 || l.slot >= num_slots) {
      *bad = {ErrorArg::slot_mapping, i, l.slot, 0, num_slots};
      return false;
    }
    split_slot(s, l.slot, page, in_page);
    return true;
  }
  const int64_t p = l.pos;
  int64_t page_in_seq = 0;
  split_slot(s, p < 0 ? 0 : p, &page_in_seq, in_page);  // p < 2^31: the fast division
  const int64_t at = int64_t{l.begin} + page_in_seq;
  const int64_t pg = s.num_indices > 0 ? s.indices[clamp_index(at, s.num_indices)] : 0;
  const int64_t b = l.batch;
  if (b < 0 || b >= s.batch) {
    *bad = {ErrorArg::batch_indices, i, b, 0, s.batch};
    return false;
  }
  const int64_t begin = l.begin;
  const int64_t end = l.end;
  if (begin < 0 || begin > s.num_indices) {
    *bad = {ErrorArg::page_indptr, b, begin, 0, s.num_indices + 1};
    return false;
  }
  if (end < begin || end > s.num_indices) {
    *bad = {ErrorArg::page_indptr, b + 1, end, begin, s.num_indices + 1};
    return false;
  }
  const int64_t room = (end - begin) * s.page_size;
  if (p < 0 || p >= room) {
    *bad = {ErrorArg::positions, i, p, 0, room};
    return false;
  }
  if (pg < 0 || pg >= s.num_pages) {
    *bad = {ErrorArg::page_indices, at, pg, 0, s.num_pages};
    return false;
  }
  *page = pg;
  return true;
}

// All three rounds back to back (kernels with nothing to overlap them with).
__device__ __forceinline__ bool resolve_slot(const DeviceSlots& s, int64_t i, int64_t* page,
                                             int64_t* in_page, BadIndex* bad) {
  SlotLookup l;
  slot_load(s, i, &l);
  slot_load_range(s, &l);
  return slot_finish(s, i, l, page, in_page, bad);
}

// One pool (K or V) and its scales. Strides in elements.
struct DevicePool {
  void* data = nullptr;
  float* scales = nullptr;  // int8 / e4m3 only
  Elem elem = Elem::bf16;
  int32_t dim = 0;
  int64_t page_stride = 0, slot_stride = 0, head_stride = 0;
  int64_t scale_page_stride = 0, scale_slot_stride = 0, scale_head_stride = 0;

  __device__ __forceinline__ int64_t row(int64_t page, int64_t in_page, int64_t head) const {
    return page * page_stride + in_page * slot_stride + head * head_stride;
  }
  __device__ __forceinline__ int64_t scale_at(int64_t page, int64_t in_page, int64_t head) const {
    return page * scale_page_stride + in_page * scale_slot_stride + head * scale_head_stride;
  }
};

// --- ops/quantize.h's float operations, with the x86 NaN results ---

// x * inv as the host computes it: a NaN operand comes back (with its sign, all that an int8 or
// e4m3 result keeps of it), and an invalid product (inf * 0) is the x86 default NaN, negative. The
// GPU's own NaN is positive, which would flip the sign an fp8 NaN keeps.
__device__ __forceinline__ float host_mul(float x, float inv) {
  const float y = __fmul_rn(x, inv);
  if (y == y) return y;
  return x != x ? x : __int_as_float(static_cast<int>(0xffc00000u));
}

// The scale factor of a row whose absolute maximum is absmax: qmax / absmax, or 0 (NaN too).
__device__ __forceinline__ float quantize_inv(float absmax, float qmax) {
  return absmax > 0.0f ? __fdiv_rn(qmax, absmax) : 0.0f;
}

// absmax / qmax (absmax is never NaN: group_absmax skips NaN).
__device__ __forceinline__ float store_scale(float absmax, float qmax) {
  return __fdiv_rn(absmax, qmax);
}

// The maximum over an aligned group of `width` lanes (a power of two <= 32). Every lane of the
// warp calls it. fmaxf returns the other operand for a NaN (signaling too), which is
// ops::absmax_step's rule, so any order gives the CPU's value.
__device__ __forceinline__ float group_max(float v, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// --- rows held by groups of lanes, up to two 8-element chunks per lane ---
// A row of num_chunks chunks of 8 elements is held by a group of lanes (a power of two), each lane
// holding up to two chunks, a and b. `pairs` (H) puts the halves of a neox rotation in one lane:
// lane i < H holds chunks i and i + H; the other chunks (from 2H up) go to lanes H, H + 1, ...:
// lane H + j holds chunks 2H + j and 2H + j + ceil((num_chunks - 2H) / 2). With H = 0, lane i
// holds chunks i and i + ceil(num_chunks / 2), so each of a warp's two loads is contiguous.
struct ChunkMap {
  int pairs = 0;
  int num_chunks = 0;

  // The lanes a row needs.
  __host__ __device__ static int lanes(int pairs, int num_chunks) {
    return pairs + (num_chunks - 2 * pairs + 1) / 2;
  }
  __device__ __forceinline__ int rest_half() const { return (num_chunks - 2 * pairs + 1) / 2; }
  // Chunk a / b of lane i (num_chunks or more: the lane holds no such chunk).
  __device__ __forceinline__ int chunk_a(int i) const {
    return i < pairs ? i : (i < pairs + rest_half() ? pairs + i : num_chunks);
  }
  __device__ __forceinline__ int chunk_b(int i) const {
    return i < pairs ? i + pairs : (i < pairs + rest_half() ? pairs + i + rest_half() : num_chunks);
  }
};

// The absolute maximum of a group's row as ops::row_absmax computes it (NaN skipped). xa / xb:
// this lane's chunks (counted when has_a / has_b). Every lane of the warp calls it.
__device__ __forceinline__ float group_absmax(const float (&xa)[8], const float (&xb)[8],
                                              bool has_a, bool has_b, int width) {
  float m = 0.0f;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    if (has_a) m = fmaxf(m, fabsf(xa[k]));
    if (has_b) m = fmaxf(m, fabsf(xb[k]));
  }
  return group_max(m, width);
}

// max with NaN propagated (max.NaN: a NaN operand gives NaN).
__device__ __forceinline__ float max_nan(float a, float b) {
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

// As group_absmax, but NaN when the group's row holds a NaN (then group_absmax has the rule's
// value); equal to it otherwise.
__device__ __forceinline__ float group_absmax_or_nan(const float (&xa)[8], const float (&xb)[8],
                                                     bool has_a, bool has_b, int width) {
  float m = 0.0f;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    if (has_a) m = max_nan(m, fabsf(xa[k]));
    if (has_b) m = max_nan(m, fabsf(xb[k]));
  }
  for (int o = width >> 1; o > 0; o >>= 1) m = max_nan(m, __shfl_xor_sync(kFullMask, m, o));
  return m;
}

// --- byte copies: one unit of 16, 8, 4, 2 or 1 bytes (p aligned to it), in the low bytes ---

__device__ __forceinline__ uint4 load_unit(const void* p, int unit) {
  switch (unit) {
    case 16:
      return __ldg(static_cast<const uint4*>(p));
    case 8: {
      const uint2 v = __ldg(static_cast<const uint2*>(p));
      return make_uint4(v.x, v.y, 0, 0);
    }
    case 4:
      return make_uint4(__ldg(static_cast<const unsigned*>(p)), 0, 0, 0);
    case 2:
      return make_uint4(__ldg(static_cast<const unsigned short*>(p)), 0, 0, 0);
    default:
      return make_uint4(__ldg(static_cast<const unsigned char*>(p)), 0, 0, 0);
  }
}

__device__ __forceinline__ void store_unit(void* p, int unit, const uint4& v) {
  switch (unit) {
    case 16:
      *static_cast<uint4*>(p) = v;
      break;
    case 8:
      *static_cast<uint2*>(p) = make_uint2(v.x, v.y);
      break;
    case 4:
      *static_cast<unsigned*>(p) = v.x;
      break;
    case 2:
      *static_cast<unsigned short*>(p) = static_cast<unsigned short>(v.x);
      break;
    default:
      *static_cast<unsigned char*>(p) = static_cast<unsigned char>(v.x);
      break;
  }
}

// --- one element, any layout (the scalar paths) ---

template <class In>
__device__ __forceinline__ float load_elem(const In* p, int64_t i) {
  return to_float(p[i]);
}

// Stores x converted to `e` (f32 / f16 / bf16; Saturation::none).
__device__ __forceinline__ void store_elem(void* base, Elem e, int64_t i, float x) {
  switch (e) {
    case Elem::f32:
      static_cast<float*>(base)[i] = x;
      break;
    case Elem::f16:
      static_cast<uint16_t*>(base)[i] = float_to_f16_bits(x);
      break;
    case Elem::bf16:
      static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(x);
      break;
    case Elem::int8:
      static_cast<int8_t*>(base)[i] = float_to_int8_sat(x);
      break;
    default:  // e4m3
      static_cast<uint8_t*>(base)[i] = float_to_fp8_e4m3_bits(x);
      break;
  }
}

// --- 8 consecutive elements (the vector paths): 16-byte accesses ---
// REQUIRES: the address of element 0 is aligned to 8 elements of its type (16 bytes at most).

// The raw bits of 8 inputs of type In (16-bit: one 16-byte word; f32: two).
template <class In>
struct Raw8 {
  uint4 w[sizeof(In) == 4 ? 2 : 1];
};

template <class In>
__device__ __forceinline__ Raw8<In> load_raw8(const In* p) {
  Raw8<In> r;
  const auto* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int k = 0; k < (sizeof(In) == 4 ? 2 : 1); ++k) r.w[k] = __ldg(q + k);
  return r;
}

template <class In>
__device__ __forceinline__ void store_raw8(In* p, const Raw8<In>& r) {
  auto* q = reinterpret_cast<uint4*>(p);
#pragma unroll
  for (int k = 0; k < (sizeof(In) == 4 ? 2 : 1); ++k) q[k] = r.w[k];
}

__device__ __forceinline__ uint32_t word(const uint4& v, int k) {
  return k == 0 ? v.x : (k == 1 ? v.y : (k == 2 ? v.z : v.w));
}

template <class In>
__device__ __forceinline__ void to_float8(const Raw8<In>& r, float (&x)[8]) {
  if constexpr (sizeof(In) == 4) {
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] = __uint_as_float(word(r.w[k / 4], k % 4));
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = elem_of<In>::value == Elem::bf16 ? unpack_bf16x2(word(r.w[0], k))
                                                        : unpack_f16x2(word(r.w[0], k));
      x[2 * k] = f.x;
      x[2 * k + 1] = f.y;
    }
  }
}

// to_float8 for values whose NaNs only ever show their sign (int8 / e4m3 codes, 16-bit stores,
// arithmetic, which gives the GPU's own NaN): bf16 widens by a shift, without quieting NaNs.
template <class In>
__device__ __forceinline__ void to_float8_nan_sign_only(const Raw8<In>& r, float (&x)[8]) {
  if constexpr (elem_of<In>::value == Elem::bf16) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t w = word(r.w[0], k);
      x[2 * k] = __uint_as_float(w << 16);
      x[2 * k + 1] = __uint_as_float(w & 0xffff0000u);
    }
  } else {
    to_float8(r, x);
  }
}

// Stores 8 floats converted to e (f32 / f16 / bf16), at element `i` of base. kBranch: bf16 or f16
// chosen by a branch; predicated (the default), both conversions of every pair issue, which cost
// qkv_rope_write's lean instance ~2% of its instructions, but branched its QK-norm and quantized
// instances ran slower (H100, sessions 6-7; cause not isolated), so only the former takes it.
template <bool kBranch = false>
__device__ __forceinline__ void store_float8(void* base, Elem e, int64_t i, const float (&x)[8]) {
  if (e == Elem::f32) {
    auto* q = reinterpret_cast<uint4*>(static_cast<float*>(base) + i);
    q[0] = make_uint4(__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]),
                      __float_as_uint(x[3]));
    q[1] = make_uint4(__float_as_uint(x[4]), __float_as_uint(x[5]), __float_as_uint(x[6]),
                      __float_as_uint(x[7]));
    return;
  }
  if constexpr (!kBranch) {
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + i) = pack_16bit8(e == Elem::bf16, x);
  } else {
    auto* q = reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + i);
    if (__builtin_expect(e == Elem::bf16, 1)) {
      *q = pack_16bit8(true, x);
    } else {
      *q = pack_16bit8(false, x);
    }
  }
}

// Stores convert(x[k] * inv) for int8 / e4m3, 8 bytes at element `i` of base: host_mul, then
// float_to_int8_sat / float_to_fp8_e4m3_bits, element by element (any input).
__device__ __forceinline__ void store_quantized8(void* base, Elem e, int64_t i, const float (&x)[8],
                                                 float inv) {
  uint32_t w[2] = {0, 0};
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float y = host_mul(x[k], inv);
    const uint32_t b =
        e == Elem::int8 ? static_cast<uint8_t>(float_to_int8_sat(y)) : float_to_fp8_e4m3_bits(y);
    w[k / 4] |= b << (8 * (k % 4));
  }
  *reinterpret_cast<uint2*>(static_cast<uint8_t*>(base) + i) = make_uint2(w[0], w[1]);
}

// Four s32 saturated to int8, packed (a[0] in byte 0).
__device__ __forceinline__ uint32_t pack_s8x4(const int (&a)[4]) {
  uint32_t hi, d;
  asm("cvt.pack.sat.s8.s32.b32 %0, %1, %2, 0;" : "=r"(hi) : "r"(a[3]), "r"(a[2]));
  asm("cvt.pack.sat.s8.s32.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a[1]), "r"(a[0]), "r"(hi));
  return d;
}

// store_quantized8 for int8, any input, in fewer instructions: cvt.rni to s32 (NaN -> 0, +-inf
// and overflow saturate) then a saturating pack is float_to_int8_sat exactly (clamping to the
// integer bounds before or after rounding gives the same integer), and an int8 code keeps nothing
// of a NaN, so host_mul's NaN choice does not matter.
__device__ __forceinline__ void store_int8x8(void* base, int64_t i, const float (&x)[8],
                                             float inv) {
  int c[2][4];
#pragma unroll
  for (int k = 0; k < 8; ++k) c[k / 4][k % 4] = __float2int_rn(__fmul_rn(x[k], inv));
  *reinterpret_cast<uint2*>(static_cast<uint8_t*>(base) + i) =
      make_uint2(pack_s8x4(c[0]), pack_s8x4(c[1]));
}

// store_quantized8 for e4m3 when every product is finite (no NaN or infinity in x, inv finite):
// cvt.rn.satfinite two at a time, as float_to_fp8_e4m3_bits converts one.
__device__ __forceinline__ void store_e4m3x8_finite(void* base, int64_t i, const float (&x)[8],
                                                    float inv) {
  uint32_t h[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 y = make_float2(__fmul_rn(x[2 * k], inv), __fmul_rn(x[2 * k + 1], inv));
    h[k] = __nv_cvt_float2_to_fp8x2(y, __NV_SATFINITE, __NV_E4M3);  // y.x in the low byte
  }
  *reinterpret_cast<uint2*>(static_cast<uint8_t*>(base) + i) =
      make_uint2(h[0] | (h[1] << 16), h[2] | (h[3] << 16));
}

// ops/quantize.h's rule for a row held by a group of `width` lanes (ChunkMap): the group's
// maximum over every chunk it holds (has_a / has_b), this lane's codes stored at elements
// at + 8 * ca / cb when wa / wb, and the scale by the lane with wa and idx 0. e: int8 or e4m3.
// Every lane of the warp calls it.
__device__ __forceinline__ void store_quantized_row(void* base, Elem e, int64_t at,
                                                    const float (&xa)[8], const float (&xb)[8],
                                                    bool has_a, bool has_b, bool wa, bool wb,
                                                    int ca, int cb, int idx, int width,
                                                    float* scale) {
  const float qmax = quantized_max(e);
  if (e == Elem::int8) {
    const float m = group_absmax(xa, xb, has_a, has_b, width);
    const float inv = quantize_inv(m, qmax);
    if (wa) store_int8x8(base, at + 8 * ca, xa, inv);
    if (wb) store_int8x8(base, at + 8 * cb, xb, inv);
    if (wa && idx == 0) *scale = store_scale(m, qmax);
    return;
  }
  // e4m3: a row without NaN or infinity (the usual one) converts two at a time.
  float m = group_absmax_or_nan(xa, xb, has_a, has_b, width);
  const bool finite = m == m && m < __int_as_float(0x7f800000);
  if (__any_sync(kFullMask, !finite)) {
    const float skipped = group_absmax(xa, xb, has_a, has_b, width);
    if (!finite) m = skipped;
  }
  const float inv = quantize_inv(m, qmax);
  const bool fast = finite && inv < __int_as_float(0x7f800000);
  if (wa) {
    if (fast)
      store_e4m3x8_finite(base, at + 8 * ca, xa, inv);
    else
      store_quantized8(base, e, at + 8 * ca, xa, inv);
  }
  if (wb) {
    if (fast)
      store_e4m3x8_finite(base, at + 8 * cb, xb, inv);
    else
      store_quantized8(base, e, at + 8 * cb, xb, inv);
  }
  if (wa && idx == 0) *scale = store_scale(m, qmax);
}

}  // namespace kvcache::cuda
