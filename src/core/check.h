// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// KV_CHECK(cond): always-on invariant check for states the library itself must never reach.
// Aborts with file, line and the expression. Never use it on user input: return a Status.

namespace kvcache::detail {
[[noreturn]] void check_failed(const char* file, int line, const char* expr);
}  // namespace kvcache::detail

#define KV_CHECK(cond) \
  ((cond) ? static_cast<void>(0) : ::kvcache::detail::check_failed(__FILE__, __LINE__, #cond))
