// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// What `kvcache bench ops --device cuda` and the GPU tests need from the CUDA runtime: a stream,
// the same-run bounds, two ways to time a call, and a captured graph run once. Defined by
// backend/cuda, or by backend/no_cuda (every call unavailable). Not thread-safe: one benchmark or
// test at a time.

#include <cstddef>
#include <functional>

#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/status.h"

namespace kvcache::backend {

// A non-blocking CUDA stream on `device` (graph capture needs one other than the default stream);
// destroy it with cuda_destroy_stream.
Result<Stream> cuda_create_stream(Device device);
void cuda_destroy_stream(const Stream& stream);
// Waits for the stream's work; internal on a CUDA error (an earlier kernel's fault shows here).
Status cuda_synchronize(const Stream& stream);
// Captures `calls` calls of `fn` into one CUDA graph (after one call outside the capture), launches
// it once and waits: proof that the calls are graph-capturable (no sync, no allocation).
Status cuda_run_graph(const Stream& stream, const std::function<Status()>& fn, int calls);

// Fills count elements of dtype at data (device memory) with random valid values on stream: f32 /
// f16 / bf16 uniform in [lo, hi); int8 uniform in [-127, 127]; fp8_e4m3 random finite patterns
// (lo, hi unused). Never zeros only; the same seed gives the same values.
Status cuda_fill_random(const Stream& stream, void* data, DType dtype, size_t count, uint32_t seed,
                        float lo, float hi);

// The read bound: GB/s of a vectorized sum over `num_bytes` of device memory, each byte read once
// (16-byte loads, enough blocks to fill the GPU), best of `repeats` timed with CUDA events.
Result<double> cuda_read_bound_gbps(Device device, size_t num_bytes, int repeats);
// The copy bound: GB/s of a device-to-device copy of `num_bytes`, counting read + write.
Result<double> cuda_copy_bound_gbps(Device device, size_t num_bytes, int repeats);

// Cold timing: before each call, reads `flush_bytes` (>= the L2) to evict the cache (clean lines:
// writing would leave dirty ones to write back during the call), then times
// one call of `fn` with events on `stream`; the median of `repeats` calls, in microseconds.
// `fn` issues its work on `stream` and returns its Status (a failure ends the timing).
Result<double> cuda_time_cold_us(const Stream& stream, const std::function<Status()>& fn,
                                 size_t flush_bytes, int repeats);
// Hot timing: captures `calls` calls of `fn` into one CUDA graph, replays it `repeats` times and
// returns the median replay time divided by `calls`, in microseconds.
Result<double> cuda_time_graph_us(const Stream& stream, const std::function<Status()>& fn,
                                  int calls, int repeats);

}  // namespace kvcache::backend
