// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// `kvcache demo`: parses the options, runs the serving engine (src/serving) and the small int8 /
// fp8 reruns, prints a progress bar while it runs and the summary at the end, writes --json and
// --plot. No logic of its own beyond that.
#include "demo.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/status.h"

#include "serving/engine.h"
#include "serving/report.h"
#include "serving/storage_compare.h"
#include "serving/svg_plot.h"
#include <unistd.h>

namespace kvcache::cli {
namespace {

using serving::EngineOptions;
using serving::EngineProgress;
using serving::VerifyMode;

constexpr const char* kUsage =
    "usage: kvcache demo [options]\n"
    "\n"
    "Serves many multi-turn conversations with a small deterministic transformer (attention with\n"
    "GQA, QK-norm and RoPE; a sliding-window layer; a recurrent layer; attention with "
    "multi-section\n"
    "RoPE) over paged K/V: one BlockManager with a fixed page budget, prefix caching of the "
    "shared\n"
    "system prompts and of each conversation's history, continuous batching, copy-on-write forks,\n"
    "eviction and preemption. The logits of the decode steps are compared with a recompute from\n"
    "scratch without any cache. Then the first conversations run again with int8 and fp8 K/V to\n"
    "show what quantized storage costs against bf16.\n"
    "\n"
    "workload:\n"
    "  --conversations N  conversations (default 64); each 8 share one system prompt\n"
    "  --turns N          turns per conversation (default 4); each turn's prompt is the whole\n"
    "                     history plus the new user tokens\n"
    "  --seed S           seed of the workload and of the model's weights (default 1)\n"
    "cache:\n"
    "  --pages N          page budget per layer group (default 384; the histories need more)\n"
    "  --page-size N      tokens per page (default 16)\n"
    "  --kv-dtype T       K/V storage: bf16 (default), int8 or fp8 (e4m3, per-token scales);\n"
    "                     f16 and f32 also work\n"
    "  --batch N          most sequences in one step (default 32; forks included)\n"
    "  --device D         cpu (default) or cuda (the first GPU)\n"
    "  --threads N        CPU threads of the ops (default 2)\n"
    "checks and output:\n"
    "  --verify M         sample: the requests of every 4th conversation (default); all: every\n"
    "                     request\n"
    "  --corrupt-at-step N  negative control: invert one cached K page of a checked sequence\n"
    "                     at step N (or the first step after it that decodes one); the checks\n"
    "                     must then fail and the exit code be 1\n"
    "  --json FILE        write the summary as JSON (keys: docs/CLI.md)\n"
    "  --plot FILE.svg    draw the full-attention pool's pages (live, cached, free) and the\n"
    "                     cumulative prefix hit rate over the steps\n"
    "  --help             show this text\n"
    "\n"
    "A progress bar goes to stderr when it is a terminal. Exit code: 0 when every check passed;\n"
    "1 when a check failed or the run failed; 2 when it could not start as asked (a bad option,\n"
    "a page budget too small for one request, --device cuda without a usable GPU or CUDA build).\n";

constexpr std::array<DType, 2> kQuantized = {DType::int8, DType::fp8_e4m3};

struct Options {
  EngineOptions engine;
  std::string json_path;
  std::string plot_path;
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

// One option's value; the error text after "--key is 'value', expected ", or none.
std::optional<std::string> apply(std::string_view key, std::string_view value, Options& o) {
  EngineOptions& e = o.engine;
  const auto range = [](int64_t lo, int64_t hi) {
    return "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  };
  if (key == "--conversations") {
    if (!parse_int<int64_t>(value, 1, 4096, e.workload.num_conversations)) return range(1, 4096);
  } else if (key == "--turns") {
    if (!parse_int<int64_t>(value, 1, 64, e.workload.num_turns)) return range(1, 64);
  } else if (key == "--seed") {
    if (!parse_int<uint64_t>(value, 0, UINT64_MAX, e.workload.seed)) return "an unsigned integer";
  } else if (key == "--pages") {
    if (!parse_int<int64_t>(value, 2, 1 << 20, e.num_pages)) return range(2, 1 << 20);
  } else if (key == "--page-size") {
    if (!parse_int<int64_t>(value, 1, 256, e.page_size)) return range(1, 256);
  } else if (key == "--batch") {
    if (!parse_int<int64_t>(value, 1, 1024, e.max_running)) return range(1, 1024);
  } else if (key == "--threads") {
    if (!parse_int<int>(value, 1, 256, e.num_threads)) return range(1, 256);
  } else if (key == "--corrupt-at-step") {
    if (!parse_int<int64_t>(value, 0, INT64_MAX, e.flip_k_page_at_step)) {
      return "a non-negative integer";
    }
  } else if (key == "--kv-dtype") {
    const Result<DType> d = value == "fp8" ? Result<DType>(DType::fp8_e4m3) : parse_dtype(value);
    if (!d.ok() || (*d != DType::bf16 && *d != DType::int8 && *d != DType::fp8_e4m3 &&
                    *d != DType::f16 && *d != DType::f32)) {
      return "bf16, int8, fp8, f16 or f32";
    }
    e.kv_dtype = *d;
  } else if (key == "--device") {
    if (value != "cpu" && value != "cuda") return "cpu or cuda";
    e.device = value == "cpu" ? Device::cpu() : Device::cuda(0);
  } else if (key == "--verify") {
    if (value != "sample" && value != "all") return "sample or all";
    e.verify = value == "all" ? VerifyMode::all : VerifyMode::sample;
  } else if (key == "--json" || key == "--plot") {
    if (value.empty()) return "a file name";
    (key == "--json" ? o.json_path : o.plot_path) = value;
  }
  return std::nullopt;
}

// The error line for a bad command line, or none.
std::optional<std::string> parse_options(int argc, char** argv, Options& o) {
  constexpr std::string_view kKeys[] = {
      "--conversations",   "--turns",   "--seed",   "--pages", "--page-size",
      "--kv-dtype",        "--device",  "--verify", "--json",  "--plot",
      "--corrupt-at-step", "--threads", "--batch"};
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
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
    if (std::find(std::begin(kKeys), std::end(kKeys), key) == std::end(kKeys)) {
      return "unknown option '" + std::string(arg) + "' (see kvcache demo --help)";
    }
    if (!value) {
      if (i + 1 >= argc) return std::string(key) + " needs a value (see kvcache demo --help)";
      value = argv[++i];
    }
    if (std::optional<std::string> expected = apply(key, *value, o)) {
      return std::string(key) + " is '" + std::string(*value) + "', expected " + *expected;
    }
  }
  // Keep back a few pages at admission for running sequences to grow (fewer on a small budget).
  o.engine.watermark_pages = std::clamp<int64_t>(o.engine.num_pages / 40, 1, 8);
  return std::nullopt;
}

// A one-line bar on stderr, redrawn at most 10 times a second, only when stderr is a terminal
// (a CI log gets nothing).
class ProgressBar {
 public:
  ProgressBar() : enabled_(isatty(STDERR_FILENO) == 1) {}

  void update(const EngineProgress& p) {
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    if (drawn_ && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    drawn_ = true;
    constexpr int kWidth = 30;
    const int filled =
        p.turns_total == 0 ? 0 : static_cast<int>(kWidth * p.turns_done / p.turns_total);
    std::fprintf(stderr, "\r  [%s%s] %lld/%lld turns, step %lld, %lld running, %lld waiting  ",
                 std::string(static_cast<size_t>(filled), '#').c_str(),
                 std::string(static_cast<size_t>(kWidth - filled), '.').c_str(),
                 static_cast<long long>(p.turns_done), static_cast<long long>(p.turns_total),
                 static_cast<long long>(p.step), static_cast<long long>(p.running),
                 static_cast<long long>(p.waiting));
  }

  void clear() {
    if (drawn_) std::fprintf(stderr, "\r%*s\r", 100, "");
    drawn_ = false;
  }

 private:
  bool enabled_;
  bool drawn_ = false;
  std::chrono::steady_clock::time_point last_;
};

Status write_file(const std::string& path, const std::string& text) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return Status::invalid_argument("cannot open '" + path + "' for writing");
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  if (std::fclose(f) != 0 || !ok) return Status::internal("writing '" + path + "' failed");
  return Status();
}

// 2 when the run could not start as asked (see kUsage), else 1.
int fail(const Status& s) {
  std::fprintf(stderr, "kvcache demo: %s\n", s.to_string().c_str());
  const Code c = s.code();
  return c == Code::invalid_argument || c == Code::unavailable || c == Code::resource_exhausted ? 2
                                                                                                : 1;
}

int run(Options& o) {
  std::fputs(serving::run_header(o.engine).c_str(), stdout);
  std::fflush(stdout);
  ProgressBar bar;
  o.engine.on_progress = [&bar](const EngineProgress& p) { bar.update(p); };
  Result<serving::EngineReport> report = serving::run_engine(o.engine);
  bar.clear();
  if (!report.ok()) return fail(report.status());
  Result<std::vector<serving::StorageError>> storage =
      serving::compare_storage(o.engine, kQuantized);
  if (!storage.ok()) return fail(storage.status());

  std::fputs(serving::summary_table(*report, o.engine, *storage).c_str(), stdout);
  if (!o.json_path.empty()) {
    const Status s = write_file(o.json_path, serving::summary_json(*report, o.engine, *storage));
    if (!s.ok()) return fail(s);
  }
  if (!o.plot_path.empty()) {
    if (Status s = write_file(o.plot_path, serving::timeline_svg(*report)); !s.ok()) return fail(s);
  }
  const int64_t checks = serving::total_checks(*report, *storage);
  if (!serving::passed(*report, *storage)) {
    std::printf("\nFAILED: %lld of %lld checks over the tolerance%s\n",
                static_cast<long long>(serving::total_mismatches(*report, *storage)),
                static_cast<long long>(checks), report->leaked_pages > 0 ? ", pages leaked" : "");
    return 1;
  }
  std::printf("\nOK: %lld checks passed\n", static_cast<long long>(checks));
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
