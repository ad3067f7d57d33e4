// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "cache/snapshot_checks.h"

#include <tuple>
#include <utility>

#include "kvcache/buffer.h"
#include "kvcache/device.h"

#include "core/check.h"

namespace kvcache::detail {
namespace {

std::string prefix_of(std::string_view op, std::string_view arg) {
  std::string out(op);
  out += ": ";
  out += arg;
  return out;
}

}  // namespace

std::string str(int64_t value) { return std::to_string(value); }

std::string join(std::span<const int64_t> values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += ", ";
    out += str(values[i]);
  }
  return out + "]";
}

bool checked_product(std::initializer_list<int64_t> factors, int64_t* out) {
  int64_t p = 1;
  for (int64_t f : factors) {
    if (__builtin_mul_overflow(p, f, &p)) return false;
  }
  *out = p;
  return true;
}

void copy_or_die(const TensorView& src, const TensorView& dst) {
  if (src.numel() == 0) return;
  const Status s = copy_into(src, dst);
  KV_CHECK(s.ok());
}

Status check_positive(std::string_view op, std::string_view field, int64_t value) {
  if (value > 0) return Status();
  return Status::invalid_argument(prefix_of(op, field) + " is " + str(value) + ", expected > 0");
}

Status check_float_dtype(std::string_view op, DType dtype) {
  if (dtype == DType::f32 || dtype == DType::f16 || dtype == DType::bf16) return Status();
  return Status::invalid_argument(prefix_of(op, "dtype is ") + name(dtype) +
                                  ", expected f32, f16 or bf16");
}

Status check_position(std::string_view op, std::string_view arg, int64_t value, int64_t offset) {
  if (value >= 0 && value <= offset) return Status();
  return Status::invalid_argument(prefix_of(op, arg) + " is " + str(value) + ", expected 0 <= " +
                                  std::string(arg) + " <= offset (" + str(offset) + ")");
}

Status check_target_in(std::string_view op, const Snapshot& s, int64_t target) {
  const int64_t a = s.begin();
  const int64_t b = s.end();
  if (target >= a && target <= b) return Status();
  return Status::invalid_argument(prefix_of(op, "target is ") + str(target) + ", expected " +
                                  str(a) + " <= target <= " + str(b) + " (the snapshot covers [" +
                                  str(a) + ", " + str(b) + "))");
}

Status check_update_inputs(const TensorView& keys, const TensorView& values,
                           const AttentionDims& dims, std::string_view op) {
  for (const auto& [t, arg, dim, dim_name] :
       {std::tuple{&keys, "keys", dims.head_dim, "head_dim"},
        std::tuple{&values, "values", dims.head_dim_v, "head_dim_v"}}) {
    if (Status s = check_dtype(*t, dims.dtype, op, arg); !s.ok()) return s;
    if (Status s = check_device(*t, Device::cpu(), op, arg); !s.ok()) return s;
    if (Status s = check_shape(*t,
                               {{dims.batch, "batch"},
                                {dims.num_kv_heads, "num_kv_heads"},
                                {-1, "L"},
                                {dim, dim_name}},
                               op, arg);
        !s.ok()) {
      return s;
    }
    if (Status s = check_data(*t, op, arg); !s.ok()) return s;
  }
  const int64_t n = keys.shape[2];
  if (n < 1) {
    return Status::invalid_argument(prefix_of(op, "keys has ") + str(n) +
                                    " tokens (L), expected at least 1");
  }
  if (values.shape[2] != n) {
    return Status::invalid_argument(prefix_of(op, "values has ") + str(values.shape[2]) +
                                    " tokens (L), expected " + str(n) + " (as many as keys)");
  }
  return Status();
}

Status check_kind_and_layout(const Snapshot& s, const SnapshotSpec& spec, std::string_view op,
                             std::string_view arg) {
  if (s.kind() != spec.kind) {
    return Status::invalid_argument(prefix_of(op, arg) + " is of a " + name(s.kind()) +
                                    " cache, expected " + name(spec.kind));
  }
  if (s.layout() != spec.layout) {
    return Status::invalid_argument(prefix_of(op, arg) + " has layout " + join(s.layout()) +
                                    ", expected " + join(spec.layout) + " " +
                                    std::string(spec.layout_fields));
  }
  return Status();
}

Status check_snapshot(const Snapshot& s, const SnapshotSpec& spec, std::string_view op,
                      std::string_view arg) {
  if (Status st = check_kind_and_layout(s, spec, op, arg); !st.ok()) return st;
  const std::string prefix = prefix_of(op, arg);
  if (s.begin() < 0 || s.end() < s.begin() || (!spec.allow_empty && s.end() == s.begin())) {
    return Status::invalid_argument(prefix + " covers [" + str(s.begin()) + ", " + str(s.end()) +
                                    "), expected 0 <= begin " + (spec.allow_empty ? "<=" : "<") +
                                    " end");
  }
  if (s.arrays().size() != spec.num_arrays) {
    return Status::invalid_argument(prefix + " has " + std::to_string(s.arrays().size()) +
                                    " arrays, expected " + std::to_string(spec.num_arrays));
  }
  for (size_t i = 0; i < spec.num_arrays; ++i) {
    const Buffer& b = s.arrays()[i];
    const size_t want = spec.array_bytes(s, i);
    if (b.num_bytes() != want || !b.device().is_cpu()) {
      return Status::invalid_argument(
          prefix + " array " + std::to_string(i) + " has " + std::to_string(b.num_bytes()) +
          " bytes on " + to_string(b.device()) + ", expected " + std::to_string(want) + " on cpu");
    }
  }
  return Status();
}

Status check_merge(const std::optional<Snapshot>& parent, const std::optional<Snapshot>& child,
                   const SnapshotSpec& spec, std::string_view op) {
  if (!parent || !child) {
    return Status::invalid_argument(prefix_of(op, parent ? "child" : "parent") +
                                    " is missing, expected a snapshot");
  }
  if (Status s = check_snapshot(*parent, spec, op, "parent"); !s.ok()) return s;
  if (Status s = check_snapshot(*child, spec, op, "child"); !s.ok()) return s;
  const Snapshot& p = *parent;
  const Snapshot& c = *child;
  if (p.cache_id() != c.cache_id()) {
    return Status::invalid_argument(
        prefix_of(op, "child comes from cache ") + std::to_string(c.cache_id()) +
        ", expected the parent's cache " + std::to_string(p.cache_id()));
  }
  if (p.end() != c.begin()) {
    return Status::invalid_argument(prefix_of(op, "parent covers [") + str(p.begin()) + ", " +
                                    str(p.end()) + ") and child [" + str(c.begin()) + ", " +
                                    str(c.end()) + "), expected adjacent ranges (child begins at " +
                                    str(p.end()) + ")");
  }
  return Status();
}

Result<Snapshot> merge_whole_state(std::optional<Snapshot>& parent, std::optional<Snapshot>& child,
                                   const SnapshotSpec& spec, std::string_view op) {
  if (Status s = check_merge(parent, child, spec, op); !s.ok()) return s;
  Snapshot merged(child->kind(), parent->cache_id(), child->layout(), parent->begin(), child->end(),
                  std::move(*child).take_arrays());
  parent.reset();
  child.reset();
  return merged;
}

}  // namespace kvcache::detail
