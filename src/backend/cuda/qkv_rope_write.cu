// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// qkv_rope_write on CUDA: one launch over every row of the packed input (per token: num_q_heads q
// rows, num_kv_heads k rows, num_kv_heads v rows), each row read once. Two shapes of the kernel:
//  - vector (head dims multiples of 8 up to 256, neox frequencies in whole chunks of 8, pointers
//    16-byte aligned): a group of lanes holds a row, each lane up to two chunks of 8 elements in
//    registers from 16-byte loads to 16-byte stores (write_common.cuh's ChunkMap; for neox, a lane
//    holds both halves of its rotations, so no lane needs another's); the RMS-norm sum runs in the
//    CPU's order over squares staged in shared memory; v rows in warps of their own. A decode step
//    is latency-bound, so the loads go in rounds that need nothing checked first: the row, the RoPE
//    positions and the slot entry; then the cos / sin rows (positions clamped) and the page range;
//    the checks only decide which stores happen;
//  - scalar (any other shape): a warp per row, lanes striding over its elements.
// Per token, a bad RoPE position skips its q and k rows (counted by the group of q row 0), a bad
// slot its k and v rows (counted by the group of v row 0).

#include <cstdint>

#include "backend/cuda/device/append_row.cuh"
#include "backend/cuda/device/rope_write.cuh"
#include "backend/cuda/device/write_common.cuh"
#include "backend/cuda/write_launch.cuh"
#include "backend/cuda_write_ops.h"

namespace kvcache::backend {
namespace {

using cuda::DevicePool;
using cuda::DeviceRope;
using cuda::DeviceSlots;
using cuda::Elem;
using cuda::FastDiv;
using cuda::StreamPositions;

struct QkvKernelParams {
  const void* qkv = nullptr;
  int64_t row_stride = 0;  // elements
  void* q_out = nullptr;
  Elem q_elem = Elem::bf16;
  const float* q_w = nullptr;  // null: no QK-norm
  const float* k_w = nullptr;
  float eps = 0.0f;
  float offset = 0.0f;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t head_dim_v = 0;
  int64_t num_tokens = 0;
  const int32_t* positions = nullptr;  // [num_streams, num_tokens]
  DeviceRope rope;
  DevicePool k;
  DevicePool v;
  DeviceSlots slots;
  // The schedule: warps_per_token warps per token, the first warps_qk on q / k rows.
  int32_t width_qk = 32;
  int32_t width_v = 32;
  int32_t pairs_qk = 0;  // the ChunkMap of q / k rows: neox rotary_dim / 16, gptj 0
  int64_t warps_qk = 0;
  int64_t warps_per_token = 0;
  FastDiv token_div;     // by warps_per_token
  bool f32_out = false;  // q or k stored as f32
  cuda::DeviceErrorRecord* errors = nullptr;
};

// Round 1 of the RoPE lookup: token t's position in each stream (the streams after the first
// behind one branch, so that the usual single stream issues one load).
__device__ __forceinline__ void load_positions(const QkvKernelParams& p, int64_t t,
                                               StreamPositions* sp) {
  sp->p[0] = p.positions[t];
  if (p.rope.num_streams == 1) return;
#pragma unroll
  for (int s = 1; s < 4; ++s) {
    if (s < p.rope.num_streams) sp->p[s] = p.positions[s * p.num_tokens + t];
  }
}

// Whether every position of token t is in range (each bad one counted when `counts`); clamps them
// into the table, so that its loads need no check.
__device__ __forceinline__ bool check_positions(const QkvKernelParams& p, int64_t t, bool counts,
                                                StreamPositions* sp) {
  bool ok = true;
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    if (s >= p.rope.num_streams) break;
    const int32_t pos = sp->p[s];
    if (pos >= 0 && pos < p.rope.max_position) continue;
    ok = false;
    sp->p[s] = pos < 0 ? 0 : static_cast<int32_t>(p.rope.max_position - 1);
    if (counts) {
      cuda::record_error(p.errors, cuda::ErrorOp::qkv_rope_write, cuda::ErrorArg::positions,
                         s * p.num_tokens + t, pos, 0, p.rope.max_position);
    }
  }
  return ok;
}

// The last round of the token's slot lookup for its k / v rows; false when an index is out of
// range (counted when `counts`).
__device__ __forceinline__ bool token_slot(const QkvKernelParams& p, int64_t t,
                                           const cuda::SlotLookup& look, bool counts, int64_t* page,
                                           int64_t* in_page) {
  cuda::BadIndex bad;
  if (cuda::slot_finish(p.slots, t, look, page, in_page, &bad)) return true;
  if (counts) cuda::record(p.errors, cuda::ErrorOp::qkv_rope_write, bad);
  return false;
}

__device__ __forceinline__ float* scale_of(const DevicePool& pool, int64_t page, int64_t in_page,
                                           int64_t head) {
  return cuda::is_quantized(pool.elem) ? pool.scales + pool.scale_at(page, in_page, head) : nullptr;
}

// --- vector kernel ---

template <class In>
__device__ __forceinline__ void vec_v_rows(const QkvKernelParams& p, const In* row_in, int64_t t,
                                           int64_t w, int lane) {
  const int width = p.width_v;
  const cuda::LaneGroup g = cuda::lane_group(width);
  const int idx = g.idx;
  const int64_t h = (w << (5 - g.shift)) + g.group;
  const int dim = p.head_dim_v;
  const bool in_range = h < p.num_kv_heads;
  const cuda::ChunkMap map{0, dim / 8};
  const In* src =
      row_in + static_cast<int64_t>(p.num_q_heads + p.num_kv_heads) * p.head_dim + h * dim;
  const cuda::LaneRow<In> lr = cuda::load_lane_row(src, map, idx, in_range);
  cuda::SlotLookup look;
  if (in_range) {
    cuda::slot_load(p.slots, t, &look);
    cuda::slot_load_range(p.slots, &look);
  }
  int64_t page = 0;
  int64_t in_page = 0;
  const bool write = in_range && token_slot(p, t, look, h == 0 && idx == 0, &page, &in_page);
  cuda::write_row(lr, write, idx, width, p.v, p.v.row(page, in_page, h),
                  scale_of(p.v, page, in_page, h));
}

// The norm weights of chunk c.
__device__ __forceinline__ void load_weights(const float* w, int c, float (&g)[8]) {
  const float4 w0 = __ldg(reinterpret_cast<const float4*>(w + 8 * c));
  const float4 w1 = __ldg(reinterpret_cast<const float4*>(w + 8 * c + 4));
  g[0] = w0.x, g[1] = w0.y, g[2] = w0.z, g[3] = w0.w;
  g[4] = w1.x, g[5] = w1.y, g[6] = w1.z, g[7] = w1.w;
}

// kNorm: QK-norm (q_w and k_w set), with stage_float4s(32 / width_qk, head_dim / 8) float4s of
// dynamic shared memory per warp. kQuantK: k stored as int8 / e4m3, its own instance, so that the
// quantizer's registers do not cost the 16-bit one occupancy: without QK-norm, 9 CTAs per SM fit
// 56 registers (ptxas would take 62-64), 8 fit 64.
template <class In, bool kNorm, bool kQuantK>
__global__ void __launch_bounds__(cuda::kWriteThreads, kNorm ? 1 : (kQuantK ? 8 : 9))
    qkv_rope_write_vec(const __grid_constant__ QkvKernelParams p) {
  extern __shared__ float4 norm_stage[];
  cuda::begin_write_kernel();
  const int lane = cuda::lane_id();
  const int64_t warp = cuda::grid_warp();
  if (warp >= p.num_tokens * p.warps_per_token) return;  // the whole warp
  const int64_t t = p.token_div.div(static_cast<uint32_t>(warp));
  const int64_t w = warp - t * p.warps_per_token;
  const In* row_in = static_cast<const In*>(p.qkv) + t * p.row_stride;
  if (w >= p.warps_qk) return vec_v_rows(p, row_in, t, w - p.warps_qk, lane);

  const int width = p.width_qk;
  const cuda::LaneGroup g = cuda::lane_group(width);
  const int idx = g.idx;
  const int64_t r = (w << (5 - g.shift)) + g.group;
  const int dim = p.head_dim;
  const cuda::ChunkMap map{p.pairs_qk, dim / 8};
  const bool row_ok = r < p.num_q_heads + p.num_kv_heads;
  const bool is_q = r < p.num_q_heads;
  const bool is_k = row_ok && !is_q;
  const DeviceRope& rope = p.rope;

  // Round 1: the row, the RoPE positions, the slot entry (k rows), the norm weights.
  const cuda::LaneRow<In> lr = cuda::load_lane_row(row_in + r * dim, map, idx, row_ok);
  StreamPositions sp;
  load_positions(p, t, &sp);
  cuda::SlotLookup look;
  if (is_k) cuda::slot_load(p.slots, t, &look);
  float ga[8] = {}, gb[8] = {};
  const float* wt = is_q ? p.q_w : p.k_w;
  if constexpr (kNorm) {
    if (lr.has_a) load_weights(wt, lr.ca, ga);
    if (lr.has_b) load_weights(wt, lr.cb, gb);
  }

  // Round 2: cos / sin at the (clamped) positions, the sequence's page range.
  // neox: frequencies 8 idx + k (lanes idx < pairs); gptj: 4 of each chunk. In the lean instance
  // (16-bit k, no QK-norm) every lane clamps the positions and may load from the table, so cs / sn
  // are set and read under the same condition and need no zeroing (16 registers cleared on every
  // lane: 2% of the chunk's instructions), and 16-bit stores branch on the type. The other
  // instances keep the zeroed, row-gated, predicated form: with the lean form the QK-norm chunk
  // ran 11-20% slower and the quantized ones 2-3% (H100, sessions 6-7; cause not isolated).
  constexpr bool kLean = !kNorm && !kQuantK;
  bool active = false;
  float cs[8], sn[8];
  if constexpr (!kLean) {
    active = row_ok && check_positions(p, t, r == 0 && idx == 0, &sp);
#pragma unroll
    for (int k = 0; k < 8; ++k) cs[k] = sn[k] = 0.0f;
  } else {
    active = check_positions(p, t, r == 0 && idx == 0, &sp) && row_ok;
  }
  const bool load_table = kLean || row_ok;
  if (!rope.gptj) {
    if (load_table && idx < map.pairs) cuda::load_cos_sin<8>(rope, sp, 8 * idx, cs, sn);
  } else if (load_table) {
    float c4[4] = {}, s4[4] = {};
    if (lr.has_a) cuda::load_cos_sin<4>(rope, sp, 4 * lr.ca, c4, s4);
    float c4b[4] = {}, s4b[4] = {};
    if (lr.has_b) cuda::load_cos_sin<4>(rope, sp, 4 * lr.cb, c4b, s4b);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      cs[q] = c4[q], sn[q] = s4[q], cs[4 + q] = c4b[q], sn[4 + q] = s4b[q];
    }
  }
  if (is_k) cuda::slot_load_range(p.slots, &look);

  // While they load: widen, QK-norm. Unless q or k is stored as f32, a NaN shows only its sign
  // in what this row stores (16-bit narrowing, int8 / e4m3 codes, arithmetic's own NaN), so bf16
  // widens by a shift, without quieting NaNs (~50 instructions per lane fewer).
  float xa[8], xb[8];
  if (p.f32_out) {
    cuda::to_float8(lr.a, xa);
    cuda::to_float8(lr.b, xb);
  } else {
    cuda::to_float8_nan_sign_only(lr.a, xa);
    cuda::to_float8_nan_sign_only(lr.b, xb);
  }
  if constexpr (kNorm) {
    float4* stage =
        norm_stage + threadIdx.x / 32 * cuda::stage_float4s(32 >> g.shift, map.num_chunks);
    const float rn = cuda::norm_factor(cuda::stage_sum(stage, g.group, 32 >> g.shift, map, xa, xb,
                                                       lr.ca, lr.cb, lr.has_a, lr.has_b),
                                       p.eps, dim);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      xa[k] = cuda::norm_scale(xa[k], rn, p.offset, ga[k]);
      xb[k] = cuda::norm_scale(xb[k], rn, p.offset, gb[k]);
    }
  }

  // Round 3 (page table), then the rotation.
  int64_t page = 0;
  int64_t in_page = 0;
  if (is_k && active) active = token_slot(p, t, look, false, &page, &in_page);
  if (!rope.gptj) {
    if (idx < map.pairs) {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float x1 = xa[k];
        const float x2 = xb[k];
        xa[k] = cuda::rotate_first(x1, x2, cs[k], sn[k]);
        xb[k] = cuda::rotate_second(x1, x2, cs[k], sn[k]);
      }
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (8 * lr.ca + 2 * q < rope.rotary_dim) {
        const float x1 = xa[2 * q];
        const float x2 = xa[2 * q + 1];
        xa[2 * q] = cuda::rotate_first(x1, x2, cs[q], sn[q]);
        xa[2 * q + 1] = cuda::rotate_second(x1, x2, cs[q], sn[q]);
      }
      if (8 * lr.cb + 2 * q < rope.rotary_dim) {
        const float x1 = xb[2 * q];
        const float x2 = xb[2 * q + 1];
        xb[2 * q] = cuda::rotate_first(x1, x2, cs[4 + q], sn[4 + q]);
        xb[2 * q + 1] = cuda::rotate_second(x1, x2, cs[4 + q], sn[4 + q]);
      }
    }
  }

  const bool wa = active && lr.has_a;
  const bool wb = active && lr.has_b;
  if (is_q) {
    const int64_t at = (t * p.num_q_heads + r) * dim;
    if (wa) cuda::store_float8<kLean>(p.q_out, p.q_elem, at + 8 * lr.ca, xa);
    if (wb) cuda::store_float8<kLean>(p.q_out, p.q_elem, at + 8 * lr.cb, xb);
    if constexpr (!kQuantK) return;  // else on to the group maximum with the warp's k rows
  }
  const int64_t head = is_q ? 0 : r - p.num_q_heads;
  const int64_t at = p.k.row(page, in_page, head);
  if constexpr (!kQuantK) {
    if (wa) cuda::store_float8<kLean>(p.k.data, p.k.elem, at + 8 * lr.ca, xa);
    if (wb) cuda::store_float8<kLean>(p.k.data, p.k.elem, at + 8 * lr.cb, xb);
  } else {  // every lane of the warp, q rows included (they store nothing)
    cuda::store_quantized_row(p.k.data, p.k.elem, at, xa, xb, lr.has_a, lr.has_b, wa && !is_q,
                              wb && !is_q, lr.ca, lr.cb, idx, width,
                              scale_of(p.k, page, in_page, head));
  }
}

// --- scalar kernel: a warp per row ---

template <class In>
__global__ void __launch_bounds__(cuda::kWriteThreads)
    qkv_rope_write_scalar(const __grid_constant__ QkvKernelParams p) {
  cuda::begin_write_kernel();
  const int lane = cuda::lane_id();
  const int64_t warp = cuda::grid_warp();
  if (warp >= p.num_tokens * p.warps_per_token) return;
  const int64_t t = p.token_div.div(static_cast<uint32_t>(warp));
  const int64_t r = warp - t * p.warps_per_token;
  const In* row_in = static_cast<const In*>(p.qkv) + t * p.row_stride;
  const int dim = p.head_dim;
  int64_t page = 0;
  int64_t in_page = 0;
  cuda::SlotLookup look;
  if (r >= p.num_q_heads) {  // k and v rows
    cuda::slot_load(p.slots, t, &look);
    cuda::slot_load_range(p.slots, &look);
  }
  if (r >= p.warps_qk) {  // a v row
    const int64_t h = r - p.warps_qk;
    const bool active = token_slot(p, t, look, h == 0 && lane == 0, &page, &in_page);
    cuda::write_row_scalar(row_in + p.warps_qk * dim + h * p.head_dim_v, p.head_dim_v, active, lane,
                           p.v, p.v.row(page, in_page, h), scale_of(p.v, page, in_page, h));
    return;
  }
  const bool is_q = r < p.num_q_heads;
  StreamPositions sp;
  load_positions(p, t, &sp);
  bool active = check_positions(p, t, r == 0 && lane == 0, &sp);
  if (active && !is_q) active = token_slot(p, t, look, false, &page, &in_page);
  const In* src = row_in + r * dim;
  const float* wt = is_q ? p.q_w : p.k_w;
  float rn = 1.0f;
  if (wt != nullptr) {
    float ss = 0.0f;
    if (lane == 0 && active) {
      for (int i = 0; i < dim; ++i) {
        const float v = cuda::load_elem(src, i);
        ss = __fadd_rn(ss, __fmul_rn(v, v));
      }
    }
    rn = cuda::norm_factor(__shfl_sync(cuda::kFullMask, ss, 0), p.eps, dim);
  }
  const DeviceRope& rope = p.rope;
  auto normed = [&](int i) {
    const float v = cuda::load_elem(src, i);
    return wt != nullptr ? cuda::norm_scale(v, rn, p.offset, wt[i]) : v;
  };
  auto table = [&](const float* t_cos_or_sin, int f) {
    const int64_t pos = cuda::position_of(sp, cuda::section_of(rope, f));
    return __ldg(t_cos_or_sin + pos * rope.num_freqs + f);
  };
  auto value = [&](int e) {
    if (e >= rope.rotary_dim) return normed(e);
    const int nf = rope.num_freqs;
    if (rope.gptj) {
      const int f = e / 2;
      const float x1 = normed(2 * f);
      const float x2 = normed(2 * f + 1);
      const float c = table(rope.cos, f);
      const float s = table(rope.sin, f);
      return e % 2 == 0 ? cuda::rotate_first(x1, x2, c, s) : cuda::rotate_second(x1, x2, c, s);
    }
    const int f = e < nf ? e : e - nf;
    const float x1 = normed(f);
    const float x2 = normed(f + nf);
    const float c = table(rope.cos, f);
    const float s = table(rope.sin, f);
    return e < nf ? cuda::rotate_first(x1, x2, c, s) : cuda::rotate_second(x1, x2, c, s);
  };
  if (is_q) {
    cuda::store_row_scalar(value, dim, active, lane, p.q_elem, p.q_out,
                           (t * p.num_q_heads + r) * dim, nullptr);
  } else {
    const int64_t head = r - p.num_q_heads;
    cuda::store_row_scalar(value, dim, active, lane, p.k.elem, p.k.data,
                           p.k.row(page, in_page, head), scale_of(p.k, page, in_page, head));
  }
}

}  // namespace

Status cuda_qkv_rope_write(const CudaQkvRopeWriteParams& p, const CudaRopeTable& table,
                           const Stream& stream) {
  constexpr std::string_view kOp = "qkv_rope_write";
  if (p.num_tokens == 0) return Status();
  QkvKernelParams k;
  k.qkv = p.qkv;
  k.row_stride = p.qkv_row_stride;
  k.q_out = p.q_out;
  k.q_elem = cuda::to_elem(p.q_dtype);
  k.q_w = p.q_norm_weight;
  k.k_w = p.k_norm_weight;
  k.eps = p.norm_eps;
  k.offset = p.norm_weight_offset;
  k.num_q_heads = static_cast<int32_t>(p.num_q_heads);
  k.num_kv_heads = static_cast<int32_t>(p.num_kv_heads);
  k.head_dim = static_cast<int32_t>(p.head_dim);
  k.head_dim_v = static_cast<int32_t>(p.head_dim_v);
  k.num_tokens = p.num_tokens;
  k.positions = p.positions;
  DeviceRope& rope = k.rope;
  rope.cos = table.cos;
  rope.sin = table.sin;
  rope.max_position = table.max_position;
  rope.num_freqs = static_cast<int32_t>(table.num_freqs);
  rope.rotary_dim = static_cast<int32_t>(p.rotary_dim);
  rope.num_streams = p.num_streams;
  for (int s = 0; s < 5; ++s) {
    rope.section_begin[s] =
        static_cast<int32_t>(s <= p.num_streams ? p.section_begin[s] : table.num_freqs);
  }
  rope.gptj = p.gptj;
  rope.table_vec4 =
      table.num_freqs % 4 == 0 && cuda::aligned(table.cos, 16) && cuda::aligned(table.sin, 16);
  k.k = cuda::device_pool(p.k);
  k.f32_out = k.q_elem == Elem::f32 || k.k.elem == Elem::f32;
  k.v = cuda::device_pool(p.v);
  k.slots = cuda::device_slots(p.slots);
  k.errors = static_cast<cuda::DeviceErrorRecord*>(p.errors);

  const bool weights_aligned = p.q_norm_weight == nullptr || (cuda::aligned(p.q_norm_weight, 16) &&
                                                              cuda::aligned(p.k_norm_weight, 16));
  const bool vec = p.head_dim % 8 == 0 && p.head_dim <= 256 && p.head_dim_v <= 256 &&
                   (p.gptj || table.num_freqs % 8 == 0) && cuda::aligned(p.qkv, 16) &&
                   p.qkv_row_stride % 8 == 0 && cuda::aligned(p.q_out, 16) &&
                   cuda::pool_vectorizable(p.k) && cuda::pool_vectorizable(p.v) && weights_aligned;
  const int64_t qk_rows = p.num_q_heads + p.num_kv_heads;
  int smem = 0;
  if (vec) {
    const int chunks = static_cast<int>(p.head_dim / 8);
    k.pairs_qk = p.gptj ? 0 : static_cast<int32_t>(table.num_freqs / 8);
    k.width_qk = cuda::pow2_at_least(cuda::ChunkMap::lanes(k.pairs_qk, chunks));
    k.width_v = cuda::pow2_at_least(cuda::ChunkMap::lanes(0, static_cast<int>(p.head_dim_v / 8)));
    k.warps_qk = cuda::ceil_div(qk_rows, 32 / k.width_qk);
    k.warps_per_token = k.warps_qk + cuda::ceil_div(p.num_kv_heads, 32 / k.width_v);
    if (p.q_norm_weight != nullptr) {
      smem = cuda::kWriteThreads / 32 * cuda::stage_float4s(32 / k.width_qk, chunks) *
             static_cast<int>(sizeof(float4));
    }
  } else {
    k.warps_qk = qk_rows;
    k.warps_per_token = qk_rows + p.num_kv_heads;
  }
  const int64_t warps = p.num_tokens * k.warps_per_token;
  if (warps > kCudaMaxElements) {
    return Status::invalid_argument(std::string(kOp) + ": " + std::to_string(p.num_tokens) +
                                    " tokens need more than 2^31 - 1 warps, expected fewer "
                                    "(split the call)");
  }
  k.token_div = FastDiv::make(static_cast<uint32_t>(k.warps_per_token));
  const auto blocks = static_cast<unsigned>(cuda::ceil_div(warps, cuda::kWriteThreads / 32));
  cuda::ScopedDevice device(stream.device.index);
  if (device.error() != cudaSuccess) return cuda::launch_status(kOp, device.error());
  auto* s = static_cast<cudaStream_t>(stream.cuda_stream);
  return cuda::dispatch_input(p.qkv_dtype, kOp, [&]<class In>(std::type_identity<In>) {
    const bool norm = p.q_norm_weight != nullptr;
    const bool quant_k = k.k.elem == Elem::int8 || k.k.elem == Elem::e4m3;
    auto* kernel = !vec              ? qkv_rope_write_scalar<In>
                   : norm && quant_k ? qkv_rope_write_vec<In, true, true>
                   : norm            ? qkv_rope_write_vec<In, true, false>
                   : quant_k         ? qkv_rope_write_vec<In, false, true>
                                     : qkv_rope_write_vec<In, false, false>;
    return cuda::launch_status(
        kOp, cuda::launch_write_kernel_smem(kernel, dim3(blocks), dim3(cuda::kWriteThreads),
                                            static_cast<size_t>(smem), s, k));
  });
}

}  // namespace kvcache::backend
