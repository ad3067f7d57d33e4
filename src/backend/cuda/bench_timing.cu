// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// The CUDA side of `kvcache bench ops --device cuda`: streams, same-run bounds, event timing.
#include <algorithm>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "backend/cuda_bench.h"
#include "backend/device_memory.h"

namespace kvcache::backend {
namespace {

Status runtime_error(const char* call, cudaError_t err) {
  (void)cudaGetLastError();
  return Status::internal(std::string("bench ops: ") + call + " failed: " + cudaGetErrorName(err) +
                          " (" + cudaGetErrorString(err) + ")");
}

#define KV_CUDA_TRY(call)                                     \
  do {                                                        \
    if (cudaError_t kv_err = (call); kv_err != cudaSuccess) { \
      return runtime_error(#call, kv_err);                    \
    }                                                         \
  } while (0)

// Each thread sums 16-byte words with a grid stride; one store per block keeps the loads live.
__global__ void read_sum(const uint4* __restrict__ data, size_t n, unsigned* __restrict__ out) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const uint4 v = __ldcs(data + i);
    acc += v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;  // practically never: no store traffic
}

// The same with ordinary L2 allocation (no evict-first hint): reading it replaces the L2's
// contents with clean lines.
__global__ void read_through_l2(const uint4* __restrict__ data, size_t n,
                                unsigned* __restrict__ out) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const uint4 v = __ldcg(data + i);
    acc += v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;
}

__global__ void fill_words(uint4* data, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const auto x = static_cast<unsigned>(i) * 2654435761u + seed;
    data[i] = make_uint4(x, x + 1, x + 2, x + 3);
  }
}

// A counter-based hash: element i of seed's stream.
__device__ uint32_t mix(uint64_t i, uint32_t seed) {
  uint64_t x = (i + 1) * 0x9e3779b97f4a7c15ull ^ (uint64_t{seed} << 32);
  x ^= x >> 31;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 29;
  return static_cast<uint32_t>(x >> 16);
}

__global__ void fill_random(void* data, int kind, size_t count, uint32_t seed, float lo, float hi) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < count;
       i += size_t{gridDim.x} * blockDim.x) {
    const uint32_t r = mix(i, seed);
    const float u = lo + (hi - lo) * static_cast<float>(r >> 8) * 0x1p-24f;
    switch (kind) {
      case 0:
        static_cast<float*>(data)[i] = u;
        break;
      case 1:
        static_cast<__half*>(data)[i] = __float2half_rn(u);
        break;
      case 2:
        static_cast<__nv_bfloat16*>(data)[i] = __float2bfloat16_rn(u);
        break;
      case 3:
        static_cast<int8_t*>(data)[i] = static_cast<int8_t>(static_cast<int>(r % 255u) - 127);
        break;
      default: {  // e4m3 without the NaN patterns (S.1111.111)
        const uint32_t bits = r & 0xffu;
        static_cast<uint8_t*>(data)[i] =
            static_cast<uint8_t>((bits & 0x7fu) == 0x7fu ? 0x3fu : bits);
        break;
      }
    }
  }
}

// Device memory freed on every exit path.
struct DeviceBytes {
  int device = 0;
  void* ptr = nullptr;
  ~DeviceBytes() {
    if (ptr != nullptr) cuda_free(device, ptr);
  }
};

// Events recorded around a sequence of work on one stream.
struct EventPair {
  cudaEvent_t start = nullptr;
  cudaEvent_t stop = nullptr;
  ~EventPair() {
    if (start != nullptr) (void)cudaEventDestroy(start);
    if (stop != nullptr) (void)cudaEventDestroy(stop);
  }
  Status create() {
    KV_CUDA_TRY(cudaEventCreate(&start));
    KV_CUDA_TRY(cudaEventCreate(&stop));
    return Status();
  }
  Result<double> elapsed_us() const {
    KV_CUDA_TRY(cudaEventSynchronize(stop));
    float ms = 0;
    KV_CUDA_TRY(cudaEventElapsedTime(&ms, start, stop));
    return static_cast<double>(ms) * 1e3;
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) n = 132;
  return n;
}

Status allocate(DeviceBytes& bytes, int device, size_t num_bytes) {
  bytes.device = device;
  Result<void*> mem = cuda_malloc(device, num_bytes);
  if (!mem.ok()) return mem.status();
  bytes.ptr = *mem;
  return Status();
}

// Captures `calls` calls of fn on stream into an instantiated graph (fn is called once first,
// outside the capture, so lazy module loading stays out of it).
Result<cudaGraphExec_t> capture(cudaStream_t s, const std::function<Status()>& fn, int calls) {
  if (Status st = fn(); !st.ok()) return st;
  KV_CUDA_TRY(cudaStreamSynchronize(s));
  cudaGraph_t graph = nullptr;
  KV_CUDA_TRY(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  const auto capture_calls = [&]() -> Status {
    for (int c = 0; c < calls; ++c) {
      if (Status st = fn(); !st.ok()) return st;
    }
    return Status();
  };
  const Status captured = capture_calls();
  const cudaError_t end = cudaStreamEndCapture(s, &graph);
  if (!captured.ok()) {
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
    return captured;
  }
  KV_CUDA_TRY(end);
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  (void)cudaGraphDestroy(graph);
  KV_CUDA_TRY(inst);
  return exec;
}

}  // namespace

Result<Stream> cuda_create_stream(Device device) {
  if (device.is_cpu()) return Status::invalid_argument("bench ops: a CUDA stream needs cuda:i");
  KV_CUDA_TRY(cudaSetDevice(device.index));
  cudaStream_t s = nullptr;
  KV_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  Stream stream;
  stream.device = device;
  stream.cuda_stream = s;
  return stream;
}

void cuda_destroy_stream(const Stream& stream) {
  if (stream.cuda_stream != nullptr) {
    (void)cudaStreamDestroy(static_cast<cudaStream_t>(stream.cuda_stream));
  }
}

Result<double> cuda_read_bound_gbps(Device device, size_t num_bytes, int repeats) {
  DeviceBytes data;
  DeviceBytes out;
  if (Status s = allocate(data, device.index, num_bytes); !s.ok()) return s;
  const int blocks = sm_count(device.index) * 8;
  if (Status s = allocate(out, device.index, sizeof(unsigned) * static_cast<size_t>(blocks));
      !s.ok()) {
    return s;
  }
  const size_t words = num_bytes / sizeof(uint4);
  fill_words<<<blocks, 256>>>(static_cast<uint4*>(data.ptr), words, 17u);
  KV_CUDA_TRY(cudaGetLastError());
  EventPair ev;
  if (Status s = ev.create(); !s.ok()) return s;
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    KV_CUDA_TRY(cudaEventRecord(ev.start));
    read_sum<<<blocks, 512>>>(static_cast<const uint4*>(data.ptr), words,
                              static_cast<unsigned*>(out.ptr));
    KV_CUDA_TRY(cudaGetLastError());
    KV_CUDA_TRY(cudaEventRecord(ev.stop));
    Result<double> us = ev.elapsed_us();
    if (!us.ok()) return us.status();
    best = std::max(best, static_cast<double>(words * sizeof(uint4)) / (*us * 1e3));
  }
  return best;
}

Result<double> cuda_copy_bound_gbps(Device device, size_t num_bytes, int repeats) {
  DeviceBytes src;
  DeviceBytes dst;
  if (Status s = allocate(src, device.index, num_bytes); !s.ok()) return s;
  if (Status s = allocate(dst, device.index, num_bytes); !s.ok()) return s;
  KV_CUDA_TRY(cudaMemset(src.ptr, 1, num_bytes));
  EventPair ev;
  if (Status s = ev.create(); !s.ok()) return s;
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    KV_CUDA_TRY(cudaEventRecord(ev.start));
    KV_CUDA_TRY(cudaMemcpyAsync(dst.ptr, src.ptr, num_bytes, cudaMemcpyDeviceToDevice));
    KV_CUDA_TRY(cudaEventRecord(ev.stop));
    Result<double> us = ev.elapsed_us();
    if (!us.ok()) return us.status();
    best = std::max(best, 2.0 * static_cast<double>(num_bytes) / (*us * 1e3));
  }
  return best;
}

Result<double> cuda_time_cold_us(const Stream& stream, const std::function<Status()>& fn,
                                 size_t flush_bytes, int repeats) {
  DeviceBytes flush;
  DeviceBytes sink;
  if (Status s = allocate(flush, stream.device.index, flush_bytes); !s.ok()) return s;
  const int blocks = sm_count(stream.device.index) * 8;
  if (Status s =
          allocate(sink, stream.device.index, sizeof(unsigned) * static_cast<size_t>(blocks));
      !s.ok()) {
    return s;
  }
  auto* s = static_cast<cudaStream_t>(stream.cuda_stream);
  KV_CUDA_TRY(cudaMemsetAsync(flush.ptr, 1, flush_bytes, s));
  // Two untimed calls: module loading, and the clocks of a GPU that was idle, stay out of it.
  for (int w = 0; w < 2; ++w) {
    if (Status st = fn(); !st.ok()) return st;
  }
  EventPair ev;
  if (Status st = ev.create(); !st.ok()) return st;
  std::vector<double> times;
  for (int r = 0; r < repeats; ++r) {
    // Evict the L2 by reading (not writing) more than it holds: a write would leave dirty lines
    // whose write-backs the timed call would pay for.
    read_through_l2<<<blocks, 512, 0, s>>>(static_cast<const uint4*>(flush.ptr), flush_bytes / 16,
                                           static_cast<unsigned*>(sink.ptr));
    KV_CUDA_TRY(cudaGetLastError());
    KV_CUDA_TRY(cudaEventRecord(ev.start, s));
    if (Status st = fn(); !st.ok()) return st;
    KV_CUDA_TRY(cudaEventRecord(ev.stop, s));
    Result<double> us = ev.elapsed_us();
    if (!us.ok()) return us.status();
    times.push_back(*us);
  }
  return median(times);
}

Status cuda_fill_random(const Stream& stream, void* data, DType dtype, size_t count, uint32_t seed,
                        float lo, float hi) {
  int kind = 0;
  switch (dtype) {
    case DType::f32:
      kind = 0;
      break;
    case DType::f16:
      kind = 1;
      break;
    case DType::bf16:
      kind = 2;
      break;
    case DType::int8:
      kind = 3;
      break;
    case DType::fp8_e4m3:
      kind = 4;
      break;
    default:
      return Status::invalid_argument(std::string("bench ops: random ") + name(dtype) +
                                      " data, expected f32, f16, bf16, int8 or fp8_e4m3");
  }
  if (count == 0) return Status();
  fill_random<<<1024, 256, 0, static_cast<cudaStream_t>(stream.cuda_stream)>>>(data, kind, count,
                                                                               seed, lo, hi);
  KV_CUDA_TRY(cudaGetLastError());
  return Status();
}

Status cuda_synchronize(const Stream& stream) {
  KV_CUDA_TRY(cudaStreamSynchronize(static_cast<cudaStream_t>(stream.cuda_stream)));
  return Status();
}

Status cuda_run_graph(const Stream& stream, const std::function<Status()>& fn, int calls) {
  auto* s = static_cast<cudaStream_t>(stream.cuda_stream);
  Result<cudaGraphExec_t> exec = capture(s, fn, calls);
  if (!exec.ok()) return exec.status();
  const cudaError_t launched = cudaGraphLaunch(*exec, s);
  const cudaError_t synced = cudaStreamSynchronize(s);
  (void)cudaGraphExecDestroy(*exec);
  KV_CUDA_TRY(launched);
  KV_CUDA_TRY(synced);
  return Status();
}

Result<double> cuda_time_graph_us(const Stream& stream, const std::function<Status()>& fn,
                                  int calls, int repeats) {
  auto* s = static_cast<cudaStream_t>(stream.cuda_stream);
  Result<cudaGraphExec_t> captured = capture(s, fn, calls);
  if (!captured.ok()) return captured.status();
  cudaGraphExec_t exec = *captured;
  std::vector<double> times;
  const auto replay = [&]() -> Status {
    EventPair ev;
    if (Status st = ev.create(); !st.ok()) return st;
    KV_CUDA_TRY(cudaGraphLaunch(exec, s));  // the first replay uploads the graph
    for (int r = 0; r < repeats; ++r) {
      KV_CUDA_TRY(cudaEventRecord(ev.start, s));
      KV_CUDA_TRY(cudaGraphLaunch(exec, s));
      KV_CUDA_TRY(cudaEventRecord(ev.stop, s));
      Result<double> us = ev.elapsed_us();
      if (!us.ok()) return us.status();
      times.push_back(*us / calls);
    }
    return Status();
  };
  const Status st = replay();
  (void)cudaGraphExecDestroy(exec);
  if (!st.ok()) return st;
  return median(times);
}

}  // namespace kvcache::backend
