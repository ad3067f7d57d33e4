// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// Built without CUDA: the write ops have no GPU kernels; every entry point is unavailable.
#include <string>

#include "backend/cuda_write_ops.h"

namespace kvcache::backend {
namespace {

Status not_built(std::string_view op) {
  return Status::unavailable(std::string(op) +
                             ": kvcache was built without CUDA, expected device cpu (or a build "
                             "with -DKVCACHE_CUDA=ON)");
}

}  // namespace

Result<void*> cuda_write_error_record(Device, std::string_view op) { return not_built(op); }

Status cuda_kv_append(const CudaKVAppendParams&, const Stream&) { return not_built("kv_append"); }

Status cuda_paged_append(const CudaPagedAppendParams&, const Stream&) {
  return not_built("paged_append");
}

Status cuda_copy_pages(const CudaCopyPagesParams&, const Stream&) {
  return not_built("copy_pages");
}

Result<std::shared_ptr<const CudaRopeTable>> cuda_rope_table(std::shared_ptr<const ops::RopeTable>,
                                                             Device, std::string_view op, bool) {
  return not_built(op);
}

Status cuda_qkv_rope_write(const CudaQkvRopeWriteParams&, const CudaRopeTable&, const Stream&) {
  return not_built("qkv_rope_write");
}

Status cuda_rope_shift(const CudaRopeShiftParams&, const CudaRopeTable&, const Stream&) {
  return not_built("rope_shift");
}

}  // namespace kvcache::backend
