// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#pragma once

// The serving demo's workload: many multi-turn conversations, generated from a seed. Conversations
// come in groups that share one long system prompt; each turn appends the user's tokens to the
// conversation's own history and asks for a number of decoded tokens; between turns the user
// "thinks" for a few scheduler steps. Plain values: intentionally copyable, thread-compatible.

#include <cstdint>
#include <vector>

#include "kvcache/status.h"

namespace kvcache::serving {

struct WorkloadOptions {
  int64_t num_conversations = 64;  // >= 1
  int64_t num_turns = 4;           // per conversation, >= 1
  int64_t group_size = 8;          // conversations sharing one system prompt, >= 1
  int64_t vocab = 97;              // tokens are drawn from [0, vocab)
  uint64_t seed = 1;
  // Lengths are drawn uniformly from these closed ranges.
  int64_t system_min = 96, system_max = 192;  // system prompt tokens
  int64_t user_min = 8, user_max = 40;        // user tokens per turn
  int64_t decode_min = 8, decode_max = 32;    // decoded tokens per turn
  int64_t think_max = 24;                     // scheduler steps between turns, in [1, think_max]
};

struct Turn {
  std::vector<int32_t> user;  // appended to the history when the turn starts
  int64_t num_decode = 0;     // tokens to generate, >= 1
  int64_t think_steps = 0;    // steps after the previous turn ended (or after step 0) it starts
  bool branch = false;        // also decode an alternative reply (fork + copy-on-write)
};

struct Conversation {
  int64_t group = 0;  // index into Workload::system_prompts
  std::vector<Turn> turns;
};

struct Workload {
  std::vector<std::vector<int32_t>> system_prompts;
  std::vector<Conversation> conversations;
  // The most tokens any conversation reaches (system prompt + every turn's user and decoded
  // tokens): bounds the positions the model sees.
  [[nodiscard]] int64_t max_history() const;
  // Each conversation's final history length (what a per-conversation cache grows to).
  [[nodiscard]] std::vector<int64_t> final_lengths() const;
};

// invalid_argument ("make_workload: ...") for a count < 1 or a range with min > max or min < 1.
[[nodiscard]] Result<Workload> make_workload(const WorkloadOptions& options);

}  // namespace kvcache::serving
