// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Balanced decode (AttnKernelParams::balanced_ctas = G > 0; one query row per sequence): the
// visible keys of every row group (row, kv head, sub-group) are cut into tiles of kAttnBalanceTile
// keys and laid end to end, rows in order, U tiles in all; CTA c streams tiles
// [c U / G, (c + 1) U / G) (G capped at U: a CTA per tile when the rows are shorter than the
// schedule's). Every CTA gets the same number of keys whatever the lengths, so a
// ragged batch costs what a uniform batch of the same total does, and there is one wave of CTAs
// with no tail. A row group cut between CTAs c0..c1 is a piece of each, merged by the last of them
// to finish (finish_item). Partial slots: a CTA's first piece goes to slot c, its last piece (when
// it is not also its first) to slot G + c; every piece but a row group's first is the first piece
// of its CTA, so piece k >= 1 of a row group sits in slot c0 + k. Each CTA derives U and where its
// range starts from all the lengths: one load per row and a block scan. A row whose length or page
// list is bad has no tiles; CTA 0 records it.

#include "attention_common.cuh"

namespace kvcache::cuda {

inline constexpr int kAttnBalanceTile = 16;

// Visible-key tiles of each of sequence b's row groups; 0 for a bad row (recorded when report).
__device__ inline int balanced_row_tiles(const AttnKernelParams& p, int b, bool report) {
  AttnItem it;
  it.b = b;
  if (!resolve_keys(p, it, 1, 0, report)) return 0;
  return (it.num_vis + kAttnBalanceTile - 1) / kAttnBalanceTile;
}

// Calls piece(it, pc) for every piece of this CTA's range, in order (the same calls on every
// thread). rows_per_cta: the kernel's query heads per CTA.
template <class F>
__device__ void for_each_balanced_piece(const AttnKernelParams& p, int rows_per_cta, F&& piece) {
  __shared__ int64_t warp_tiles[kAttnWarps];
  __shared__ int first_row;
  __shared__ int64_t first_row_start;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int groups = p.num_kv_heads * p.subgroups;  // row groups per sequence
  const int64_t c = blockIdx.x;

  // Thread t sums the tiles of rows [t per, (t + 1) per); an inclusive scan over the threads.
  const int per = (p.batch + kAttnThreads - 1) / kAttnThreads;
  const int r0 = min(p.batch, tid * per);
  const int r1 = min(p.batch, r0 + per);
  const bool report = c == 0;
  int64_t mine = 0;
  for (int b = r0; b < r1; ++b)
    mine += static_cast<int64_t>(groups) * balanced_row_tiles(p, b, report);
  int64_t incl = mine;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int64_t x = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += x;
  }
  if (lane == 31) warp_tiles[warp] = incl;
  __syncthreads();
  int64_t total = 0;
#pragma unroll
  for (int w = 0; w < kAttnWarps; ++w) {
    if (w < warp) incl += warp_tiles[w];
    total += warp_tiles[w];
  }
  // With fewer tiles than CTAs (a schedule made for longer rows), one tile per CTA: every CTA
  // the ranges count has a piece, so the merges' counts hold.
  const int64_t ctas = min(static_cast<int64_t>(p.balanced_ctas), total);
  if (c >= ctas) return;
  const int64_t u0 = c * total / ctas;
  const int64_t u1 = (c + 1) * total / ctas;
  const int64_t excl = incl - mine;
  if (excl <= u0 && u0 < incl) {  // u0 lies in this thread's rows
    int64_t start = excl;
    for (int b = r0; b < r1; ++b) {
      const int64_t tiles = static_cast<int64_t>(groups) * balanced_row_tiles(p, b, false);
      if (u0 < start + tiles) {
        first_row = b;
        first_row_start = start;
        break;
      }
      start += tiles;
    }
  }
  __syncthreads();

  // CTA of tile u, and the first tile of CTA k.
  const auto owner = [&](int64_t u) { return static_cast<int>(((u + 1) * ctas - 1) / total); };
  const auto first_tile = [&](int64_t k) { return k * total / ctas; };
  int64_t start = first_row_start;  // the first tile of row b
  int64_t u = u0;
  for (int b = first_row; u < u1 && b < p.batch; ++b) {
    AttnItem it;
    it.b = b;
    if (!resolve_keys(p, it, 1, 0, false)) continue;  // no tiles
    const int tiles = (it.num_vis + kAttnBalanceTile - 1) / kAttnBalanceTile;
    const int64_t row_end = start + static_cast<int64_t>(groups) * tiles;
    it.q_row0 = b;
    it.ok = true;
    while (u < u1 && u < row_end) {
      const int h = static_cast<int>((u - start) / tiles);
      const int64_t rg_start = start + static_cast<int64_t>(h) * tiles;
      const int64_t rg_end = rg_start + tiles;
      const int64_t piece_end = min(u1, rg_end);
      it.row_group = b * groups + h;
      resolve_heads(p, it, rows_per_cta);
      it.rows = it.heads;
      AttnPiece pc;
      pc.v0 = static_cast<int>(u - rg_start) * kAttnBalanceTile;
      pc.v1 = min(it.num_vis, static_cast<int>(piece_end - rg_start) * kAttnBalanceTile);
      const int c0 = owner(rg_start);
      pc.parts = owner(rg_end - 1) - c0 + 1;
      if (pc.parts > 1) {
        const int64_t n = p.item_floats;
        pc.mine = p.partials + (u == u0 ? c : ctas + c) * n;
        pc.first = p.partials + (rg_start == first_tile(c0) ? c0 : ctas + c0) * n;
        pc.rest = p.partials + c0 * n;
      }
      piece(it, pc);
      u = piece_end;
    }
    start = row_end;
  }
}

}  // namespace kvcache::cuda
