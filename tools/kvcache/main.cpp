// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// kvcache: the command-line entry point. Dispatches to one file per subcommand.

#include <cstdio>
#include <cstring>

#include "bench.h"
#include "demo.h"

namespace {

constexpr const char* kUsage =
    "usage: kvcache <command> [options]\n"
    "\n"
    "commands:\n"
    "  demo    serve many multi-turn conversations through the paged manager (prefix caching,\n"
    "          eviction, preemption, copy-on-write) with a small deterministic transformer, and\n"
    "          check the decode steps against a recompute without cache (the main job)\n"
    "  bench   time the library (suites: ops, manager); prints a table, writes JSON\n"
    "\n"
    "Run 'kvcache <command> --help' for a command's options.\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::strcmp(argv[1], "--help") == 0 || std::strcmp(argv[1], "-h") == 0) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  if (std::strcmp(argv[1], "demo") == 0) return kvcache::cli::run_demo(argc - 1, argv + 1);
  if (std::strcmp(argv[1], "bench") == 0) return kvcache::cli::run_bench(argc - 1, argv + 1);
  std::fprintf(stderr, "kvcache: unknown command '%s', expected one of: demo, bench (see --help)\n",
               argv[1]);
  return 2;
}
