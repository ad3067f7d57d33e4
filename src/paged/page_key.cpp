// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/page_key.h"

// SHA256_Init/Update/Final are deprecated in OpenSSL 3 but kept: EVP_Digest and SHA256() allocate
// a provider context on every call (measured with OpenSSL 3.0: 2-3 mallocs and ~2.8x the time of
// a page key); these keep the state on the stack and run the same SHA-NI code.
#define OPENSSL_SUPPRESS_DEPRECATED

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include <openssl/sha.h>
// Header-only use: no library to link, so the header alone is a build dependency.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "core/check.h"

namespace kvcache {
namespace {

// Field type tags and domain strings: docs/PAGE_KEYS.md.
constexpr uint8_t kTagDomain = 0x01;
constexpr uint8_t kTagModelId = 0x02;
constexpr uint8_t kTagKvDtype = 0x03;
constexpr uint8_t kTagPageSize = 0x04;
constexpr uint8_t kTagLayerGroup = 0x05;
constexpr uint8_t kTagSalt = 0x06;
constexpr uint8_t kTagParent = 0x10;
constexpr uint8_t kTagTokens = 0x11;
constexpr uint8_t kTagAdapter = 0x12;
constexpr uint8_t kTagMultimodal = 0x13;

constexpr std::string_view kRootDomain = "kvcache/root/v1";
constexpr std::string_view kPageDomain = "kvcache/page/v1";

// Unsigned LEB128, as protobuf's varint: 7 bits a byte, low first, high bit set on all but the
// last. Small lengths take one byte, so a 16-token page message fits two SHA-256 blocks.
constexpr size_t varint_size(uint64_t v) {
  size_t n = 1;
  for (; v >= 0x80; v >>= 7) ++n;
  return n;
}
uint8_t* put_varint(uint8_t* p, uint64_t v) {
  for (; v >= 0x80; v >>= 7) *p++ = static_cast<uint8_t>(v | 0x80);
  *p++ = static_cast<uint8_t>(v);
  return p;
}
// Bytes of a field with a `payload`-byte payload: tag, length, payload.
constexpr size_t field_size(size_t payload) { return 1 + varint_size(payload) + payload; }

uint8_t* put_i64(uint8_t* p, int64_t v) {
  const auto u = static_cast<uint64_t>(v);
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(u >> (8 * i));
  return p + 8;
}
uint8_t* put_bytes(uint8_t* p, const void* data, size_t n) {
  if (n != 0) std::memcpy(p, data, n);
  return p + n;
}
uint8_t* put_header(uint8_t* p, uint8_t tag, size_t payload) {
  *p = tag;
  return put_varint(p + 1, payload);
}
uint8_t* put_field(uint8_t* p, uint8_t tag, std::string_view payload) {
  return put_bytes(put_header(p, tag, payload.size()), payload.data(), payload.size());
}
uint8_t* put_field(uint8_t* p, uint8_t tag, int64_t value) {
  return put_i64(put_header(p, tag, 8), value);
}

// Grows *out by n bytes (reusing its capacity) and returns where they start.
uint8_t* extend(std::vector<uint8_t>* out, size_t n) {
  const size_t old = out->size();
  out->resize(old + n);
  return out->data() + old;
}

size_t root_size(const KeyFingerprint& fingerprint, std::string_view salt) {
  return field_size(kRootDomain.size()) + field_size(fingerprint.model_id.size()) +
         field_size(fingerprint.kv_dtype.size()) + 2 * field_size(8) + field_size(salt.size());
}

uint8_t* write_root(uint8_t* p, const KeyFingerprint& fingerprint, std::string_view salt) {
  p = put_field(p, kTagDomain, kRootDomain);
  p = put_field(p, kTagModelId, fingerprint.model_id);
  p = put_field(p, kTagKvDtype, fingerprint.kv_dtype);
  p = put_field(p, kTagPageSize, fingerprint.page_size);
  p = put_field(p, kTagLayerGroup, fingerprint.layer_group);
  return put_field(p, kTagSalt, salt);
}

// One page's message: the page [first_pos, end) and the spans that may overlap it. `sorted` lets
// the scans stop at the first span that begins at or after `end` (page_keys has checked the
// order; page_key takes spans as given).
struct PageMessage {
  const PageKey& parent;
  std::span<const int32_t> tokens;
  int64_t first_pos;
  int64_t end;
  std::string_view adapter;
  std::span<const MultimodalSpan> spans;
  bool sorted;

  PageMessage(const PageKey& parent_, std::span<const int32_t> tokens_, int64_t first_pos_,
              std::string_view adapter_, std::span<const MultimodalSpan> spans_, bool sorted_)
      : parent(parent_),
        tokens(tokens_),
        first_pos(first_pos_),
        // Saturated, so that no first_pos overflows; an overlap ends at most n past first_pos.
        end(first_pos_ > std::numeric_limits<int64_t>::max() - static_cast<int64_t>(tokens_.size())
                ? std::numeric_limits<int64_t>::max()
                : first_pos_ + static_cast<int64_t>(tokens_.size())),
        adapter(adapter_),
        spans(spans_),
        sorted(sorted_) {}

  // Calls f(span, lo, hi) for each span overlapping the page, [lo, hi) the overlap.
  template <class F>
  void for_each_overlap(F&& f) const {
    for (const MultimodalSpan& s : spans) {
      if (sorted && s.begin >= end) break;
      const int64_t lo = std::max(s.begin, first_pos);
      const int64_t hi = std::min(s.end, end);
      if (lo < hi) f(s, lo, hi);
    }
  }

  [[nodiscard]] size_t size() const {
    size_t n = field_size(kPageDomain.size()) + field_size(parent.bytes.size()) +
               field_size(tokens.size() * 4) + field_size(adapter.size());
    for_each_overlap([&](const MultimodalSpan& s, int64_t, int64_t) {
      n += field_size(16 + s.content_hash.size());
    });
    return n;
  }

  uint8_t* write(uint8_t* p) const {
    p = put_field(p, kTagDomain, kPageDomain);
    p = put_bytes(put_header(p, kTagParent, parent.bytes.size()), parent.bytes.data(),
                  parent.bytes.size());
    p = put_header(p, kTagTokens, tokens.size() * 4);
    if constexpr (std::endian::native == std::endian::little) {
      p = put_bytes(p, tokens.data(), tokens.size() * 4);
    } else {
      for (const int32_t t : tokens) {
        const auto u = static_cast<uint32_t>(t);
        for (int i = 0; i < 4; ++i) *p++ = static_cast<uint8_t>(u >> (8 * i));
      }
    }
    p = put_field(p, kTagAdapter, adapter);
    for_each_overlap([&](const MultimodalSpan& s, int64_t lo, int64_t hi) {
      p = put_header(p, kTagMultimodal, 16 + s.content_hash.size());
      p = put_i64(p, lo - first_pos);
      p = put_i64(p, hi - first_pos);
      p = put_bytes(p, s.content_hash.data(), s.content_hash.size());
    });
    return p;
  }
};

PageKey sha256_key(std::span<const uint8_t> message) {
  static_assert(SHA256_DIGEST_LENGTH == sizeof(PageKey::bytes));
  PageKey key;
  SHA256_CTX ctx;
  SHA256_Init(&ctx);
  SHA256_Update(&ctx, message.data(), message.size());
  SHA256_Final(key.bytes.data(), &ctx);
  return key;
}

PageKey xxh3_128_key(std::span<const uint8_t> message) {
  XXH128_canonical_t canonical;
  XXH128_canonicalFromHash(&canonical, XXH3_128bits(message.data(), message.size()));
  static_assert(sizeof(canonical.digest) == 16);
  PageKey key;  // bytes 16..31 stay zero
  std::memcpy(key.bytes.data(), canonical.digest, sizeof(canonical.digest));
  return key;
}

Status check_spans(std::span<const MultimodalSpan> spans) {
  for (size_t i = 0; i < spans.size(); ++i) {
    const MultimodalSpan& s = spans[i];
    const std::string at = "page_keys: multimodal span " + std::to_string(i);
    if (s.begin < 0) {
      return Status::invalid_argument(at + " begin is " + std::to_string(s.begin) +
                                      ", expected >= 0");
    }
    if (s.end < s.begin) {
      return Status::invalid_argument(at + " end is " + std::to_string(s.end) +
                                      ", expected >= its begin " + std::to_string(s.begin));
    }
    if (i > 0 && s.begin < spans[i - 1].begin) {
      return Status::invalid_argument(at + " begin is " + std::to_string(s.begin) +
                                      ", expected >= span " + std::to_string(i - 1) + " begin " +
                                      std::to_string(spans[i - 1].begin) +
                                      " (spans sorted by begin)");
    }
  }
  return Status();
}

// page_keys' message buffer, kept per thread so steady-state calls allocate nothing. Taken out
// while in use, so a hash function that itself computes keys still gets a buffer of its own.
thread_local std::vector<uint8_t> t_scratch;

// hash(the message encode(&message) writes), in the thread's scratch buffer.
template <class Encode>
PageKey hash_message(const KeyHashFn& hash, Encode&& encode) {
  std::vector<uint8_t> message = std::move(t_scratch);
  message.clear();
  encode(&message);
  const PageKey key = hash(message);
  t_scratch = std::move(message);
  return key;
}

}  // namespace

const char* name(HashKind kind) {
  switch (kind) {
    case HashKind::sha256:
      return "sha256";
    case HashKind::xxh3_128:
      return "xxh3_128";
  }
  return "unknown";
}

std::string PageKey::hex() const {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s(bytes.size() * 2, '0');
  for (size_t i = 0; i < bytes.size(); ++i) {
    s[2 * i] = kDigits[bytes[i] >> 4];
    s[2 * i + 1] = kDigits[bytes[i] & 0xf];
  }
  return s;
}

size_t PageKeyHash::operator()(const PageKey& key) const noexcept {
  size_t h;
  static_assert(sizeof(h) <= sizeof(key.bytes));
  std::memcpy(&h, key.bytes.data(), sizeof(h));
  return h;
}

KeyHashFn key_hash_fn(HashKind kind) {
  // An out-of-range enum value gets SHA-256, the default: the safe choice.
  return kind == HashKind::xxh3_128 ? KeyHashFn(&xxh3_128_key) : KeyHashFn(&sha256_key);
}

void encode_root(const KeyFingerprint& fingerprint, std::string_view salt,
                 std::vector<uint8_t>* out) {
  const size_t size = root_size(fingerprint, salt);
  uint8_t* p = extend(out, size);
  const uint8_t* const end = write_root(p, fingerprint, salt);
  KV_CHECK(end == p + size);
}

void encode_page(const PageKey& parent, std::span<const int32_t> tokens, int64_t first_pos,
                 const KeyExtras& extras, std::vector<uint8_t>* out) {
  const PageMessage m(parent, tokens, first_pos, extras.adapter, extras.multimodal,
                      /*sorted=*/false);
  const size_t size = m.size();
  uint8_t* p = extend(out, size);
  const uint8_t* const end = m.write(p);
  KV_CHECK(end == p + size);
}

PageKey root_key(const KeyHashFn& hash, const KeyFingerprint& fingerprint, std::string_view salt) {
  return hash_message(hash, [&](std::vector<uint8_t>* m) { encode_root(fingerprint, salt, m); });
}

PageKey page_key(const KeyHashFn& hash, const PageKey& parent, std::span<const int32_t> tokens,
                 int64_t first_pos, const KeyExtras& extras) {
  return hash_message(
      hash, [&](std::vector<uint8_t>* m) { encode_page(parent, tokens, first_pos, extras, m); });
}

Status page_keys(const KeyHashFn& hash, const KeyFingerprint& fingerprint,
                 std::span<const int32_t> tokens, const KeyExtras& extras,
                 std::vector<PageKey>* out) {
  if (fingerprint.page_size < 1) {
    return Status::invalid_argument("page_keys: page_size is " +
                                    std::to_string(fingerprint.page_size) + ", expected >= 1");
  }
  if (out == nullptr) return Status::invalid_argument("page_keys: out is null, expected a vector");
  if (Status s = check_spans(extras.multimodal); !s.ok()) return s;

  const int64_t page_size = fingerprint.page_size;
  const auto num_pages = static_cast<int64_t>(tokens.size()) / page_size;
  std::vector<uint8_t> message = std::move(t_scratch);
  message.clear();
  encode_root(fingerprint, extras.salt, &message);
  PageKey parent = hash(message);

  out->resize(static_cast<size_t>(num_pages));
  std::span<const MultimodalSpan> spans = extras.multimodal;
  for (int64_t i = 0; i < num_pages; ++i) {
    const int64_t first = i * page_size;
    // Spans are sorted by begin: one that ended before this page ends before every later one.
    while (!spans.empty() && spans.front().end <= first) spans = spans.subspan(1);
    const PageMessage m(parent, tokens.subspan(static_cast<size_t>(first), page_size), first,
                        extras.adapter, spans, /*sorted=*/true);
    // The buffer only grows: rewriting a page in place costs no allocation and no zeroing.
    const size_t size = m.size();
    if (message.size() < size) message.resize(size);
    const uint8_t* const end = m.write(message.data());
    KV_CHECK(end == message.data() + size);
    parent = hash(std::span<const uint8_t>(message.data(), size));
    (*out)[static_cast<size_t>(i)] = parent;
  }
  t_scratch = std::move(message);
  return Status();
}

}  // namespace kvcache
