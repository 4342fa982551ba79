// The small per-layer ops of a CPU decode/verification step as plain loops (atlas_rl.rollout.cpu_glue).
//
// After a matmul has streamed megabytes of weights, every PyTorch op starts with cold caches: an RMSNorm made of
// seven ATen ops costs ~70 us there, this loop ~16 us. float32; each loop makes its inputs contiguous or checks them.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

namespace {

// exp(x) without a libm call, so that loops over it vectorise (Cephes' expf: range reduction by ln 2, degree-6
// polynomial, 2^n from the exponent bits; within 2 ulp of std::exp over [-87, 88], clamped outside)
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// out[i] = (x[i] * rsqrt(mean(x[i]^2) + eps)) * w, the sum accumulated in double (in 8 independent partial sums:
// one sequential chain of 576 dependent adds took ~1 us per row)
void rms_row(const float* x, const float* w, float* out, int64_t d, double eps) {
  double part[8] = {0.0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8)
    for (int64_t l = 0; l < 8; ++l) part[l] += static_cast<double>(x[j + l]) * x[j + l];
  double s = 0.0;
  for (int64_t l = 0; l < 8; ++l) s += part[l];
  for (; j < d; ++j) s += static_cast<double>(x[j]) * x[j];
  const float inv = 1.0f / std::sqrt(static_cast<float>(s / d) + static_cast<float>(eps));
  for (int64_t j = 0; j < d; ++j) out[j] = (x[j] * inv) * w[j];
}

}  // namespace

// x: [c, d], w: [d] -> [c, d]
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  x = x.contiguous();
  w = w.contiguous();
  auto out = torch::empty_like(x);
  const int64_t d = x.size(-1), c = x.numel() / d;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < c; ++i) rms_row(xp + i * d, wp, op + i * d, d, eps);
  return out;
}

// h, y: [c, d], w: [d] -> (h + y, rms_norm(h + y))
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor h, torch::Tensor y, torch::Tensor w, double eps) {
  h = h.contiguous();
  y = y.contiguous();
  w = w.contiguous();
  auto sum = torch::empty_like(h);
  auto out = torch::empty_like(h);
  const int64_t d = h.size(-1), c = h.numel() / d;
  const float* hp = h.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  for (int64_t i = 0; i < c * d; ++i) sp[i] = hp[i] + yp[i];
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < c; ++i) rms_row(sp + i * d, wp, op + i * d, d, eps);
  return {sum, out};
}

// In place on the first `heads` heads of x [c, all_heads, d]: x * cos + roll(x, d/2) * sin, cos/sin: [c, d]
// (sin sign-folded: -sin on the first half, so this is HF's x * cos + rotate_half(x) * sin)
void rope_(torch::Tensor x, int64_t heads, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.is_contiguous(), "rope_ rotates x in place: it must be contiguous");
  cos = cos.contiguous();
  sin = sin.contiguous();
  const int64_t c = x.size(0), all = x.size(1), d = x.size(2), half = d / 2;
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (int64_t i = 0; i < c; ++i) {
    const float* ci = cp + i * d;
    const float* si = sp + i * d;
    for (int64_t hh = 0; hh < heads; ++hh) {
      float* v = xp + (i * all + hh) * d;
      for (int64_t j = 0; j < half; ++j) {
        const float a = v[j], b = v[j + half];
        v[j] = a * ci[j] + b * si[j];
        v[j + half] = b * ci[j + half] + a * si[j + half];
      }
    }
  }
}

// rope_ on heads [0, hq + hk) of x [c, hq + 2 hk, d], then the keys (heads hq ..) and values (heads hq + hk ..) of
// token i, kv head j into rows idx[i * hk + j] of k_rows / v_rows [slots, d] (a layer's KV cache as rows)
void rope_write_kv_(torch::Tensor x, int64_t hq, int64_t hk, torch::Tensor cos, torch::Tensor sin,
                    torch::Tensor k_rows, torch::Tensor v_rows, torch::Tensor idx) {
  TORCH_CHECK(k_rows.is_contiguous() && v_rows.is_contiguous(), "the KV cache rows must be contiguous");
  TORCH_CHECK(idx.scalar_type() == torch::kLong, "the row index must be int64");
  idx = idx.contiguous();
  rope_(x, hq + hk, cos, sin);
  const int64_t c = x.size(0), all = x.size(1), d = x.size(2);
  const float* xp = x.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* kp = k_rows.data_ptr<float>();
  float* vp = v_rows.data_ptr<float>();
  for (int64_t i = 0; i < c; ++i) {
    for (int64_t j = 0; j < hk; ++j) {
      const int64_t dst = ip[i * hk + j] * d;
      const float* k = xp + (i * all + hq + j) * d;
      const float* v = xp + (i * all + hq + hk + j) * d;
      for (int64_t t = 0; t < d; ++t) {
        kp[dst + t] = k[t];
        vp[dst + t] = v[t];
      }
    }
  }
}

// The attention block of a step after its q/k/v projection: rope_write_kv_ into layer `layer` of the cache
// (keys, values: [layers, rows, hk, max_len, d]; idx: the rows of keys[layer].view(-1, d) to write), then SDPA of
// the rotated queries over cache rows row0 .. row0 + n, positions 0 .. kv_len, grouped-query heads folded as
// g extra query rows of their key/value head (so keys/values are never repeated), mask: additive [n, 1, q g, kv]
// or none. x: [n * q, hq + 2 hk, d]. Returns [n * q, hq * d] (the input of o_proj).
torch::Tensor rope_kv_attend(torch::Tensor x, int64_t hq, int64_t hk, torch::Tensor cos, torch::Tensor sin,
                             torch::Tensor keys, torch::Tensor values, int64_t layer, int64_t row0, int64_t kv_len,
                             torch::Tensor idx, c10::optional<torch::Tensor> mask, int64_t n, int64_t q,
                             double scale) {
  auto k_layer = keys.select(0, layer), v_layer = values.select(0, layer);  // [rows, hk, max_len, d]
  const int64_t d = x.size(2), g = hq / hk;
  rope_write_kv_(x, hq, hk, cos, sin, k_layer.view({-1, d}), v_layer.view({-1, d}), idx);
  auto k = k_layer.narrow(0, row0, n).narrow(2, 0, kv_len), v = v_layer.narrow(0, row0, n).narrow(2, 0, kv_len);
  auto qf = x.narrow(1, 0, hq).view({n, q, hk, g, d}).permute({0, 2, 1, 3, 4}).reshape({n, hk, q * g, d});
  auto out = at::scaled_dot_product_attention(qf, k, v, mask, 0.0, false, scale);  // [n, hk, q g, d]
  return out.view({n, hk, q, g, d}).permute({0, 2, 1, 3, 4}).reshape({n * q, hq * d});
}

// gu: [c, 2 * m] (gate | up) -> [c, m] silu(gate) * up
torch::Tensor silu_mul(torch::Tensor gu) {
  gu = gu.contiguous();
  const int64_t c = gu.size(0), m = gu.size(1) / 2;
  auto out = torch::empty({c, m}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < c; ++i) {
    const float* g = gp + i * 2 * m;
    float* o = op + i * m;
    for (int64_t j = 0; j < m; ++j) o[j] = g[j] / (1.0f + exp_approx(-g[j])) * g[m + j];
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("rms_norm", &rms_norm, "RMSNorm of the rows of x [c, d]");
  mod.def("add_rms_norm", &add_rms_norm, "(h + y, RMSNorm(h + y))");
  mod.def("rope_", &rope_, "RoPE in place on the first heads of x [c, heads, d]");
  mod.def("rope_write_kv_", &rope_write_kv_, "rope_ on q and k, then k and v into the KV cache rows");
  mod.def("rope_kv_attend", &rope_kv_attend, "rope_write_kv_, then SDPA over the cache (folded GQA)");
  mod.def("silu_mul", &silu_mul, "silu(gate) * up of gu [c, 2m]");
}
