// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// Prefix-cache keys. A full page of a sequence gets key = H(parent key, the page's token ids, the
// page's extra keys); the first page's parent is the chain root = H(model/layout fingerprint,
// tenant salt). So a key covers everything that changes the page's K/V, and two requests with
// different salts never share a key. Messages are typed, length-prefixed fields (see
// docs/PAGE_KEYS.md, which also publishes known-answer vectors so other languages reproduce keys).
// H is SHA-256 (OpenSSL, which uses the CPU's SHA instructions) or XXH3-128 (faster, not
// collision-resistant: a key match is always verified against the stored token ids anyway).
// All functions are pure and thread-safe.

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvcache/export.h"
#include "kvcache/status.h"

namespace kvcache {

enum class HashKind : uint8_t { sha256, xxh3_128 };
// "sha256", "xxh3_128".
[[nodiscard]] KVCACHE_API const char* name(HashKind kind);

// A key: the 32 bytes of SHA-256, or the 16 bytes of XXH3-128 followed by 16 zero bytes.
// Intentionally copyable.
struct PageKey {
  std::array<uint8_t, 32> bytes{};
  friend bool operator==(const PageKey&, const PageKey&) = default;
  // 64 lowercase hex digits.
  [[nodiscard]] KVCACHE_API std::string hex() const;
};

// For unordered containers: the first 8 bytes (keys are uniformly distributed).
struct KVCACHE_API PageKeyHash {
  size_t operator()(const PageKey& key) const noexcept;
};

// Everything fixed for one cache layout: pages of two managers with different fingerprints never
// share keys.
struct KeyFingerprint {
  std::string model_id;            // e.g. "meta-llama/Llama-3.1-8B@rev"
  std::string kv_dtype;            // e.g. "bf16" or "k:int8,v:bf16"
  int64_t page_size = 16;          // tokens per page
  int64_t layer_group = 0;         // which layer group of a hybrid model
};

// A multimodal input whose placeholder tokens occupy positions [begin, end) of the sequence; every
// page overlapping that range carries content_hash among its extra keys.
struct MultimodalSpan {
  std::string_view content_hash;  // e.g. the image's SHA-256 in hex
  int64_t begin = 0;
  int64_t end = 0;
};

// The per-request fields a key covers besides the tokens.
struct KeyExtras {
  std::string_view salt;                      // tenant salt, at the chain root ("" for none)
  std::string_view adapter;                   // LoRA adapter id, every page ("" for none)
  std::span<const MultimodalSpan> multimodal;  // sorted by begin
};

// The hash over an encoded message; tests inject weak ones to force collisions.
using KeyHashFn = std::function<PageKey(std::span<const uint8_t> message)>;
// The library's hash of `kind`.
[[nodiscard]] KVCACHE_API KeyHashFn key_hash_fn(HashKind kind);

// The chain root: H(root message of fingerprint and salt).
[[nodiscard]] KVCACHE_API PageKey root_key(const KeyHashFn& hash, const KeyFingerprint& fingerprint,
                                           std::string_view salt);
// The key of the page holding tokens [first_pos, first_pos + tokens.size()) of a sequence, given
// its parent's key. Multimodal spans overlapping that range are included in order.
[[nodiscard]] KVCACHE_API PageKey page_key(const KeyHashFn& hash, const PageKey& parent,
                                           std::span<const int32_t> tokens, int64_t first_pos,
                                           const KeyExtras& extras);
// Keys of every full page of `tokens` (tokens.size() / page_size of them), chained from the root
// of (fingerprint, extras.salt), written to *out (resized; reuses its capacity).
// invalid_argument for page_size < 1.
[[nodiscard]] KVCACHE_API Status page_keys(const KeyHashFn& hash, const KeyFingerprint& fingerprint,
                                           std::span<const int32_t> tokens,
                                           const KeyExtras& extras, std::vector<PageKey>* out);

// The encoded messages the hashes run over (exposed for the known-answer tests and other
// languages): see docs/PAGE_KEYS.md. Appended to *out.
KVCACHE_API void encode_root(const KeyFingerprint& fingerprint, std::string_view salt,
                             std::vector<uint8_t>* out);
KVCACHE_API void encode_page(const PageKey& parent, std::span<const int32_t> tokens,
                             int64_t first_pos, const KeyExtras& extras, std::vector<uint8_t>* out);

}  // namespace kvcache
