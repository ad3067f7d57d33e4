// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The attention kernel on tensor cores (mma.sync m16n8k16, f32 accumulation) for bf16, f16, int8
// and fp8_e4m3 K/V with head_dim 64, 128 or 256 (8-bit: 128 or 256).
//
// A CTA of 4 warps (8 for one-wave grids with long chunks) serves one work item
// (attention_common.cuh) whose query heads (up to 16: the MMA's M rows; the rest padding) share
// one kv head. The chunk's keys are cut into tiles of 16; warp w takes tiles w, w + warps, ... and
// streams each tile's K and V rows (and scales) into its own ring of kStages shared-memory stages
// with cp.async, so loads for later tiles are in flight while it computes. Per tile: S = Q K^T (two
// n8 tiles of keys, head_dim / 16 k-steps), online softmax on S in registers (a rescale only when a
// row's max grows), O += P V (head_dim / 8 n8 tiles). Every warp is one slot of the epilogue.
//
// Operands. Q (scaled by sm_scale * log2 e) and P are rounded to the MMA type (bf16 for bf16 K/V,
// else f16). K and V tiles sit in shared memory as stored, rows unpadded, their 16-byte chunks
// swizzled (tile_chunk) so that ldmatrix is conflict-free and every 32-byte global sector lands in
// one 32-byte block of shared memory (a row padded by 16 bytes instead made L2 send every other
// row's sectors twice: 24 sectors per 512-byte copy where 16 do). 16-bit K: ldmatrix gives the B
// fragments of Q K^T directly; 16-bit V: ldmatrix.trans those of P V. 8-bit K: a b16 of ldmatrix
// holds two stored bytes, so one 8x8 matrix (8 keys x 16 dims) converts to a whole k16 B fragment
// whose k order is dims (4c, 4c + 1 | 4c + 2, 4c + 3) for c = lane % 4: Q's A fragments use the
// same order. 8-bit V: ldmatrix.trans gives each lane two keys x two adjacent dims; a byte permute
// splits them into the B fragments of an "even dims" and an "odd dims" n8 tile. e4m3 -> f16 by
// cvt. int8 -> f16 by the 0x6400 magic: a byte permute makes 1024 + (k + 128) exactly, and the
// constant 1152 stays in: Q (K + 1152) = Q K + 1152 sum(Q) per query row (subtracted from the
// scores, sum(Q) taken from Q's f16 fragments), P (V + 1152) = P V + 1152 sum(P) per row (one
// more MMA against ones sums the same f16 P; subtracted once at the end). Both subtractions cost
// f32 rounding of values ~10x the result's size, far below the f16 rounding of Q and P. Scales:
// the K scale multiplies the score column, the V scale the softmax weight.

#include <type_traits>

#include "attention_common.cuh"

namespace kvcache::cuda {

inline constexpr int kTileKeys = 16;

// --- PTX wrappers ---

__device__ inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared through L2 only, L2 asked to fetch the 256 bytes around them (a
// 16-bit key row of head_dim 128; measured 1-3% faster on the long decode shapes than without the
// hint); src_bytes 0 fills zeros (a masked row).
__device__ inline void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ inline void cp_async4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ inline void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <bool kBf16>
__device__ inline void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as one register of the MMA type (first in the low half).
template <bool kBf16>
__device__ inline uint32_t pack2(float lo, float hi) {
  if constexpr (kBf16) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  }
}

// What widen() adds to each stored 8-bit value (header paragraph): 1152 for int8, 0 for e4m3.
template <class KV>
inline constexpr float kWidenOffset = std::is_same_v<KV, int8_t> ? 1152.0f : 0.0f;

// Four stored 8-bit values (bytes 0-3 of x) as two f16x2: bytes (0, 1) -> a, (2, 3) -> b, each
// plus kWidenOffset<KV>, exactly.
template <class KV>
__device__ inline void widen(uint32_t x, uint32_t& a, uint32_t& b) {
  if constexpr (std::is_same_v<KV, E4M3>) {
    asm("{\n .reg .b16 lo, hi;\n mov.b32 {lo, hi}, %2;\n cvt.rn.f16x2.e4m3x2 %0, lo;\n"
        " cvt.rn.f16x2.e4m3x2 %1, hi;\n}"
        : "=r"(a), "=r"(b)
        : "r"(x));
  } else {
    // 0x64XX is 1024 + XX as f16; XX = byte + 128 (the sign bit flipped).
    const uint32_t u = x ^ 0x80808080u;
    a = __byte_perm(u, 0x64646464u, 0x4140);
    b = __byte_perm(u, 0x64646464u, 0x4342);
  }
}
// As widen(), with bytes (0, 2) -> even and (1, 3) -> odd.
template <class KV>
__device__ inline void widen_split(uint32_t x, uint32_t& even, uint32_t& odd) {
  if constexpr (std::is_same_v<KV, E4M3>) {
    widen<KV>(__byte_perm(x, 0, 0x3120), even, odd);
  } else {
    const uint32_t u = x ^ 0x80808080u;
    even = __byte_perm(u, 0x64646464u, 0x4240);
    odd = __byte_perm(u, 0x64646464u, 0x4341);
  }
}

// Where chunk c (16 bytes) of tile row r sits in its row: c with its low three bits xored by t(r),
// a bijection of r mod 8 that is even for r mod 8 < 4. The 8 rows an ldmatrix reads (rows 8a to
// 8a + 7, one chunk column) land in 8 different bank groups, and chunks 2j, 2j + 1 (one 32-byte
// global sector) stay in one 32-byte block (swapped when t(r) is odd).
__host__ __device__ constexpr int tile_swizzle(int r) { return ((r & 3) << 1) | ((r >> 2) & 1); }
__host__ __device__ constexpr int tile_chunk(int r, int c) { return c ^ tile_swizzle(r & 7); }

// The claims above, for every row and chunk column of a tile of `chunks` chunks per row.
constexpr bool tile_chunk_ok(int chunks) {
  for (int r = 0; r < 16; ++r) {
    bool seen[64] = {};
    for (int c = 0; c < chunks; ++c) {
      const int x = tile_chunk(r, c);
      if (x < 0 || x >= chunks || seen[x]) return false;  // a permutation of the row's chunks
      seen[x] = true;
      if (x / 2 != tile_chunk(r, c ^ 1) / 2) return false;  // sector partners share a block
    }
  }
  for (int c = 0; c < chunks; ++c) {
    for (int r0 = 0; r0 < 16; r0 += 8) {
      int banks = 0;  // bank groups (16 bytes of 128) of one ldmatrix matrix
      for (int r = r0; r < r0 + 8; ++r) banks |= 1 << (tile_chunk(r, c) & 7);
      if (banks != 0xff) return false;
    }
  }
  return true;
}

template <class KV, int kHeadDim, int kWarps>
struct MmaShape {
  static constexpr bool kEightBit = sizeof(KV) == 1;
  static constexpr bool kBf16 = std::is_same_v<KV, BF16>;
  static constexpr int kRowBytes = kHeadDim * static_cast<int>(sizeof(KV));
  static constexpr int kChunks = kRowBytes / 16;  // 16-byte chunks per key row
  // Unpadded rows; tile_chunk places the chunks.
  static constexpr int kRowStride = kRowBytes;
  static_assert(kChunks % 8 == 0 && tile_chunk_ok(kChunks), "tile_chunk's claims hold");
  static constexpr int kTileBytes = kTileKeys * kRowStride;
  // K tile, V tile, K scales [16], V scales [16], row bias [16] (0, or -inf: masked).
  static constexpr int kStageBytes = 2 * kTileBytes + 3 * kTileKeys * 4;
  // Three stages: two tiles in flight per warp while it computes a third (measured on H200:
  // 3 stages at 2 CTAs / SM beat 2 stages at 3 CTAs / SM for 16-bit head_dim 128;
  // docs/PERFORMANCE.md).
  static constexpr int kStages = 3;
  static constexpr int kPipelineBytes = kWarps * kStages * kStageBytes;
  // Q staged as the MMA type (16 rows, swizzled like the tiles) in a warp's last stage.
  static constexpr int kQRowStride = kHeadDim * 2;
  static_assert(tile_chunk_ok(kQRowStride / 16), "tile_chunk's claims hold for Q");
  static_assert(kTileKeys * kQRowStride <= kStageBytes, "Q fits one stage");
  // The epilogue's accumulator rows, padded by 8 floats: a warp's float2 stores of one C
  // fragment land in distinct banks.
  static constexpr int kAccStride = kHeadDim + 8;
  static constexpr int kEpilogueBytes =
      (kWarps * kTileKeys * kAccStride + kMergeScratchFloats<kTileKeys>)*4;
  static constexpr int kSmemBytes =
      kPipelineBytes > kEpilogueBytes ? kPipelineBytes : kEpilogueBytes;
  static constexpr int kKSteps = kHeadDim / 16;
  static constexpr int kNTiles = kHeadDim / 8;  // n8 tiles of O
  static constexpr int kCopies = kChunks / 2;   // 16-byte copies per lane per tile and side
  static_assert(kChunks % 2 == 0 && kKSteps % 2 == 0, "head_dim a multiple of 32");
};

// 2^x, one MUFU instruction; inputs far below the range flush to 0.
__device__ inline float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A finite stand-in for -inf as the running max: x - kNoMax never overflows into NaN.
inline constexpr float kNoMax = -1e30f;

// Where row (lane & 15) of one tile comes from, as locate() found it a tile ahead: the page index
// is loaded there and first read in issue(), so its latency hides behind a tile of work. It stays
// the loaded 32-bit value until then: widening it in locate() made the warp wait for the load
// right there (42% of the stall samples at b64 x 4096, ncu).
struct TileRow {
  bool live = false;      // a tile of this warp (else nothing is copied)
  bool in_range = false;  // a visible key (else masked)
  int page = 0;           // paged: the loaded page index (checked in issue()); else the sequence
  int in_page = 0;        // slot in the page (contiguous: the position)
  int local = 0;          // paged: the page's entry in the sequence's page list
};

// kWarps: 4 (kAttnWarps), or 8 where the host asks for wide CTAs (cuda_attention: grids of at
// most one CTA per multiprocessor with long chunks).
template <class KV, int kHeadDim, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, kWarps == kAttnWarps && kHeadDim <= 128 ? 2 : 1)
    attention_mma_kernel(const __grid_constant__ AttnKernelParams p) {
  using S = MmaShape<KV, kHeadDim, kWarps>;
  constexpr bool kBf16 = S::kBf16;
  constexpr int kRows = 16;
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ EpilogueSmem<kRows, kWarps> ep;

  const AttnItem it = resolve_item(p, kRows);
  if (!it.ok) return;
  const AttnItem& row = it;
  const int head_group = it.row_group % (p.num_kv_heads * p.subgroups);
  const int num_chunks = (row.num_vis + p.chunk_size - 1) / p.chunk_size;
  if (it.chunk >= num_chunks) return;

  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int quad = lane & 3;  // c: the column pair of C / B fragments
  const int grp = lane >> 2;  // the row of A / C fragments (and + 8)
  const int v0 = it.chunk * p.chunk_size;
  const int v1 = min(v0 + p.chunk_size, row.num_vis);
  const int num_tiles = (v1 - v0 + kTileKeys - 1) / kTileKeys;
  const int my_tiles = (num_tiles - warp + kWarps - 1) / kWarps;
  const bool report_pages = head_group == 0 && lane < kTileKeys;
  const int copy_row = lane & (kTileKeys - 1);  // the row this lane copies
  const int copy_half = lane >> 4;              // its even (0) or odd (1) chunks

  // The CTA's constant parts of the row offsets (elements).
  const int64_t k_head = it.kv_head * p.k.head_stride;
  const int64_t v_head = it.kv_head * p.v.head_stride;

  // Finds this lane's row of the warp's i-th tile (the page index load stays in flight).
  const auto locate = [&](int i) {
    TileRow t;
    const int v = v0 + (warp + i * kWarps) * kTileKeys + copy_row;
    t.live = i < my_tiles;
    t.in_range = t.live && v < v1;
    if (!t.in_range) return t;
    const int j = v < row.sink_cnt ? v : row.win_lo + v - row.sink_cnt;
    if (p.paged) {
      t.local = p.page_shift >= 0 ? j >> p.page_shift : j / p.page_size;
      t.in_page = j - t.local * p.page_size;
      t.page = p.indices[row.page_base + t.local];
    } else {
      t.page = row.b;
      t.in_page = j;
    }
    return t;
  };

  uint8_t* ring = smem + warp * S::kStages * S::kStageBytes;
  const uint32_t ring_addr = smem_addr(ring);

  // Copies the tile's rows into stage st (one commit group; masked rows become zeros, bias -inf).
  // Every lane runs the shuffles: a branch around them (on t.live, which is the same for the whole
  // warp but not provably so) made the compiler add a divergent copy of this code.
  const auto issue = [&](const TileRow& t, int st) {
    bool ok = t.in_range;
    if (ok && p.paged && (t.page < 0 || t.page >= p.num_pages)) {
      if (report_pages) {
        record_error(p.errors, p.op, ErrorArg::page_indices, row.page_base + t.local, t.page, 0,
                     p.num_pages);
      }
      ok = false;
    }
    constexpr int64_t kElem = static_cast<int64_t>(sizeof(KV));
    const int64_t page = t.page;
    const int64_t in_page = t.in_page;
    const int64_t k_row =
        ok ? (page * p.k.page_stride + in_page * p.k.slot_stride + k_head) * kElem : -1;
    const int64_t v_row =
        ok ? (page * p.v.page_stride + in_page * p.v.slot_stride + v_head) * kElem : -1;
    const uint32_t k_tile = ring_addr + st * S::kStageBytes;
    const uint32_t v_tile = k_tile + S::kTileBytes;
    // Lanes cover consecutive 16-byte chunks of a row (whole rows per instruction); each row's
    // offsets come from the lane that resolved it.
    constexpr int kRowsPerCopy = 32 / S::kChunks;
    const int chunk = lane % S::kChunks;
#pragma unroll
    for (int c = 0; c < S::kCopies; ++c) {
      const int r2 = c * kRowsPerCopy + lane / S::kChunks;
      const int64_t k_off = __shfl_sync(0xffffffffu, k_row, r2);
      const int64_t v_off = __shfl_sync(0xffffffffu, v_row, r2);
      if (!t.live) continue;  // no tile: an empty commit group keeps the wait counts uniform
      const bool row_ok = k_off >= 0;
      const uint32_t dst = r2 * S::kRowStride + tile_chunk(r2, chunk) * 16;
      cp_async16(k_tile + dst, p.k.base + (row_ok ? k_off + chunk * 16 : 0), row_ok ? 16 : 0);
      cp_async16(v_tile + dst, p.v.base + (row_ok ? v_off + chunk * 16 : 0), row_ok ? 16 : 0);
    }
    if (!t.live) {
      cp_async_commit();
      return;
    }
    if constexpr (S::kEightBit) {
      // Lanes 0-15: K scales of rows 0-15; lanes 16-31: V scales.
      const AttnSide& side = copy_half == 0 ? p.k : p.v;
      const int64_t at = page * side.scale_page_stride + in_page * side.scale_slot_stride +
                         it.kv_head * side.scale_head_stride;
      cp_async4(v_tile + S::kTileBytes + lane * 4, side.scales + (ok ? at : 0), ok ? 4 : 0);
    }
    if (copy_half == 0) {
      float* bias =
          reinterpret_cast<float*>(ring + st * S::kStageBytes + 2 * S::kTileBytes) + 2 * kTileKeys;
      bias[copy_row] = ok ? 0.0f : -INFINITY;
    }
    cp_async_commit();
  };

  // Prologue: the first kStages - 1 tiles in flight (their page indices loaded together), the
  // next tile's rows located.
  {
    TileRow first[S::kStages - 1];
#pragma unroll
    for (int st = 0; st < S::kStages - 1; ++st) first[st] = locate(st);
#pragma unroll
    for (int st = 0; st < S::kStages - 1; ++st) issue(first[st], st);
  }
  TileRow next = locate(S::kStages - 1);

  // Q (scaled, as the MMA type) staged in the warp's last stage, which the loop's first issue()
  // overwrites, then read as A fragments: per k-step {(grp, k 2q..), (grp + 8, k 2q..), (grp,
  // k 2q+8..), (grp + 8, k 2q+8..)}. 8-bit: a k-step's k order follows the B fragments' dims
  // (header paragraph), so dim pair d of a 16-dim block is stored at pair slot d / 2 + 4 (d % 2).
  uint32_t qa[S::kKSteps][4];
  {
    uint8_t* q_stage = ring + (S::kStages - 1) * S::kStageBytes;
    constexpr int kPieces = kHeadDim / 8;  // 8-element pieces of a row
    constexpr int kPerLane = kTileKeys * kPieces / 32;
    float x[kPerLane][8];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int rr = (lane + 32 * k) / kPieces;  // kernel row: token rr / heads, head rr % heads
      const int piece = (lane + 32 * k) % kPieces;
      if (rr < it.rows) {
        load_io8(p.q,
                 (it.q_row0 + rr / it.heads) * p.q_row_stride +
                     (it.head0 + rr % it.heads) * p.q_head_stride + piece * 8,
                 p.q_type, x[k]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) x[k][e] = 0.0f;
      }
    }
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int rr = (lane + 32 * k) / kPieces;
      const int piece = (lane + 32 * k) % kPieces;
      uint8_t* row = q_stage + rr * S::kQRowStride;
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const int pair = (piece & 1) * 4 + w;  // dim pair within the 16-dim block
        const int slot = S::kEightBit ? (pair >> 1) + 4 * (pair & 1) : pair;
        const int chunk = (piece >> 1) * 2 + (slot >> 2);
        *reinterpret_cast<uint32_t*>(row + tile_chunk(rr, chunk) * 16 + (slot & 3) * 4) =
            pack2<kBf16>(p.q_scale * x[k][2 * w], p.q_scale * x[k][2 * w + 1]);
      }
    }
    __syncwarp();
    const uint32_t q_row = smem_addr(q_stage) + (lane & 15) * S::kQRowStride;
#pragma unroll
    for (int s = 0; s < S::kKSteps; ++s) {
      ldmatrix_x4(qa[s], q_row + tile_chunk(lane & 15, 2 * s + (lane >> 4)) * 16);
    }
  }

  // ldmatrix addresses of this lane, relative to a tile (header paragraph for the orders): the
  // lane's row and its matrix's chunk column offset (col) within each pair of chunks.
  const int mi = lane >> 3;  // the 8x8 matrix this lane addresses
  const int mrow = lane & 7;
  const int k_row = S::kEightBit ? (mi & 1) * 8 + mrow : (mi >> 1) * 8 + mrow;
  const int k_col = S::kEightBit ? mi >> 1 : mi & 1;
  const int v_row = (mi & 1) * 8 + mrow;
  const int v_col = mi >> 1;
  // The byte offset of chunk c + col of the lane's row (c a compile-time even chunk column, so
  // c + col is tile_chunk's input written so that only its low three bits depend on the lane:
  // each distinct c % 8 costs one register, hoisted out of the loop).
  const auto ld_at = [&](int row, int col, int c) {
    return row * S::kRowStride + (c & ~7) * 16 + (((c & 7) + col) ^ tile_swizzle(mrow)) * 16;
  };

  // Packed extend: the causal limit of this thread's rows grp and grp + 8 (keys j > pos are
  // masked); one query row per CTA needs none (its chunks end at its position).
  const bool packed = p.q_per_cta > 1;
  int row_pos[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int rr = grp + 8 * h;
    row_pos[h] = rr < it.rows ? it.pos - (it.ntok - 1) + rr / it.heads : it.pos;
  }

  float m[2] = {kNoMax, kNoMax};  // rows grp, grp + 8
  float l[2] = {0.0f, 0.0f};
  // int8: kWidenOffset * sum(Q) of rows grp, grp + 8 (Q as the MMA sees it), and P's row sums
  // from the MMA against ones (header paragraph).
  float k_offset[2] = {0.0f, 0.0f};
  float p_sums[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if constexpr (kWidenOffset<KV> != 0.0f) {
#pragma unroll
    for (int s = 0; s < S::kKSteps; ++s) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        __half2 h;
        memcpy(&h, &qa[s][j], 4);
        const float2 f = __half22float2(h);
        k_offset[j & 1] += f.x + f.y;
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      k_offset[h] += __shfl_xor_sync(0xffffffffu, k_offset[h], 1);
      k_offset[h] += __shfl_xor_sync(0xffffffffu, k_offset[h], 2);
      k_offset[h] *= kWidenOffset<KV>;
    }
  }
  float acc[S::kNTiles][4];
#pragma unroll
  for (int n = 0; n < S::kNTiles; ++n) {
#pragma unroll
    for (int x = 0; x < 4; ++x) acc[n][x] = 0.0f;
  }

  for (int i = 0; i < my_tiles; ++i) {
    cp_async_wait<S::kStages - 2>();
    __syncwarp();  // tile i landed for every lane; every lane is done with tile i - 1's stage
    issue(next, (i + S::kStages - 1) % S::kStages);
    next = locate(i + S::kStages);
    const int st = i % S::kStages;
    const uint32_t k_tile = ring_addr + st * S::kStageBytes;
    const uint32_t v_tile = k_tile + S::kTileBytes;
    const float* scales =
        reinterpret_cast<const float*>(ring + st * S::kStageBytes + 2 * S::kTileBytes);
    const float* bias = scales + 2 * kTileKeys;
    const int tile_v0 = v0 + (warp + i * kWarps) * kTileKeys;

    // S = Q K^T: sc[n-tile of 8 keys][c0..c3].
    float sc[2][4] = {};
#pragma unroll
    for (int s2 = 0; s2 < S::kKSteps; s2 += 2) {
      uint32_t b[4];
      if constexpr (S::kEightBit) {
        // matrices: (keys 0-7, k-step s2), (keys 8-15, s2), (keys 0-7, s2+1), (keys 8-15, s2+1)
        ldmatrix_x4(b, k_tile + ld_at(k_row, k_col, s2));
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          uint32_t b0, b1;
          widen<KV>(b[x], b0, b1);
          mma16816<false>(sc[x & 1], qa[s2 + (x >> 1)], b0, b1);
        }
      } else {
        // per k-step s: (keys 0-7, dims 16 s + 0-7), (keys 0-7, + 8-15), (keys 8-15, ..), (..)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          ldmatrix_x4(b, k_tile + ld_at(k_row, k_col, 2 * (s2 + h)));
          mma16816<kBf16>(sc[0], qa[s2 + h], b[0], b[1]);
          mma16816<kBf16>(sc[1], qa[s2 + h], b[2], b[3]);
        }
      }
    }

    // Scale, cap, mask (keys past the chunk or behind a bad page index); the rows' new maxima.
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        const int col = nt * 8 + 2 * quad + (x & 1);
        float v = sc[nt][x];
        if constexpr (kWidenOffset<KV> != 0.0f) v -= k_offset[x >> 1];
        if constexpr (S::kEightBit) v *= scales[col];
        if (p.soft_cap_log2 > 0.0f) v = p.soft_cap_log2 * tanhf(v * p.inv_soft_cap);
        v += bias[col];
        if (packed && tile_v0 + col > row_pos[x >> 1]) v = -INFINITY;
        sc[nt][x] = v;
        mx[x >> 1] = fmaxf(mx[x >> 1], v);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
    }
    if (__any_sync(0xffffffffu, mx[0] > m[0] || mx[1] > m[1])) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float corr = fast_exp2(m[h] - mx[h]);
        l[h] *= corr;
#pragma unroll
        for (int n = 0; n < S::kNTiles; ++n) {
          acc[n][2 * h] *= corr;
          acc[n][2 * h + 1] *= corr;
        }
        if constexpr (kWidenOffset<KV> != 0.0f) p_sums[2 * h] *= corr;
        m[h] = mx[h];
      }
    }

    // P = 2^(S - m) as A fragments (V scales folded in); row sums.
    uint32_t pa[4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      float w[4];
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        w[x] = fast_exp2(sc[nt][x] - m[x >> 1]);
        l[x >> 1] += w[x];
        if constexpr (S::kEightBit) w[x] *= scales[kTileKeys + nt * 8 + 2 * quad + (x & 1)];
      }
      pa[2 * nt] = pack2<kBf16>(w[0], w[1]);
      pa[2 * nt + 1] = pack2<kBf16>(w[2], w[3]);
    }

    // O += P V.
    if constexpr (S::kEightBit) {
      // matrices: (keys 0-7, dims 16 b..), (keys 8-15, 16 b..), (keys 0-7, 16 (b+1)..), (8-15, ..)
#pragma unroll
      for (int b2 = 0; b2 < kHeadDim / 16; b2 += 2) {
        uint32_t v[4];
        ldmatrix_x4_trans(v, v_tile + ld_at(v_row, v_col, b2));
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t lo = v[2 * h];      // keys 2q, 2q+1 (x) dims 2n, 2n+1
          const uint32_t hi = v[2 * h + 1];  // keys 2q+8, 2q+9
          const int nt = 2 * (b2 + h);       // even dims tile; + 1: odd dims
          uint32_t lo_even, lo_odd, hi_even, hi_odd;
          widen_split<KV>(lo, lo_even, lo_odd);
          widen_split<KV>(hi, hi_even, hi_odd);
          mma16816<false>(acc[nt], pa, lo_even, hi_even);
          mma16816<false>(acc[nt + 1], pa, lo_odd, hi_odd);
        }
      }
      if constexpr (kWidenOffset<KV> != 0.0f) {
        constexpr uint32_t kOnes = 0x3c003c00u;  // f16x2 (1, 1)
        mma16816<false>(p_sums, pa, kOnes, kOnes);
      }
    } else {
      // matrices: (keys 0-7, dims 8 n..), (keys 8-15, 8 n..), (keys 0-7, 8 (n+1)..), (8-15, ..)
#pragma unroll
      for (int n2 = 0; n2 < S::kNTiles; n2 += 2) {
        uint32_t v[4];
        ldmatrix_x4_trans(v, v_tile + ld_at(v_row, v_col, n2));
        mma16816<kBf16>(acc[n2], pa, v[0], v[1]);
        mma16816<kBf16>(acc[n2 + 1], pa, v[2], v[3]);
      }
    }
  }
  cp_async_wait<0>();
  if constexpr (kWidenOffset<KV> != 0.0f) {
#pragma unroll
    for (int n = 0; n < S::kNTiles; ++n) {
#pragma unroll
      for (int x = 0; x < 4; ++x) acc[n][x] -= kWidenOffset<KV> * p_sums[x & 2];
    }
  }

  // Hand the warps' partials to the epilogue (the ring's memory becomes s_acc).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
  __syncthreads();
  float* s_acc = reinterpret_cast<float*>(smem);  // [warp][row][kAccStride]
  if (quad == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      ep.m[warp * kRows + grp + 8 * h] = l[h] > 0.0f ? m[h] : -INFINITY;
      ep.l[warp * kRows + grp + 8 * h] = l[h];
    }
  }
  // Adjacent dims as float2: 16-bit: (x, x + 1) of an n8 tile of consecutive dims; 8-bit: the
  // same x of an even and an odd dims tile.
#pragma unroll
  for (int n = 0; n < S::kNTiles; n += S::kEightBit ? 2 : 1) {
#pragma unroll
    for (int x = 0; x < 4; x += S::kEightBit ? 1 : 2) {
      const int rr = grp + 8 * (x >> 1);
      const int dim = S::kEightBit ? 16 * (n >> 1) + 4 * quad + 2 * (x & 1) : 8 * n + 2 * quad;
      const float2 pair = S::kEightBit ? make_float2(acc[n][x], acc[n + 1][x])
                                       : make_float2(acc[n][x], acc[n][x + 1]);
      *reinterpret_cast<float2*>(s_acc + (warp * kRows + rr) * S::kAccStride + dim) = pair;
    }
  }
  __syncthreads();
  finish_item<kRows, kWarps, kWarps * 32>(p, it, num_chunks, kWarps, s_acc, S::kAccStride, ep,
                                          s_acc + kWarps * kRows * S::kAccStride);
}

// Raises the kernel's dynamic shared memory limit (once per instantiation).
template <class KV, int kHeadDim, int kWarps>
cudaError_t configure_attention_mma() {
  static const cudaError_t configured = cudaFuncSetAttribute(
      attention_mma_kernel<KV, kHeadDim, kWarps>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      MmaShape<KV, kHeadDim, kWarps>::kSmemBytes);
  return configured;
}

template <class KV, int kHeadDim, int kWarps>
cudaError_t launch_attention_mma_warps(const AttnKernelParams& p, cudaStream_t stream) {
  using S = MmaShape<KV, kHeadDim, kWarps>;
  if (cudaError_t err = configure_attention_mma<KV, kHeadDim, kWarps>(); err != cudaSuccess) {
    return err;
  }
  const int64_t ctas = attention_ctas(p);
  attention_mma_kernel<KV, kHeadDim, kWarps>
      <<<dim3(static_cast<unsigned>(ctas)), kWarps * 32, S::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// A grid of at most one CTA per multiprocessor runs 8 warps per CTA: 4 leave each scheduler one
// warp, too few to keep the multiprocessor's share of DRAM bandwidth in flight (head_dim 256
// already fills the shared memory with 4).
template <class KV, int kHeadDim>
cudaError_t launch_attention_mma_dim(const AttnKernelParams& p, bool wide, cudaStream_t stream) {
  if constexpr (kHeadDim <= 128) {
    if (wide) return launch_attention_mma_warps<KV, kHeadDim, 2 * kAttnWarps>(p, stream);
  }
  return launch_attention_mma_warps<KV, kHeadDim, kAttnWarps>(p, stream);
}

template <class KV, int kHeadDim>
cudaError_t attention_mma_occupancy_dim(int* ctas_per_sm) {
  using S = MmaShape<KV, kHeadDim, kAttnWarps>;
  if (cudaError_t err = configure_attention_mma<KV, kHeadDim, kAttnWarps>(); err != cudaSuccess) {
    return err;
  }
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      ctas_per_sm, attention_mma_kernel<KV, kHeadDim, kAttnWarps>, kAttnThreads, S::kSmemBytes);
}

// Calls f.template operator()<kHeadDim>() for the kernel's head_dim, or returns invalid value.
template <class KV, class F>
cudaError_t with_mma_head_dim(int head_dim, F f) {
  switch (head_dim) {
    case 64:
      if constexpr (sizeof(KV) == 2) return f.template operator()<64>();
      return cudaErrorInvalidValue;
    case 128:
      return f.template operator()<128>();
    case 256:
      return f.template operator()<256>();
    default:
      return cudaErrorInvalidValue;
  }
}

template <class KV>
cudaError_t launch_attention_mma(const AttnKernelParams& p, bool wide, cudaStream_t stream) {
  return with_mma_head_dim<KV>(
      p.head_dim, [&]<int kD>() { return launch_attention_mma_dim<KV, kD>(p, wide, stream); });
}

template <class KV>
cudaError_t attention_mma_occupancy(int head_dim, int* ctas_per_sm) {
  return with_mma_head_dim<KV>(
      head_dim, [&]<int kD>() { return attention_mma_occupancy_dim<KV, kD>(ctas_per_sm); });
}

}  // namespace kvcache::cuda
