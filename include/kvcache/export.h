// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// KVCACHE_API marks the symbols the shared library exports; everything else is hidden
// (-fvisibility=hidden), so src/ stays free to change.
#if defined(KVCACHE_SHARED_LIBRARY) && defined(KVCACHE_COMPILING)
#define KVCACHE_API __attribute__((visibility("default")))
#else
#define KVCACHE_API
#endif
