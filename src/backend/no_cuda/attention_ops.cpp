// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// Built without CUDA: the attention plans' CUDA path answers unavailable (select() asks first).
#include <string>

#include "backend/cuda_attention_ops.h"

namespace kvcache::backend {
namespace {
Status not_built(const char* what) {
  return Status::unavailable(std::string(what) +
                             ": needs a build with CUDA (-DKVCACHE_CUDA=ON, or AUTO with nvcc "
                             "found)");
}
}  // namespace

size_t cuda_attention_workspace_bytes(bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t) {
  return 0;
}
Status cuda_attention(const CudaAttentionParams& p, const Stream&) {
  return not_built(p.extend ? "extend_attention" : "decode_attention");
}
Result<int> cuda_attention_ctas_per_sm(Device, bool, DType, DType, int64_t, int64_t) {
  return not_built("cuda_attention_ctas_per_sm");
}
Result<void*> cuda_error_record(Device) { return not_built("the device error record"); }
Result<int> cuda_multiprocessor_count(Device) { return not_built("cuda_multiprocessor_count"); }

}  // namespace kvcache::backend
