// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// kvcache bench: runs a benchmark suite from bench/, prints its table, optionally writes JSON.

#include "bench.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "bench/manager_bench.h"

namespace kvcache::cli {
namespace {

constexpr const char* kUsage =
    "usage: kvcache bench <suite> [options]\n"
    "\n"
    "suites:\n"
    "  manager   the paged block manager: keys, one scheduling step of 1024 sequences,\n"
    "            prefix lookup and admission, fork + free (median and p90 microseconds)\n"
    "\n"
    "options:\n"
    "  --repeats N   timed calls per case (default 200)\n"
    "  --json FILE   also write the rows as JSON (keys: docs/CLI.md)\n"
    "  --help        show this text\n";

int usage_error(const std::string& message) {
  std::fprintf(stderr, "kvcache bench: %s (see kvcache bench --help)\n", message.c_str());
  return 2;
}

}  // namespace

int run_bench(int argc, char** argv) {
  std::string suite;
  std::string json_path;
  bench::ManagerBenchOptions options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (arg == "--json" || arg == "--repeats") {
      if (i + 1 >= argc) return usage_error(arg + " needs a value");
      const std::string value = argv[++i];
      if (arg == "--json") {
        json_path = value;
        continue;
      }
      char* end = nullptr;
      const long long n = std::strtoll(value.c_str(), &end, 10);
      if (value.empty() || *end != '\0' || n < 1 || n > 1000000) {
        return usage_error("--repeats is '" + value + "', expected an integer in [1, 1000000]");
      }
      options.repeats = n;
      continue;
    }
    if (!arg.empty() && arg[0] == '-') return usage_error("unknown option '" + arg + "'");
    if (!suite.empty()) return usage_error("unexpected argument '" + arg + "'");
    suite = arg;
  }
  if (suite.empty()) return usage_error("no suite given, expected one of: manager");
  if (suite != "manager") return usage_error("unknown suite '" + suite + "', expected: manager");

  Result<bench::Report> report = bench::run_manager_bench(options);
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
