// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "bench/bandwidth.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "kvcache/buffer.h"
#include "kvcache/op_plan.h"

#include "backend/cpu/x86_intrinsics.h"
#include <sys/mman.h>

namespace kvcache::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Sums 64-byte lines with four independent accumulators, so loads, not adds, set the pace.
__attribute__((target("avx512f"))) uint64_t read_avx512(const std::byte* p, int64_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    _mm_prefetch(reinterpret_cast<const char*>(p + i + 512), _MM_HINT_T0);
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 64));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 128));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 192));
  }
  // Lanes summed as unsigned: the sum wraps by design (_mm512_reduce_add_epi64 adds signed).
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(lanes, _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
  uint64_t sum = 0;
  for (uint64_t lane : lanes) sum += lane;
  for (; i < n; ++i) sum += static_cast<uint64_t>(p[i]);
  return sum;
}

uint64_t read_portable(const std::byte* p, int64_t n) {
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    uint64_t w[4];
    std::memcpy(w, p + i, sizeof(w));
    s0 += w[0];
    s1 += w[1];
    s2 += w[2];
    s3 += w[3];
  }
  for (; i < n; ++i) s0 += static_cast<uint64_t>(p[i]);
  return s0 + s1 + s2 + s3;
}

// The best pass of fn(thread, first, count) over the pool: each thread takes one contiguous,
// 4 KiB-aligned share.
template <class Fn>
double best_seconds(ThreadPool& pool, int64_t bytes, int passes, Fn&& fn) {
  double best = 1e30;
  const int64_t threads = pool.num_threads();
  const int64_t share = (bytes / threads) & ~int64_t{4095};
  for (int pass = 0; pass < passes; ++pass) {
    const auto start = Clock::now();
    pool.parallel_for(threads, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t first = t * share;
        fn(t, first, t + 1 == threads ? bytes - first : share);
      }
    });
    best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
  }
  return best;
}

}  // namespace

void advise_huge_pages(void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

Result<BandwidthProbe> BandwidthProbe::create(ThreadPool& pool, const BandwidthOptions& options) {
  if (options.bytes < (int64_t{1} << 20) || options.passes < 1) {
    return Status::invalid_argument(
        "BandwidthProbe.create: bytes < 1 MiB or passes < 1, expected a buffer of >= 1 MiB and "
        ">= 1 pass");
  }
  const size_t n = static_cast<size_t>(options.bytes);
  Result<Buffer> src = Buffer::allocate(Device::cpu(), n);
  if (!src.ok()) return src.status();
  Result<Buffer> dst = Buffer::allocate(Device::cpu(), n);
  if (!dst.ok()) return dst.status();
  auto* s = static_cast<std::byte*>(src->data());
  auto* d = static_cast<std::byte*>(dst->data());
  advise_huge_pages(s, n);
  advise_huge_pages(d, n);
  // Touch every page first (and give the sum something to add) so no pass pays a page fault.
  pool.parallel_for(options.bytes, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) s[i] = static_cast<std::byte>(i * 131);
    std::memset(d + begin, 1, static_cast<size_t>(end - begin));
  });
  return BandwidthProbe(pool, options, std::move(*src), std::move(*dst));
}

BandwidthProbe::BandwidthProbe(ThreadPool& pool, const BandwidthOptions& options, Buffer src,
                               Buffer dst)
    : pool_(&pool), options_(options), src_(std::move(src)), dst_(std::move(dst)) {}

double BandwidthProbe::read_gbps() {
  const bool avx512 = cpu_supports(CpuIsa::avx512);
  const auto* s = static_cast<const std::byte*>(src_.data());
  std::vector<uint64_t> sums(static_cast<size_t>(pool_->num_threads()));
  const double seconds = best_seconds(
      *pool_, options_.bytes, options_.passes, [&](int64_t t, int64_t first, int64_t count) {
        sums[static_cast<size_t>(t)] +=
            avx512 ? read_avx512(s + first, count) : read_portable(s + first, count);
      });
  for (uint64_t v : sums) checksum_ += v;
  return static_cast<double>(options_.bytes) / seconds * 1e-9;
}

double BandwidthProbe::copy_gbps() {
  const auto* s = static_cast<const std::byte*>(src_.data());
  auto* d = static_cast<std::byte*>(dst_.data());
  const double seconds = best_seconds(
      *pool_, options_.bytes, options_.passes, [&](int64_t, int64_t first, int64_t count) {
        std::memcpy(d + first, s + first, static_cast<size_t>(count));
      });
  return 2.0 * static_cast<double>(options_.bytes) / seconds * 1e-9;
}

}  // namespace kvcache::bench
