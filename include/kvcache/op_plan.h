// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// What every op plan shares. An op is a descriptor (plain data: shapes, dtypes, layout) and a plan
// made from it:
//   Plan::select(desc, device [, isa]) -> Result<Plan>   picks an implementation, or says why none
//   plan.can_implement(args)                             validates arguments (nothing is written)
//   plan.workspace_size()                                bytes of scratch run() needs
//   plan.run(stream, workspace, args)                    validates, then computes; allocates
//   nothing plan.sku()                                           the implementation's name, for
//   logs/benches plan.precision()                                     the guarantee against the
//   float64 reference
// Plans are values: intentionally copyable, cheap to keep and reuse; const methods are thread-safe.

#include <cstdint>
#include <string>

#include "kvcache/export.h"
#include "kvcache/status.h"

namespace kvcache {

// Which CPU implementation select() may pick. best: the fastest this CPU supports whose
// known-answer self-test passed (run once per process). The others force one; select() returns
// unavailable when the CPU lacks it. The portable path is always built.
enum class CpuIsa : uint8_t { best, portable, avx2, avx512 };

// "best", "portable", "avx2", "avx512".
[[nodiscard]] KVCACHE_API const char* name(CpuIsa isa);
// Whether this CPU can run `isa` (compiler support and CPUID). best and portable: always.
[[nodiscard]] KVCACHE_API bool cpu_supports(CpuIsa isa);

// The accuracy an implementation promises against the op's float64 reference, per output element:
// |got - ref| <= abs_tol + rel_tol * |ref|, or identical bits. Intentionally copyable.
struct Precision {
  bool bit_exact = false;
  double abs_tol = 0.0;
  double rel_tol = 0.0;
  std::string note;  // what the bound covers, e.g. "bf16 output rounding + f32 accumulation"
};

}  // namespace kvcache
