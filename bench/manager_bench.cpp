// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "bench/manager_bench.h"

#include <algorithm>
#include <chrono>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "kvcache/block_manager.h"
#include "kvcache/page_key.h"

namespace kvcache::bench {
namespace {

using Clock = std::chrono::steady_clock;

constexpr int64_t kPageSize = 16;
constexpr int64_t kRunning = 1024;       // sequences in one scheduling step
constexpr int64_t kPromptTokens = 4096;  // match_prefix / admission / fork prompts
constexpr int64_t kCachedTokens = 3072;  // of which this much is cached

struct Timing {
  double median_us;
  double p90_us;
};

// Runs setup() untimed and body() timed, `repeats` times.
Timing time_calls(int64_t repeats, const std::function<void()>& setup,
                  const std::function<void()>& body) {
  std::vector<double> us;
  us.reserve(static_cast<size_t>(repeats));
  for (int64_t i = 0; i < repeats; ++i) {
    setup();
    const auto t0 = Clock::now();
    body();
    us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  std::vector<double> sorted = us;
  std::sort(sorted.begin(), sorted.end());
  const double p90 = sorted[std::min(sorted.size() - 1, sorted.size() * 9 / 10)];
  return {median(us), p90};
}

std::vector<int32_t> tokens_from(int32_t seed, int64_t n) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  uint32_t x = static_cast<uint32_t>(seed) * 2654435761u + 1;
  for (auto& v : t) {
    x = x * 1664525u + 1013904223u;
    v = static_cast<int32_t>(x >> 16);
  }
  return t;
}

KeyFingerprint fingerprint() {
  KeyFingerprint f;
  f.model_id = "bench/llama-3-8b";
  f.kv_dtype = "bf16";
  f.page_size = kPageSize;
  return f;
}

Result<std::unique_ptr<BlockManager>> make_manager(int64_t num_pages) {
  BlockManagerOptions o;
  o.num_pages = num_pages;
  o.page_size = kPageSize;
  o.fingerprint = fingerprint();
  return BlockManager::create(o);
}

// Adds seq with `prompt` and commits all of it.
Status add_committed(BlockManager& m, SeqId seq, std::span<const int32_t> prompt) {
  Result<int64_t> cached = m.add(seq, prompt);
  if (!cached.ok()) return cached.status();
  const auto rest = prompt.subspan(static_cast<size_t>(*cached));
  Result<std::span<const int64_t>> slots = m.reserve(seq, static_cast<int64_t>(rest.size()));
  if (!slots.ok()) return slots.status();
  return m.commit(seq, rest);
}

}  // namespace

Result<Report> run_manager_bench(const ManagerBenchOptions& options) {
  if (options.repeats < 1) {
    return Status::invalid_argument("bench manager: repeats is " + std::to_string(options.repeats) +
                                    ", expected >= 1");
  }
  const int64_t repeats = options.repeats;
  Report report({"op", "n", "median_us", "p90_us", "target_us", "repeats"});
  // target_us: the bound for the median, "-" where none is set.
  const auto add = [&](const char* op, int64_t n, Timing t, Value target, int64_t reps) {
    report.add_row({std::string(op), n, t.median_us, t.p90_us, std::move(target), reps});
  };
  const Value none = std::string("-");
  Status failure;
  const auto check = [&](const Status& s) {
    if (!s.ok() && failure.ok()) failure = s;
  };

  // The 256 keys of a 4096-token prompt.
  const std::vector<int32_t> prompt = tokens_from(1, kPromptTokens);
  std::vector<PageKey> keys;
  keys.reserve(kPromptTokens / kPageSize);
  for (const HashKind kind : {HashKind::sha256, HashKind::xxh3_128}) {
    const KeyHashFn hash = key_hash_fn(kind);
    const Timing t = time_calls(
        repeats, [] {}, [&] { check(page_keys(hash, fingerprint(), prompt, KeyExtras{}, &keys)); });
    add(kind == HashKind::sha256 ? "page_keys_sha256" : "page_keys_xxh3_128",
        kPromptTokens / kPageSize, t, kind == HashKind::sha256 ? Value(40.0) : none, repeats);
  }

  // One scheduling step: every running sequence reserves one slot and commits one token.
  {
    const int64_t steps = std::max<int64_t>(1, repeats / 4);
    const int64_t tokens_per_seq = 100 + steps + kPageSize;
    Result<std::unique_ptr<BlockManager>> m =
        make_manager(kRunning * (tokens_per_seq / kPageSize + 2));
    if (!m.ok()) return m.status();
    for (SeqId s = 0; s < kRunning; ++s) {
      check(add_committed(**m, s, tokens_from(static_cast<int32_t>(s + 100), 100)));
    }
    const int32_t token = 7;
    const Timing t = time_calls(
        steps, [] {},
        [&] {
          for (SeqId s = 0; s < kRunning; ++s) {
            Result<std::span<const int64_t>> slots = (*m)->reserve(s, 1);
            check(slots.status());
            check((*m)->commit(s, std::span<const int32_t>(&token, 1)));
          }
        });
    add("step_reserve_commit", kRunning, t, 50.0, steps);
  }

  // Prefix lookups and admission against a cached 3072-token prefix.
  {
    Result<std::unique_ptr<BlockManager>> m = make_manager(4 * kPromptTokens / kPageSize);
    if (!m.ok()) return m.status();
    std::vector<int32_t> request = prompt;
    std::copy(prompt.begin(), prompt.begin() + kCachedTokens, request.begin());
    const std::span<const int32_t> cached_part(prompt.data(), kCachedTokens);
    check(add_committed(**m, 0, cached_part));
    check((*m)->free(0));  // its pages stay cached (evictable)
    std::vector<int32_t> fresh = tokens_from(2, kPromptTokens);
    std::copy(prompt.begin(), prompt.begin() + kCachedTokens, fresh.begin());

    // The request's keys, as a router or the scheduler computes them once.
    std::vector<PageKey> fresh_keys;
    check(page_keys(key_hash_fn(HashKind::sha256), fingerprint(), fresh, KeyExtras{}, &fresh_keys));
    const Timing given = time_calls(
        repeats, [] {}, [&] { check((*m)->match_prefix(fresh, fresh_keys, {}).status()); });
    add("match_prefix_given_keys", kPromptTokens, given, 20.0, repeats);
    // Hashing the request inside: the 20 µs lookup plus the 40 µs keys.
    const Timing match = time_calls(
        repeats, [] {}, [&] { check((*m)->match_prefix(fresh).status()); });
    add("match_prefix_with_keys", kPromptTokens, match, 60.0, repeats);

    SeqId next = 1;
    const auto free_previous = [&] {
      check((*m)->contains(next - 1) ? (*m)->free(next - 1) : Status());
    };
    const Timing admit_given = time_calls(
        repeats, free_previous, [&] { check((*m)->add(next++, fresh, fresh_keys, {}).status()); });
    add("admit_prefix_hit_given_keys", kPromptTokens, admit_given, none, repeats);
    const Timing admit =
        time_calls(repeats, free_previous, [&] { check((*m)->add(next++, fresh).status()); });
    add("admit_prefix_hit", kPromptTokens, admit, none, repeats);
  }

  // fork + free of a 4096-token sequence.
  {
    Result<std::unique_ptr<BlockManager>> m = make_manager(2 * kPromptTokens / kPageSize + 2);
    if (!m.ok()) return m.status();
    check(add_committed(**m, 0, prompt));
    const Timing t = time_calls(
        repeats, [] {},
        [&] {
          check((*m)->fork(0, 1));
          check((*m)->free(1));
        });
    add("fork_free", kPromptTokens, t, none, repeats);
  }

  if (!failure.ok()) return failure;
  return report;
}

}  // namespace kvcache::bench
