// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// PagedModel: the tiny transformer (src/model) running over paged K/V, one step of a continuous
// batch at a time. It owns, per attention layer, a pair of page pools (PagedKV, in Buffers on the
// configured device; bf16, int8 or fp8_e4m3 with per-(token, head) scales) and, per recurrent
// layer, a pool of state slots; and the op plans that touch them: qkv_rope_write (split, QK-norm,
// RoPE incl. multi-section, quantize, paged write), extend / decode attention over the page tables
// (sliding window on the sliding layer), copy_pages for copy-on-write. The BlockManager that hands
// out pages and slots is the caller's (the Engine): this class only follows its slots, page tables
// and copy lists. Layers map onto the manager's layer groups by kind (layer_groups()).
//
// The math around the ops (projections, MLP, the recurrent mixer, logits) is the model's own
// host functions, so the only difference to TinyModel::forward_full is the cache: its storage
// dtype and the ops' summation order. On CUDA every op argument (activations, slots, page tables,
// lengths) is staged to the device and the attention output copied back (DeviceArrays); each
// call ends with check_device_errors, so a kernel-detected bad index surfaces as its Status.
// Not thread-safe: one scheduler thread calls it; the ops spread over the given ThreadPool.

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "kvcache/block_manager.h"
#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/status.h"
#include "kvcache/thread_pool.h"

#include "model/tiny_model.h"

namespace kvcache::serving {

// The manager groups a model needs (num_pages left 0 for the caller) and each layer's group: one
// full group for the attention layers, one sliding_window group per window, one recurrent group.
struct LayerGroups {
  std::vector<LayerGroupSpec> groups;
  std::vector<int32_t> group_of_layer;  // [num_layers]
};
[[nodiscard]] LayerGroups layer_groups(const model::TinyModelConfig& config);

struct PagedModelOptions {
  DType kv_dtype = DType::bf16;  // K and V storage: bf16, f16, f32, int8 or fp8_e4m3
  Device device = Device::cpu();
  int64_t page_size = 16;
  std::vector<int64_t> group_pages;  // per group of layer_groups(): pages, or state slots
  // --- bounds of one step (size the plans' workspaces) ---
  int64_t max_batch = 64;         // sequences per step
  int64_t max_seq_len = 0;        // tokens of the longest sequence, the new ones included
  int64_t max_step_tokens = 512;  // new tokens per step over all sequences
};

// One sequence's part of a step: n new tokens at positions [start, start + n).
struct StepRows {
  std::span<const int32_t> tokens;  // [n], n >= 1
  int64_t start = 0;                // tokens already in the cache
  // Per layer group (empty for a recurrent group): the slot of each new token, and the page
  // table covering [0, start + n) (kNullPage for pages that left a sliding window).
  std::vector<std::vector<int64_t>> slots;
  std::vector<std::vector<int32_t>> pages;
  std::vector<StateSlot> state;  // per group: the live state slot (recurrent groups only)
  bool want_logits = false;      // return the logits of the last new token
};

class PagedModel {
 public:
  // The plans are selected for options.device first, so an unavailable device answers
  // `unavailable` before any memory is taken. invalid_argument for bad options (the ops'
  // messages), resource_exhausted when a pool cannot be allocated.
  // REQUIRES: model and pool outlive the PagedModel.
  static Result<std::unique_ptr<PagedModel>> create(const model::TinyModel& model,
                                                    const PagedModelOptions& options,
                                                    ThreadPool* pool);
  ~PagedModel();
  PagedModel(const PagedModel&) = delete;
  PagedModel& operator=(const PagedModel&) = delete;

  // Runs one step: writes the new tokens' K/V to their slots, attends, advances the recurrent
  // states in place. Returns the logits [vocab] of each sequence with want_logits, in batch
  // order. Errors are the ops' (a bug in the caller's slots or tables, not user input).
  Result<std::vector<std::vector<float>>> forward(std::span<const StepRows> batch);
  // Applies the manager's copy-on-write list in every layer of each copy's group, in order.
  Status apply_page_copies(std::span<const PageCopy> copies);
  // Applies the manager's state copies (kNoStateSlot: reset to zero) in every recurrent layer.
  void apply_state_copies(std::span<const StateCopy> copies);
  // Fault injection for the verification's negative test: inverts every byte of page `page` of
  // layer `layer`'s K pool (the values; int8 / fp8 scales stay). invalid_argument for a layer
  // without K/V or a page outside the pool.
  Status flip_k_page(int64_t layer, PageId page);

  [[nodiscard]] const LayerGroups& groups() const;
  // The attention plans' implementation, e.g. "cpu.avx512".
  [[nodiscard]] const char* attention_sku() const;
  // Bytes of every pool (K/V pages, scales, state slots).
  [[nodiscard]] size_t pool_bytes() const;

 private:
  struct Rep;
  explicit PagedModel(std::unique_ptr<Rep> rep);
  std::unique_ptr<Rep> rep_;
};

}  // namespace kvcache::serving
