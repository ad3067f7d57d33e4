// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "serving/workload.h"

#include <algorithm>
#include <random>
#include <string>

namespace kvcache::serving {
namespace {

// Every third turn of a conversation (offset by its index) also decodes an alternative reply.
constexpr int64_t kBranchEvery = 3;

int64_t draw(std::mt19937_64& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

std::vector<int32_t> draw_tokens(std::mt19937_64& rng, int64_t n, int64_t vocab) {
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (int32_t& t : out) t = static_cast<int32_t>(draw(rng, 0, vocab - 1));
  return out;
}

Status check_range(const char* what, int64_t lo, int64_t hi) {
  if (lo < 1 || lo > hi) {
    return Status::invalid_argument("make_workload: " + std::string(what) + " range is [" +
                                    std::to_string(lo) + ", " + std::to_string(hi) +
                                    "], expected 1 <= min <= max");
  }
  return Status();
}

}  // namespace

int64_t Workload::max_history() const {
  const std::vector<int64_t> lengths = final_lengths();
  return lengths.empty() ? 0 : *std::max_element(lengths.begin(), lengths.end());
}

std::vector<int64_t> Workload::final_lengths() const {
  std::vector<int64_t> out;
  for (const Conversation& c : conversations) {
    auto n = static_cast<int64_t>(system_prompts[static_cast<size_t>(c.group)].size());
    for (const Turn& t : c.turns) n += static_cast<int64_t>(t.user.size()) + t.num_decode;
    out.push_back(n);
  }
  return out;
}

Result<Workload> make_workload(const WorkloadOptions& o) {
  if (o.num_conversations < 1 || o.num_turns < 1 || o.group_size < 1 || o.vocab < 2) {
    return Status::invalid_argument(
        "make_workload: conversations " + std::to_string(o.num_conversations) + ", turns " +
        std::to_string(o.num_turns) + ", group size " + std::to_string(o.group_size) + ", vocab " +
        std::to_string(o.vocab) + ", expected each >= 1 (vocab >= 2)");
  }
  for (const Status& s :
       {check_range("system", o.system_min, o.system_max),
        check_range("user", o.user_min, o.user_max),
        check_range("decode", o.decode_min, o.decode_max), check_range("think", 1, o.think_max)}) {
    if (!s.ok()) return s;
  }
  std::mt19937_64 rng(o.seed ^ 0x776f726b6c6f6164ull);
  Workload w;
  const int64_t groups = (o.num_conversations + o.group_size - 1) / o.group_size;
  for (int64_t g = 0; g < groups; ++g) {
    w.system_prompts.push_back(draw_tokens(rng, draw(rng, o.system_min, o.system_max), o.vocab));
  }
  for (int64_t c = 0; c < o.num_conversations; ++c) {
    Conversation conv;
    conv.group = c / o.group_size;
    for (int64_t t = 0; t < o.num_turns; ++t) {
      Turn turn;
      turn.user = draw_tokens(rng, draw(rng, o.user_min, o.user_max), o.vocab);
      turn.num_decode = draw(rng, o.decode_min, o.decode_max);
      // The first turns are staggered over the first think_max steps, so the batch fills up.
      turn.think_steps = draw(rng, 1, o.think_max);
      turn.branch = (c + t) % kBranchEvery == 0;
      conv.turns.push_back(std::move(turn));
    }
    w.conversations.push_back(std::move(conv));
  }
  return w;
}

}  // namespace kvcache::serving
