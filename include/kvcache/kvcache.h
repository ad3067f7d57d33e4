// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Umbrella header: the whole public API.

#include "kvcache/buffer.h"
#include "kvcache/cache.h"
#include "kvcache/contiguous_cache.h"
#include "kvcache/device.h"
#include "kvcache/dtype.h"
#include "kvcache/recurrent_cache.h"
#include "kvcache/rotating_cache.h"
#include "kvcache/status.h"
#include "kvcache/tensor.h"
#include "kvcache/thread_pool.h"
