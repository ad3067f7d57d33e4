// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// CPU feature detection behind CpuIsa. The fast paths are compiled with per-function target
// attributes, so one binary carries every path and picks at run time.

#include "kvcache/op_plan.h"

namespace kvcache {

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
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
#else
      return false;
#endif
    case CpuIsa::avx512:
#if defined(__x86_64__)
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bf16");
#else
      return false;
#endif
  }
  return false;
}

}  // namespace kvcache
