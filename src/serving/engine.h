// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The serving demo's engine: a continuous-batching scheduler that serves a Workload of multi-turn
// conversations with the tiny transformer over paged K/V (PagedModel), a BlockManager with one
// layer group per kind of layer (full attention, sliding window, recurrent) and a fixed page
// budget, and checks the decode steps against a recompute without cache (verify.h).
//
// Each turn is one request: its prompt is the conversation's whole history plus the new user
// tokens, so add() finds the history (and the group's shared system prompt) in the prefix cache
// when it is still there. Prefill runs in chunks that end on page boundaries (one page per
// sequence per step), so every chunk leaves a recurrent-state checkpoint that later prefix hits
// restore. Decoding is greedy. Some turns also fork an alternative reply (the runner-up first
// token): the fork shares every page and the partial last page is copied on write. When a
// reservation finds no page, plan_preemption() picks the newest requests to free; they go back
// to the front of the queue and resume from whatever prefix is still cached (recompute).
//
// run_engine() owns everything it creates; it is a plain function, thread-compatible. The
// progress callback runs on the caller's thread.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/status.h"

#include "serving/workload.h"

namespace kvcache::serving {

enum class VerifyMode : uint8_t { sample, all };

struct EngineProgress {
  int64_t step = 0;
  int64_t turns_done = 0;  // main requests finished
  int64_t turns_total = 0;
  int64_t running = 0;
  int64_t waiting = 0;
  int64_t mismatches = 0;
};

struct EngineOptions {
  // --- affects behaviour ---
  WorkloadOptions workload;      // its seed also seeds the model's weights
  int64_t num_pages = 384;       // per layer group (pages; state slots for the recurrent one)
  int64_t page_size = 16;        // tokens per page
  DType kv_dtype = DType::bf16;  // bf16, f16, f32, int8 or fp8_e4m3
  Device device = Device::cpu();
  VerifyMode verify = VerifyMode::sample;
  int64_t verify_every = 4;     // sample: conversations whose index is a multiple of this
  int64_t max_running = 32;     // sequences in the batch (forks included)
  int64_t watermark_pages = 8;  // kept back at admission for running sequences to grow
  // Fault injection for the negative test (-1: off): at the first step >= flip_k_page_at_step
  // that decodes a verified sequence whose first page is full, invert the K bytes of that page
  // in the last full-attention layer before the step runs (EngineReport::faults_injected).
  int64_t flip_k_page_at_step = -1;
  // --- affects performance ---
  int64_t max_step_tokens = 512;  // new tokens per step over the batch
  int num_threads = 2;            // the ops' ThreadPool
  // Called after every step (and once at the end).
  std::function<void(const EngineProgress&)> on_progress;
};

// One point of the page timeline (group 0, the full-attention pool), after a step.
struct TimelinePoint {
  int64_t step = 0;
  int64_t live = 0;    // pages some sequence holds
  int64_t cached = 0;  // cached prefix pages nobody holds (evictable)
  int64_t free = 0;
  double hit_rate = 0.0;    // cumulative prefix hit rate (tokens)
  int64_t preemptions = 0;  // cumulative
};

struct EngineReport {
  // --- the workload ---
  int64_t conversations = 0;
  int64_t requests = 0;  // turns served + alternative replies (forks)
  int64_t forks = 0;
  int64_t steps = 0;
  // --- tokens ---
  // A preempted request is admitted again: its prompt counts again, reused or recomputed.
  int64_t tokens_prefilled = 0;  // prompt tokens computed (recomputes after preemption included)
  int64_t tokens_reused = 0;     // prompt tokens served from the prefix cache at admission
  int64_t tokens_decoded = 0;    // tokens generated
  int64_t tokens_computed = 0;   // every token the model ran (prefill + decode)
  double hit_rate = 0.0;         // tokens_reused / (tokens_reused + tokens_prefilled)
  // --- pages (group 0: the full-attention pool) ---
  int64_t page_size = 0;
  int64_t budget_pages = 0;             // per layer group
  int64_t peak_pages = 0;               // most pages held by running sequences at once
  int64_t contiguous_pages_needed = 0;  // sum over conversations of ceil(final length / page_size)
  int64_t evictions = 0;                // cached pages / checkpoints evicted, all groups
  int64_t cow_copies = 0;
  int64_t preemptions = 0;
  int64_t leaked_pages = 0;  // pages or slots still held after every request finished: 0
  size_t pool_bytes = 0;
  // --- speed ---
  double engine_seconds = 0.0;  // scheduling + model steps, verification excluded
  double verify_seconds = 0.0;
  double tokens_per_second = 0.0;  // tokens_computed / engine_seconds
  // --- verification ---
  DType kv_dtype = DType::bf16;
  DType reference_dtype = DType::bf16;
  float tolerance = 0.0f;
  int64_t verified_requests = 0;
  int64_t checks = 0;                       // decode steps compared
  int64_t mismatches = 0;                   // steps over the tolerance
  int64_t faults_injected = 0;              // pages flipped by flip_k_page_at_step: 0 or 1
  float max_error = 0.0f;                   // max |logit diff| over the compared steps
  std::vector<std::string> mismatch_lines;  // the first few, for the report
  std::vector<TimelinePoint> timeline;
  std::string attention_sku;
};

// Runs the whole workload. invalid_argument for bad options (the message names the field),
// unavailable for a device without the ops (CUDA before issue 5), resource_exhausted when one
// request alone does not fit in the page budget. Mismatches are not an error: they are counted
// in the report.
[[nodiscard]] Result<EngineReport> run_engine(const EngineOptions& options);

}  // namespace kvcache::serving
