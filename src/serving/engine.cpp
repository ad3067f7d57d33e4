// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "serving/engine.h"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <deque>
#include <memory>
#include <span>
#include <string>
#include <utility>

#include "kvcache/block_manager.h"
#include "kvcache/thread_pool.h"

#include "model/tiny_model.h"
#include "serving/paged_model.h"
#include "serving/verify.h"

namespace kvcache::serving {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kMaxMismatchLines = 8;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// One turn (or one alternative reply) from admission to its last decoded token.
struct Request {
  int64_t conversation = 0;
  int64_t turn = 0;
  bool branch = false;  // an alternative reply: verified, then dropped
  bool verify = false;
  std::vector<int32_t> tokens;  // history + user tokens + the tokens decoded so far
  int64_t num_decode = 0;
  int64_t generated = 0;
  std::vector<StepLogits> steps;  // the decode steps' logits, for verify
  SeqId seq = -1;                 // while admitted
  int64_t cached = 0;             // tokens whose K/V are in the cache
  int64_t prompt_len = 0;         // tokens at admission: rows below it are prefill
};

struct ConversationState {
  std::vector<int32_t> history;
  int64_t next_turn = 0;
  int64_t ready_step = 0;
  bool busy = false;  // a turn is queued or running
};

// A batch entry: the request and its rows.
struct Planned {
  Request* request = nullptr;
  StepRows rows;
};

// The index of the largest value other than `best`.
int32_t runner_up(std::span<const float> logits, int32_t best) {
  int32_t out = best == 0 ? 1 : 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const auto v = static_cast<int32_t>(i);
    if (v != best && logits[i] > logits[static_cast<size_t>(out)]) out = v;
  }
  return out;
}

// Of the prompt tokens whose K/V the requests got, the share the prefix cache served.
double hit_rate(const EngineReport& r) {
  const int64_t total = r.tokens_reused + r.tokens_prefilled;
  return total == 0 ? 0.0 : static_cast<double>(r.tokens_reused) / static_cast<double>(total);
}

Status check_options(const EngineOptions& o) {
  const auto bad = [](const std::string& what) {
    return Status::invalid_argument("run_engine: " + what);
  };
  if (o.num_pages < 1)
    return bad("num_pages is " + std::to_string(o.num_pages) + ", expected >= 1");
  if (o.page_size < 1 || o.page_size > 1024) {
    return bad("page_size is " + std::to_string(o.page_size) + ", expected in [1, 1024]");
  }
  if (o.max_running < 1)
    return bad("max_running is " + std::to_string(o.max_running) + ", expected >= 1");
  if (o.verify_every < 1)
    return bad("verify_every is " + std::to_string(o.verify_every) + ", expected >= 1");
  if (o.max_step_tokens < o.page_size) {
    return bad("max_step_tokens is " + std::to_string(o.max_step_tokens) +
               ", expected >= page_size (a prefill chunk is one page)");
  }
  if (o.watermark_pages < 0 || o.watermark_pages >= o.num_pages) {
    return bad("watermark_pages is " + std::to_string(o.watermark_pages) + ", expected in [0, " +
               std::to_string(o.num_pages) + ")");
  }
  if (o.num_threads < 1)
    return bad("num_threads is " + std::to_string(o.num_threads) + ", expected >= 1");
  return Status();
}

class Scheduler {
 public:
  Scheduler(const EngineOptions& options, const Workload& workload, const model::TinyModel& model,
            PagedModel& paged, BlockManager& manager, EngineReport& report)
      : o_(options),
        w_(workload),
        model_(model),
        paged_(paged),
        manager_(manager),
        report_(report) {
    conversations_.resize(w_.conversations.size());
    for (size_t c = 0; c < conversations_.size(); ++c) {
      conversations_[c].history = w_.system_prompts[static_cast<size_t>(w_.conversations[c].group)];
      conversations_[c].ready_step = w_.conversations[c].turns[0].think_steps;
      turns_total_ += static_cast<int64_t>(w_.conversations[c].turns.size());
    }
    const auto& layers = model_.config().layers;
    for (size_t l = 0; l < layers.size(); ++l) {
      if (layers[l].kind == model::LayerKind::attention) fault_layer_ = static_cast<int64_t>(l);
    }
  }

  Status run() {
    const Clock::time_point t0 = Clock::now();
    // Alternative replies (forks) may still run after the last turn: they finish too.
    while (turns_done_ < turns_total_ || !running_.empty() || !waiting_.empty()) {
      activate();
      if (Status s = admit(); !s.ok()) return s;
      if (Status s = step(); !s.ok()) return s;
      record_point();
      ++step_;
      if (o_.on_progress) o_.on_progress(progress());
    }
    report_.engine_seconds = seconds_since(t0) - report_.verify_seconds;
    report_.steps = step_;
    return Status();
  }

  EngineProgress progress() const {
    return {step_,
            turns_done_,
            turns_total_,
            static_cast<int64_t>(running_.size()),
            static_cast<int64_t>(waiting_.size()),
            report_.mismatches};
  }

 private:
  // Conversations whose user has finished thinking queue their next turn.
  void activate() {
    for (size_t c = 0; c < conversations_.size(); ++c) {
      ConversationState& s = conversations_[c];
      const auto& turns = w_.conversations[c].turns;
      if (s.busy || s.next_turn >= static_cast<int64_t>(turns.size()) || s.ready_step > step_) {
        continue;
      }
      const Turn& turn = turns[static_cast<size_t>(s.next_turn)];
      s.history.insert(s.history.end(), turn.user.begin(), turn.user.end());
      auto r = std::make_unique<Request>();
      r->conversation = static_cast<int64_t>(c);
      r->turn = s.next_turn;
      r->verify = o_.verify == VerifyMode::all || static_cast<int64_t>(c) % o_.verify_every == 0;
      r->tokens = s.history;
      r->num_decode = turn.num_decode;
      waiting_.push_back(std::move(r));
      s.busy = true;
    }
  }

  Status admit() {
    while (!waiting_.empty() && static_cast<int64_t>(running_.size()) < o_.max_running) {
      Request& r = *waiting_.front();
      Result<int64_t> hit = manager_.match_prefix(r.tokens);
      if (!hit.ok()) return hit.status();
      const auto len = static_cast<int64_t>(r.tokens.size());
      if (!manager_.can_admit(len - *hit)) {
        if (running_.empty()) return too_big(r);  // nothing running will ever free a page
        break;
      }
      const SeqId seq = next_seq_++;
      Result<int64_t> added = manager_.add(seq, r.tokens);
      if (!added.ok()) return added.status();
      apply_state_copies();
      r.seq = seq;
      r.cached = *added;
      r.prompt_len = len;
      report_.tokens_reused += *added;
      running_.push_back(std::move(waiting_.front()));
      waiting_.pop_front();
    }
    return Status();
  }

  Status too_big(const Request& r) const {
    return Status::resource_exhausted(
        "run_engine: a request of " + std::to_string(r.tokens.size()) + " tokens (conversation " +
        std::to_string(r.conversation) + ") does not fit in " + std::to_string(o_.num_pages) +
        " pages of " + std::to_string(o_.page_size) + " with " +
        std::to_string(o_.watermark_pages) + " kept back, expected more pages");
  }

  void apply_state_copies() {
    paged_.apply_state_copies(manager_.pending_state_copies());
    manager_.clear_pending_state_copies();
  }

  // Frees running_[i] and queues it at the front: it resumes from the cached prefix later.
  void preempt(size_t i) {
    std::unique_ptr<Request> r = std::move(running_[i]);
    running_.erase(running_.begin() + static_cast<std::ptrdiff_t>(i));
    (void)manager_.free(r->seq);  // a running request's seq is always known to the manager
    r->seq = -1;
    r->cached = 0;
    ++report_.preemptions;
    waiting_.push_front(std::move(r));
  }

  // Reserves n slots for running_[i], preempting newer requests (or, failing that, itself) when
  // the pool runs dry. Returns false when running_[i] itself was preempted.
  Result<bool> reserve_or_preempt(size_t i, int64_t n) {
    Request& r = *running_[i];
    for (;;) {
      Result<std::span<const int64_t>> slots = manager_.reserve(r.seq, n);
      if (slots.ok()) return true;
      if (slots.status().code() != Code::resource_exhausted) return slots.status();
      std::vector<SeqId> victims;  // the newest first
      for (size_t j = running_.size(); j-- > i + 1;) victims.push_back(running_[j]->seq);
      const int64_t needed = (n + o_.page_size - 1) / o_.page_size + 1;
      Result<std::vector<SeqId>> plan = manager_.plan_preemption(needed, victims);
      if (!plan.ok() || plan->empty()) {
        if (running_.size() == 1) return too_big(r);
        preempt(i);
        return false;
      }
      // Victims go to the queue front newest first, so the oldest ends up in front.
      for (const SeqId v : *plan) {
        for (size_t j = i + 1; j < running_.size(); ++j) {
          if (running_[j]->seq == v) {
            preempt(j);
            break;
          }
        }
      }
    }
  }

  // The rows of running_[i] for this step, after its reserve.
  Result<StepRows> rows_of(const Request& r, int64_t n) {
    const int64_t groups = manager_.num_groups();
    StepRows rows;
    rows.tokens = std::span<const int32_t>(r.tokens).subspan(static_cast<size_t>(r.cached),
                                                             static_cast<size_t>(n));
    rows.start = r.cached;
    rows.want_logits = r.cached + n == static_cast<int64_t>(r.tokens.size());
    rows.slots.resize(static_cast<size_t>(groups));
    rows.pages.resize(static_cast<size_t>(groups));
    rows.state.assign(static_cast<size_t>(groups), kNoStateSlot);
    for (int64_t g = 0; g < groups; ++g) {
      const auto gi = static_cast<size_t>(g);
      if (paged_.groups().groups[gi].kind == LayerGroupKind::recurrent) {
        Result<StateSlot> slot = manager_.state_slot(r.seq, g);
        if (!slot.ok()) return slot.status();
        rows.state[gi] = *slot;
        continue;
      }
      Result<std::span<const int64_t>> slots = manager_.reserved_slots(g);
      Result<std::span<const PageId>> pages = manager_.page_table(r.seq, g);
      if (!slots.ok()) return slots.status();
      if (!pages.ok()) return pages.status();
      rows.slots[gi].assign(slots->begin(), slots->end());
      rows.pages[gi].assign(pages->begin(), pages->end());
    }
    return rows;
  }

  Status step() {
    std::vector<Planned> batch;
    int64_t budget = o_.max_step_tokens;
    for (size_t i = 0; i < running_.size(); ++i) {
      Request& r = *running_[i];
      const auto len = static_cast<int64_t>(r.tokens.size());
      // Prefill one page per step (the chunk ends on a page boundary), decode one token.
      const int64_t end = std::min(len, (r.cached / o_.page_size + 1) * o_.page_size);
      const int64_t n = end - r.cached;
      if (n > budget) continue;
      Result<bool> kept = reserve_or_preempt(i, n);
      if (!kept.ok()) return kept.status();
      if (!*kept) {
        --i;  // running_[i] is now the next request
        continue;
      }
      Result<StepRows> rows = rows_of(r, n);
      if (!rows.ok()) return rows.status();
      if (Status s = paged_.apply_page_copies(manager_.pending_copies()); !s.ok()) return s;
      manager_.clear_pending_copies();
      batch.push_back({&r, std::move(*rows)});
      budget -= n;
    }
    if (batch.empty()) return Status();  // every conversation is thinking

    if (o_.flip_k_page_at_step >= 0 && step_ >= o_.flip_k_page_at_step &&
        report_.faults_injected == 0) {
      if (Status s = inject_fault(batch); !s.ok()) return s;
    }
    std::vector<StepRows> rows;
    for (Planned& p : batch) rows.push_back(std::move(p.rows));
    Result<std::vector<std::vector<float>>> logits = paged_.forward(rows);
    if (!logits.ok()) return logits.status();
    for (size_t b = 0; b < batch.size(); ++b) {
      Request& r = *batch[b].request;
      const auto n = static_cast<int64_t>(rows[b].tokens.size());
      if (Status s = manager_.commit(r.seq, rows[b].tokens); !s.ok()) return s;
      report_.tokens_prefilled += std::clamp<int64_t>(r.prompt_len - r.cached, 0, n);
      r.cached += n;
      report_.tokens_computed += n;
    }
    apply_state_copies();
    return sample(batch, rows, *logits);
  }

  // Inverts page 0 of a verified sequence that reads it in this very step and whose page 0 is
  // full (no write of this step lands on it): the corruption must reach logits that are checked,
  // so the negative test cannot pass by accident. Waits for a later step when none qualifies.
  Status inject_fault(const std::vector<Planned>& batch) {
    if (fault_layer_ < 0) return Status();
    const auto g =
        static_cast<size_t>(paged_.groups().group_of_layer[static_cast<size_t>(fault_layer_)]);
    for (const Planned& p : batch) {
      if (!p.request->verify || !p.rows.want_logits || p.rows.start < o_.page_size) continue;
      if (Status s = paged_.flip_k_page(fault_layer_, p.rows.pages[g][0]); !s.ok()) return s;
      ++report_.faults_injected;
      return Status();
    }
    return Status();
  }

  Status sample(const std::vector<Planned>& batch, const std::vector<StepRows>& rows,
                std::vector<std::vector<float>>& logits) {
    size_t next_logits = 0;
    std::vector<Request*> finished;
    for (size_t b = 0; b < batch.size(); ++b) {
      if (!rows[b].want_logits) continue;
      Request& r = *batch[b].request;
      std::vector<float>& row = logits[next_logits++];
      const int32_t token = model::argmax(row);
      const int32_t alternative = runner_up(row, token);
      if (r.verify) {
        r.steps.push_back({static_cast<int64_t>(r.tokens.size()) - 1, std::move(row)});
      }
      r.tokens.push_back(token);
      ++r.generated;
      ++report_.tokens_decoded;
      if (r.generated == r.num_decode) {
        finished.push_back(&r);
        continue;
      }
      const Turn& turn =
          w_.conversations[static_cast<size_t>(r.conversation)].turns[static_cast<size_t>(r.turn)];
      if (!r.branch && turn.branch && r.generated == 1 &&
          static_cast<int64_t>(running_.size()) < o_.max_running) {
        if (Status s = fork(r, alternative); !s.ok()) return s;
      }
    }
    for (Request* r : finished) {
      if (Status s = finish(*r); !s.ok()) return s;
    }
    return Status();
  }

  // An alternative reply: shares every page of r (copy-on-write) and starts from the runner-up.
  Status fork(const Request& r, int32_t alternative) {
    const SeqId child = next_seq_++;
    if (Status s = manager_.fork(r.seq, child); !s.ok()) {
      // No state slot for the child: the alternative is skipped, nothing changed.
      return s.code() == Code::resource_exhausted ? Status() : s;
    }
    apply_state_copies();
    auto c = std::make_unique<Request>(r);
    c->branch = true;
    c->steps.clear();
    c->tokens.back() = alternative;
    c->seq = child;
    ++report_.forks;
    running_.push_back(std::move(c));
    return Status();
  }

  Status finish(Request& r) {
    if (Status s = manager_.free(r.seq); !s.ok()) return s;
    if (r.verify) {
      const Clock::time_point t0 = Clock::now();
      Result<VerifyResult> v = verify_steps(model_, r.tokens, r.steps, report_.tolerance);
      report_.verify_seconds += seconds_since(t0);
      if (!v.ok()) return v.status();
      ++report_.verified_requests;
      report_.checks += v->checks;
      report_.mismatches += v->mismatches;
      report_.max_error = std::max(report_.max_error, v->max_error);
      if (v->mismatches > 0 && report_.mismatch_lines.size() < kMaxMismatchLines) {
        report_.mismatch_lines.push_back(
            "conversation " + std::to_string(r.conversation) + " turn " + std::to_string(r.turn) +
            (r.branch ? " (alternative reply)" : "") + ": " + std::to_string(v->mismatches) +
            " of " + std::to_string(v->checks) + " steps over the tolerance, first at position " +
            std::to_string(v->first_bad_position) + " (|diff| " +
            std::to_string(v->first_bad_error) + ")");
      }
    }
    ++report_.requests;
    if (!r.branch) {
      ConversationState& s = conversations_[static_cast<size_t>(r.conversation)];
      s.history = r.tokens;
      s.busy = false;
      ++s.next_turn;
      const auto& turns = w_.conversations[static_cast<size_t>(r.conversation)].turns;
      if (s.next_turn < static_cast<int64_t>(turns.size())) {
        s.ready_step = step_ + turns[static_cast<size_t>(s.next_turn)].think_steps;
      }
      ++turns_done_;
    }
    const auto it = std::find_if(running_.begin(), running_.end(),
                                 [&](const std::unique_ptr<Request>& p) { return p.get() == &r; });
    running_.erase(it);
    return Status();
  }

  void record_point() {
    TimelinePoint p;
    p.step = step_;
    p.live = manager_.num_used_pages(0);
    p.cached = manager_.num_evictable_pages(0);
    p.free = manager_.num_free_pages(0);
    p.hit_rate = hit_rate(report_);
    p.preemptions = report_.preemptions;
    report_.peak_pages = std::max(report_.peak_pages, p.live);
    report_.timeline.push_back(p);
  }

  const EngineOptions& o_;
  const Workload& w_;
  const model::TinyModel& model_;
  PagedModel& paged_;
  BlockManager& manager_;
  EngineReport& report_;
  std::vector<ConversationState> conversations_;
  std::deque<std::unique_ptr<Request>> waiting_;
  std::vector<std::unique_ptr<Request>> running_;  // in admission order, oldest first
  int64_t step_ = 0;
  int64_t turns_done_ = 0;
  int64_t turns_total_ = 0;
  SeqId next_seq_ = 0;
  int64_t fault_layer_ = -1;  // the last full-attention layer
};

}  // namespace

Result<EngineReport> run_engine(const EngineOptions& options) {
  if (Status s = check_options(options); !s.ok()) return s;
  Result<Workload> workload = make_workload(options.workload);
  if (!workload.ok()) return workload.status();

  model::TinyModelConfig config;
  config.vocab = options.workload.vocab;
  config.seed = options.workload.seed;
  config.dtype = model_dtype(options.kv_dtype);
  config.layers = model::serving_layers();
  Result<std::unique_ptr<model::TinyModel>> model = model::TinyModel::create(config);
  if (!model.ok()) return model.status();

  ThreadPool pool(options.num_threads);
  const LayerGroups groups = layer_groups(config);
  PagedModelOptions po;
  po.kv_dtype = options.kv_dtype;
  po.device = options.device;
  po.page_size = options.page_size;
  po.group_pages.assign(groups.groups.size(), options.num_pages);
  po.max_batch = options.max_running;
  po.max_seq_len = workload->max_history() + options.page_size;
  po.max_step_tokens = options.max_step_tokens;
  Result<std::unique_ptr<PagedModel>> paged = PagedModel::create(**model, po, &pool);
  if (!paged.ok()) return paged.status();

  BlockManagerOptions mo;
  mo.page_size = options.page_size;
  mo.watermark_pages = options.watermark_pages;
  mo.fingerprint = {"kvcache-tiny-serving/seed-" + std::to_string(config.seed),
                    name(options.kv_dtype), options.page_size, 0};
  mo.groups = groups.groups;
  for (LayerGroupSpec& g : mo.groups) g.num_pages = options.num_pages;
  mo.max_pages_per_seq_hint = po.max_seq_len / options.page_size + 1;
  Result<std::unique_ptr<BlockManager>> manager = BlockManager::create(mo);
  if (!manager.ok()) return manager.status();

  EngineReport report;
  report.conversations = options.workload.num_conversations;
  report.page_size = options.page_size;
  report.budget_pages = options.num_pages;
  report.kv_dtype = options.kv_dtype;
  report.reference_dtype = config.dtype;
  report.tolerance = verify_tolerance(options.kv_dtype);
  report.pool_bytes = (*paged)->pool_bytes();
  report.attention_sku = (*paged)->attention_sku();
  for (const int64_t len : workload->final_lengths()) {
    report.contiguous_pages_needed += (len + options.page_size - 1) / options.page_size;
  }

  Scheduler scheduler(options, *workload, **model, **paged, **manager, report);
  if (Status s = scheduler.run(); !s.ok()) return s;

  const BlockManagerStats& stats = (*manager)->stats();
  report.evictions = stats.evictions;
  report.cow_copies = stats.cow_copies;
  report.hit_rate = hit_rate(report);
  for (int64_t g = 0; g < (*manager)->num_groups(); ++g) {
    report.leaked_pages += (*manager)->num_used_pages(g);
  }
  if (Status s = (*manager)->check_invariants(); !s.ok()) return s;
  report.tokens_per_second =
      report.engine_seconds > 0.0
          ? static_cast<double>(report.tokens_computed) / report.engine_seconds
          : 0.0;
  if (options.on_progress) options.on_progress(scheduler.progress());
  return report;
}

}  // namespace kvcache::serving
