// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// Built without CUDA: no GPU to time.
#include <string>

#include "backend/cuda_bench.h"

namespace kvcache::backend {
namespace {
Status not_built(const char* what) {
  return Status::unavailable(
      std::string("bench ops: ") + what +
      " needs a build with CUDA (-DKVCACHE_CUDA=ON, or AUTO with nvcc found)");
}
}  // namespace

Result<Stream> cuda_create_stream(Device) { return not_built("a CUDA stream"); }
void cuda_destroy_stream(const Stream&) {}
Status cuda_fill_random(const Stream&, void*, DType, size_t, uint32_t, float, float) {
  return not_built("random device data");
}
Status cuda_synchronize(const Stream&) { return not_built("a CUDA stream"); }
Status cuda_run_graph(const Stream&, const std::function<Status()>&, int) {
  return not_built("a CUDA graph");
}
Result<double> cuda_read_bound_gbps(Device, size_t, int) { return not_built("the read bound"); }
Result<double> cuda_copy_bound_gbps(Device, size_t, int) { return not_built("the copy bound"); }
Result<double> cuda_time_cold_us(const Stream&, const std::function<Status()>&, size_t, int) {
  return not_built("cold timing");
}
Result<double> cuda_time_graph_us(const Stream&, const std::function<Status()>&, int, int) {
  return not_built("graph timing");
}

}  // namespace kvcache::backend
