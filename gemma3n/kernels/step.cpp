// The fused decode step: generated tokens through the whole text decoder in one call.
//
// Decoding a token of a small model is bound by per-operation overhead, not arithmetic: the
// Python forward (gemma3n/text.py) issues ~2,000 tensor operations a token for the embedded
// 15-layer model and ~4,000 for E2B, each costing several microseconds in the interpreter and
// dispatcher. This file is the same forward for a few consecutive tokens of one sequence (one
// decoded token, or a speculative draft to verify), written op for op in the same order with the
// same ATen operations (norms and RoPE as plain loops), the weight products on the kernels of
// decode.cpp (each weight read once for all the tokens), and no Python in between.
// It covers what generate.decode_one runs on a CPU with fp32 activations: any plan (MatFormer
// view), KV-shared layers, sliding windows, activation sparsity, dense and quantized weights.
// Everything else (prefill, batches, other dtypes and devices) stays on the Python forward,
// which the tests compare this against.
//
// The KV caches stay the Python ones (gemma3n/cache.py): before a call each owner layer has
// reserved room for one entry, the step writes the token's K/V and position there and attends
// over the layer's entries, and Python then advances the layer's length.

#include "kernels.h"

#include <c10/core/InferenceMode.h>

#include <cmath>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace gemma3n {
namespace {

using at::Tensor;

// A weight (dense or quantized) as the products read it; keeps its tensors alive.
struct Linear {
  Weight w;
  int64_t out = 0, in = 0;
  Tensor data, scales;
};

void check(bool ok, const std::string& what) { TORCH_CHECK(ok, "gemma3n fused step: ", what); }

Linear make_linear(const std::string& kind, Tensor w, c10::optional<Tensor> scales, int64_t group) {
  check(w.device().is_cpu() && w.dim() == 2 && (w.size(1) == 0 || w.stride(1) == 1) &&
            (w.size(0) <= 1 || w.stride(0) >= w.size(1)),
        "a weight must be a 2-D CPU tensor with contiguous rows");
  Linear l;
  l.data = w;
  l.out = w.size(0);
  l.in = w.size(1);
  if (kind == "f32" || kind == "bf16") {
    check(w.scalar_type() == (kind == "f32" ? at::kFloat : at::kBFloat16), "weight dtype does not match " + kind);
    l.w = {kind == "f32" ? F32 : BF16, w.data_ptr(), w.stride(0)};
    return l;
  }
  check(scales.has_value(), kind + " needs its scales");
  l.scales = scales->contiguous();
  check(l.scales.scalar_type() == at::kBFloat16, "scales must be bf16");
  if (kind == "int8") {
    check(w.scalar_type() == at::kChar && l.scales.dim() == 1 && l.scales.size(0) == w.size(0), "bad int8 weight");
    l.w = {INT8, w.data_ptr(), w.stride(0), l.scales.data_ptr()};
    return l;
  }
  check(kind == "int4", "unknown weight kind " + kind);
  l.in = 2 * w.size(1);
  check(w.scalar_type() == at::kByte && group > 0 && group % 32 == 0 && l.in % group == 0 && l.scales.dim() == 3 &&
            l.scales.size(0) == w.size(0) && l.scales.size(1) == l.in / group && l.scales.size(2) == 2,
        "bad int4 weight");
  l.w = {INT4, w.data_ptr(), w.stride(0), l.scales.data_ptr(), l.scales.stride(0) / 2, group};
  return l;
}

// x [..., K'] · W[rows]ᵀ over the first `cols` inputs: a row prefix (`rows` >= 0) or list (`list`).
// Every row of x is one activation row of the product (the weights are read once for all).
Tensor apply(const Linear& l, const Tensor& x, int64_t rows = -1, const Tensor* list = nullptr, int64_t cols = -1) {
  const int64_t K = cols < 0 ? l.in : cols;
  check(x.size(-1) == K && x.scalar_type() == at::kFloat, "activation size does not match the weight");
  int64_t N = rows < 0 ? l.out : rows;
  const int64_t* row_ptr = nullptr;
  if (list != nullptr) {
    row_ptr = list->data_ptr<int64_t>();
    N = list->numel();
  }
  const Tensor xc = x.contiguous();
  const int64_t M = K ? xc.numel() / K : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  Tensor y = at::empty(shape, at::kFloat);
  product(l.w, xc.data_ptr<float>(), M, K, y.data_ptr<float>(), row_ptr, N);
  return y;
}

// RMSNorm over the last dimension as layers.RMSNorm computes it, in fp32 (x·(mean(x²)+eps)^-½,
// then times the weight as is), as a plain loop: a norm is ~1 µs of work and ATen's version of
// it seven operations, each with its own dispatch and allocation, 11 norms a layer.
Tensor rms(const Tensor& x, const Tensor& w, double eps) {
  const Tensor xc = x.contiguous();
  Tensor out = at::empty_like(xc);
  const int64_t n = xc.size(-1), rows = n ? xc.numel() / n : 0;
  const float* src = xc.data_ptr<float>();
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  float* dst = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r, src += n, dst += n) {
    float part[8] = {};  // independent partial sums
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
      for (int t = 0; t < 8; ++t) part[t] += src[k + t] * src[k + t];
    for (; k < n; ++k) part[0] += src[k] * src[k];
    const float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + static_cast<float>(eps));
    for (k = 0; k < n; ++k) {
      const float y = src[k] * inv;
      dst[k] = wp ? y * wp[k] : y;
    }
  }
  return out;
}

// NeoX rotate-half RoPE of x [T, H, d] with each token's tables [T, d] (text.apply_rope).
Tensor rope(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const Tensor xc = x.contiguous();
  Tensor out = at::empty_like(xc);
  const int64_t T = xc.size(0), d = xc.size(-1), h = d / 2, heads = xc.numel() / (T * d);
  const float* src = xc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float *c = cos.data_ptr<float>() + t * d, *s = sin.data_ptr<float>() + t * d;
    for (int64_t r = 0; r < heads; ++r, src += d, dst += d)
      for (int64_t i = 0; i < h; ++i) {
        dst[i] = src[i] * c[i] + (-src[i + h]) * s[i];
        dst[i + h] = src[i + h] * c[i + h] + src[i] * s[i + h];
      }
  }
  return out;
}

Tensor match_magnitude(const Tensor& x, const Tensor& target) {
  return x * target / at::sqrt(at::mean(x.pow(2), -1, true).clamp_min(1e-5));
}

struct Layer {
  std::map<std::string, Linear> lin;  // q k v o gate up down laurel_l laurel_r router pred corr ple_gate ple_proj
  std::map<std::string, Tensor> norm;  // fp32 weights: input post_attn pre_ffn post_ffn q k router laurel ple out_scale
  bool owns_kv = false;
  const Linear& L(const char* name) const {
    auto it = lin.find(name);
    check(it != lin.end(), std::string("missing weight ") + name);
    return it->second;
  }
  Tensor N(const char* name) const {
    auto it = norm.find(name);
    check(it != norm.end(), std::string("missing norm ") + name);
    return it->second;
  }
};

// One layer of the plan: parent layer, FFN width, Gaussian top-k multiplier (NaN: dense), the plan
// layer whose K/V it borrows (-1: its own), sliding window (0: full attention), RoPE table index.
using PlanLayer = std::tuple<int64_t, int64_t, double, int64_t, int64_t, int64_t>;
// An owner layer's cache: K and V buffers [1, Hkv, capacity, d], positions [capacity], first live entry, length.
using KV = std::tuple<Tensor, Tensor, Tensor, int64_t, int64_t>;

struct Config {
  int64_t hidden, streams, active, head_dim, heads, kv_heads, ple_dim, parent_layers;
  double eps, softcap;
  bool correct_scale;
};

class Step {
 public:
  Step(std::vector<Layer> layers, std::vector<PlanLayer> plan, std::map<std::string, Linear> global_lin,
       std::vector<Linear> altup_in, std::vector<Linear> altup_out, std::map<std::string, Tensor> global_norm,
       std::vector<Tensor> inv_freq, std::map<std::string, double> cfg)
      : layers_(std::move(layers)),
        plan_(std::move(plan)),
        lin_(std::move(global_lin)),
        altup_in_(std::move(altup_in)),
        altup_out_(std::move(altup_out)),
        norm_(std::move(global_norm)),
        inv_freq_(std::move(inv_freq)) {
    auto get = [&](const char* k) {
      auto it = cfg.find(k);
      check(it != cfg.end(), std::string("missing config value ") + k);
      return it->second;
    };
    c_ = {static_cast<int64_t>(get("hidden")),    static_cast<int64_t>(get("streams")),
          static_cast<int64_t>(get("active")),    static_cast<int64_t>(get("head_dim")),
          static_cast<int64_t>(get("heads")),     static_cast<int64_t>(get("kv_heads")),
          static_cast<int64_t>(get("ple_dim")),   static_cast<int64_t>(get("parent_layers")),
          get("eps"),                             get("softcap"),
          get("correct_scale") != 0.0};
    check(static_cast<int64_t>(altup_in_.size()) == c_.streams - 1 && altup_in_.size() == altup_out_.size(),
          "AltUp projections do not match the stream count");
    for (const auto& p : plan_) {
      check(std::get<0>(p) >= 0 && std::get<0>(p) < static_cast<int64_t>(layers_.size()), "plan layer out of range");
      check(std::get<5>(p) >= 0 && std::get<5>(p) < static_cast<int64_t>(inv_freq_.size()), "bad RoPE index");
    }
  }

  // logits [T, V] for T consecutive tokens of one sequence from `pos` on: their embeddings `h0`
  // [T, D] (already scaled) and raw per-layer-embedding rows `ple` [T, parent_layers · P]. Each
  // owner layer's cache has room reserved for T entries.
  Tensor tokens(const Tensor& h0, const Tensor& ple, int64_t pos, const std::vector<c10::optional<KV>>& caches) {
    c10::InferenceMode guard;
    const int64_t T = h0.numel() / c_.hidden;
    return forward(h0, ple, at::arange(pos, pos + T, at::kLong), {Segment{T, caches}});
  }

  // logits [B, V] for one token of each of B sequences (a decode batch): row b at position
  // `positions[b]` with its own caches `caches[b]`. Each weight is read once for all of them.
  Tensor batch(const Tensor& h0, const Tensor& ple, const std::vector<int64_t>& positions,
               const std::vector<std::vector<c10::optional<KV>>>& caches) {
    c10::InferenceMode guard;
    check(positions.size() == caches.size(), "one position and one set of caches per sequence");
    std::vector<Segment> segments;
    for (const auto& c : caches) segments.push_back(Segment{1, c});
    return forward(h0, ple, at::tensor(positions, at::kLong), segments);
  }

 private:
  // A run of consecutive rows of one sequence and that sequence's caches (one slot per plan layer).
  struct Segment {
    int64_t rows;
    std::vector<c10::optional<KV>> caches;
  };
  using LayerKVs = std::vector<std::tuple<Tensor, Tensor, Tensor>>;  // per segment: K, V, key positions

  Tensor forward(const Tensor& h0_in, const Tensor& ple, const Tensor& positions, const std::vector<Segment>& segs) {
    const Config& c = c_;
    for (const auto& seg : segs)
      check(static_cast<int64_t>(seg.caches.size()) == static_cast<int64_t>(plan_.size()),
            "one cache slot per plan layer");
    const Tensor h0 = h0_in.to(at::kFloat).contiguous().view({-1, c.hidden});
    const int64_t T = h0.size(0);
    check(T >= 1 && positions.numel() == T && ple.numel() == T * c.parent_layers * c.ple_dim,
          "one position and one per-layer row per token");

    // per-layer inputs (text.py per_layer_inputs) [T, L, P]
    Tensor proj = apply(lin_.at("per_layer_model_projection"), h0) *
                  static_cast<float>(std::pow(static_cast<double>(c.hidden), -0.5));
    proj = rms(proj.view({T, c.parent_layers, c.ple_dim}), norm_.at("per_layer_projection_norm"), c.eps);
    const Tensor tok = ple.to(at::kFloat).view({T, c.parent_layers, c.ple_dim}) *
                       static_cast<float>(std::sqrt(static_cast<double>(c.ple_dim)));
    const Tensor pli = (proj + tok) * static_cast<float>(std::pow(2.0, -0.5));

    // AltUp expand: streams [N, T, D]
    const Tensor target = at::pow(at::mean(h0.pow(2), -1, true), 0.5);
    std::vector<Tensor> expanded{h0};
    for (const auto& p : altup_in_) expanded.push_back(match_magnitude(apply(p, h0), target));
    Tensor streams = at::stack(expanded);

    // RoPE tables of these positions [T, d], per table (text.rope_cos_sin)
    std::vector<std::pair<Tensor, Tensor>> ropes;
    for (const auto& inv : inv_freq_) {
      const Tensor freqs = positions.to(at::kFloat).unsqueeze(1) * inv.unsqueeze(0);
      const Tensor emb = at::cat({freqs, freqs}, -1);
      ropes.emplace_back(emb.cos(), emb.sin());
    }
    std::vector<LayerKVs> kv(plan_.size());  // per plan layer, per segment
    for (size_t j = 0; j < plan_.size(); ++j) streams = layer(j, streams, pli, positions, ropes, segs, kv);

    // AltUp collapse, final norm, tied head, soft-cap (text.py forward / lm_head)
    const Tensor first = streams.select(0, 0);
    const Tensor t = at::pow(at::mean(first.pow(2), -1, true), 0.5);
    std::vector<Tensor> collapsed{first};
    for (size_t k = 0; k < altup_out_.size(); ++k)
      collapsed.push_back(match_magnitude(apply(altup_out_[k], streams.select(0, k + 1)), t));
    const Tensor hidden = rms(at::stack(collapsed).mean(0), norm_.at("norm"), c.eps);
    Tensor logits = apply(lin_.at("head"), hidden);
    if (c.softcap > 0) logits = at::tanh(logits / c.softcap) * c.softcap;
    return logits;
  }

  // tanh(norm(x)/D @ W_rᵀ), x [T, D] -> [T, N]
  Tensor router(const Layer& l, const Tensor& x) const {
    Tensor normed = rms(x, l.N("router"), c_.eps);
    const float scale = static_cast<float>(1.0 / static_cast<double>(c_.hidden));
    float* p = normed.data_ptr<float>();
    for (int64_t k = 0; k < normed.numel(); ++k) p[k] *= scale;
    return at::tanh(apply(l.L("router"), normed));
  }

  Tensor layer(size_t j, const Tensor& streams, const Tensor& pli, const Tensor& positions,
               const std::vector<std::pair<Tensor, Tensor>>& ropes, const std::vector<Segment>& segs,
               std::vector<LayerKVs>& kv) {
    const auto& [parent, width, z, source, window, rope_idx] = plan_[j];
    const Layer& l = layers_[parent];
    const Config& c = c_;
    const int64_t a = c.active, T = streams.size(1);
    const auto& [cos, sin] = ropes[rope_idx];

    // AltUp predict: pred_i = S_i + Σ_j c_ij S_j, c = router(S_active) @ W_pᵀ read row-major,
    // as the reference's batched matmul [T, D, j] @ [T, j, i]
    const Tensor coefs = apply(l.L("pred"), router(l, streams.select(0, a))).view({T, c.streams, c.streams});
    const Tensor mixed = at::matmul(streams.permute({1, 2, 0}), coefs.transpose(-1, -2)).permute({2, 0, 1});
    const Tensor pred = mixed + streams;
    const Tensor active = pred.select(0, a);
    const Tensor xn = rms(active, l.N("input"), c.eps);
    const Tensor lau = xn + rms(apply(l.L("laurel_r"), apply(l.L("laurel_l"), xn)), l.N("laurel"), c.eps);

    // attention (scale 1.0: q_norm / k_norm replace 1/sqrt(d)), each sequence over its own keys
    const Tensor q = rope(rms(apply(l.L("q"), xn).view({T, c.heads, c.head_dim}), l.N("q"), c.eps), cos, sin);
    Tensor k, v;
    if (source < 0) {
      k = rope(rms(apply(l.L("k"), xn).view({T, c.kv_heads, c.head_dim}), l.N("k"), c.eps), cos, sin);
      v = rms(apply(l.L("v"), xn).view({T, c.kv_heads, c.head_dim}), Tensor(), c.eps);
    }
    kv[j].resize(segs.size());
    std::vector<Tensor> attended;
    int64_t r0 = 0;
    for (size_t s = 0; s < segs.size(); r0 += segs[s].rows, ++s) {
      const int64_t n = segs[s].rows;
      const Tensor pos = positions.narrow(0, r0, n);
      if (source < 0) {
        check(segs[s].caches[j].has_value(), "an owner layer needs its cache");
        const auto& [kbuf, vbuf, pbuf, start, length] = *segs[s].caches[j];
        check(length + n <= kbuf.size(2), "the cache has no room reserved");
        kbuf.narrow(2, length, n).copy_(k.narrow(0, r0, n).transpose(0, 1).unsqueeze(0));
        vbuf.narrow(2, length, n).copy_(v.narrow(0, r0, n).transpose(0, 1).unsqueeze(0));
        pbuf.narrow(0, length, n).copy_(pos);
        kv[j][s] = {kbuf.slice(2, start, length + n), vbuf.slice(2, start, length + n),
                    pbuf.slice(0, start, length + n)};
      } else {
        kv[j][s] = kv[source][s];
      }
      const auto& [keys, values, kpos] = kv[j][s];
      Tensor mask = kpos.unsqueeze(0) <= pos.unsqueeze(1);  // [n, S] (text.attention_mask)
      if (window > 0) mask = mask & (kpos.unsqueeze(0) > (pos - window).unsqueeze(1));
      const Tensor qs = q.narrow(0, r0, n).transpose(0, 1).unsqueeze(0);  // [1, Hq, n, d]
      attended.push_back(at::scaled_dot_product_attention(qs, keys, values, mask, 0.0, false, 1.0, true)
                             .squeeze(0)
                             .transpose(0, 1)
                             .reshape({n, -1}));
    }
    const Tensor attn = apply(l.L("o"), attended.size() == 1 ? attended[0] : at::cat(attended, 0));

    const Tensor h = (active + rms(attn, l.N("post_attn"), c.eps) + lau) / std::sqrt(2.0);

    // FFN over the plan's width; one token in a sparse layer reads only the up rows that fire
    const Tensor fin = rms(h, l.N("pre_ffn"), c.eps);
    Tensor gate = apply(l.L("gate"), fin, width);
    if (!std::isnan(z)) {
      const Tensor zt = at::scalar_tensor(z, at::kFloat);
      gate = at::relu(gate - (gate.mean(-1, true) + at::std(gate, {-1}, false, true) * zt));
    }
    Tensor ffn;
    if (!std::isnan(z) && T == 1) {
      const Tensor fired = gate.reshape({-1}).nonzero().squeeze(1);
      const Tensor up = apply(l.L("up"), fin, -1, &fired);
      Tensor hidden = at::zeros_like(gate);
      hidden.index_put_({at::indexing::Slice(), fired}, at::gelu(gate.index_select(1, fired), "tanh") * up);
      ffn = apply(l.L("down"), hidden, -1, nullptr, width);
    } else {
      ffn = apply(l.L("down"), at::gelu(gate, "tanh") * apply(l.L("up"), fin, width), -1, nullptr, width);
    }
    const Tensor act = h + rms(ffn, l.N("post_ffn"), c.eps);

    // AltUp correct, then the per-layer input into streams 1..N-1
    const Tensor gamma = apply(l.L("corr"), router(l, act)) + 1.0;  // [T, N]
    const Tensor innovation = act - active;
    Tensor corrected = innovation.unsqueeze(0) * gamma.transpose(0, 1).unsqueeze(-1) + pred;
    Tensor first = corrected.select(0, a);
    if (c.correct_scale) first = first * l.N("out_scale");
    const Tensor gated = at::gelu(apply(l.L("ple_gate"), first), "tanh") * pli.select(1, parent);
    corrected.slice(0, 1) += rms(apply(l.L("ple_proj"), gated), l.N("ple"), c.eps);
    return corrected;
  }

  std::vector<Layer> layers_;
  std::vector<PlanLayer> plan_;
  std::map<std::string, Linear> lin_;
  std::vector<Linear> altup_in_, altup_out_;
  std::map<std::string, Tensor> norm_;
  std::vector<Tensor> inv_freq_;
  Config c_{};
};

}  // namespace

void register_step(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Linear>(m, "StepLinear", "a weight for the fused step: kind f32, bf16, int8 or int4")
      .def(py::init(&make_linear), py::arg("kind"), py::arg("weight"), py::arg("scales") = py::none(),
           py::arg("group") = 0);
  py::class_<Layer>(m, "StepLayer", "one decoder layer's weights for the fused step")
      .def(py::init([](std::map<std::string, Linear> lin, std::map<std::string, Tensor> norm, bool owns_kv) {
             Layer l;
             l.lin = std::move(lin);
             l.norm = std::move(norm);
             l.owns_kv = owns_kv;
             return l;
           }),
           py::arg("linears"), py::arg("norms"), py::arg("owns_kv"));
  py::class_<Step>(m, "Step", "one token through the text decoder (see step.cpp)")
      .def(py::init<std::vector<Layer>, std::vector<PlanLayer>, std::map<std::string, Linear>, std::vector<Linear>,
                    std::vector<Linear>, std::map<std::string, Tensor>, std::vector<Tensor>,
                    std::map<std::string, double>>())
      .def("tokens", &Step::tokens, py::arg("h0"), py::arg("ple"), py::arg("position"), py::arg("caches"),
           py::call_guard<py::gil_scoped_release>())
      .def("batch", &Step::batch, py::arg("h0"), py::arg("ple"), py::arg("positions"), py::arg("caches"),
           py::call_guard<py::gil_scoped_release>());
}

}  // namespace gemma3n
