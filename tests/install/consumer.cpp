// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
// Links against an installed kvcache and appends one token.
#include <cstdio>
#include <vector>

#include "kvcache/kvcache.h"

int main() {
  auto cache = kvcache::KVCache::make(/*num_layers=*/1, /*num_kv_heads=*/2, /*head_dim=*/4);
  if (!cache.ok()) return 1;
  std::vector<float> k(2 * 4, 1.5f), v(2 * 4, -0.5f);
  const auto kt = kvcache::TensorView::contiguous(k.data(), kvcache::DType::f32, {1, 2, 4});
  const auto vt = kvcache::TensorView::contiguous(v.data(), kvcache::DType::f32, {1, 2, 4});
  if (!(*cache)->append(0, kt, vt).ok() || !(*cache)->advance().ok()) return 1;
  std::printf("installed kvcache holds %lld token\n", static_cast<long long>((*cache)->len()));
  return (*cache)->len() == 1 ? 0 : 1;
}
