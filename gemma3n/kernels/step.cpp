// The fused decode step: one generated token through the whole text decoder in one call.
//
// Decoding a token of a small model is bound by per-operation overhead, not arithmetic: the
// Python forward (gemma3n/text.py) issues ~2,000 tensor operations a token for the embedded
// 15-layer model and ~4,000 for E2B, each costing several microseconds in the interpreter and
// dispatcher. This file is the same forward for one token of one sequence, written op for op
// in the same order with the same ATen operations (so it rounds as the Python path does), the
// weight products on the kernels of decode.cpp, and no Python in between: one call per token.
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

// x [K'] · W[rows]ᵀ over the first `cols` inputs: a row prefix (`rows` >= 0) or list (`list`).
Tensor apply(const Linear& l, const Tensor& x, int64_t rows = -1, const Tensor* list = nullptr, int64_t cols = -1) {
  const int64_t K = cols < 0 ? l.in : cols;
  check(x.numel() == K && x.scalar_type() == at::kFloat, "activation size does not match the weight");
  int64_t N = rows < 0 ? l.out : rows;
  const int64_t* row_ptr = nullptr;
  if (list != nullptr) {
    row_ptr = list->data_ptr<int64_t>();
    N = list->numel();
  }
  Tensor xc = x.contiguous();
  Tensor y = at::empty({N}, at::kFloat);
  product(l.w, xc.data_ptr<float>(), 1, K, y.data_ptr<float>(), row_ptr, N);
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

// NeoX rotate-half RoPE of x [H, d] with this position's tables [d] (text.apply_rope).
Tensor rope(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const Tensor xc = x.contiguous();
  Tensor out = at::empty_like(xc);
  const int64_t d = xc.size(-1), h = d / 2, rows = xc.numel() / d;
  const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  const float* src = xc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r, src += d, dst += d)
    for (int64_t i = 0; i < h; ++i) {
      dst[i] = src[i] * c[i] + (-src[i + h]) * s[i];
      dst[i + h] = src[i + h] * c[i + h] + src[i] * s[i + h];
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

  // logits [V] for the token whose embedding is `h0` [D] (already scaled) and whose raw
  // per-layer-embedding row is `ple` [parent_layers · P], at absolute position `pos`.
  Tensor token(const Tensor& h0_in, const Tensor& ple, int64_t pos, const std::vector<c10::optional<KV>>& caches) {
    c10::InferenceMode guard;
    const Config& c = c_;
    check(static_cast<int64_t>(caches.size()) == static_cast<int64_t>(plan_.size()), "one cache slot per plan layer");
    const Tensor h0 = h0_in.to(at::kFloat).contiguous().view({c.hidden});

    // per-layer inputs (text.py per_layer_inputs)
    Tensor proj = apply(lin_.at("per_layer_model_projection"), h0) *
                  static_cast<float>(std::pow(static_cast<double>(c.hidden), -0.5));
    proj = rms(proj.view({c.parent_layers, c.ple_dim}), norm_.at("per_layer_projection_norm"), c.eps);
    const Tensor tok = ple.to(at::kFloat).view({c.parent_layers, c.ple_dim}) *
                       static_cast<float>(std::sqrt(static_cast<double>(c.ple_dim)));
    const Tensor pli = (proj + tok) * static_cast<float>(std::pow(2.0, -0.5));

    // AltUp expand
    const Tensor target = at::pow(at::mean(h0.pow(2), -1, true), 0.5);
    std::vector<Tensor> expanded{h0};
    for (const auto& p : altup_in_) expanded.push_back(match_magnitude(apply(p, h0), target));
    Tensor streams = at::stack(expanded);  // [N, D]

    // RoPE tables of this position, per table
    std::vector<std::pair<Tensor, Tensor>> ropes;
    for (const auto& inv : inv_freq_) {
      const Tensor freqs = at::scalar_tensor(static_cast<double>(pos), at::kFloat) * inv;
      const Tensor emb = at::cat({freqs, freqs}, -1);
      ropes.emplace_back(emb.cos(), emb.sin());
    }
    std::vector<std::tuple<Tensor, Tensor, Tensor>> kv(plan_.size());  // per plan layer: K, V, positions
    for (size_t j = 0; j < plan_.size(); ++j) streams = layer(j, streams, pli, pos, ropes, caches, kv);

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

 private:
  // tanh(norm(x)/D @ W_rᵀ): a handful of values, as a loop
  Tensor router(const Layer& l, const Tensor& x) const {
    Tensor normed = rms(x, l.N("router"), c_.eps);
    const float scale = static_cast<float>(1.0 / static_cast<double>(c_.hidden));
    float* p = normed.data_ptr<float>();
    for (int64_t k = 0; k < normed.numel(); ++k) p[k] *= scale;
    Tensor routed = apply(l.L("router"), normed);
    float* r = routed.data_ptr<float>();
    for (int64_t k = 0; k < routed.numel(); ++k) r[k] = std::tanh(r[k]);
    return routed;
  }

  Tensor layer(size_t j, const Tensor& streams, const Tensor& pli, int64_t pos,
               const std::vector<std::pair<Tensor, Tensor>>& ropes, const std::vector<c10::optional<KV>>& caches,
               std::vector<std::tuple<Tensor, Tensor, Tensor>>& kv) {
    const auto& [parent, width, z, source, window, rope_idx] = plan_[j];
    const Layer& l = layers_[parent];
    const Config& c = c_;
    const int64_t a = c.active;
    const auto& [cos, sin] = ropes[rope_idx];

    // AltUp predict: pred_i = S_i + Σ_j c_ij S_j, c = router(S_active) @ W_pᵀ read row-major
    const Tensor coefs = apply(l.L("pred"), router(l, streams.select(0, a))).view({c.streams, c.streams});
    const Tensor mixed = at::matmul(streams.t(), coefs.t()).t();  // [N, D]
    const Tensor pred = mixed + streams;
    const Tensor active = pred.select(0, a);
    const Tensor xn = rms(active, l.N("input"), c.eps);
    const Tensor lau = xn + rms(apply(l.L("laurel_r"), apply(l.L("laurel_l"), xn)), l.N("laurel"), c.eps);

    // attention (scale 1.0: q_norm / k_norm replace 1/sqrt(d))
    const Tensor q = rope(rms(apply(l.L("q"), xn).view({c.heads, c.head_dim}), l.N("q"), c.eps), cos, sin);
    if (source < 0) {
      check(caches[j].has_value(), "an owner layer needs its cache");
      const auto& [kbuf, vbuf, pbuf, start, length] = *caches[j];
      check(length < kbuf.size(2), "the cache has no room reserved");
      const Tensor k = rope(rms(apply(l.L("k"), xn).view({c.kv_heads, c.head_dim}), l.N("k"), c.eps), cos, sin);
      const Tensor v = rms(apply(l.L("v"), xn).view({c.kv_heads, c.head_dim}), Tensor(), c.eps);
      kbuf.narrow(2, length, 1).copy_(k.view({1, c.kv_heads, 1, c.head_dim}));
      vbuf.narrow(2, length, 1).copy_(v.view({1, c.kv_heads, 1, c.head_dim}));
      pbuf.narrow(0, length, 1).fill_(pos);
      kv[j] = {kbuf.slice(2, start, length + 1), vbuf.slice(2, start, length + 1), pbuf.slice(0, start, length + 1)};
    } else {
      kv[j] = kv[source];
    }
    const auto& [keys, values, kpos] = kv[j];
    Tensor mask = kpos <= pos;
    if (window > 0) mask = mask & (kpos > pos - window);
    const Tensor attended = at::scaled_dot_product_attention(q.view({1, c.heads, 1, c.head_dim}), keys, values,
                                                             mask.view({1, -1}), 0.0, false, 1.0, true);
    const Tensor attn = apply(l.L("o"), attended.reshape({-1}));
    const Tensor h = (active + rms(attn, l.N("post_attn"), c.eps) + lau) / std::sqrt(2.0);

    // FFN over the plan's width; in a sparse layer only the up rows of the units that fire
    const Tensor fin = rms(h, l.N("pre_ffn"), c.eps);
    Tensor gate = apply(l.L("gate"), fin, width);
    Tensor ffn;
    if (!std::isnan(z)) {
      const Tensor zt = at::scalar_tensor(z, at::kFloat);
      gate = at::relu(gate - (gate.mean(-1, true) + at::std(gate, {-1}, false, true) * zt));
      const Tensor fired = gate.nonzero().squeeze(1);
      const Tensor up = apply(l.L("up"), fin, -1, &fired);
      Tensor hidden = at::zeros_like(gate);
      hidden.index_put_({fired}, at::gelu(gate.index_select(0, fired), "tanh") * up);
      ffn = apply(l.L("down"), hidden, -1, nullptr, width);
    } else {
      ffn = apply(l.L("down"), at::gelu(gate, "tanh") * apply(l.L("up"), fin, width), -1, nullptr, width);
    }
    const Tensor act = h + rms(ffn, l.N("post_ffn"), c.eps);

    // AltUp correct, then the per-layer input into streams 1..N-1
    const Tensor gamma = apply(l.L("corr"), router(l, act)) + 1.0;
    const Tensor innovation = act - active;
    Tensor corrected = innovation.unsqueeze(0) * gamma.unsqueeze(1) + pred;
    Tensor first = corrected.select(0, a);
    if (c.correct_scale) first = first * l.N("out_scale");
    const Tensor gated = at::gelu(apply(l.L("ple_gate"), first), "tanh") * pli.select(0, parent);
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
      .def("token", &Step::token, py::arg("h0"), py::arg("ple"), py::arg("position"), py::arg("caches"),
           py::call_guard<py::gil_scoped_release>());
}

}  // namespace gemma3n
