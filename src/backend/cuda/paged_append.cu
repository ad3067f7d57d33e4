// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// paged_append on CUDA: one launch writes every (token, kv head) row of K and of V. Each row is
// held by a group of lanes: width = the power of two >= dim / 16 lanes, each with up to two chunks
// of 8 elements (16-byte loads and stores, write_common.cuh's ChunkMap; K and V rows in separate
// warps, 32 / width rows per warp), or, where a dim is not a multiple of 8 or a pointer is not
// 16-byte aligned, one warp per row with lanes striding over its elements. Each group looks up its
// token's slot, its loads issued with the row's (device indices checked afterwards; a bad one
// skips the row, and the group of head 0 of K counts it once per token).

#include <cstdint>

#include "backend/cuda/device/append_row.cuh"
#include "backend/cuda/device/write_common.cuh"
#include "backend/cuda/write_launch.cuh"
#include "backend/cuda_write_ops.h"

namespace kvcache::backend {
namespace {

using cuda::DevicePool;
using cuda::DeviceSlots;
using cuda::FastDiv;

struct PagedAppendKernelParams {
  const void* src[2] = {};  // K, V: [num_tokens, num_kv_heads, dim]
  DevicePool pool[2];
  DeviceSlots slots;
  int64_t num_rows = 0;  // num_tokens * num_kv_heads, per side
  int64_t num_kv_heads = 0;
  FastDiv heads_div;
  int64_t warps_k = 0;  // warps of K rows; the V rows' follow
  int64_t warps_v = 0;
  int32_t width[2] = {32, 32};  // lanes per row (a power of two)
  cuda::DeviceErrorRecord* errors = nullptr;
};

// kVec: rows of 8-element chunks (every dim % 8 == 0, pointers 16-byte aligned); else one warp
// per row, element by element.
template <class In, bool kVec>
__global__ void __launch_bounds__(cuda::kWriteThreads)
    paged_append_kernel(const __grid_constant__ PagedAppendKernelParams p) {
  cuda::begin_write_kernel();
  const int lane = cuda::lane_id();
  const int64_t warp = cuda::grid_warp();
  const int side = warp < p.warps_k ? 0 : 1;
  const int64_t w = side == 0 ? warp : warp - p.warps_k;
  if (side == 1 && w >= p.warps_v) return;  // the whole warp
  const int width = kVec ? p.width[side] : 32;
  const cuda::LaneGroup g = cuda::lane_group(width);
  const int idx = g.idx;
  const int64_t row = (w << (5 - g.shift)) + g.group;
  const DevicePool& pool = p.pool[side];
  const int dim = pool.dim;
  const bool in_range = row < p.num_rows;
  const int64_t token = in_range ? p.heads_div.div(static_cast<uint32_t>(row)) : 0;
  const int64_t head = row - token * p.num_kv_heads;
  const In* src = static_cast<const In*>(p.src[side]) + row * dim;
  // The row's loads and the slot's first round together; nothing waits for a check.
  const cuda::ChunkMap map{0, dim / 8};
  cuda::LaneRow<In> lr;
  if constexpr (kVec) lr = cuda::load_lane_row(src, map, idx, in_range);
  cuda::SlotLookup look;
  if (in_range) cuda::slot_load(p.slots, token, &look);
  if (in_range) cuda::slot_load_range(p.slots, &look);
  int64_t page = 0;
  int64_t in_page = 0;
  cuda::BadIndex bad;
  bool active = in_range;
  if (active && !cuda::slot_finish(p.slots, token, look, &page, &in_page, &bad)) {
    active = false;
    if (side == 0 && head == 0 && idx == 0)
      cuda::record(p.errors, cuda::ErrorOp::paged_append, bad);
  }
  const int64_t at = pool.row(page, in_page, head);
  float* scale =
      cuda::is_quantized(pool.elem) ? pool.scales + pool.scale_at(page, in_page, head) : nullptr;
  if constexpr (kVec) {
    cuda::write_row(lr, active, idx, width, pool, at, scale);
  } else {
    cuda::write_row_scalar(src, dim, active, lane, pool, at, scale);
  }
}

}  // namespace

Status cuda_paged_append(const CudaPagedAppendParams& p, const Stream& stream) {
  constexpr std::string_view kOp = "paged_append";
  const int64_t rows = p.num_tokens * p.num_kv_heads;
  if (rows == 0) return Status();
  PagedAppendKernelParams k;
  k.src[0] = p.k_src;
  k.src[1] = p.v_src;
  k.pool[0] = cuda::device_pool(p.k);
  k.pool[1] = cuda::device_pool(p.v);
  k.slots = cuda::device_slots(p.slots);
  k.num_rows = rows;
  k.num_kv_heads = p.num_kv_heads;
  k.heads_div = FastDiv::make(static_cast<uint32_t>(p.num_kv_heads));
  k.errors = static_cast<cuda::DeviceErrorRecord*>(p.errors);
  const bool vec = cuda::pool_vectorizable(p.k) && cuda::pool_vectorizable(p.v) && p.k.dim <= 256 &&
                   p.v.dim <= 256 && cuda::aligned(p.k_src, 16) && cuda::aligned(p.v_src, 16);
  for (int s = 0; s < 2; ++s) {
    const int64_t dim = s == 0 ? p.k.dim : p.v.dim;
    k.width[s] =
        vec ? cuda::pow2_at_least(cuda::ChunkMap::lanes(0, static_cast<int>(dim / 8))) : 32;
  }
  k.warps_k = cuda::ceil_div(rows, 32 / k.width[0]);
  k.warps_v = cuda::ceil_div(rows, 32 / k.width[1]);
  const auto blocks =
      static_cast<unsigned>(cuda::ceil_div(k.warps_k + k.warps_v, cuda::kWriteThreads / 32));
  cuda::ScopedDevice device(stream.device.index);
  if (device.error() != cudaSuccess) return cuda::launch_status(kOp, device.error());
  auto* s = static_cast<cudaStream_t>(stream.cuda_stream);
  return cuda::dispatch_input(p.src_dtype, kOp, [&]<class In>(std::type_identity<In>) {
    auto* kernel = vec ? paged_append_kernel<In, true> : paged_append_kernel<In, false>;
    return cuda::launch_status(
        kOp, cuda::launch_write_kernel(kernel, dim3(blocks), dim3(cuda::kWriteThreads), s, k));
  });
}

}  // namespace kvcache::backend
