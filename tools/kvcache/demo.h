// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// `kvcache demo`: a verified greedy decode of the tiny transformer (src/model) over the
// per-sequence caches, with a speculative rollback and a negative control.

namespace kvcache::cli {

// argv[0] is "demo". Prints the report to stdout. Returns 0 when every check passed, 1 when one
// failed or a call returned an error, 2 for a bad option (a one-line error on stderr).
int run_demo(int argc, char** argv);

}  // namespace kvcache::cli
