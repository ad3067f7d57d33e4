// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// kvcache bench: runs a benchmark suite from bench/, prints its table, optionally writes JSON.

#include "bench.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "bench/manager_bench.h"
#include "bench/ops_bench.h"

namespace kvcache::cli {
namespace {

constexpr const char* kUsage =
    "usage: kvcache bench <suite> [options]\n"
    "\n"
    "suites:\n"
    "  ops       every op (attention, appends, the fused QKV write, page copies, context shift)\n"
    "            over Llama-3-8B shapes; GB/s and its fraction of a read or copy bound\n"
    "            measured in the same run\n"
    "  manager   the paged block manager: keys, one scheduling step of 1024 sequences,\n"
    "            prefix lookup and admission, fork + free (median and p90 microseconds)\n"
    "\n"
    "options:\n"
    "  --repeats N     timed calls per case (default: ops 10, manager 200)\n"
    "  --json FILE     also write the rows as JSON (keys: docs/CLI.md)\n"
    "  --device D      ops: cpu (default) or cuda\n"
    "  --threads N     ops: CPU threads (default: every core)\n"
    "  --quick         ops: small shapes only, a smoke test in seconds\n"
    "  --filter TEXT   ops: only the cases whose op, shape or dtype contains TEXT\n"
    "  --help          show this text\n";

int usage_error(const std::string& message) {
  std::fprintf(stderr, "kvcache bench: %s (see kvcache bench --help)\n", message.c_str());
  return 2;
}

// An integer option value in [lo, hi], or -1 after printing the usage error.
long long parse_count(const std::string& option, const std::string& value, long long lo,
                      long long hi) {
  char* end = nullptr;
  const long long n = std::strtoll(value.c_str(), &end, 10);
  if (value.empty() || *end != '\0' || n < lo || n > hi) {
    usage_error(option + " is '" + value + "', expected an integer in [" + std::to_string(lo) +
                ", " + std::to_string(hi) + "]");
    return -1;
  }
  return n;
}

}  // namespace

int run_bench(int argc, char** argv) {
  std::string suite;
  std::string json_path;
  std::string device = "cpu";
  long long repeats = 0;
  long long threads = 0;
  bool quick = false;
  std::string filter;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (arg == "--quick") {
      quick = true;
      continue;
    }
    if (arg == "--json" || arg == "--repeats" || arg == "--device" || arg == "--threads" ||
        arg == "--filter") {
      if (i + 1 >= argc) return usage_error(arg + " needs a value");
      const std::string value = argv[++i];
      if (arg == "--json") {
        json_path = value;
      } else if (arg == "--filter") {
        filter = value;
      } else if (arg == "--device") {
        if (value != "cpu" && value != "cuda") {
          return usage_error("--device is '" + value + "', expected cpu or cuda");
        }
        device = value;
      } else if (arg == "--repeats") {
        if ((repeats = parse_count(arg, value, 1, 1000000)) < 0) return 2;
      } else if ((threads = parse_count(arg, value, 1, 1024)) < 0) {
        return 2;
      }
      continue;
    }
    if (!arg.empty() && arg[0] == '-') return usage_error("unknown option '" + arg + "'");
    if (!suite.empty()) return usage_error("unexpected argument '" + arg + "'");
    suite = arg;
  }
  if (suite.empty()) return usage_error("no suite given, expected one of: ops, manager");
  if (suite != "manager" && suite != "ops") {
    return usage_error("unknown suite '" + suite + "', expected one of: ops, manager");
  }
  if (suite == "manager" && (quick || threads != 0 || device != "cpu" || !filter.empty())) {
    return usage_error("--quick, --threads, --device and --filter apply to the ops suite only");
  }

  Result<bench::Report> report = Status::internal("no suite ran");
  if (suite == "manager") {
    bench::ManagerBenchOptions options;
    if (repeats > 0) options.repeats = repeats;
    report = bench::run_manager_bench(options);
  } else {
    bench::OpsBenchOptions options;
    if (repeats > 0) options.repeats = repeats;
    options.threads = static_cast<int>(threads);
    options.quick = quick;
    options.filter = filter;
    options.device = device == "cuda" ? Device::cuda(0) : Device::cpu();
    report = bench::run_ops_bench(options);
  }
  if (!report.ok()) {
    std::fprintf(stderr, "kvcache bench: %s\n", report.status().to_string().c_str());
    return 1;
  }
  std::fputs(report->table().c_str(), stdout);
  if (!json_path.empty()) {
    if (Status s = report->write_json(json_path); !s.ok()) {
      std::fprintf(stderr, "kvcache bench: %s\n", s.to_string().c_str());
      return 1;
    }
  }
  return 0;
}

}  // namespace kvcache::cli
