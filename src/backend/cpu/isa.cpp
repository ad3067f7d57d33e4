// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// CPU feature detection behind CpuIsa. The fast paths are compiled with per-function target
// attributes, so one binary carries every path and picks at run time.

#include "kvcache/op_plan.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace kvcache {
namespace {

#if defined(__x86_64__)
// Asked with CPUID directly: clang 14's __builtin_cpu_supports knows neither "f16c" nor
// "avx512bf16". F16C: CPUID.1:ECX bit 29.
bool has_f16c() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0) return false;
  return (ecx & (1u << 29)) != 0;
}

// AVX512_BF16: CPUID.(EAX=7, ECX=1):EAX bit 5.
bool has_avx512_bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) == 0) return false;
  return (eax & (1u << 5)) != 0;
}
#endif

}  // namespace

const char* name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::best:
      return "best";
    case CpuIsa::portable:
      return "portable";
    case CpuIsa::avx2:
      return "avx2";
    case CpuIsa::avx512:
      return "avx512";
  }
  return "?";
}

bool cpu_supports(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::best:
    case CpuIsa::portable:
      return true;
    case CpuIsa::avx2:
#if defined(__x86_64__)
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c();
#else
      return false;
#endif
    case CpuIsa::avx512:
#if defined(__x86_64__)
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             has_avx512_bf16();
#else
      return false;
#endif
  }
  return false;
}

}  // namespace kvcache
