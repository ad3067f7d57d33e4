// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// `kvcache demo`: prefill + greedy decode of the tiny transformer, one cache per layer, every
// step's logits checked against a recompute without cache; a speculative draft rolled back through
// snapshot/restore; a corrupted cache shown to be caught. Prints a short report.
#include "demo.h"

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvcache/cache.h"
#include "kvcache/dtype.h"
#include "kvcache/rotating_cache.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"

#include "model/tiny_model.h"

namespace kvcache::cli {
namespace {

using model::LayerKind;
using model::Session;
using model::TinyModel;

constexpr int64_t kDraftEvery = 8;  // decode steps between speculative drafts

// Adds delta to every element of token `token` of a [batch, tokens, heads, dim] cache view (batch
// row 0) and returns the bytes it overwrote, for restore_token.
std::vector<std::byte> add_to_token(const TensorView& t, int64_t token, float delta) {
  std::vector<std::byte> saved;
  const size_t elem = size_of(t.dtype);
  for (int64_t h = 0; h < t.dim(2); ++h) {
    for (int64_t d = 0; d < t.dim(3); ++d) {
      const int64_t index[] = {0, token, h, d};
      void* p = t.element_ptr(index);
      const auto* bytes = static_cast<const std::byte*>(p);
      saved.insert(saved.end(), bytes, bytes + elem);
      float value = 0.0f;
      to_float(t.dtype, p, &value, 1);
      value += delta;
      from_float(&value, t.dtype, p, 1);
    }
  }
  return saved;
}

void restore_token(const TensorView& t, int64_t token, const std::vector<std::byte>& saved) {
  const size_t elem = size_of(t.dtype);
  size_t at = 0;
  for (int64_t h = 0; h < t.dim(2); ++h) {
    for (int64_t d = 0; d < t.dim(3); ++d, at += elem) {
      const int64_t index[] = {0, token, h, d};
      std::memcpy(t.element_ptr(index), saved.data() + at, elem);
    }
  }
}

constexpr const char* kUsage =
    "usage: kvcache demo [options]\n"
    "\n"
    "Greedy decode with a small deterministic transformer (attention with GQA, QK-norm and RoPE;\n"
    "a sliding-window layer with sink tokens; a Gated DeltaNet recurrent layer), each layer over\n"
    "its own cache. Every step's logits are checked against a recompute without any cache.\n"
    "\n"
    "options:\n"
    "  --steps N      decode steps (default 48)\n"
    "  --prompt N     prompt tokens, prefilled in one chunk (default 16)\n"
    "  --dtype T      cache storage: f32, f16 or bf16 (default bf16)\n"
    "  --seed S       seed of the weights and the prompt (default 1)\n"
    "  --draft K      tokens drafted and rolled back every 8 steps, 0 for none (default 3)\n"
    "  --help         show this text\n";

struct Options {
  int64_t steps = 48;
  int64_t prompt = 16;
  DType dtype = DType::bf16;
  uint64_t seed = 1;
  int64_t draft = 3;
  bool help = false;
};

template <class T>
bool parse_int(std::string_view text, T min, T max, T& out) {
  T value{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || value < min || value > max) {
    return false;
  }
  out = value;
  return true;
}

// The error line for a bad command line, or none.
std::optional<std::string> parse_options(int argc, char** argv, Options& o) {
  for (int i = 1; i < argc; ++i) {
    std::string_view arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      o.help = true;
      continue;
    }
    std::string_view key = arg;
    std::optional<std::string_view> value;
    if (const size_t eq = arg.find('='); arg.starts_with("--") && eq != std::string_view::npos) {
      key = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    }
    if (key != "--steps" && key != "--prompt" && key != "--dtype" && key != "--seed" &&
        key != "--draft") {
      return "unknown option '" + std::string(arg) + "' (see kvcache demo --help)";
    }
    if (!value) {
      if (i + 1 >= argc) return std::string(key) + " needs a value";
      value = argv[++i];
    }
    const std::string shown = std::string(key) + " is '" + std::string(*value) + "', expected ";
    if (key == "--steps" && !parse_int<int64_t>(*value, 1, 2048, o.steps)) {
      return shown + "an integer in [1, 2048]";
    }
    if (key == "--prompt" && !parse_int<int64_t>(*value, 1, 2048, o.prompt)) {
      return shown + "an integer in [1, 2048]";
    }
    if (key == "--draft" && !parse_int<int64_t>(*value, 0, 64, o.draft)) {
      return shown + "an integer in [0, 64]";
    }
    if (key == "--seed" && !parse_int<uint64_t>(*value, 0, UINT64_MAX, o.seed)) {
      return shown + "an unsigned integer";
    }
    if (key == "--dtype") {
      const Result<DType> d = parse_dtype(*value);
      if (!d.ok() || (*d != DType::f32 && *d != DType::f16 && *d != DType::bf16)) {
        return shown + "f32, f16 or bf16";
      }
      o.dtype = *d;
    }
  }
  return std::nullopt;
}

std::string format(const char* fmt, double value) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), fmt, value);
  return buf;
}
std::string sci(double value) { return format("%.1e", value); }

// Collects check results and prints one line per kind of check.
class Checks {
 public:
  void add(bool ok) { ok ? ++passed_ : ++failed_; }
  void line(bool ok, const std::string& name, const std::string& text) {
    std::printf("  %-5s %-10s %s\n", ok ? "ok" : "FAIL", name.c_str(), text.c_str());
  }
  [[nodiscard]] int passed() const { return passed_; }
  [[nodiscard]] int failed() const { return failed_; }

 private:
  int passed_ = 0;
  int failed_ = 0;
};

// Every layer's offset and state() contents, densely copied: equal means the caches agree.
Result<std::vector<std::vector<std::byte>>> state_bytes(const Session& s) {
  std::vector<std::vector<std::byte>> out;
  for (int64_t l = 0; l < s.num_layers(); ++l) {
    const int64_t offset = s.cache(l).offset();
    const auto* p = reinterpret_cast<const std::byte*>(&offset);
    out.emplace_back(p, p + sizeof(offset));
    for (const TensorView& v : s.cache(l).state()) {
      std::vector<std::byte> bytes(v.num_bytes());
      const TensorView dense = TensorView::contiguous(
          bytes.data(), v.dtype,
          std::span<const int64_t>(v.shape.data(), static_cast<size_t>(v.rank)));
      if (Status st = copy_into(v, dense); !st.ok()) return st;
      out.push_back(std::move(bytes));
    }
  }
  return out;
}

std::string mixer_text(const model::LayerConfig& l) {
  const model::AttentionConfig& a = l.attention;
  char buf[96];
  if (l.kind == LayerKind::recurrent) {
    const model::RecurrentConfig& r = l.recurrent;
    std::snprintf(buf, sizeof(buf), "deltanet   conv %lld x %lld, state %lld x %lld x %lld",
                  static_cast<long long>(model::conv_dim(r)),
                  static_cast<long long>(r.conv_tail + 1), static_cast<long long>(r.num_v_heads),
                  static_cast<long long>(r.head_v_dim), static_cast<long long>(r.head_k_dim));
  } else if (l.kind == LayerKind::sliding_window) {
    std::snprintf(buf, sizeof(buf), "sliding    window %lld with %lld sinks, %lldq/%lldkv",
                  static_cast<long long>(a.window), static_cast<long long>(a.keep),
                  static_cast<long long>(a.num_q_heads), static_cast<long long>(a.num_kv_heads));
  } else {
    std::snprintf(buf, sizeof(buf), "attention  %lldq/%lldkv heads x %lld%s, RoPE",
                  static_cast<long long>(a.num_q_heads), static_cast<long long>(a.num_kv_heads),
                  static_cast<long long>(a.head_dim), a.qk_norm ? ", QK-norm" : "");
  }
  return buf;
}

void print_layers(const TinyModel& m, const Session& s) {
  std::printf("layer  %-44s %-10s %6s %5s %6s\n", "mixer", "cache", "offset", "held", "bytes");
  for (int64_t l = 0; l < s.num_layers(); ++l) {
    const Cache& c = s.cache(l);
    size_t bytes = 0;
    for (const TensorView& v : c.state()) bytes += v.num_bytes();
    std::string held = "-";  // a recurrent state holds no tokens
    if (c.kind() == CacheKind::contiguous) held = std::to_string(c.offset());
    if (c.kind() == CacheKind::rotating) {
      held = std::to_string(static_cast<const RotatingKVCache&>(c).window_len());
    }
    std::printf("%5lld  %-44s %-10s %6lld %5s %6zu\n", static_cast<long long>(l),
                mixer_text(m.config().layers[static_cast<size_t>(l)]).c_str(), name(c.kind()),
                static_cast<long long>(c.offset()), held.c_str(), bytes);
  }
}

// Last row of forward_full(tokens).
Result<std::vector<float>> full_last(const TinyModel& m, const std::vector<int32_t>& tokens) {
  Result<std::vector<float>> all = m.forward_full(tokens);
  if (!all.ok()) return all;
  const auto vocab = static_cast<std::ptrdiff_t>(m.config().vocab);
  return std::vector<float>(all->end() - vocab, all->end());
}

int fail(const Status& s) {
  std::printf("FAILED: %s\n", s.to_string().c_str());
  return 1;
}

int run(const Options& o) {
  model::TinyModelConfig config;
  config.dtype = o.dtype;
  config.seed = o.seed;
  auto created = TinyModel::create(config);
  if (!created.ok()) return fail(created.status());
  const TinyModel& m = **created;
  auto made = Session::create(m);
  auto made_plain = Session::create(m);  // the same tokens, never drafts
  if (!made.ok()) return fail(made.status());
  if (!made_plain.ok()) return fail(made_plain.status());
  Session& session = **made;
  Session& plain = **made_plain;
  const int64_t vocab = config.vocab;

  std::printf(
      "kvcache demo: tiny transformer (seed %llu, vocab %lld, d_model %lld, %lld layers), "
      "%s caches\n",
      static_cast<unsigned long long>(o.seed), static_cast<long long>(vocab),
      static_cast<long long>(config.d_model), static_cast<long long>(m.num_layers()),
      name(o.dtype));
  std::printf("  %lld-token prompt prefilled in one chunk, %lld greedy decode steps",
              static_cast<long long>(o.prompt), static_cast<long long>(o.steps));
  if (o.draft > 0) {
    std::printf(", %lld-token drafts every %lld", static_cast<long long>(o.draft),
                static_cast<long long>(kDraftEvery));
  }
  std::printf("\n\n");

  const float tolerance = model::logit_tolerance(o.dtype);
  std::mt19937_64 rng(o.seed ^ 0x70726f6d7074ull);
  std::vector<int32_t> tokens(static_cast<size_t>(o.prompt));
  for (int32_t& t : tokens) t = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));

  // Prefill: every position's logits against the recompute.
  auto prefill = session.prefill(tokens);
  if (!prefill.ok()) return fail(prefill.status());
  if (auto p = plain.prefill(tokens); !p.ok()) return fail(p.status());
  auto full = m.forward_full(tokens);
  if (!full.ok()) return fail(full.status());
  const float prefill_diff = model::max_abs_diff(*prefill, *full);
  const bool prefill_ok = prefill_diff <= tolerance;
  int32_t next = model::argmax(std::span<const float>(*prefill).last(static_cast<size_t>(vocab)));

  // Decode, with drafts rolled back every kDraftEvery steps.
  float decode_worst = 0.0f;
  int64_t decode_failed = 0, first_bad_step = -1, wrap_step = -1;
  int64_t drafts = 0, drafts_ok = 0;
  size_t checkpoint_bytes = 0;
  const auto* sliding = [&]() -> const RotatingKVCache* {
    for (int64_t l = 0; l < session.num_layers(); ++l) {
      if (session.cache(l).kind() == CacheKind::rotating) {
        return &static_cast<const RotatingKVCache&>(session.cache(l));
      }
    }
    return nullptr;
  }();
  for (int64_t step = 1; step <= o.steps; ++step) {
    const bool drafting = o.draft > 0 && step % kDraftEvery == 0;
    if (drafting) {
      // A deliberately wrong drafter: every token is rejected and rolled back.
      std::vector<int32_t> draft(static_cast<size_t>(o.draft));
      for (size_t j = 0; j < draft.size(); ++j) {
        draft[j] = static_cast<int32_t>((next + 1 + 7 * static_cast<int64_t>(j)) % vocab);
      }
      auto bytes = model::speculate(session, draft);
      if (!bytes.ok()) return fail(bytes.status());
      checkpoint_bytes = std::max(checkpoint_bytes, *bytes);
    }
    auto logits = session.decode(next);
    if (!logits.ok()) return fail(logits.status());
    auto plain_logits = plain.decode(next);
    if (!plain_logits.ok()) return fail(plain_logits.status());
    tokens.push_back(next);
    auto reference = full_last(m, tokens);
    if (!reference.ok()) return fail(reference.status());
    const float diff = model::max_abs_diff(*logits, *reference);
    decode_worst = std::max(decode_worst, diff);
    if (!(diff <= tolerance)) {
      ++decode_failed;
      if (first_bad_step < 0) first_bad_step = step;
    }
    if (drafting) {
      ++drafts;
      if (*logits == *plain_logits) ++drafts_ok;
    }
    if (wrap_step < 0 && sliding != nullptr && sliding->has_wrapped()) wrap_step = step;
    next = model::argmax(*logits);
  }

  // Negative control: damage one cached token (its K and V rows, every head), see the check
  // fail, then undo the damage and roll back. A whole row, not one value: a single value can
  // hide behind a small attention weight for some seeds.
  auto cp = session.checkpoint();
  if (!cp.ok()) return fail(cp.status());
  // The last full-attention layer: nearest the logits, so the damage shows most.
  int64_t victim = session.num_layers() - 1;
  while (session.cache(victim).kind() != CacheKind::contiguous && victim > 0) --victim;
  const std::vector<TensorView> victim_state = session.cache(victim).state();
  const int64_t victim_token = std::min<int64_t>(1, victim_state[0].dim(1) - 1);
  std::vector<std::vector<std::byte>> saved;
  for (const TensorView& t : {victim_state[0], victim_state[1]}) {
    saved.push_back(add_to_token(t, victim_token, 2.0f));
  }
  auto corrupted = session.decode(next);
  if (!corrupted.ok()) return fail(corrupted.status());
  std::vector<int32_t> with_next = tokens;
  with_next.push_back(next);
  auto reference = full_last(m, with_next);
  if (!reference.ok()) return fail(reference.status());
  const float corrupt_diff = model::max_abs_diff(*corrupted, *reference);
  const bool caught = corrupt_diff > tolerance;
  restore_token(victim_state[0], victim_token, saved[0]);
  restore_token(victim_state[1], victim_token, saved[1]);
  if (Status s = session.rollback(*cp); !s.ok()) return fail(s);
  auto session_state = state_bytes(session);
  auto plain_state = state_bytes(plain);
  if (!session_state.ok()) return fail(session_state.status());
  if (!plain_state.ok()) return fail(plain_state.status());
  const bool identical = *session_state == *plain_state;

  // Informational: what the storage dtype costs against f32 storage.
  std::string storage_info;
  if (o.dtype != DType::f32) {
    model::TinyModelConfig f32_config = config;
    f32_config.dtype = DType::f32;
    auto f32_model = TinyModel::create(f32_config);
    if (!f32_model.ok()) return fail(f32_model.status());
    auto exact = (*f32_model)->forward_full(tokens);
    auto stored = m.forward_full(tokens);
    if (!exact.ok()) return fail(exact.status());
    if (!stored.ok()) return fail(stored.status());
    storage_info = std::string(name(o.dtype)) + " vs f32 storage: max |logit diff| " +
                   sci(model::max_abs_diff(*stored, *exact)) + " over " +
                   std::to_string(tokens.size()) + " positions";
  }

  print_layers(m, session);
  std::printf(
      "\nchecks: logits against forward_full, a recompute from scratch without cache "
      "(tolerance %s)\n",
      sci(tolerance).c_str());
  Checks checks;
  checks.add(prefill_ok);
  checks.line(
      prefill_ok, "prefill",
      std::to_string(o.prompt) + " positions in one chunk, max |diff| " + sci(prefill_diff));
  for (int64_t i = 0; i < o.steps; ++i) checks.add(i >= decode_failed);
  std::string decode_text = std::to_string(o.steps) + " steps";
  decode_text += wrap_step > 0 ? ", window wrapped at step " + std::to_string(wrap_step)
                               : ", window not wrapped";
  decode_text += ", max |diff| " + sci(decode_worst);
  if (decode_failed > 0) {
    decode_text += ", " + std::to_string(decode_failed) + " over (first: step " +
                   std::to_string(first_bad_step) + ")";
  }
  checks.line(decode_failed == 0, "decode", decode_text);
  if (drafts > 0) {
    for (int64_t i = 0; i < drafts; ++i) checks.add(i < drafts_ok);
    checks.line(drafts_ok == drafts, "speculate",
                std::to_string(drafts) + " drafts rolled back via snapshots (" +
                    std::to_string(checkpoint_bytes) + " B), next logits as undrafted: " +
                    std::to_string(drafts_ok) + "/" + std::to_string(drafts));
  }
  checks.add(caught);
  checks.line(caught, "corrupt",
              "cached token " + std::to_string(victim_token) + " of layer " +
                  std::to_string(victim) + " (K and V) changed by 2: " +
                  (caught ? "caught" : "NOT caught") + ", max |diff| " + sci(corrupt_diff));
  checks.add(identical);
  checks.line(
      identical, "rollback",
      identical ? "after the rollbacks, every layer byte-identical to a session that never drafted"
                : "states differ from the undrafted run");
  if (!storage_info.empty())
    std::printf("  %-5s %-10s %s\n", "info", "storage", storage_info.c_str());

  std::string generated;
  const size_t shown = std::min<size_t>(16, static_cast<size_t>(o.steps));
  for (size_t i = 0; i < shown; ++i) {
    generated += " " + std::to_string(tokens[static_cast<size_t>(o.prompt) + i]);
  }
  std::printf("\ngenerated:%s%s\n", generated.c_str(),
              shown < static_cast<size_t>(o.steps) ? " ..." : "");
  if (checks.failed() > 0) {
    std::printf("FAILED: %d of %d checks failed\n", checks.failed(),
                checks.failed() + checks.passed());
    return 1;
  }
  std::printf("OK: %d checks passed\n", checks.passed());
  return 0;
}

}  // namespace

int run_demo(int argc, char** argv) {
  Options options;
  if (std::optional<std::string> error = parse_options(argc, argv, options)) {
    std::fprintf(stderr, "kvcache demo: %s\n", error->c_str());
    return 2;
  }
  if (options.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  return run(options);
}

}  // namespace kvcache::cli
