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
#include <utility>
#include <vector>

#include <ATen/Parallel.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

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

// sum_i a[i] * b[i] over D floats in 16 independent partial sums (one vector of them), reduced pairwise (8, 4, 2,
// 1 lanes) so that both the products and the reduction vectorise (D a multiple of 16)
template <int64_t D>
inline float dot16(const float* a, const float* b) {
  float part[16] = {0.0f};
  for (int64_t i = 0; i < D; i += 16)
    for (int64_t l = 0; l < 16; ++l) part[l] += a[i + l] * b[i + l];
  for (int64_t w = 8; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0];
}

// s[p] = exp(s[p] - max(s)) for p < lim; returns their sum (in 16 partial sums, reduced pairwise)
inline float exp_shift_sum(float* s, int64_t lim) {
  float m = -INFINITY;
  for (int64_t p = 0; p < lim; ++p) m = std::max(m, s[p]);
  float part[16] = {0.0f};
  int64_t p = 0;
  for (; p + 16 <= lim; p += 16)
    for (int64_t l = 0; l < 16; ++l) {
      s[p + l] = exp_approx(s[p + l] - m);
      part[l] += s[p + l];
    }
  for (int64_t l = 0; p + l < lim; ++l) {
    s[p + l] = exp_approx(s[p + l] - m);
    part[l] += s[p + l];
  }
  for (int64_t w = 8; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) part[l] += part[l + w];
  return part[0];
}

#if defined(__AVX2__) && defined(__FMA__)
// sums of the 8 lanes of each of x[0..7], as the 8 lanes of one vector
inline __m256 sum8x8(const __m256* x) {
  const __m256 t0 = _mm256_hadd_ps(x[0], x[1]), t1 = _mm256_hadd_ps(x[2], x[3]);
  const __m256 t2 = _mm256_hadd_ps(x[4], x[5]), t3 = _mm256_hadd_ps(x[6], x[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// s[p] = scale * q.k_p for p < lim (keys [lim, D]): eight keys at a time, their products summed across lanes
// together (no per-key horizontal sum); the last lim % 8 keys through dot16
template <int64_t D>
void scores(const float* q, const float* k, const float* v, int64_t lim, float scale, float* s, bool prefetch) {
  int64_t p = 0;
  for (; p + 8 <= lim; p += 8) {
    if (prefetch) {  // keys two tiles ahead and this tile's values (read after the softmax) into L2: cold caches
      for (int64_t off = 0; off < 8 * D; off += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(k + (p + 16) * D + off), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(v + p * D + off), _MM_HINT_T1);
      }
    }
    __m256 acc[8];
    for (int64_t u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
      const __m256 qi = _mm256_loadu_ps(q + i);
      for (int64_t u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qi, _mm256_loadu_ps(k + (p + u) * D + i), acc[u]);
    }
    _mm256_storeu_ps(s + p, _mm256_mul_ps(sum8x8(acc), _mm256_set1_ps(scale)));
  }
  for (; p < lim; ++p) s[p] = dot16<D>(q, k + p * D) * scale;
}
#else
template <int64_t D>
void scores(const float* q, const float* k, const float*, int64_t lim, float scale, float* s, bool) {
  for (int64_t p = 0; p < lim; ++p) s[p] = dot16<D>(q, k + p * D) * scale;
}
#endif

// A query rows (the grouped heads of one token, all seeing positions 0 .. lim - 1) over keys/values [lim, D]:
// out_a = softmax(scale q_a.k) v, each key and value read once for all A rows. q, out: A rows `stride` floats
// apart; s: scratch [A, lim].
template <int64_t D, int64_t A>
void attend_group(const float* q, const float* k, const float* v, int64_t lim, float scale, float* s, float* out,
                  int64_t stride) {
  for (int64_t a = 0; a < A; ++a) scores<D>(q + a * stride, k, v, lim, scale, s + a * lim, a == 0);
  float inv[A];
  for (int64_t a = 0; a < A; ++a) inv[a] = 1.0f / exp_shift_sum(s + a * lim, lim);
  float acc[A][D] = {};  // local accumulators the compiler can keep in registers
  for (int64_t p = 0; p < lim; ++p) {
    const float* vp = v + p * D;
    for (int64_t a = 0; a < A; ++a)
      for (int64_t i = 0; i < D; ++i) acc[a][i] += s[a * lim + p] * vp[i];
  }
  for (int64_t a = 0; a < A; ++a)
    for (int64_t i = 0; i < D; ++i) out[a * stride + i] = acc[a][i] * inv[a];
}

// attend_group over g query rows in chunks of at most 4
template <int64_t D>
void attend_heads(const float* q, const float* k, const float* v, int64_t lim, float scale, float* s, float* out,
                  int64_t stride, int64_t g) {
  for (int64_t a0 = 0; a0 < g; a0 += 4) {
    const float* qa = q + a0 * stride;
    float* oa = out + a0 * stride;
    switch (std::min<int64_t>(4, g - a0)) {
      case 4: attend_group<D, 4>(qa, k, v, lim, scale, s, oa, stride); break;
      case 3: attend_group<D, 3>(qa, k, v, lim, scale, s, oa, stride); break;
      case 2: attend_group<D, 2>(qa, k, v, lim, scale, s, oa, stride); break;
      default: attend_group<D, 1>(qa, k, v, lim, scale, s, oa, stride);
    }
  }
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

// Causal attention of a short step over the cache, row by row: token t of row r (position starts[r] + t) sees key
// positions 0 .. starts[r] + t of its own row only, so a row never reads the positions other rows have and it lacks
// (SDPA over a padded [n, hk, kv_len, d] view reads and masks them). Query head h uses kv head h / g (GQA).
// x: [n * q, hq + 2 hk, D] (queries in heads 0 .. hq); k_layer, v_layer: [rows, hk, max_len, D]; starts: [n].
// out: [n * q, hq * D]; scratch: [n * hk, 4 * kv_len].
template <int64_t D>
void attend_rows_d(const torch::Tensor& x, int64_t hq, int64_t hk, const torch::Tensor& k_layer,
                   const torch::Tensor& v_layer, int64_t row0, const int64_t* sp, int64_t n, int64_t q, float scale,
                   torch::Tensor& scratch, torch::Tensor& out) {
  const int64_t all = x.size(1), g = hq / hk, max_len = k_layer.size(2), kv_len = scratch.size(1) / 4;
  const float* xp = x.data_ptr<float>();
  const float* kp = k_layer.data_ptr<float>();
  const float* vp = v_layer.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* sc = scratch.data_ptr<float>();
  at::parallel_for(0, n * hk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b / hk, j = b % hk, block = ((row0 + r) * hk + j) * max_len * D;
      for (int64_t t = 0; t < q; ++t) {  // the g query heads of kv head j, token t
        const int64_t tok = r * q + t;
        attend_heads<D>(xp + (tok * all + j * g) * D, kp + block, vp + block, sp[r] + t + 1, scale,
                        sc + b * 4 * kv_len, op + (tok * hq + j * g) * D, D, g);
      }
    }
  });
}

// attend_rows_d for the head sizes it is compiled for (64, 128); returns [n * q, hq * d]
torch::Tensor attend_rows(const torch::Tensor& x, int64_t hq, int64_t hk, const torch::Tensor& k_layer,
                          const torch::Tensor& v_layer, int64_t row0, const torch::Tensor& starts, int64_t n,
                          int64_t q, double scale) {
  TORCH_CHECK(starts.scalar_type() == torch::kLong && starts.numel() == n, "starts must be int64 [n]");
  TORCH_CHECK(x.is_contiguous() && k_layer.is_contiguous() && v_layer.is_contiguous(), "attend_rows: not contiguous");
  const int64_t d = x.size(2);
  if (n == 0) return torch::empty({0, hq * d}, x.options());
  auto st = starts.contiguous();
  const int64_t* sp = st.data_ptr<int64_t>();
  auto out = torch::empty({n * q, hq * d}, x.options());
  auto scratch = torch::empty({n * hk, 4 * (*std::max_element(sp, sp + n) + q)}, x.options());
  const float sc = static_cast<float>(scale);
  if (d == 64)
    attend_rows_d<64>(x, hq, hk, k_layer, v_layer, row0, sp, n, q, sc, scratch, out);
  else if (d == 128)
    attend_rows_d<128>(x, hq, hk, k_layer, v_layer, row0, sp, n, q, sc, scratch, out);
  else
    TORCH_CHECK(false, "attend_rows: head_dim ", d, " is not compiled (64, 128)");
  return out;
}

// The attention block of a step after its q/k/v projection: rope_write_kv_ into layer `layer` of the cache
// (keys, values: [layers, rows, hk, max_len, d]; idx: the rows of keys[layer].view(-1, d) to write), then attention
// of the rotated queries over cache rows row0 .. row0 + n: attend_rows for steps of up to `row_q_max` tokens per
// row (decoding, verification), else SDPA over positions 0 .. kv_len with grouped-query heads folded as g extra
// query rows of their key/value head (so keys/values are never repeated), mask: additive [n, 1, q g, kv] or none.
// x: [n * q, hq + 2 hk, d]; starts: [n] each row's position of its first token. Returns [n * q, hq * d].
torch::Tensor rope_kv_attend(torch::Tensor x, int64_t hq, int64_t hk, torch::Tensor cos, torch::Tensor sin,
                             torch::Tensor keys, torch::Tensor values, int64_t layer, int64_t row0, int64_t kv_len,
                             torch::Tensor idx, c10::optional<torch::Tensor> mask, int64_t n, int64_t q,
                             double scale, torch::Tensor starts, int64_t row_q_max) {
  auto k_layer = keys.select(0, layer), v_layer = values.select(0, layer);  // [rows, hk, max_len, d]
  const int64_t d = x.size(2), g = hq / hk;
  rope_write_kv_(x, hq, hk, cos, sin, k_layer.view({-1, d}), v_layer.view({-1, d}), idx);
  if (q <= row_q_max && (d == 64 || d == 128)) return attend_rows(x, hq, hk, k_layer, v_layer, row0, starts, n, q, scale);
  auto k = k_layer.narrow(0, row0, n).narrow(2, 0, kv_len), v = v_layer.narrow(0, row0, n).narrow(2, 0, kv_len);
  auto qf = x.narrow(1, 0, hq).view({n, q, hk, g, d}).permute({0, 2, 1, 3, 4}).reshape({n, hk, q * g, d});
  auto out = at::scaled_dot_product_attention(qf, k, v, mask, 0.0, false, scale);  // [n, hk, q g, d]
  return out.view({n, hk, q, g, d}).permute({0, 2, 1, 3, 4}).reshape({n * q, hq * d});
}

// y [rows, out] = x [rows, in] (float32) @ w^T for w [out, in] stored in bfloat16 and widened to float32 in registers
// (a draft head's weights on a CPU without native bfloat16 matmuls: half the bytes to stream, float32 arithmetic).
// One pass over the weights whatever the number of rows: each weight row is used for every activation row while it
// sits in L1; two outputs at a time, so a few rows still keep enough independent FMA chains in flight.
inline float w_to_float(uint16_t b) {  // bfloat16 bits
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float w_to_float(float f) { return f; }

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load_w8(const uint16_t* p) {  // eight bfloat16 weights widened to float32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load_w8(const float* p) { return _mm256_loadu_ps(p); }

inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// outputs o and o + 1 (w0, w1) for the rn <= 4 rows x[0..rn) (stride in); the first in8 columns vectorised
template <int RN, typename W>
inline void dot2_w(const float* x, int64_t in, int64_t in8, const W* w0, const W* w1, float* r0, float* r1) {
  __m256 a0[RN], a1[RN];
  for (int r = 0; r < RN; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < in8; k += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(w0 + 4 * in + k), _MM_HINT_T0);  // two pairs ahead
    _mm_prefetch(reinterpret_cast<const char*>(w1 + 4 * in + k), _MM_HINT_T0);
    const __m256 u = load_w8(w0 + k), v = load_w8(w1 + k);
    for (int r = 0; r < RN; ++r) {
      const __m256 xr = _mm256_loadu_ps(x + r * in + k);
      a0[r] = _mm256_fmadd_ps(u, xr, a0[r]);
      a1[r] = _mm256_fmadd_ps(v, xr, a1[r]);
    }
  }
  for (int r = 0; r < RN; ++r) {
    float s0 = hsum8(a0[r]), s1 = hsum8(a1[r]);
    for (int64_t k = in8; k < in; ++k) {
      s0 += w_to_float(w0[k]) * x[r * in + k];
      s1 += w_to_float(w1[k]) * x[r * in + k];
    }
    r0[r] = s0;
    r1[r] = s1;
  }
}

// one activation row, outputs o .. o + 3: four weight streams and two partial sums each, so eight independent FMA
// chains (a single row has no other rows to hide the FMA latency behind)
template <typename W>
inline void dot4_w_row(const float* x, int64_t in, int64_t in8, const W* w, float* r) {
  __m256 a[4][2];
  for (int j = 0; j < 4; ++j) a[j][0] = a[j][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= in8; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int j = 0; j < 4; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (8 + j) * in + k), _MM_HINT_T0);  // two groups ahead
      a[j][0] = _mm256_fmadd_ps(load_w8(w + j * in + k), x0, a[j][0]);
      a[j][1] = _mm256_fmadd_ps(load_w8(w + j * in + k + 8), x1, a[j][1]);
    }
  }
  for (; k < in8; k += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + k);
    for (int j = 0; j < 4; ++j) a[j][0] = _mm256_fmadd_ps(load_w8(w + j * in + k), x0, a[j][0]);
  }
  for (int j = 0; j < 4; ++j) {
    float s = hsum8(_mm256_add_ps(a[j][0], a[j][1]));
    for (int64_t t = in8; t < in; ++t) s += w_to_float(w[j * in + t]) * x[t];
    r[j] = s;
  }
}
#endif

// outputs [o0, o1) of y (row stride out) for the rows [r0, r0 + rn)
template <typename W>
void linear_w_block(const float* x, const W* w, float* y, int64_t rows, int64_t in, int64_t out, int64_t o0,
                    int64_t o1) {
  float t0[4], t1[4];
#if defined(__AVX2__) && defined(__FMA__)
  if (rows == 1) {  // four outputs at a time; the last one to three by the pairs below
    const int64_t in8 = in - in % 8;
    for (; o0 + 4 <= o1; o0 += 4) dot4_w_row(x, in, in8, w + o0 * in, y + o0);
  }
#endif
  for (int64_t o = o0; o < o1; o += 2) {
    const bool pair = o + 1 < o1;
    const W* w0 = w + o * in;
    const W* w1 = pair ? w0 + in : w0;
    for (int64_t r = 0; r < rows; r += 4) {
      const int64_t rn = std::min<int64_t>(4, rows - r);
      const float* xr = x + r * in;
#if defined(__AVX2__) && defined(__FMA__)
      const int64_t in8 = in - in % 8;
      switch (rn) {
        case 1: dot2_w<1>(xr, in, in8, w0, w1, t0, t1); break;
        case 2: dot2_w<2>(xr, in, in8, w0, w1, t0, t1); break;
        case 3: dot2_w<3>(xr, in, in8, w0, w1, t0, t1); break;
        default: dot2_w<4>(xr, in, in8, w0, w1, t0, t1); break;
      }
#else
      for (int64_t i = 0; i < rn; ++i) {
        float s0 = 0.0f, s1 = 0.0f;
        for (int64_t k = 0; k < in; ++k) {
          s0 += w_to_float(w0[k]) * xr[i * in + k];
          s1 += w_to_float(w1[k]) * xr[i * in + k];
        }
        t0[i] = s0;
        t1[i] = s1;
      }
#endif
      for (int64_t i = 0; i < rn; ++i) {
        y[(r + i) * out + o] = t0[i];
        if (pair) y[(r + i) * out + o + 1] = t1[i];
      }
    }
  }
}

template <typename W>
torch::Tensor linear_w(torch::Tensor x, const W* wp, int64_t out) {
  x = x.contiguous();
  const int64_t rows = x.size(0), in = x.size(1);
  auto y = torch::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // chunks of an even number of outputs, so that pairs never straddle two threads' chunks
  at::parallel_for(0, (out + 1) / 2, 128, [&](int64_t p0, int64_t p1) {
    linear_w_block(xp, wp, yp, rows, in, out, 2 * p0, std::min(out, 2 * p1));
  });
  return y;
}

// x: [rows, in] float32, w: [out, in] bfloat16 (contiguous) -> [rows, out] float32
torch::Tensor linear_bf16w(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_bf16w: x [rows, in], w [out, in]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous(),
              "linear_bf16w: float32 x, contiguous bfloat16 w");
  return linear_w(x, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), w.size(0));
}

// x: [rows, in] float32, w: [out, in] float32 (contiguous) -> [rows, out] float32 (the same loops, float32 weights)
torch::Tensor linear_f32w(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_f32w: x [rows, in], w [out, in]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32 && w.is_contiguous(),
              "linear_f32w: float32 x, contiguous float32 w");
  return linear_w(x, w.data_ptr<float>(), w.size(0));
}

namespace {

// top-k of one row x[0 .. v) by a min-heap of k (value, index) pairs: a value enters only when it beats the heap's
// smallest (compared 8 at a time with AVX2), so a pass costs about one compare per element once the heap is warm
void topk_row(const float* x, int64_t v, int64_t k, float* vals, int64_t* ids) {
  std::vector<std::pair<float, int64_t>> heap;
  heap.reserve(k);
  // min-heap by value; among equal values the larger index is "smaller" (evicted first): ties keep the lower index
  auto worse = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  int64_t j = 0;
  for (; j < std::min(k, v); ++j) heap.emplace_back(x[j], j);
  std::make_heap(heap.begin(), heap.end(), worse);
  auto offer = [&](int64_t i) {
    if (x[i] > heap.front().first) {
      std::pop_heap(heap.begin(), heap.end(), worse);
      heap.back() = {x[i], i};
      std::push_heap(heap.begin(), heap.end(), worse);
    }
  };
#if defined(__AVX2__)
  for (; j < v && (j & 7); ++j) offer(j);
  for (; j + 8 <= v; j += 8) {
    const __m256 t = _mm256_set1_ps(heap.front().first);
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), t, _CMP_GT_OQ));
    while (mask) {
      const int b = __builtin_ctz(mask);
      mask &= mask - 1;
      offer(j + b);
    }
  }
#endif
  for (; j < v; ++j) offer(j);
  std::sort_heap(heap.begin(), heap.end(), worse);  // ascending by `worse` = descending by value, ties index-first
  for (int64_t i = 0; i < static_cast<int64_t>(heap.size()); ++i) {
    vals[i] = heap[i].first;
    ids[i] = heap[i].second;
  }
}

}  // namespace

// x: [r, v] float32 with contiguous rows, rows: [m] int64 row indices -> (values [m, k] descending, ids [m, k]):
// torch.topk of the picked rows (no copy of them); among equal values the lower index comes first
std::tuple<torch::Tensor, torch::Tensor> topk_rows(torch::Tensor x, torch::Tensor rows, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.stride(1) == 1,
              "topk_rows: x must be a float32 [r, v] tensor with contiguous rows");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == torch::kInt64, "topk_rows: rows must be an int64 [m] tensor");
  TORCH_CHECK(k >= 1 && k <= x.size(1), "topk_rows: k must lie in [1, v]");
  rows = rows.contiguous();
  const int64_t m = rows.size(0), v = x.size(1), r = x.size(0);
  auto vals = torch::empty({m, k}, x.options());
  auto ids = torch::empty({m, k}, rows.options());
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < r, "topk_rows: row index out of range");
    topk_row(x.data_ptr<float>() + rp[i] * x.stride(0), v, k, vals.data_ptr<float>() + i * k,
             ids.data_ptr<int64_t>() + i * k);
  }
  return {vals, ids};
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
  mod.def("attend_rows", &attend_rows, "causal attention of a short step over each row's own cache positions");
  mod.def("rope_kv_attend", &rope_kv_attend, "rope_write_kv_, then attention over the cache (folded GQA)");
  mod.def("silu_mul", &silu_mul, "silu(gate) * up of gu [c, 2m]");
  mod.def("linear_bf16w", &linear_bf16w, "x [rows, in] float32 @ w.T for bfloat16 w [out, in], float32 result");
  mod.def("topk_rows", &topk_rows, "top-k values (descending) and indices of the picked rows of x [r, v]");
  mod.def("linear_f32w", &linear_f32w, "x [rows, in] float32 @ w.T for float32 w [out, in] (few rows)");
}
