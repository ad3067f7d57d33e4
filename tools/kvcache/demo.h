// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// `kvcache demo`: many multi-turn conversations served by the paged engine (src/serving), the
// decode steps verified against a recompute without cache; a summary table, optional JSON and SVG.

namespace kvcache::cli {

// argv[0] is "demo". Prints the report to stdout, progress to stderr when it is a terminal.
// Returns 0 when every check passed, 1 when a check failed or the run failed, 2 when the run
// could not start as asked: a bad option (a one-line error on stderr), a page budget too small
// for one request, or a device that is not available.
int run_demo(int argc, char** argv);

}  // namespace kvcache::cli
