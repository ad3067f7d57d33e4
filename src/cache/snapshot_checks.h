// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Internal to the library: what the three cache kinds check alike (options, positions, update()
// inputs of the attention kinds, and above all the snapshots handed to restore, merge and split)
// and the small helpers their messages use, so that one refusal reads the same whichever kind
// makes it: "<Class>.<method>: <what was wrong>, expected <what was expected>". Free functions of
// values; thread-compatible.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvcache/cache.h"
#include "kvcache/dtype.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

namespace kvcache::detail {

// "42"
[[nodiscard]] std::string str(int64_t value);
// "[1, 2, 3]"
[[nodiscard]] std::string join(std::span<const int64_t> values);

// The product of `factors` in int64 into *out; false (and *out untouched) on overflow.
[[nodiscard]] bool checked_product(std::initializer_list<int64_t> factors, int64_t* out);

// copy_into for views the caller validated (and made room for) first: a failure is a bug.
// Copies nothing when src is empty.
void copy_or_die(const TensorView& src, const TensorView& dst);

// --- options (op is "<Class>.create") ---

// "<op>: <field> is <value>, expected > 0"
[[nodiscard]] Status check_positive(std::string_view op, std::string_view field, int64_t value);
// "<op>: dtype is <dtype>, expected f32, f16 or bf16"
[[nodiscard]] Status check_float_dtype(std::string_view op, DType dtype);

// --- positions ---

// "<op>: <arg> is <value>, expected 0 <= <arg> <= offset (<offset>)"
[[nodiscard]] Status check_position(std::string_view op, std::string_view arg, int64_t value,
                                    int64_t offset);
// The target of restore(snapshot, target) lies in [s.begin(), s.end()].
[[nodiscard]] Status check_target_in(std::string_view op, const Snapshot& s, int64_t target);

// --- update() of an attention cache ---

struct AttentionDims {
  DType dtype;
  int64_t batch;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t head_dim_v;
};
// keys [batch, num_kv_heads, L, head_dim] and values [batch, num_kv_heads, L, head_dim_v] of the
// dtype, on the CPU, with data, L >= 1 and the same for both.
[[nodiscard]] Status check_update_inputs(const TensorView& keys, const TensorView& values,
                                         const AttentionDims& dims, std::string_view op);

// --- snapshots ---

// What a cache kind accepts as a snapshot of its own.
struct SnapshotSpec {
  CacheKind kind;
  std::vector<int64_t> layout;
  std::string_view layout_fields;  // names the layout's entries: "(max_size, keep, ...)"
  bool allow_empty = true;         // whether begin == end is a valid range
  size_t num_arrays = 0;
  // The bytes array `i` holds in snapshot `s`, whose kind, layout and range already passed.
  std::function<size_t(const Snapshot& s, size_t i)> array_bytes;
};

// Kind and layout only ("<op>: <arg> is of a rotating cache, expected recurrent").
[[nodiscard]] Status check_kind_and_layout(const Snapshot& s, const SnapshotSpec& spec,
                                           std::string_view op, std::string_view arg);
// Kind, layout, range (0 <= begin <= end, or < for !allow_empty) and arrays (count, bytes, on
// the CPU): a snapshot is a plain value and can be built by hand, so all of it is input.
[[nodiscard]] Status check_snapshot(const Snapshot& s, const SnapshotSpec& spec,
                                    std::string_view op, std::string_view arg);
// merge()'s preconditions, the same for every kind: both sides present and valid, taken from one
// cache, parent.end() == child.begin().
[[nodiscard]] Status check_merge(const std::optional<Snapshot>& parent,
                                 const std::optional<Snapshot>& child, const SnapshotSpec& spec,
                                 std::string_view op);
// merge() of the whole-state kinds: after check_merge, the child's state already holds
// everything [a, c) needs, so the result adopts the child's arrays (no copy) over
// [parent.begin(), child.end()) under the parent's cache id and both inputs are consumed. On a
// refusal neither is moved from.
[[nodiscard]] Result<Snapshot> merge_whole_state(std::optional<Snapshot>& parent,
                                                 std::optional<Snapshot>& child,
                                                 const SnapshotSpec& spec, std::string_view op);

}  // namespace kvcache::detail
