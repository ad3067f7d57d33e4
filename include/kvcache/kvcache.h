// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Umbrella header: the whole public API.

#include "kvcache/attention.h"
#include "kvcache/buffer.h"
#include "kvcache/cache.h"
#include "kvcache/contiguous_cache.h"
#include "kvcache/copy_pages.h"
#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/kv_append.h"
#include "kvcache/paged_append.h"
#include "kvcache/qkv_rope_write.h"
#include "kvcache/recurrent_cache.h"
#include "kvcache/rope.h"
#include "kvcache/rope_shift.h"
#include "kvcache/rotating_cache.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"
#include "kvcache/thread_pool.h"
