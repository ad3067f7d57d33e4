// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

namespace kvcache::cli {

// `kvcache bench <suite> [options]`; argv[0] is "bench". Returns the exit code: 0, 1 when a
// benchmark failed, 2 for bad options.
int run_bench(int argc, char** argv);

}  // namespace kvcache::cli
