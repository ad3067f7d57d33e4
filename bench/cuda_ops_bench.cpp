// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "bench/cuda_ops_bench.h"

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "backend/cuda_bench.h"
#include "bench/cuda_cases.h"

namespace kvcache::bench {
namespace {

constexpr size_t kFlushBytes = size_t{256} << 20;
constexpr int kGraphCalls = 20;

// Destroys the bench's stream on every exit path.
struct OwnedStream {
  Stream stream;
  ~OwnedStream() { backend::cuda_destroy_stream(stream); }
};

}  // namespace

Result<Report> run_cuda_ops_bench(const OpsBenchOptions& options) {
  if (options.repeats < 1) {
    return Status::invalid_argument("bench ops: repeats < 1, expected >= 1");
  }
  if (options.device.is_cpu() || options.device.index >= cuda_device_count()) {
    return Status::unavailable("bench ops: device " + to_string(options.device) +
                               " is not a GPU of this machine (" +
                               std::to_string(cuda_device_count()) + " found), expected cuda:i");
  }
  Result<Stream> created = backend::cuda_create_stream(options.device);
  if (!created.ok()) return created.status();
  OwnedStream owned{*created};
  const Stream& stream = owned.stream;

  const size_t bound_bytes = options.quick ? size_t{256} << 20 : size_t{4} << 30;
  Result<double> read_gbps = backend::cuda_read_bound_gbps(options.device, bound_bytes, 7);
  if (!read_gbps.ok()) return read_gbps.status();
  Result<double> copy_gbps = backend::cuda_copy_bound_gbps(options.device, bound_bytes / 2, 7);
  if (!copy_gbps.ok()) return copy_gbps.status();

  const CudaCaseOptions case_options{stream, options.quick};
  std::vector<CudaCaseBuilder> builders = cuda_attention_cases(case_options);
  for (CudaCaseBuilder& b : cuda_write_cases(case_options)) builders.push_back(std::move(b));

  const int cold_repeats = static_cast<int>(std::max<int64_t>(25, options.repeats));
  const int graph_repeats = static_cast<int>(std::max<int64_t>(10, options.repeats));
  Report report({"op", "shape", "dtype", "sku", "timing", "median_us", "gbps", "bound_gbps",
                 "bound_kind", "fraction"});
  for (const CudaCaseBuilder& build : builders) {
    Result<CudaCase> c = build();
    if (!c.ok()) return c.status();
    if (!case_selected(options, c->op, c->shape, c->dtype)) continue;
    Result<double> cold = backend::cuda_time_cold_us(stream, c->call, kFlushBytes, cold_repeats);
    if (!cold.ok()) return cold.status();
    Result<double> graph = backend::cuda_time_graph_us(stream, c->call, kGraphCalls, graph_repeats);
    if (!graph.ok()) return graph.status();
    // The cases pass valid indices: a recorded error is a kernel bug, not a measurement.
    if (Status s = check_device_errors(stream); !s.ok()) return s;
    const double bound = c->copy_bound ? *copy_gbps : *read_gbps;
    for (auto [timing, us] : {std::pair{"cold", *cold}, std::pair{"graph", *graph}}) {
      const double gbps = c->bytes / (us * 1e-6) * 1e-9;
      report.add_row({c->op, c->shape, c->dtype, c->sku, std::string(timing), us, gbps, bound,
                      std::string(c->copy_bound ? "copy" : "read"), gbps / bound});
    }
    std::fprintf(stderr, ".");
  }
  std::fprintf(stderr, "\n");
  return report;
}

}  // namespace kvcache::bench
