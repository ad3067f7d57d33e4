// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The picture of `kvcache demo --plot FILE.svg`: the full-attention pool's pages over the run,
// stacked (held by running sequences, cached prefixes nobody holds, free), and the cumulative
// prefix-cache hit rate on a second axis. Hand-written SVG 1.1, no library. Pure: thread-safe.

#include <string>

#include "serving/engine.h"

namespace kvcache::serving {

// The whole SVG document. An empty timeline gives a chart with no data.
[[nodiscard]] std::string timeline_svg(const EngineReport& report);

}  // namespace kvcache::serving
