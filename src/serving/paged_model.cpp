// Copyright kvcache authors. SPDX-License-Identifier: Apache-2.0
#include "serving/paged_model.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <optional>
#include <string>
#include <utility>

#include "kvcache/attention.h"
#include "kvcache/buffer.h"
#include "kvcache/copy_pages.h"
#include "kvcache/paged_kv.h"
#include "kvcache/qkv_rope_write.h"
#include "kvcache/rope.h"
#include "kvcache/tensor.h"

#include "serving/device_arrays.h"

namespace kvcache::serving {
namespace {

using model::LayerKind;

size_t sz(int64_t n) { return static_cast<size_t>(n); }

// A zero-filled buffer of num_bytes (at least one byte, so every pool has an address).
Result<Buffer> zeroed(Device device, size_t num_bytes) {
  num_bytes = std::max<size_t>(num_bytes, 1);
  Result<Buffer> b = Buffer::allocate(device, num_bytes);
  if (!b.ok()) return b.status();
  const std::vector<std::byte> zeros(num_bytes);
  if (Status s = copy_bytes(b->data(), device, zeros.data(), Device::cpu(), num_bytes); !s.ok()) {
    return s;
  }
  return b;
}

struct AttentionLayer {
  PagedKVDesc desc;
  Buffer k, v, k_scales, v_scales;
  PagedKV kv;
  std::optional<QkvRopeWritePlan> write;
  std::optional<ExtendAttentionPlan> extend;
  std::optional<DecodeAttentionPlan> decode;
  std::optional<CopyPagesPlan> copy;
  std::vector<float> w_qkv;  // [wq; wk; wv] stacked: [(Hq + 2 Hkv) * head_dim, d_model]
  std::span<const float> q_norm, k_norm;  // [head_dim] each, on the device (Rep::weights)
};

// States live in host memory: the recurrent mixer is the model's host code in this demo.
struct RecurrentLayer {
  int64_t conv_elems = 0, delta_elems = 0;  // per slot
  std::vector<float> conv, delta;           // [slots, conv_elems], [slots, delta_elems]
};

}  // namespace

LayerGroups layer_groups(const model::TinyModelConfig& config) {
  LayerGroups out;
  for (const model::LayerConfig& l : config.layers) {
    LayerGroupSpec spec;
    if (l.kind == LayerKind::sliding_window) {
      spec.kind = LayerGroupKind::sliding_window;
      spec.window = l.attention.window;
    } else if (l.kind == LayerKind::recurrent) {
      spec.kind = LayerGroupKind::recurrent;
    }
    auto found = std::find_if(out.groups.begin(), out.groups.end(), [&](const LayerGroupSpec& g) {
      return g.kind == spec.kind && g.window == spec.window;
    });
    if (found == out.groups.end()) found = out.groups.insert(out.groups.end(), spec);
    out.group_of_layer.push_back(static_cast<int32_t>(found - out.groups.begin()));
  }
  return out;
}

namespace {
// Everything a PagedModel owns (Rep is this; the step helpers below take it by this name).
struct ModelState {
  const model::TinyModel* model = nullptr;
  PagedModelOptions options;
  Stream stream;
  LayerGroups groups;
  std::vector<std::optional<AttentionLayer>> attention;  // [num_layers]
  std::vector<std::optional<RecurrentLayer>> recurrent;  // [num_layers]
  Buffer workspace;  // on the device, sized for every plan
  DeviceArrays weights{Device::cpu()};  // the QK-norm weights on the device; never reset
  DeviceArrays step{Device::cpu()};     // one call's arguments; reset by each call

  std::span<std::byte> workspace_span() {
    return {static_cast<std::byte*>(workspace.data()), workspace.num_bytes()};
  }
};
}  // namespace

struct PagedModel::Rep : ModelState {};

PagedModel::PagedModel(std::unique_ptr<Rep> rep) : rep_(std::move(rep)) {}
PagedModel::~PagedModel() = default;

const LayerGroups& PagedModel::groups() const { return rep_->groups; }

Result<std::unique_ptr<PagedModel>> PagedModel::create(const model::TinyModel& model,
                                                       const PagedModelOptions& options,
                                                       ThreadPool* pool) {
  auto rep = std::make_unique<Rep>();
  rep->model = &model;
  rep->options = options;
  // CUDA: the default stream (the ThreadPool is the CPU's).
  rep->stream = Stream{options.device, options.device.is_cpu() ? pool : nullptr, nullptr};
  rep->weights = DeviceArrays(options.device);
  rep->step = DeviceArrays(options.device);
  rep->groups = layer_groups(model.config());
  if (options.group_pages.size() != rep->groups.groups.size()) {
    return Status::invalid_argument(
        "PagedModel.create: " + std::to_string(options.group_pages.size()) +
        " group sizes, expected " + std::to_string(rep->groups.groups.size()));
  }
  const model::TinyModelConfig& config = model.config();
  size_t workspace_bytes = 0;
  // Every plan first: an unavailable device answers before any pool is allocated.
  for (size_t l = 0; l < config.layers.size(); ++l) {
    const model::LayerConfig& lc = config.layers[l];
    const int64_t pages = options.group_pages[sz(rep->groups.group_of_layer[l])];
    if (lc.kind == LayerKind::recurrent) {
      rep->attention.emplace_back();
      RecurrentLayer r;
      r.conv_elems = lc.recurrent.conv_tail * model::conv_dim(lc.recurrent);
      r.delta_elems = lc.recurrent.num_v_heads * lc.recurrent.head_v_dim * lc.recurrent.head_k_dim;
      r.conv.assign(sz(pages * r.conv_elems), 0.0f);
      r.delta.assign(sz(pages * r.delta_elems), 0.0f);
      rep->recurrent.emplace_back(std::move(r));
      continue;
    }
    rep->recurrent.emplace_back();
    const model::AttentionConfig& c = lc.attention;
    AttentionLayer a;
    a.desc.kv = {c.num_kv_heads, c.head_dim, c.head_dim, options.kv_dtype, options.kv_dtype};
    a.desc.pages = {pages, options.page_size, PageLayout::nhd};

    QkvRopeWriteDesc wd;
    wd.num_q_heads = c.num_q_heads;
    wd.cache = a.desc;
    wd.qkv_dtype = wd.q_dtype = DType::f32;
    wd.qk_norm = c.qk_norm;
    wd.rope.base = c.rope_theta;
    wd.rope.max_position = std::max<int64_t>(options.max_seq_len, 1);
    for (size_t s = 0; s < c.mrope_section.size(); ++s)
      wd.rope.mrope_section[s] = c.mrope_section[s];
    Result<QkvRopeWritePlan> write = QkvRopeWritePlan::select(wd, options.device);
    if (!write.ok()) return write.status();
    a.write = *write;

    AttentionDesc ad;
    ad.num_q_heads = c.num_q_heads;
    ad.kv = a.desc.kv;
    ad.pages = a.desc.pages;
    ad.q_dtype = ad.o_dtype = DType::f32;
    if (lc.kind == LayerKind::sliding_window) {
      ad.window = c.window - c.keep;
      ad.sink_tokens = c.keep;
    }
    ad.max_batch = options.max_batch;
    ad.max_seq_len = options.max_seq_len;
    ad.max_q_tokens = options.max_step_tokens;
    Result<ExtendAttentionPlan> extend = ExtendAttentionPlan::select(ad, options.device);
    if (!extend.ok()) return extend.status();
    Result<DecodeAttentionPlan> decode = DecodeAttentionPlan::select(ad, options.device);
    if (!decode.ok()) return decode.status();
    Result<CopyPagesPlan> copy = CopyPagesPlan::select({a.desc}, options.device);
    if (!copy.ok()) return copy.status();
    a.extend = *extend;
    a.decode = *decode;
    a.copy = *copy;
    workspace_bytes = std::max({workspace_bytes, extend->workspace_size(), decode->workspace_size(),
                                write->workspace_size(), copy->workspace_size()});

    const model::AttentionWeights& w = model.weights(static_cast<int64_t>(l)).attention;
    if (c.qk_norm) {
      Result<std::span<const float>> q_norm = rep->weights.stage(w.q_norm);
      if (!q_norm.ok()) return q_norm.status();
      Result<std::span<const float>> k_norm = rep->weights.stage(w.k_norm);
      if (!k_norm.ok()) return k_norm.status();
      a.q_norm = *q_norm;
      a.k_norm = *k_norm;
    }
    a.w_qkv = w.wq;
    a.w_qkv.insert(a.w_qkv.end(), w.wk.begin(), w.wk.end());
    a.w_qkv.insert(a.w_qkv.end(), w.wv.begin(), w.wv.end());
    rep->attention.emplace_back(std::move(a));
  }
  for (std::optional<AttentionLayer>& a : rep->attention) {
    if (!a) continue;
    const KVFormat& f = a->desc.kv;
    const int64_t rows = a->desc.pages.num_pages * a->desc.pages.page_size;
    const int64_t shape[] = {a->desc.pages.num_pages, a->desc.pages.page_size, f.num_kv_heads,
                             f.head_dim};
    for (auto [buffer, view] : {std::pair{&a->k, &a->kv.k_pages}, {&a->v, &a->kv.v_pages}}) {
      Result<Buffer> b = zeroed(options.device,
                                sz(rows * f.num_kv_heads * f.head_dim) * size_of(options.kv_dtype));
      if (!b.ok()) return b.status();
      *buffer = std::move(*b);
      *view = TensorView::contiguous(buffer->data(), options.kv_dtype, shape, options.device);
    }
    if (is_quantized(options.kv_dtype)) {
      for (auto [buffer, view] :
           {std::pair{&a->k_scales, &a->kv.k_scales}, {&a->v_scales, &a->kv.v_scales}}) {
        Result<Buffer> b = zeroed(options.device, sz(rows * f.num_kv_heads) * sizeof(float));
        if (!b.ok()) return b.status();
        *buffer = std::move(*b);
        *view =
            TensorView::contiguous(buffer->data(), DType::f32, std::span(shape, 3), options.device);
      }
    }
  }
  Result<Buffer> ws = zeroed(options.device, workspace_bytes);
  if (!ws.ok()) return ws.status();
  rep->workspace = std::move(*ws);
  return std::unique_ptr<PagedModel>(new PagedModel(std::move(rep)));
}

namespace {

// What every layer of one step shares: the batch's rows and, on the ops' device, the sequence
// lengths and query offsets.
struct StepShape {
  std::span<const StepRows> batch;
  int64_t rows = 0;
  bool decode_only = true;              // one new token per sequence: the decode op
  std::vector<int32_t> q_indptr = {0};  // [batch + 1], host
  std::span<const int32_t> q_indptr_dev, seq_lens_dev;
};

// An attention layer's host arguments: positions (stream-major for multi-section RoPE), the
// new tokens' slots and the page table of the layer's group.
struct LayerIndex {
  std::vector<int32_t> positions;
  std::vector<int64_t> slots;
  std::vector<int32_t> indptr = {0}, indices;
};

LayerIndex layer_index(const StepShape& step, const model::AttentionConfig& c, size_t group) {
  LayerIndex out;
  const bool mrope = c.mrope_section[0] != 0;
  const size_t streams = mrope ? 3 : 1;
  out.positions.resize(sz(step.rows) * streams);
  size_t r = 0;
  for (const StepRows& b : step.batch) {
    for (size_t i = 0; i < b.tokens.size(); ++i, ++r) {
      const int64_t pos = b.start + static_cast<int64_t>(i);
      const std::array<int64_t, 3> p = model::mrope_positions(pos);
      for (size_t s = 0; s < streams; ++s) {
        out.positions[s * sz(step.rows) + r] = static_cast<int32_t>(mrope ? p[s] : pos);
      }
    }
    out.slots.insert(out.slots.end(), b.slots[group].begin(), b.slots[group].end());
    // Pages that left the window stay in the table as kNullPage; the op never reads them (the
    // window skips them), but it validates every index, so they point at page 0.
    for (const int32_t p : b.pages[group]) out.indices.push_back(p == kNullPage ? 0 : p);
    out.indptr.push_back(static_cast<int32_t>(out.indices.size()));
  }
  return out;
}

// One attention layer of a step: project, write K/V to the pages (qkv_rope_write), attend over
// the page tables, add the output projection to x. Every op argument goes through rep.step, so
// the same code runs on the CPU (no copies) and on CUDA (staged to and from device memory).
Status attention_layer(ModelState& rep, const StepShape& step, int64_t l,
                       const std::vector<float>& h, std::vector<float>& x) {
  const model::TinyModel& m = *rep.model;
  const model::AttentionConfig& c = m.config().layers[sz(l)].attention;
  AttentionLayer& a = *rep.attention[sz(l)];
  DeviceArrays& dev = rep.step;
  const Device device = rep.options.device;
  const int64_t hd = c.head_dim;
  const int64_t width = (c.num_q_heads + 2 * c.num_kv_heads) * hd;
  std::vector<float> packed(sz(step.rows * width));
  model::matmul(h.data(), step.rows, a.w_qkv.data(), m.config().d_model, width, packed.data());
  const LayerIndex index = layer_index(step, c, sz(rep.groups.group_of_layer[sz(l)]));

  Result<std::span<const float>> qkv = dev.stage(packed);
  Result<std::span<const int32_t>> positions = dev.stage(index.positions);
  Result<std::span<const int64_t>> slots = dev.stage(index.slots);
  Result<std::span<const int32_t>> indptr = dev.stage(index.indptr);
  Result<std::span<const int32_t>> indices = dev.stage(index.indices);
  std::vector<float> q(sz(step.rows * c.num_q_heads * hd)), o(q.size());
  Result<float*> q_dev = dev.output_for(std::span(q));
  Result<float*> o_dev = dev.output_for(std::span(o));
  for (const Status& s : {qkv.status(), positions.status(), slots.status(), indptr.status(),
                          indices.status(), q_dev.status(), o_dev.status()}) {
    if (!s.ok()) return s;
  }

  QkvRopeWriteArgs w;
  // The ops only read qkv and the norm weights.
  w.qkv = TensorView::contiguous(const_cast<float*>(qkv->data()), DType::f32, {step.rows, width},
                                 device);
  w.positions = *positions;
  if (c.qk_norm) {
    w.q_norm_weight =
        TensorView::contiguous(const_cast<float*>(a.q_norm.data()), DType::f32, {hd}, device);
    w.k_norm_weight =
        TensorView::contiguous(const_cast<float*>(a.k_norm.data()), DType::f32, {hd}, device);
  }
  w.q_out = TensorView::contiguous(*q_dev, DType::f32, {step.rows, c.num_q_heads, hd}, device);
  w.slots.slot_mapping = *slots;
  w.kv = a.kv;
  const std::span<std::byte> workspace = rep.workspace_span();
  if (Status s = a.write->run(rep.stream, workspace, w); !s.ok()) return s;

  AttentionArgs args;
  args.q = w.q_out;
  args.o = TensorView::contiguous(*o_dev, DType::f32, {step.rows, c.num_q_heads, hd}, device);
  args.seq_lens = step.seq_lens_dev;
  args.paged = a.kv;
  args.page_table = {*indptr, *indices};
  if (step.decode_only) {
    if (Status s = a.decode->run(rep.stream, workspace, args); !s.ok()) return s;
  } else {
    args.q_indptr = step.q_indptr_dev;
    if (Status s = a.extend->run(rep.stream, workspace, args); !s.ok()) return s;
  }
  if (Status s = dev.download(std::span(o), *o_dev); !s.ok()) return s;
  m.output_into(l, o, step.rows, x);
  return Status();
}

// One recurrent layer of a step, on the host: each sequence's state slot advances in place.
void recurrent_layer(ModelState& rep, const StepShape& step, int64_t l, const std::vector<float>& h,
                     std::vector<float>& x) {
  const model::TinyModel& m = *rep.model;
  const int64_t d = m.config().d_model;
  const size_t group = sz(rep.groups.group_of_layer[sz(l)]);
  RecurrentLayer& r = *rep.recurrent[sz(l)];
  int64_t r0 = 0;
  for (const StepRows& b : step.batch) {
    const auto n = static_cast<int64_t>(b.tokens.size());
    const auto slot = static_cast<size_t>(b.state[group]);
    const auto conv_at = r.conv.begin() + static_cast<std::ptrdiff_t>(slot * sz(r.conv_elems));
    const auto delta_at = r.delta.begin() + static_cast<std::ptrdiff_t>(slot * sz(r.delta_elems));
    std::vector<float> conv(conv_at, conv_at + r.conv_elems);
    std::vector<float> delta(delta_at, delta_at + r.delta_elems);
    const std::vector<float> hb(h.begin() + r0 * d, h.begin() + (r0 + n) * d);
    std::vector<float> y(sz(n * d), 0.0f);
    m.recurrent_into(l, hb, n, conv, delta, y);
    for (int64_t i = 0; i < n * d; ++i) x[sz(r0 * d + i)] += y[sz(i)];
    std::copy(conv.begin(), conv.end(), conv_at);
    std::copy(delta.begin(), delta.end(), delta_at);
    r0 += n;
  }
}

}  // namespace

Result<std::vector<std::vector<float>>> PagedModel::forward(std::span<const StepRows> batch) {
  Rep& rep = *rep_;
  const model::TinyModel& m = *rep.model;
  const model::TinyModelConfig& config = m.config();
  const int64_t d = config.d_model;
  // The previous call ended with check_device_errors (a sync): its device memory is free again.
  rep.step.reset();
  StepShape step;
  step.batch = batch;
  std::vector<int32_t> tokens, seq_lens;
  for (const StepRows& b : batch) {
    tokens.insert(tokens.end(), b.tokens.begin(), b.tokens.end());
    step.q_indptr.push_back(static_cast<int32_t>(tokens.size()));
    seq_lens.push_back(static_cast<int32_t>(b.start + static_cast<int64_t>(b.tokens.size())));
    step.decode_only = step.decode_only && b.tokens.size() == 1;
  }
  step.rows = static_cast<int64_t>(tokens.size());
  Result<std::span<const int32_t>> q_indptr = rep.step.stage(step.q_indptr);
  if (!q_indptr.ok()) return q_indptr.status();
  Result<std::span<const int32_t>> lens = rep.step.stage(seq_lens);
  if (!lens.ok()) return lens.status();
  step.q_indptr_dev = *q_indptr;
  step.seq_lens_dev = *lens;

  std::vector<float> x = m.embed(tokens);
  for (int64_t l = 0; l < m.num_layers(); ++l) {
    const std::vector<float> h = m.norm_rows(x, step.rows, m.weights(l).mixer_norm);
    if (config.layers[sz(l)].kind == LayerKind::recurrent) {
      recurrent_layer(rep, step, l, h, x);
    } else if (Status s = attention_layer(rep, step, l, h, x); !s.ok()) {
      return s;
    }
    m.mlp_into(l, x, step.rows);
  }
  // Kernel-detected errors (a bad slot or page) surface here; OK at once on the CPU.
  if (Status s = check_device_errors(rep.stream); !s.ok()) return s;

  // Logits of the last row of each sequence that asked for them.
  std::vector<float> last;
  for (size_t b = 0; b < batch.size(); ++b) {
    if (!batch[b].want_logits) continue;
    const auto at = x.begin() + static_cast<std::ptrdiff_t>(sz(step.q_indptr[b + 1] - 1) * sz(d));
    last.insert(last.end(), at, at + d);
  }
  const auto num_out = static_cast<int64_t>(last.size()) / d;
  const std::vector<float> all = m.logits(last, num_out);
  std::vector<std::vector<float>> out;
  const auto vocab = static_cast<std::ptrdiff_t>(config.vocab);
  for (int64_t i = 0; i < num_out; ++i) {
    out.emplace_back(all.begin() + i * vocab, all.begin() + (i + 1) * vocab);
  }
  return out;
}

Status PagedModel::apply_page_copies(std::span<const PageCopy> copies) {
  if (copies.empty()) return Status();
  Rep& rep = *rep_;
  rep.step.reset();  // the last forward / apply synchronized
  for (const PageCopy& c : copies) {
    const int32_t src[] = {c.src}, dst[] = {c.dst};
    Result<std::span<const int32_t>> src_dev = rep.step.stage(std::span<const int32_t>(src));
    Result<std::span<const int32_t>> dst_dev = rep.step.stage(std::span<const int32_t>(dst));
    if (!src_dev.ok()) return src_dev.status();
    if (!dst_dev.ok()) return dst_dev.status();
    for (size_t l = 0; l < rep.attention.size(); ++l) {
      if (!rep.attention[l] || rep.groups.group_of_layer[l] != c.group) continue;
      AttentionLayer& a = *rep.attention[l];
      const CopyPagesArgs args{a.kv, *src_dev, *dst_dev};
      if (Status s = a.copy->run(rep.stream, rep.workspace_span(), args); !s.ok()) return s;
    }
  }
  return check_device_errors(rep.stream);
}

void PagedModel::apply_state_copies(std::span<const StateCopy> copies) {
  for (const StateCopy& c : copies) {
    for (size_t l = 0; l < rep_->recurrent.size(); ++l) {
      if (!rep_->recurrent[l] || rep_->groups.group_of_layer[l] != c.group) continue;
      RecurrentLayer& r = *rep_->recurrent[l];
      for (auto [pool, elems] : {std::pair{&r.conv, r.conv_elems}, {&r.delta, r.delta_elems}}) {
        float* dst = pool->data() + sz(c.dst) * sz(elems);
        if (c.src == kNoStateSlot) {
          std::fill(dst, dst + elems, 0.0f);
        } else {
          const float* src = pool->data() + sz(c.src) * sz(elems);
          std::copy(src, src + elems, dst);
        }
      }
    }
  }
}

Status PagedModel::flip_k_page(int64_t layer, PageId page) {
  if (layer < 0 || layer >= static_cast<int64_t>(rep_->attention.size()) ||
      !rep_->attention[sz(layer)]) {
    return Status::invalid_argument("PagedModel.flip_k_page: layer " + std::to_string(layer) +
                                    " has no K/V, expected an attention layer");
  }
  AttentionLayer& a = *rep_->attention[sz(layer)];
  if (page < 0 || page >= a.desc.pages.num_pages) {
    return Status::invalid_argument("PagedModel.flip_k_page: page " + std::to_string(page) +
                                    ", expected in [0, " + std::to_string(a.desc.pages.num_pages) +
                                    ")");
  }
  const size_t page_bytes =
      sz(a.desc.pages.page_size * a.desc.kv.num_kv_heads * a.desc.kv.head_dim) *
      size_of(a.desc.kv.k_dtype);
  std::vector<std::byte> bytes(page_bytes);
  std::byte* at = static_cast<std::byte*>(a.k.data()) + sz(page) * page_bytes;
  const Device device = rep_->options.device;
  if (Status s = copy_bytes(bytes.data(), Device::cpu(), at, device, page_bytes); !s.ok()) return s;
  for (std::byte& b : bytes) b = ~b;
  return copy_bytes(at, device, bytes.data(), Device::cpu(), page_bytes);
}

const char* PagedModel::attention_sku() const {
  for (const auto& a : rep_->attention) {
    if (a) return a->extend->sku();
  }
  return "none";
}

size_t PagedModel::pool_bytes() const {
  size_t total = 0;
  for (const auto& a : rep_->attention) {
    if (a)
      total +=
          a->k.num_bytes() + a->v.num_bytes() + a->k_scales.num_bytes() + a->v_scales.num_bytes();
  }
  for (const auto& r : rep_->recurrent) {
    if (r) total += (r->conv.size() + r->delta.size()) * sizeof(float);
  }
  return total;
}

}  // namespace kvcache::serving
