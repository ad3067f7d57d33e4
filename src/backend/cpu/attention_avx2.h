// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The AVX2 + FMA + F16C inner loops of CPU attention (the interface of attention_kernels.h), for
// x86-64 CPUs without AVX-512 (AMD Zen 2/3, most desktops). Stateless functions; the returned
// table holds plain function pointers, safe to call from any thread.

#include "backend/cpu/attention_kernels.h"

namespace kvcache::cpu {

// The AVX2 loops. REQUIRES cpu_supports(CpuIsa::avx2).
[[nodiscard]] AttentionRowKernels avx2_attention_rows();
// Runs the AVX2 loops against the portable ones on fixed inputs for every dtype (once per
// process; later calls return the first answer). false when the CPU lacks AVX2 or they differ by
// more than float rounding.
[[nodiscard]] bool avx2_attention_rows_self_test();

}  // namespace kvcache::cpu
