// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "kvcache/block_manager.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "core/check.h"
#include "paged/block_pool.h"

namespace kvcache {
namespace {

using paged::BlockPool;
using paged::kNoPage;

std::string seq_str(SeqId seq) { return "sequence " + std::to_string(seq); }

Status unknown_seq(std::string_view op, SeqId seq) {
  return Status::not_found(std::string(op) + ": unknown " + seq_str(seq) +
                           ", expected an added sequence");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A multimodal span with its content hash owned.
struct StoredSpan {
  std::string content_hash;
  int64_t begin = 0;
  int64_t end = 0;
};

bool overlaps(int64_t begin, int64_t end, int64_t first_pos, int64_t page_size) {
  return begin < first_pos + page_size && end > first_pos;
}

// What a cached page holds besides its token ids, to verify a hit. The parent is identified by
// its uid: a number given to each cached page once and never reused, so an evicted and reused
// parent page cannot vouch for a child it never had.
struct PageMeta {
  PageKey key;
  PageKey parent;           // the previous page's key or the chain root (for events)
  uint64_t uid = 0;         // 0 while not cached
  uint64_t parent_uid = 0;  // 0 for the first page of a sequence (verified by salt instead)
  std::string salt;         // first pages only
  std::string adapter;
  std::vector<StoredSpan> spans;  // the multimodal spans overlapping the page, in order
};

// Prefix index: key -> cached page, open addressing with linear probing over page ids (the key
// lives in PageMeta). At most num_pages entries in >= 2 * num_pages slots, so it never fills and
// never allocates after construction.
class PrefixIndex {
 public:
  explicit PrefixIndex(int32_t num_pages)
      : slots_(std::bit_ceil(static_cast<size_t>(std::max(2 * num_pages, 4))), kNoPage),
        mask_(slots_.size() - 1) {}

  [[nodiscard]] PageId find(const PageKey& key, const std::vector<PageMeta>& meta) const {
    for (size_t i = home(key);; i = (i + 1) & mask_) {
      const PageId page = slots_[i];
      if (page == kNoPage || meta[page].key == key) return page;
    }
  }
  // REQUIRES: meta[page].key is not in the index.
  void insert(PageId page, const std::vector<PageMeta>& meta) {
    size_t i = home(meta[page].key);
    while (slots_[i] != kNoPage) i = (i + 1) & mask_;
    slots_[i] = page;
    ++size_;
  }
  // Backward-shift deletion: no tombstones, so probe chains stay short.
  void erase(PageId page, const std::vector<PageMeta>& meta) {
    size_t i = home(meta[page].key);
    while (slots_[i] != page) {
      KV_CHECK(slots_[i] != kNoPage);
      i = (i + 1) & mask_;
    }
    for (size_t j = (i + 1) & mask_; slots_[j] != kNoPage; j = (j + 1) & mask_) {
      const size_t k = home(meta[slots_[j]].key);
      // The entry at j may move to the hole at i unless its home lies cyclically in (i, j].
      const bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
      if (!stays) {
        slots_[i] = slots_[j];
        i = j;
      }
    }
    slots_[i] = kNoPage;
    --size_;
  }
  [[nodiscard]] int64_t size() const { return size_; }

 private:
  [[nodiscard]] size_t home(const PageKey& key) const {
    uint64_t h = 0;
    std::memcpy(&h, key.bytes.data(), sizeof(h));
    return static_cast<size_t>(h) & mask_;
  }

  std::vector<PageId> slots_;
  size_t mask_;
  int64_t size_ = 0;
};

struct Sequence {
  std::vector<PageId> pages;
  std::vector<int32_t> tokens;  // committed
  int64_t num_reserved = 0;
  // With prefix caching: per full page, its key and the uid of the cached content it holds.
  std::vector<PageKey> keys;
  std::vector<uint64_t> uids;
  PageKey root;
  std::string salt;
  std::string adapter;
  std::vector<StoredSpan> spans;
};

// 0 <= begin < end, sorted by begin.
Status check_extras(std::string_view op, const KeyExtras& extras) {
  int64_t prev_begin = 0;
  for (size_t i = 0; i < extras.multimodal.size(); ++i) {
    const MultimodalSpan& s = extras.multimodal[i];
    if (s.begin < 0 || s.end <= s.begin) {
      return Status::invalid_argument(std::string(op) + ": multimodal span " + std::to_string(i) +
                                      " is [" + std::to_string(s.begin) + ", " +
                                      std::to_string(s.end) + "), expected 0 <= begin < end");
    }
    if (s.begin < prev_begin) {
      return Status::invalid_argument(
          std::string(op) + ": multimodal span " + std::to_string(i) + " begins at " +
          std::to_string(s.begin) +
          ", expected spans sorted by begin (>= " + std::to_string(prev_begin) + ")");
    }
    prev_begin = s.begin;
  }
  return Status();
}

// keys.size() == prompt.size() / page_size.
Status check_keys(std::string_view op, std::span<const int32_t> prompt,
                  std::span<const PageKey> keys, int64_t page_size) {
  const int64_t want = static_cast<int64_t>(prompt.size()) / page_size;
  if (static_cast<int64_t>(keys.size()) == want) return Status();
  return Status::invalid_argument(
      std::string(op) + ": keys has " + std::to_string(keys.size()) +
      " entries, expected prompt.size() / page_size = " + std::to_string(prompt.size()) + " / " +
      std::to_string(page_size) + " = " + std::to_string(want));
}

}  // namespace

const char* name(PageEventKind kind) {
  switch (kind) {
    case PageEventKind::cached:
      return "cached";
    case PageEventKind::evicted:
      return "evicted";
  }
  return "unknown";
}

struct BlockManager::Rep {
  explicit Rep(const BlockManagerOptions& o)
      : options(o),
        page_size(o.page_size),
        hash(o.hash_override ? o.hash_override : key_hash_fn(o.hash_kind)),
        pool(static_cast<int32_t>(o.num_pages)),
        // Without prefix caching nothing is ever cached: no per-page key state.
        meta(o.enable_prefix_caching ? static_cast<size_t>(o.num_pages) : 0),
        page_tokens(o.enable_prefix_caching ? static_cast<size_t>(o.num_pages * o.page_size) : 0),
        index(o.enable_prefix_caching ? static_cast<int32_t>(o.num_pages) : 0) {
    copies.reserve(static_cast<size_t>(std::min<int64_t>(o.num_pages, 1024)));
    // Drained once per step by a router, so steady state grows it no further.
    if (o.record_events && o.enable_prefix_caching) {
      events.reserve(static_cast<size_t>(std::min<int64_t>(2 * o.num_pages, 4096)));
    }
  }

  [[nodiscard]] bool caching() const { return options.enable_prefix_caching; }
  [[nodiscard]] std::span<const int32_t> stored_tokens(PageId page) const {
    return std::span<const int32_t>(page_tokens)
        .subspan(static_cast<size_t>(page * page_size), static_cast<size_t>(page_size));
  }
  [[nodiscard]] Sequence* find(SeqId seq) {
    auto it = seqs.find(seq);
    return it == seqs.end() ? nullptr : &it->second;
  }
  [[nodiscard]] const Sequence* find(SeqId seq) const {
    auto it = seqs.find(seq);
    return it == seqs.end() ? nullptr : &it->second;
  }

  // The key extras of a sequence, viewing its owned strings (span_scratch holds the spans).
  KeyExtras extras_of(const Sequence& s) {
    span_scratch.clear();
    for (const StoredSpan& sp : s.spans)
      span_scratch.push_back({sp.content_hash, sp.begin, sp.end});
    return KeyExtras{s.salt, s.adapter, span_scratch};
  }

  // True when cached page `page` holds exactly the page at first_pos of a request with `extras`
  // whose previous page has uid parent_uid.
  [[nodiscard]] bool verify(PageId page, std::span<const int32_t> tokens, int64_t first_pos,
                            const KeyExtras& extras, uint64_t parent_uid) const {
    const PageMeta& m = meta[page];
    if (m.parent_uid != parent_uid) return false;
    if (first_pos == 0 && m.salt != extras.salt) return false;
    if (m.adapter != extras.adapter) return false;
    const std::span<const int32_t> stored = stored_tokens(page);
    if (!std::equal(stored.begin(), stored.end(), tokens.begin(), tokens.end())) return false;
    size_t i_span = 0;
    for (const MultimodalSpan& s : extras.multimodal) {
      if (!overlaps(s.begin, s.end, first_pos, page_size)) continue;
      if (i_span == m.spans.size()) return false;
      const StoredSpan& t = m.spans[i_span++];
      if (t.content_hash != s.content_hash || t.begin != s.begin || t.end != s.end) return false;
    }
    return i_span == m.spans.size();
  }

  // Longest verified run of cached full pages of `prompt`, at most max_pages. Uses `keys` when
  // given (checked: prompt.size() / page_size of them, so non-empty whenever max_pages > 0), else
  // computes them from `root`. With `out`, the pages, keys and uids are appended to it.
  int64_t walk(std::span<const int32_t> prompt, std::span<const PageKey> keys,
               const KeyExtras& extras, const PageKey& root, int64_t max_pages,
               Sequence* out) const {
    PageKey parent = root;
    uint64_t parent_uid = 0;
    int64_t i = 0;
    for (; i < max_pages; ++i) {
      const auto tokens =
          prompt.subspan(static_cast<size_t>(i * page_size), static_cast<size_t>(page_size));
      const PageKey key = keys.empty() ? page_key(hash, parent, tokens, i * page_size, extras)
                                       : keys[static_cast<size_t>(i)];
      const PageId page = index.find(key, meta);
      if (page == kNoPage || !verify(page, tokens, i * page_size, extras, parent_uid)) break;
      if (out != nullptr) {
        out->pages.push_back(page);
        out->keys.push_back(key);
        out->uids.push_back(meta[page].uid);
      }
      parent = key;
      parent_uid = meta[page].uid;
    }
    return i;
  }

  [[nodiscard]] int64_t max_hit_pages(int64_t num_prompt_tokens) const {
    return num_prompt_tokens == 0 ? 0 : (num_prompt_tokens - 1) / page_size;
  }

  void record(PageEventKind kind, const PageMeta& m) {
    if (!options.record_events) return;
    events.push_back({kind, m.key, m.parent, page_size, options.fingerprint.layer_group});
  }

  // Drops a cached page's key (the page is being reused or replaced).
  void uncache(PageId page) {
    record(PageEventKind::evicted, meta[page]);
    index.erase(page, meta);
    meta[page].uid = 0;
    ++stats.evictions;
  }

  // REQUIRES: pool.num_available() > 0.
  PageId allocate_page() {
    const BlockPool::Allocation a = pool.allocate();
    KV_CHECK(a.page != kNoPage);
    if (a.evicted) uncache(a.page);
    return a.page;
  }

  // Page j of s just filled up: key it, and cache it unless an identical page already is.
  void on_page_full(Sequence& s, int64_t j) {
    const PageId page = s.pages[static_cast<size_t>(j)];
    KV_CHECK(!pool.is_cached(page));
    const KeyExtras extras = extras_of(s);
    const int64_t first_pos = j * page_size;
    const auto tokens = std::span<const int32_t>(s.tokens).subspan(static_cast<size_t>(first_pos),
                                                                   static_cast<size_t>(page_size));
    // A copy: the push_back below may move s.keys.
    const PageKey parent = j == 0 ? s.root : s.keys[static_cast<size_t>(j - 1)];
    const uint64_t parent_uid = j == 0 ? 0 : s.uids[static_cast<size_t>(j - 1)];
    s.keys.push_back(page_key(hash, parent, tokens, first_pos, extras));
    const PageKey& key = s.keys.back();

    const PageId other = index.find(key, meta);
    if (other != kNoPage) {
      if (verify(other, tokens, first_pos, extras, parent_uid)) {
        s.uids.push_back(meta[other].uid);
        ++stats.duplicate_pages;
        return;
      }
      if (pool.refcount(other) > 0) {
        // A collision with a page in use: this page stays private, under an identity nothing
        // in the index can match.
        s.uids.push_back(next_uid++);
        return;
      }
      // A collision (or an orphan whose parent was evicted) nobody uses: replace it.
      uncache(other);
      pool.drop_cached(other);
    }
    PageMeta& m = meta[page];
    m.key = key;
    m.parent = parent;
    m.uid = next_uid++;
    m.parent_uid = parent_uid;
    if (j == 0) {
      m.salt.assign(s.salt);
    } else {
      m.salt.clear();
    }
    m.adapter.assign(s.adapter);
    m.spans.clear();
    for (const StoredSpan& sp : s.spans) {
      if (overlaps(sp.begin, sp.end, first_pos, page_size)) m.spans.push_back(sp);
    }
    std::copy(tokens.begin(), tokens.end(),
              page_tokens.begin() + static_cast<ptrdiff_t>(page * page_size));
    pool.set_cached(page, true);
    index.insert(page, meta);
    s.uids.push_back(m.uid);
    record(PageEventKind::cached, m);
  }

  // Last page first, so a sequence's tail pages reach the LRU first and are evicted first.
  void release_pages(Sequence& s, size_t keep) {
    while (s.pages.size() > keep) {
      pool.unref(s.pages.back());
      s.pages.pop_back();
    }
  }

  // Both add() overloads: keys_given tells them apart.
  Result<int64_t> add(SeqId seq, std::span<const int32_t> prompt, std::span<const PageKey> keys,
                      bool keys_given, const KeyExtras& extras) {
    constexpr std::string_view kOp = "BlockManager.add";
    Rep& r = *this;
    if (r.find(seq) != nullptr) {
      return Status::invalid_argument(std::string(kOp) + ": " + seq_str(seq) +
                                      " exists, expected a new id");
    }
    if (Status st = check_extras(kOp, extras); !st.ok()) return st;
    if (keys_given) {
      if (Status st = check_keys(kOp, prompt, keys, r.page_size); !st.ok()) return st;
    }

    Sequence s;
    const size_t hint = static_cast<size_t>(r.options.max_pages_per_seq_hint);
    s.pages.reserve(hint);
    s.tokens.reserve(std::max(hint * static_cast<size_t>(r.page_size), prompt.size()));
    s.salt = extras.salt;
    s.adapter = extras.adapter;
    for (const MultimodalSpan& sp : extras.multimodal) {
      s.spans.push_back({std::string(sp.content_hash), sp.begin, sp.end});
    }
    int64_t hit_pages = 0;
    if (r.caching()) {
      s.keys.reserve(hint);
      s.uids.reserve(hint);
      s.root = root_key(r.hash, r.options.fingerprint, extras.salt);
      hit_pages = r.walk(prompt, keys, extras, s.root,
                         r.max_hit_pages(static_cast<int64_t>(prompt.size())), &s);
      ++r.stats.prefix_queries;
      r.stats.prefix_tokens_queried += static_cast<int64_t>(prompt.size());
      if (hit_pages > 0) ++r.stats.prefix_hits;
      r.stats.prefix_tokens_hit += hit_pages * r.page_size;
    }
    const int64_t hit_tokens = hit_pages * r.page_size;
    for (PageId page : s.pages) r.pool.ref(page);
    s.tokens.assign(prompt.begin(), prompt.begin() + hit_tokens);
    r.seqs.emplace(seq, std::move(s));
    return hit_tokens;
  }

  // Both match_prefix() overloads.
  [[nodiscard]] Result<int64_t> match_prefix(std::span<const int32_t> prompt,
                                             std::span<const PageKey> keys, bool keys_given,
                                             const KeyExtras& extras) const {
    constexpr std::string_view kOp = "BlockManager.match_prefix";
    const Rep& r = *this;
    if (Status st = check_extras(kOp, extras); !st.ok()) return st;
    if (keys_given) {
      if (Status st = check_keys(kOp, prompt, keys, r.page_size); !st.ok()) return st;
    }
    if (!r.caching()) return int64_t{0};
    const int64_t max_pages = r.max_hit_pages(static_cast<int64_t>(prompt.size()));
    // With keys given the root is not needed (and not hashed).
    const PageKey root =
        keys_given ? PageKey{} : root_key(r.hash, r.options.fingerprint, extras.salt);
    return r.walk(prompt, keys, extras, root, max_pages, nullptr) * r.page_size;
  }

  BlockManagerOptions options;
  int64_t page_size;
  KeyHashFn hash;
  BlockPool pool;
  std::vector<PageMeta> meta;        // per page
  std::vector<int32_t> page_tokens;  // [num_pages, page_size]: token ids of cached pages
  PrefixIndex index;
  std::unordered_map<SeqId, Sequence> seqs;
  std::vector<int64_t> slots;  // reserve()'s result
  std::vector<PageCopy> copies;
  std::vector<PageEvent> events;
  std::vector<MultimodalSpan> span_scratch;
  BlockManagerStats stats;
  uint64_t next_uid = 1;
};

Result<std::unique_ptr<BlockManager>> BlockManager::create(const BlockManagerOptions& options) {
  constexpr std::string_view kOp = "BlockManager.create";
  const auto bad = [&](const std::string& what) {
    return Status::invalid_argument(std::string(kOp) + ": " + what);
  };
  if (options.num_pages < 1 || options.num_pages > BlockPool::kMaxPages) {
    return bad("num_pages is " + std::to_string(options.num_pages) +
               ", expected 1 <= num_pages <= " + std::to_string(BlockPool::kMaxPages));
  }
  if (options.page_size < 1) {
    return bad("page_size is " + std::to_string(options.page_size) + ", expected >= 1");
  }
  if (options.fingerprint.page_size != options.page_size) {
    return bad("fingerprint.page_size is " + std::to_string(options.fingerprint.page_size) +
               ", expected page_size = " + std::to_string(options.page_size));
  }
  if (options.watermark_pages < 0 || options.watermark_pages > options.num_pages) {
    return bad(
        "watermark_pages is " + std::to_string(options.watermark_pages) +
        ", expected 0 <= watermark_pages <= num_pages = " + std::to_string(options.num_pages));
  }
  if (options.max_pages_per_seq_hint < 0) {
    return bad("max_pages_per_seq_hint is " + std::to_string(options.max_pages_per_seq_hint) +
               ", expected >= 0");
  }
  return std::unique_ptr<BlockManager>(new BlockManager(std::make_unique<Rep>(options)));
}

BlockManager::BlockManager(std::unique_ptr<Rep> rep) : rep_(std::move(rep)) {}
BlockManager::~BlockManager() = default;

Result<int64_t> BlockManager::add(SeqId seq, std::span<const int32_t> prompt,
                                  const KeyExtras& extras) {
  return rep_->add(seq, prompt, {}, false, extras);
}

Result<int64_t> BlockManager::add(SeqId seq, std::span<const int32_t> prompt,
                                  std::span<const PageKey> keys, const KeyExtras& extras) {
  return rep_->add(seq, prompt, keys, true, extras);
}

Result<std::span<const int64_t>> BlockManager::reserve(SeqId seq, int64_t n) {
  constexpr std::string_view kOp = "BlockManager.reserve";
  Rep& r = *rep_;
  Sequence* s = r.find(seq);
  if (s == nullptr) return unknown_seq(kOp, seq);
  if (n < 0) {
    return Status::invalid_argument(std::string(kOp) + ": n is " + std::to_string(n) +
                                    ", expected n >= 0");
  }
  const int64_t ps = r.page_size;
  const int64_t num_tokens = static_cast<int64_t>(s->tokens.size());
  const size_t need = static_cast<size_t>(ceil_div(num_tokens + n, ps));
  // The partly filled page the first token goes to must be private and not cached.
  const size_t i_write = static_cast<size_t>(num_tokens / ps);
  bool cow = false;
  if (n > 0 && num_tokens % ps != 0) {
    const PageId page = s->pages[i_write];
    cow = r.pool.refcount(page) > 1 || r.pool.is_cached(page);
  }
  const size_t num_release = s->pages.size() > need ? s->pages.size() - need : 0;
  const int64_t num_alloc =
      static_cast<int64_t>(need - std::min(need, s->pages.size())) + (cow ? 1 : 0);
  const int64_t available = r.pool.num_available() + static_cast<int64_t>(num_release);
  if (num_alloc > available) {
    return Status::resource_exhausted(std::string(kOp) + ": " + std::to_string(num_alloc) +
                                      " new pages needed for " + std::to_string(n) + " tokens of " +
                                      seq_str(seq) + ", expected at most " +
                                      std::to_string(available) + " available (free + evictable)");
  }

  r.release_pages(*s, need);  // reservation pages only: private, they go to the free list
  PageId cow_src = kNoPage;
  if (cow) {
    cow_src = s->pages[i_write];
    const PageId dst = r.allocate_page();
    r.copies.push_back({cow_src, dst});
    ++r.stats.cow_copies;
    s->pages[i_write] = dst;
  }
  while (s->pages.size() < need) s->pages.push_back(r.allocate_page());
  // After the allocations: the source may join the LRU, and must not be handed out above.
  if (cow_src != kNoPage) r.pool.unref(cow_src);
  s->num_reserved = n;

  r.slots.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = num_tokens + i;
    r.slots[static_cast<size_t>(i)] = s->pages[static_cast<size_t>(pos / ps)] * ps + pos % ps;
  }
  return std::span<const int64_t>(r.slots);
}

Status BlockManager::commit(SeqId seq, std::span<const int32_t> tokens) {
  constexpr std::string_view kOp = "BlockManager.commit";
  Rep& r = *rep_;
  Sequence* s = r.find(seq);
  if (s == nullptr) return unknown_seq(kOp, seq);
  const int64_t k = static_cast<int64_t>(tokens.size());
  if (k > s->num_reserved) {
    return Status::invalid_argument(std::string(kOp) + ": " + std::to_string(k) +
                                    " tokens, expected at most " + std::to_string(s->num_reserved) +
                                    " reserved for " + seq_str(seq));
  }
  const int64_t old = static_cast<int64_t>(s->tokens.size());
  s->tokens.insert(s->tokens.end(), tokens.begin(), tokens.end());
  s->num_reserved -= k;
  if (r.caching()) {
    for (int64_t j = old / r.page_size; j < (old + k) / r.page_size; ++j) r.on_page_full(*s, j);
  }
  return Status();
}

Status BlockManager::truncate(SeqId seq, int64_t n) {
  constexpr std::string_view kOp = "BlockManager.truncate";
  Rep& r = *rep_;
  Sequence* s = r.find(seq);
  if (s == nullptr) return unknown_seq(kOp, seq);
  const int64_t len = static_cast<int64_t>(s->tokens.size());
  if (n < 0 || n > len) {
    return Status::invalid_argument(std::string(kOp) + ": n is " + std::to_string(n) +
                                    ", expected 0 <= n <= " + std::to_string(len) +
                                    " (num_tokens of " + seq_str(seq) + ")");
  }
  r.release_pages(*s, static_cast<size_t>(ceil_div(n, r.page_size)));
  s->tokens.resize(static_cast<size_t>(n));
  s->num_reserved = 0;
  if (r.caching()) {
    s->keys.resize(static_cast<size_t>(n / r.page_size));
    s->uids.resize(static_cast<size_t>(n / r.page_size));
  }
  return Status();
}

Status BlockManager::fork(SeqId parent, SeqId child) {
  constexpr std::string_view kOp = "BlockManager.fork";
  Rep& r = *rep_;
  const Sequence* p = r.find(parent);
  if (p == nullptr) return unknown_seq(kOp, parent);
  if (r.find(child) != nullptr) {
    return Status::invalid_argument(std::string(kOp) + ": child " + seq_str(child) +
                                    " exists, expected a new id");
  }
  Sequence c = *p;
  c.pages.resize(
      static_cast<size_t>(ceil_div(static_cast<int64_t>(p->tokens.size()), r.page_size)));
  c.num_reserved = 0;
  for (PageId page : c.pages) r.pool.ref(page);
  r.seqs.emplace(child, std::move(c));
  return Status();
}

Status BlockManager::free(SeqId seq) {
  Rep& r = *rep_;
  auto it = r.seqs.find(seq);
  if (it == r.seqs.end()) return unknown_seq("BlockManager.free", seq);
  r.release_pages(it->second, 0);
  r.seqs.erase(it);
  return Status();
}

Result<std::span<const PageId>> BlockManager::page_table(SeqId seq) const {
  const Sequence* s = rep_->find(seq);
  if (s == nullptr) return unknown_seq("BlockManager.page_table", seq);
  return std::span<const PageId>(s->pages);
}

Result<int64_t> BlockManager::num_tokens(SeqId seq) const {
  const Sequence* s = rep_->find(seq);
  if (s == nullptr) return unknown_seq("BlockManager.num_tokens", seq);
  return static_cast<int64_t>(s->tokens.size());
}

Result<int64_t> BlockManager::num_reserved(SeqId seq) const {
  const Sequence* s = rep_->find(seq);
  if (s == nullptr) return unknown_seq("BlockManager.num_reserved", seq);
  return s->num_reserved;
}

bool BlockManager::contains(SeqId seq) const { return rep_->find(seq) != nullptr; }
int64_t BlockManager::num_sequences() const { return static_cast<int64_t>(rep_->seqs.size()); }

Result<int64_t> BlockManager::match_prefix(std::span<const int32_t> prompt,
                                           const KeyExtras& extras) const {
  return rep_->match_prefix(prompt, {}, false, extras);
}

Result<int64_t> BlockManager::match_prefix(std::span<const int32_t> prompt,
                                           std::span<const PageKey> keys,
                                           const KeyExtras& extras) const {
  return rep_->match_prefix(prompt, keys, true, extras);
}

bool BlockManager::is_cached(const PageKey& key) const {
  const Rep& r = *rep_;
  return r.caching() && r.index.find(key, r.meta) != kNoPage;
}

Result<std::vector<SeqId>> BlockManager::plan_preemption(
    int64_t num_pages_needed, std::span<const SeqId> victims_in_order) const {
  constexpr std::string_view kOp = "BlockManager.plan_preemption";
  const Rep& r = *rep_;
  if (num_pages_needed < 0) {
    return Status::invalid_argument(std::string(kOp) + ": num_pages_needed is " +
                                    std::to_string(num_pages_needed) + ", expected >= 0");
  }
  std::unordered_map<SeqId, size_t> position;
  position.reserve(victims_in_order.size());
  for (size_t i = 0; i < victims_in_order.size(); ++i) {
    const SeqId v = victims_in_order[i];
    if (r.find(v) == nullptr) return unknown_seq(kOp, v);
    const auto [it, inserted] = position.emplace(v, i);
    if (!inserted) {
      return Status::invalid_argument(std::string(kOp) + ": victim " + std::to_string(i) + " (" +
                                      seq_str(v) + ") repeats victim " +
                                      std::to_string(it->second) + ", expected distinct sequences");
    }
  }
  int64_t available = r.pool.num_available();
  std::vector<SeqId> plan;
  if (available >= num_pages_needed) return plan;
  // References the planned victims hold per page: a page is released when they are all of them.
  std::unordered_map<PageId, int32_t> dropped;
  for (const SeqId v : victims_in_order) {
    plan.push_back(v);
    for (const PageId page : r.find(v)->pages) {
      if (++dropped[page] == r.pool.refcount(page)) ++available;
    }
    if (available >= num_pages_needed) return plan;
  }
  return Status::resource_exhausted(
      std::string(kOp) + ": freeing all " + std::to_string(victims_in_order.size()) +
      " victims leaves " + std::to_string(available) +
      " pages available, expected >= " + std::to_string(num_pages_needed) + " (num_pages_needed)");
}

bool BlockManager::can_admit(int64_t num_new_tokens) const {
  if (num_new_tokens < 0) return false;
  const Rep& r = *rep_;
  return ceil_div(num_new_tokens, r.page_size) <=
         r.pool.num_available() - r.options.watermark_pages;
}

int64_t BlockManager::num_pages() const { return rep_->pool.num_pages(); }
int64_t BlockManager::page_size() const { return rep_->page_size; }
int64_t BlockManager::num_free_pages() const { return rep_->pool.num_free(); }
int64_t BlockManager::num_cached_pages() const { return rep_->index.size(); }
int64_t BlockManager::num_evictable_pages() const { return rep_->pool.num_evictable(); }
int64_t BlockManager::num_used_pages() const { return rep_->pool.num_used(); }
const BlockManagerStats& BlockManager::stats() const { return rep_->stats; }
std::span<const PageCopy> BlockManager::pending_copies() const { return rep_->copies; }
void BlockManager::clear_pending_copies() { rep_->copies.clear(); }
std::span<const PageEvent> BlockManager::events() const { return rep_->events; }
void BlockManager::clear_events() { rep_->events.clear(); }

Status BlockManager::check_invariants() const {
  const Rep& r = *rep_;
  const auto fail = [](const std::string& what) {
    return Status::internal("BlockManager.check_invariants: " + what);
  };
  const int32_t num_pages = r.pool.num_pages();
  const int64_t ps = r.page_size;

  std::vector<int32_t> refs(static_cast<size_t>(num_pages), 0);
  for (const auto& [id, s] : r.seqs) {
    const int64_t len = static_cast<int64_t>(s.tokens.size());
    const int64_t want = ceil_div(len + s.num_reserved, ps);
    if (s.num_reserved < 0 || static_cast<int64_t>(s.pages.size()) != want) {
      return fail(seq_str(id) + " has " + std::to_string(s.pages.size()) + " pages for " +
                  std::to_string(len) + " tokens + " + std::to_string(s.num_reserved) +
                  " reserved, expected " + std::to_string(want));
    }
    for (size_t j = 0; j < s.pages.size(); ++j) {
      const PageId page = s.pages[j];
      if (page < 0 || page >= num_pages) return fail(seq_str(id) + " holds bad page id");
      ++refs[static_cast<size_t>(page)];
      // Pages holding reserved tokens only were allocated by reserve(): private, not cached.
      if (static_cast<int64_t>(j) >= ceil_div(len, ps) &&
          (r.pool.refcount(page) != 1 || r.pool.is_cached(page))) {
        return fail(seq_str(id) + " reservation page " + std::to_string(page) +
                    " is shared or cached, expected private");
      }
    }
    if (!r.caching()) continue;
    const size_t full = static_cast<size_t>(len / ps);
    if (s.keys.size() != full || s.uids.size() != full) {
      return fail(seq_str(id) + " has " + std::to_string(s.keys.size()) + " keys, expected " +
                  std::to_string(full) + " (full pages)");
    }
    for (size_t j = 0; j < full; ++j) {
      const PageId page = s.pages[j];
      if (!r.pool.is_cached(page)) continue;
      const PageMeta& m = r.meta[static_cast<size_t>(page)];
      const auto mine = std::span<const int32_t>(s.tokens).subspan(j * static_cast<size_t>(ps),
                                                                   static_cast<size_t>(ps));
      const auto stored = r.stored_tokens(page);
      if (m.key != s.keys[j] || m.uid != s.uids[j] ||
          !std::equal(mine.begin(), mine.end(), stored.begin(), stored.end())) {
        return fail(seq_str(id) + " page " + std::to_string(j) + " (page id " +
                    std::to_string(page) + ") is cached with other contents, expected its own");
      }
    }
  }

  int64_t num_cached = 0;
  int64_t num_used = 0;
  for (PageId page = 0; page < num_pages; ++page) {
    const int32_t rc = r.pool.refcount(page);
    const bool cached = r.pool.is_cached(page);
    const std::string name = "page " + std::to_string(page);
    if (rc != refs[static_cast<size_t>(page)]) {
      return fail(name + " has refcount " + std::to_string(rc) + ", expected " +
                  std::to_string(refs[static_cast<size_t>(page)]) + " (references held)");
    }
    if (rc > 0) ++num_used;
    const bool free = r.pool.on_free_list(page);
    const bool lru = r.pool.on_lru(page);
    if (rc > 0 && (free || lru)) return fail(name + " is used and on a list, expected neither");
    if (rc == 0 && free == lru) return fail(name + " is unused, expected on exactly one list");
    if (free && cached) return fail(name + " is free and cached, expected not cached");
    if (lru && !cached) return fail(name + " is on the LRU, expected cached");
    if (!r.caching()) {
      if (cached) return fail(name + " is cached, expected nothing cached without prefix caching");
      continue;
    }
    if (cached != (r.meta[static_cast<size_t>(page)].uid != 0)) {
      return fail(name + " cached flag and uid disagree");
    }
    if (cached) {
      ++num_cached;
      if (r.index.find(r.meta[static_cast<size_t>(page)].key, r.meta) != page) {
        return fail(name + " is cached, expected its key in the index pointing back to it");
      }
    }
  }
  if (num_cached != r.index.size()) {
    return fail("index holds " + std::to_string(r.index.size()) + " keys, expected " +
                std::to_string(num_cached) + " (cached pages)");
  }
  if (static_cast<int64_t>(r.pool.free_list().size()) != r.pool.num_free() ||
      static_cast<int64_t>(r.pool.lru().size()) != r.pool.num_evictable()) {
    return fail("list lengths disagree with the counts");
  }
  if (num_used != r.pool.num_used() ||
      r.pool.num_free() + r.pool.num_evictable() + num_used != num_pages) {
    return fail("free " + std::to_string(r.pool.num_free()) + " + evictable " +
                std::to_string(r.pool.num_evictable()) + " + used " + std::to_string(num_used) +
                ", expected num_pages = " + std::to_string(num_pages));
  }
  return Status();
}

}  // namespace kvcache
