// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// <immintrin.h> without GCC 12's false -Wuninitialized / -Wmaybe-uninitialized reports from
// inside its AVX-512 headers (GCC bug 105593), which -Werror would turn into build failures.

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
