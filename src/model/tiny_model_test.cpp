// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "model/tiny_model.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "kvcache/rotating_cache.h"

#include "testing/test_util.h"

namespace kvcache::model {
namespace {

using ::kvcache::testing::CacheFingerprint;
using ::kvcache::testing::fingerprint;
using ::kvcache::testing::has_error;
using ::kvcache::testing::seed_trace;
using ::kvcache::testing::test_seed;
using ::kvcache::testing::value_or_fail;

constexpr int64_t kSlidingLayer = 1;    // in default_layers()
constexpr int64_t kRecurrentLayer = 2;  // in default_layers()

std::unique_ptr<TinyModel> make_model(DType dtype, uint64_t seed = 1) {
  TinyModelConfig config;
  config.dtype = dtype;
  config.seed = seed;
  return value_or_fail(TinyModel::create(config));
}

std::unique_ptr<Session> make_session(const TinyModel& model) {
  return value_or_fail(Session::create(model));
}

std::vector<int32_t> random_tokens(std::mt19937& rng, int64_t n, int64_t vocab) {
  std::uniform_int_distribution<int32_t> dist(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (int32_t& t : out) t = dist(rng);
  return out;
}

// Row `row` of logits [n, vocab].
std::span<const float> row_of(const std::vector<float>& logits, int64_t row, int64_t vocab) {
  return std::span<const float>(logits).subspan(static_cast<size_t>(row * vocab),
                                                static_cast<size_t>(vocab));
}

// Every layer's state() bytes and offset: equal means the caches hold the same.
std::vector<CacheFingerprint> session_bytes(const Session& s) {
  std::vector<CacheFingerprint> out;
  for (int64_t l = 0; l < s.num_layers(); ++l) out.push_back(fingerprint(s.cache(l)));
  return out;
}

// Max |cached - forward_full| over the prefill positions and then every greedy decode step.
float decode_vs_full(DType dtype, int64_t prompt_len, int64_t steps, bool* wrapped) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  auto model = make_model(dtype);
  auto session = make_session(*model);
  const int64_t vocab = model->config().vocab;
  std::vector<int32_t> tokens = random_tokens(rng, prompt_len, vocab);

  auto cached = session->prefill(tokens);
  auto full = model->forward_full(tokens);
  EXPECT_OK(cached);
  EXPECT_OK(full);
  float worst = max_abs_diff(*cached, *full);
  int32_t next = argmax(row_of(*cached, prompt_len - 1, vocab));
  for (int64_t step = 0; step < steps; ++step) {
    tokens.push_back(next);
    auto logits = session->decode(next);
    auto reference = model->forward_full(tokens);
    EXPECT_OK(logits);
    EXPECT_OK(reference);
    const float diff = max_abs_diff(*logits, row_of(*reference, step + prompt_len, vocab));
    EXPECT_LE(diff, logit_tolerance(dtype)) << "decode step " << step;
    worst = std::max(worst, diff);
    next = argmax(*logits);
  }
  *wrapped = static_cast<const RotatingKVCache&>(session->cache(kSlidingLayer)).has_wrapped();
  return worst;
}

// forward_full rounds K, V and the recurrent states through the storage dtype exactly where the
// cache stores them; the tolerance covers the attention op's other summation order
// (logit_tolerance).
TEST(TinyModel, CachedDecodeMatchesFullRecomputeF32) {
  bool wrapped = false;
  EXPECT_LE(decode_vs_full(DType::f32, 8, 40, &wrapped), logit_tolerance(DType::f32));
  EXPECT_TRUE(wrapped) << "the decode must be long enough to wrap the sliding window";
}

TEST(TinyModel, CachedDecodeMatchesFullRecomputeBF16) {
  bool wrapped = false;
  EXPECT_LE(decode_vs_full(DType::bf16, 8, 40, &wrapped), logit_tolerance(DType::bf16));
  EXPECT_TRUE(wrapped);
}

TEST(TinyModel, CachedDecodeMatchesFullRecomputeF16) {
  bool wrapped = false;
  EXPECT_LE(decode_vs_full(DType::f16, 8, 40, &wrapped), logit_tolerance(DType::f16));
  EXPECT_TRUE(wrapped);
}

TEST(TinyModel, PrefillInChunksEqualsTokenByToken) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  auto model = make_model(DType::bf16);
  const int64_t vocab = model->config().vocab;
  // 30 tokens: longer than the 24-token window, so the one-chunk prefill wraps it.
  const std::vector<int32_t> prompt = random_tokens(rng, 30, vocab);
  const std::vector<int32_t> more = random_tokens(rng, 10, vocab);

  auto by_token = make_session(*model);
  std::vector<float> expected;
  for (const int32_t t : prompt) {
    auto logits = by_token->decode(t);
    ASSERT_OK(logits);
    expected.insert(expected.end(), logits->begin(), logits->end());
  }
  for (const std::vector<int64_t>& chunks :
       {std::vector<int64_t>{30}, std::vector<int64_t>{5, 20, 5}, std::vector<int64_t>{1, 29}}) {
    auto chunked = make_session(*model);
    std::vector<float> got;
    int64_t at = 0;
    for (const int64_t n : chunks) {
      auto logits = chunked->prefill(std::span<const int32_t>(prompt).subspan(
          static_cast<size_t>(at), static_cast<size_t>(n)));
      ASSERT_OK(logits);
      got.insert(got.end(), logits->begin(), logits->end());
      at += n;
    }
    EXPECT_LE(max_abs_diff(got, expected), logit_tolerance(DType::bf16))
        << "chunks of " << chunks.size();
    // Not byte-equal caches: the attention op's float sums depend on how queries are batched, and
    // later layers round their K/V through bf16 (logit_tolerance).
    for (int64_t l = 0; l < chunked->num_layers(); ++l) {
      EXPECT_EQ(chunked->cache(l).offset(), by_token->cache(l).offset());
    }
    // Decoding on from either gives the same logits.
    auto twin = make_session(*model);
    ASSERT_OK(twin->prefill(prompt));
    for (const int32_t t : more) {
      auto a = chunked->decode(t);
      auto b = twin->decode(t);
      ASSERT_OK(a);
      ASSERT_OK(b);
      EXPECT_LE(max_abs_diff(*a, *b), logit_tolerance(DType::bf16));
    }
  }
}

TEST(TinyModel, SpeculativeRollbackRestoresIdenticalLogits) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  for (const DType dtype : {DType::f32, DType::bf16}) {
    auto model = make_model(dtype);
    const int64_t vocab = model->config().vocab;
    auto drafting = make_session(*model);
    auto plain = make_session(*model);  // never drafts
    const std::vector<int32_t> prompt = random_tokens(rng, 10, vocab);
    ASSERT_OK(drafting->prefill(prompt));
    ASSERT_OK(plain->prefill(prompt));
    // Drafts of 5 at offsets 10, 17 (unwrapped window), 24 (the draft wraps it), 31 (wrapped).
    const std::vector<int32_t> next = random_tokens(rng, 28, vocab);
    int num_drafts = 0;
    for (size_t step = 0; step < next.size(); ++step) {
      if (step % 7 == 0) {
        const int64_t offset = drafting->offset();
        auto bytes = speculate(*drafting, random_tokens(rng, 5, vocab));
        ASSERT_OK(bytes);
        EXPECT_GT(*bytes, 0u);
        EXPECT_EQ(drafting->offset(), offset);
        EXPECT_EQ(session_bytes(*drafting), session_bytes(*plain)) << "step " << step;
        ++num_drafts;
      }
      auto a = drafting->decode(next[step]);
      auto b = plain->decode(next[step]);
      ASSERT_OK(a);
      ASSERT_OK(b);
      EXPECT_EQ(*a, *b) << "step " << step;
    }
    EXPECT_EQ(num_drafts, 4);
    EXPECT_TRUE(static_cast<const RotatingKVCache&>(drafting->cache(kSlidingLayer)).has_wrapped());
  }
}

// Adds `delta` to every element of a cache view whose leading indices are `prefix` (a whole
// token row, or one head of a state), in any storage dtype.
void corrupt(const TensorView& t, std::span<const int64_t> prefix, float delta) {
  std::array<int64_t, kMaxRank> index{};
  for (size_t i = 0; i < prefix.size(); ++i) index[i] = prefix[i];
  const int first_free = static_cast<int>(prefix.size());
  for (;;) {
    void* p = t.element_ptr(std::span<const int64_t>(index.data(), t.rank));
    float x = 0.0f;
    to_float(t.dtype, p, &x, 1);
    x += delta;
    from_float(&x, t.dtype, p, 1);
    int axis = t.rank - 1;
    for (; axis >= first_free; --axis) {
      if (++index[axis] < t.shape[axis]) break;
      index[axis] = 0;
    }
    if (axis < first_free) return;
  }
}

// The comparison is not vacuous: a corrupted cached token (or state head) in any kind of cache
// shows up, whatever the seed.
TEST(TinyModel, CorruptedCacheIsDetected) {
  const uint32_t seed = test_seed();
  SCOPED_TRACE(seed_trace(seed));
  std::mt19937 rng(seed);
  auto model = make_model(DType::bf16);
  const int64_t vocab = model->config().vocab;
  std::vector<int32_t> tokens = random_tokens(rng, 12, vocab);
  const int32_t next = tokens.back();
  tokens.pop_back();
  // state() views: attention [batch, tokens, heads, dim]; recurrent delta [batch, heads, dv, dk].
  const int64_t contiguous_token[] = {0, 2};  // layer 0: token 2, K and V
  const int64_t pinned_token[] = {0, 1};      // sliding layer: the pinned token 1, K and V
  const int64_t delta_head[] = {0, 1};        // recurrent: head 1 of the delta state
  for (const int64_t layer : {int64_t{0}, kSlidingLayer, kRecurrentLayer}) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    auto session = make_session(*model);
    ASSERT_OK(session->prefill(tokens));
    std::vector<TensorView> state = session->cache(layer).state();
    if (layer == 0) {
      corrupt(state[0], contiguous_token, 2.0f);
      corrupt(state[1], contiguous_token, 2.0f);
    }
    if (layer == kSlidingLayer) {
      corrupt(state[0], pinned_token, 2.0f);
      corrupt(state[1], pinned_token, 2.0f);
    }
    // The delta state decays: a change of 1 can move the logits by less than bf16's tolerance
    // (3.5e-3 at one seed in 300); 4 stays above twice the tolerance at every seed tried.
    if (layer == kRecurrentLayer) corrupt(state[1], delta_head, 4.0f);

    std::vector<int32_t> all = tokens;
    all.push_back(next);
    auto logits = session->decode(next);
    auto full = model->forward_full(all);
    ASSERT_OK(logits);
    ASSERT_OK(full);
    EXPECT_GT(max_abs_diff(*logits, row_of(*full, 11, vocab)), 2 * logit_tolerance(DType::bf16));
  }
}

TEST(TinyModel, WeightsAreDeterministicPerSeed) {
  auto a = make_model(DType::f32, 7);
  auto b = make_model(DType::f32, 7);
  auto c = make_model(DType::f32, 8);
  for (int64_t l = 0; l < a->num_layers(); ++l) {
    EXPECT_EQ(a->weights(l).mixer_norm, b->weights(l).mixer_norm);
    EXPECT_EQ(a->weights(l).w_down, b->weights(l).w_down);
    EXPECT_NE(a->weights(l).w_down, c->weights(l).w_down);
  }
  EXPECT_EQ(a->weights(0).attention.wq, b->weights(0).attention.wq);
  EXPECT_NE(a->weights(0).attention.wq, c->weights(0).attention.wq);
  EXPECT_EQ(a->weights(kRecurrentLayer).recurrent.w_qkv,
            b->weights(kRecurrentLayer).recurrent.w_qkv);
  EXPECT_NE(a->weights(kRecurrentLayer).recurrent.w_qkv,
            c->weights(kRecurrentLayer).recurrent.w_qkv);
  const std::vector<int32_t> tokens = {3, 1, 4, 1, 5, 9, 2, 6};
  auto la = a->forward_full(tokens);
  auto lb = b->forward_full(tokens);
  auto lc = c->forward_full(tokens);
  ASSERT_OK(la);
  ASSERT_OK(lb);
  ASSERT_OK(lc);
  EXPECT_EQ(*la, *lb);
  EXPECT_GT(max_abs_diff(*la, *lc), 1e-2f);
}

TEST(TinyModel, DefaultLayersCoverEveryCacheKind) {
  auto model = make_model(DType::f32);
  auto session = make_session(*model);
  ASSERT_EQ(session->num_layers(), 4);
  EXPECT_EQ(session->cache(0).kind(), CacheKind::contiguous);
  EXPECT_EQ(session->cache(kSlidingLayer).kind(), CacheKind::rotating);
  EXPECT_EQ(session->cache(kRecurrentLayer).kind(), CacheKind::recurrent);
  EXPECT_EQ(session->cache(3).kind(), CacheKind::contiguous);
  const AttentionConfig& sliding = model->config().layers[kSlidingLayer].attention;
  EXPECT_LT(sliding.window, 40);
  EXPECT_EQ(sliding.keep, 2);
}

TEST(TinyModel, RefusesBadConfigs) {
  const auto create_with = [](auto edit) {
    TinyModelConfig config;
    edit(config);
    return TinyModel::create(config).status();
  };
  EXPECT_TRUE(
      has_error(create_with([](TinyModelConfig& c) { c.layers[0].attention.num_q_heads = 3; }),
                Code::invalid_argument, "not a multiple of num_kv_heads 2"));
  EXPECT_TRUE(has_error(create_with([](TinyModelConfig& c) { c.layers[0].attention.head_dim = 7; }),
                        Code::invalid_argument, "layer 0 head_dim is 7, expected even"));
  EXPECT_TRUE(has_error(create_with([](TinyModelConfig& c) { c.layers[1].attention.keep = 24; }),
                        Code::invalid_argument, "expected 0 <= keep < window"));
  EXPECT_TRUE(
      has_error(create_with([](TinyModelConfig& c) { c.layers[2].recurrent.num_v_heads = 3; }),
                Code::invalid_argument, "layer 2 num_v_heads 3"));
  EXPECT_TRUE(has_error(create_with([](TinyModelConfig& c) { c.dtype = DType::int8; }),
                        Code::invalid_argument, "dtype is int8, expected f32, f16 or bf16"));
  EXPECT_TRUE(has_error(create_with([](TinyModelConfig& c) { c.layers.clear(); }),
                        Code::invalid_argument, "no layers"));
  EXPECT_TRUE(has_error(create_with([](TinyModelConfig& c) { c.vocab = 1; }),
                        Code::invalid_argument, "vocab is 1, expected >= 2"));
  EXPECT_TRUE(has_error(create_with([](TinyModelConfig& c) {
                          c.layers[0].attention.mrope_section = {4, 2, 1, 0};
                        }),
                        Code::invalid_argument,
                        "mrope_section sums to 7, expected 0 or 8 (head_dim / 2)"));
  EXPECT_TRUE(has_error(create_with([](TinyModelConfig& c) {
                          c.layers[0].attention.mrope_section = {4, 0, 4, 0};
                        }),
                        Code::invalid_argument, "mrope_section is {4, 0, 4, 0}, expected up to 3"));
  EXPECT_TRUE(has_error(create_with([](TinyModelConfig& c) {
                          c.layers[0].attention.mrope_section = {2, 2, 2, 2};
                        }),
                        Code::invalid_argument, "mrope_section is {2, 2, 2, 2}"));
}

// Multi-section RoPE rotates frequency pair i by the position stream of its section: pairs of
// section 0 as plain RoPE at pos, section 1 at pos / 16, section 2 at pos % 16
// (mrope_positions). All-zero sections are plain RoPE.
TEST(TinyModel, MultiSectionRopeUsesEachSectionsStream) {
  constexpr int64_t kHeads = 2, kDim = 16, kHalf = kDim / 2, kPos = 37;
  std::vector<float> x(kHeads * kDim);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.1f * static_cast<float>(i % 11) - 0.4f;
  const std::array<int64_t, 3> streams = mrope_positions(kPos);
  EXPECT_EQ(streams, (std::array<int64_t, 3>{37, 2, 5}));

  std::vector<float> plain = x, zero_sections = x;
  rope(plain.data(), kHeads, kDim, kPos, 10000.0);
  rope_sections(zero_sections.data(), kHeads, kDim, kPos, 10000.0, {});
  EXPECT_EQ(plain, zero_sections);

  std::vector<float> mrope = x;
  rope_sections(mrope.data(), kHeads, kDim, kPos, 10000.0, {4, 2, 2, 0});
  std::array<std::vector<float>, 3> by_stream;
  for (size_t s = 0; s < 3; ++s) {
    by_stream[s] = x;
    rope(by_stream[s].data(), kHeads, kDim, streams[s], 10000.0);
  }
  for (int64_t h = 0; h < kHeads; ++h) {
    for (int64_t i = 0; i < kHalf; ++i) {
      const size_t s = i < 4 ? 0 : i < 6 ? 1 : 2;
      for (const int64_t d : {i, i + kHalf}) {  // the pair (i, i + head_dim / 2)
        const auto at = static_cast<size_t>(h * kDim + d);
        EXPECT_EQ(mrope[at], by_stream[s][at]) << "head " << h << " dim " << d;
      }
    }
  }
  EXPECT_NE(mrope, plain);  // the streams differ, so the sections must show
}

TEST(TinyModel, RefusesBadTokensAndRollbacksWithoutChange) {
  auto model = make_model(DType::bf16);
  const std::vector<int32_t> bad = {1, 97};
  EXPECT_TRUE(has_error(model->forward_full(bad), Code::invalid_argument,
                        "TinyModel.forward_full: token 1 is 97, expected 0 <= token < 97"));
  EXPECT_TRUE(has_error(model->forward_full({}), Code::invalid_argument, "no tokens"));

  auto session = make_session(*model);
  EXPECT_TRUE(has_error(session->checkpoint(), Code::invalid_argument, "session is empty"));
  EXPECT_TRUE(has_error(speculate(*session, std::vector<int32_t>{1}), Code::invalid_argument,
                        "Session.checkpoint: the session is empty"));
  ASSERT_OK(session->prefill(std::vector<int32_t>{5, 6, 7, 8, 9}));
  const auto before = session_bytes(*session);
  EXPECT_TRUE(has_error(session->decode(-1), Code::invalid_argument,
                        "Session.decode: token is -1, expected 0 <= token < 97"));
  EXPECT_TRUE(has_error(session->prefill(bad), Code::invalid_argument, "Session.prefill: token 1"));
  EXPECT_TRUE(has_error(speculate(*session, bad), Code::invalid_argument, "speculate: token 1"));
  EXPECT_TRUE(has_error(speculate(*session, {}), Code::invalid_argument, "speculate: no tokens"));

  // A checkpoint from further along than the session, and one of another layer count.
  auto longer = make_session(*model);
  ASSERT_OK(longer->prefill(std::vector<int32_t>{5, 6, 7, 8, 9, 10, 11}));
  auto cp = longer->checkpoint();
  ASSERT_OK(cp);
  EXPECT_TRUE(has_error(session->rollback(*cp), Code::invalid_argument,
                        "Session.rollback: checkpoint offset is 7, expected 1 <= offset <= 5"));
  TinyModelConfig one_layer;
  one_layer.layers.resize(1);
  auto small = TinyModel::create(one_layer);
  ASSERT_OK(small);
  auto small_session = make_session(**small);
  ASSERT_OK(small_session->prefill(std::vector<int32_t>{1, 2}));
  auto small_cp = small_session->checkpoint();
  ASSERT_OK(small_cp);
  EXPECT_TRUE(has_error(session->rollback(*small_cp), Code::invalid_argument,
                        "checkpoint has 1 layers, expected 4"));
  EXPECT_EQ(session->offset(), 5);
  EXPECT_EQ(session_bytes(*session), before);
}

}  // namespace
}  // namespace kvcache::model
