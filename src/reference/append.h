// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// float64 references of kv_append, paged_append and copy_pages: simple element loops, the ground
// truth the tests and `kvcache bench ops` compare the kernels with. Values are read through the
// dtype conversions into double and written back from double; quantized storage follows
// ops/quantize.h's rule (the one definition of a stored int8 / fp8 value and its scale). Each
// writes into the output views of args, like the op. Slow by design; thread-compatible.

#include "kvcache/copy_pages.h"
#include "kvcache/kv_append.h"
#include "kvcache/paged_append.h"

namespace kvcache::reference {

// REQUIRES: KVAppendPlan::select(desc) and can_implement(args) passed.
void kv_append(const KVAppendDesc& desc, const KVAppendArgs& args);
// REQUIRES: PagedAppendPlan::select(desc) and can_implement(args) passed.
void paged_append(const PagedAppendDesc& desc, const PagedAppendArgs& args);
// REQUIRES: CopyPagesPlan::select(desc) and can_implement(args) passed.
void copy_pages(const CopyPagesDesc& desc, const CopyPagesArgs& args);

}  // namespace kvcache::reference
