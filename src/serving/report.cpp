// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "serving/report.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>

#include "kvcache/dtype.h"

#include "model/tiny_model.h"
#include "serving/verify.h"

namespace kvcache::serving {
namespace {

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  return buf;
}

long long ll(int64_t v) { return static_cast<long long>(v); }
double dbl(float v) { return static_cast<double>(v); }

double ratio(int64_t a, int64_t b) {
  return b == 0 ? 0.0 : static_cast<double>(a) / static_cast<double>(b);
}

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  return format("%.6g", v);
}

std::string layer_text(const model::LayerConfig& l) {
  const model::AttentionConfig& a = l.attention;
  switch (l.kind) {
    case model::LayerKind::recurrent:
      return "recurrent (Gated DeltaNet: a state slot per sequence, checkpointed per page)";
    case model::LayerKind::sliding_window:
      return format("sliding window of %lld tokens (pages that leave it are freed)", ll(a.window));
    case model::LayerKind::attention:
      break;
  }
  return format("attention %lldq/%lldkv heads x %lld, QK-norm, %s", ll(a.num_q_heads),
                ll(a.num_kv_heads), ll(a.head_dim),
                a.mrope_section[0] != 0 ? "multi-section RoPE" : "RoPE");
}

}  // namespace

int64_t total_checks(const EngineReport& r, std::span<const StorageError> storage) {
  int64_t n = r.checks;
  for (const StorageError& s : storage) n += s.checks;
  return n;
}

int64_t total_mismatches(const EngineReport& r, std::span<const StorageError> storage) {
  int64_t n = r.mismatches;
  for (const StorageError& s : storage) n += s.mismatches;
  return n;
}

bool passed(const EngineReport& r, std::span<const StorageError> storage) {
  return total_mismatches(r, storage) == 0 && r.checks > 0 && r.leaked_pages == 0;
}

std::string run_header(const EngineOptions& o) {
  const WorkloadOptions& w = o.workload;
  std::string out = format(
      "kvcache demo: %lld conversations x %lld turns, groups of %lld share a system prompt of "
      "%lld-%lld tokens; seed %llu\n",
      ll(w.num_conversations), ll(w.num_turns), ll(w.group_size), ll(w.system_min),
      ll(w.system_max), static_cast<unsigned long long>(w.seed));
  out += "  model: a tiny deterministic transformer (weights from the seed), layers:\n";
  const std::vector<model::LayerConfig> layers = model::serving_layers();
  for (size_t l = 0; l < layers.size(); ++l) {
    out += format("    %zu  %s\n", l, layer_text(layers[l]).c_str());
  }
  out += format(
      "  cache: %s K/V in pages of %lld tokens, %lld pages per layer group, on %s; continuous "
      "batching of up to %lld sequences\n",
      name(o.kv_dtype), ll(o.page_size), ll(o.num_pages), to_string(o.device).c_str(),
      ll(o.max_running));
  out += format(
      "  checks: the logits of every decode step of %s against a recompute from "
      "scratch without cache\n\n",
      o.verify == VerifyMode::all
          ? "every request"
          : format("the requests of every %lldth conversation", ll(o.verify_every)).c_str());
  return out;
}

std::string summary_table(const EngineReport& r, const EngineOptions& o,
                          std::span<const StorageError> storage) {
  const int64_t turns = r.requests - r.forks;
  const int64_t prompt = r.tokens_prefilled + r.tokens_reused;
  std::string out;
  const auto row = [&out](const char* key, const std::string& value) {
    out += format("  %-15s %s\n", key, value.c_str());
  };
  row("requests", format("%lld (%lld turns + %lld alternative replies by fork) in %lld steps",
                         ll(r.requests), ll(turns), ll(r.forks), ll(r.steps)));
  row("prompt tokens",
      format("%lld: %lld prefilled, %lld reused from the prefix cache "
             "(hit rate %.1f%%)",
             ll(prompt), ll(r.tokens_prefilled), ll(r.tokens_reused), 100.0 * r.hit_rate));
  row("decoded tokens", format("%lld", ll(r.tokens_decoded)));
  row("pages", format("peak %lld in use of a budget of %lld (per layer group); contiguous "
                      "per-conversation caches would need %lld (%.1fx)",
                      ll(r.peak_pages), ll(r.budget_pages), ll(r.contiguous_pages_needed),
                      ratio(r.contiguous_pages_needed, r.peak_pages)));
  row("evictions",
      format("%lld cached pages and state checkpoints dropped for new tokens", ll(r.evictions)));
  row("copy-on-write",
      format("%lld page copies (forks writing into their shared last page)", ll(r.cow_copies)));
  row("preemptions", format("%lld (freed when the pool ran dry, resumed from the cached prefix)",
                            ll(r.preemptions)));
  row("speed", format("%.0f tokens/s (%lld tokens in %.2f s, %d threads, attention %s); "
                      "verification %.2f s",
                      r.tokens_per_second, ll(r.tokens_computed), r.engine_seconds, o.num_threads,
                      r.attention_sku.c_str(), r.verify_seconds));
  row("accuracy",
      format("%s K/V: max |logit diff| %.1e against the %s model without cache "
             "(tolerance %.1e)",
             name(r.kv_dtype), dbl(r.max_error), name(r.reference_dtype), dbl(r.tolerance)));
  for (const StorageError& s : storage) {
    row("",
        format("%s K/V: max |logit diff| %.1e against the %s model (tolerance %.1e; "
               "%lld steps of a %lld x %lld rerun)",
               name(s.kv_dtype), dbl(s.max_error), name(model_dtype(s.kv_dtype)), dbl(s.tolerance),
               ll(s.checks), ll(std::min(o.workload.num_conversations, kCompareConversations)),
               ll(std::min(o.workload.num_turns, kCompareTurns))));
  }
  row("checks", format("%lld decode steps compared: %lld of %lld requests (%s) + %lld in the "
                       "reruns; %lld over the tolerance",
                       ll(total_checks(r, storage)), ll(r.checks), ll(r.verified_requests),
                       o.verify == VerifyMode::all ? "all" : "a sample",
                       ll(total_checks(r, storage) - r.checks), ll(total_mismatches(r, storage))));
  if (r.faults_injected > 0) {
    row("fault", format("%lld cached K page inverted on purpose (--corrupt-at-step)",
                        ll(r.faults_injected)));
  }
  for (const std::string& line : r.mismatch_lines) out += "    MISMATCH " + line + "\n";
  row("leaked pages", format("%lld after the last request", ll(r.leaked_pages)));
  return out;
}

std::string summary_json(const EngineReport& r, const EngineOptions& o,
                         std::span<const StorageError> storage) {
  std::string out = "{\n";
  const auto key = [&out](const char* k, const std::string& v) {
    out += format("  \"%s\": %s,\n", k, v.c_str());
  };
  const auto integer = [](int64_t v) { return format("%lld", ll(v)); };
  const auto text = [](const std::string& v) { return "\"" + v + "\""; };
  key("conversations", integer(r.conversations));
  key("turns", integer(o.workload.num_turns));
  key("seed", format("%llu", static_cast<unsigned long long>(o.workload.seed)));
  key("device", text(to_string(o.device)));
  key("requests", integer(r.requests));
  key("forks", integer(r.forks));
  key("steps", integer(r.steps));
  key("kv_dtype", text(name(r.kv_dtype)));
  key("reference_dtype", text(name(r.reference_dtype)));
  key("page_size", integer(r.page_size));
  key("budget_pages", integer(r.budget_pages));
  key("tokens_prefilled", integer(r.tokens_prefilled));
  key("tokens_reused", integer(r.tokens_reused));
  key("tokens_decoded", integer(r.tokens_decoded));
  key("tokens_computed", integer(r.tokens_computed));
  key("hit_rate", json_number(r.hit_rate));
  key("peak_pages", integer(r.peak_pages));
  key("contiguous_pages_needed", integer(r.contiguous_pages_needed));
  key("evictions", integer(r.evictions));
  key("cow_copies", integer(r.cow_copies));
  key("preemptions", integer(r.preemptions));
  key("leaked_pages", integer(r.leaked_pages));
  key("engine_seconds", json_number(r.engine_seconds));
  key("verify_seconds", json_number(r.verify_seconds));
  key("tokens_per_second", json_number(r.tokens_per_second));
  key("verify", text(o.verify == VerifyMode::all ? "all" : "sample"));
  key("verified_requests", integer(r.verified_requests));
  key("max_error", json_number(dbl(r.max_error)));
  key("tolerance", json_number(dbl(r.tolerance)));
  key("faults_injected", integer(r.faults_injected));
  std::string reruns = "[";
  for (const StorageError& s : storage) {
    reruns += format(
        "%s\n    {\"kv_dtype\": \"%s\", \"max_error\": %s, \"tolerance\": %s, "
        "\"checks\": %lld, \"mismatches\": %lld}",
        reruns.size() > 1 ? "," : "", name(s.kv_dtype), json_number(dbl(s.max_error)).c_str(),
        json_number(dbl(s.tolerance)).c_str(), ll(s.checks), ll(s.mismatches));
  }
  key("storage_comparison", reruns + (storage.empty() ? "]" : "\n  ]"));
  key("checks", integer(total_checks(r, storage)));
  key("mismatches", integer(total_mismatches(r, storage)));
  out += format("  \"passed\": %s\n}\n", passed(r, storage) ? "true" : "false");
  return out;
}

}  // namespace kvcache::serving
