// Ternary weight quantization (BitNet b1.58 absmean) and per-token int8 activation
// quantization (absmax), plus their quantize-dequantize (fake quant) forms.
//
// Conventions, shared bit for bit with agentforge.ops.reference:
//   weights:     scale = max(mean|w|, 1e-5) (per tensor or per row); code = clamp(round(w * (1 / scale)), -1, 1);
//                fake quant = code / (1 / scale). This is the BitNet b1.58 reference code (the paper's
//                weight_quant, Hugging Face's WeightQuant) step for step, so codes and values agree bit for
//                bit with it: the reciprocal is multiplied, not divided, and the mean is torch's own.
//   activations: Qp = 2^(bits-1) - 1; scale = Qp / max(absmax, 1e-5) per token;
//                q = clamp(round(x * scale), -Qp - 1, Qp); x ≈ q / scale
//   round is half to even (as torch.round); arithmetic in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "cpu/arch.h"
#include "cpu/ops_cpu.h"

#if AF_X86_SIMD
#include <emmintrin.h>
#endif

namespace agentforge {
namespace cpu {
namespace {

// Row loops in SSE2 (every x86-64 has it): cvtps2dq rounds half to even under the default
// rounding mode, like torch.round, and GCC will not vectorise the scalar clamp-and-round
// loop on its own (float min/max must respect NaN; inputs here are known to be finite).
// Without x86 (AF_X86_SIMD 0) the scalar loops below, which finish each row's tail on x86,
// do whole rows, with the same fp32 operations and so the same results.
inline int8_t round_clamped(float v, float lo, float hi) {
  return static_cast<int8_t>(std::nearbyint(v < lo ? lo : (v > hi ? hi : v)));
}

#if AF_X86_SIMD
inline __m128i round_clamped(__m128 v, __m128 lo, __m128 hi) {
  return _mm_cvtps_epi32(_mm_min_ps(_mm_max_ps(v, lo), hi));
}

// Stores 4 int32 lanes (already within int8 range) as 4 int8.
inline void store4_i8(int8_t* dst, __m128i v) {
  __m128i packed = _mm_packs_epi16(_mm_packs_epi32(v, v), _mm_setzero_si128());
  int32_t word = _mm_cvtsi128_si32(packed);
  std::memcpy(dst, &word, 4);
}
#endif

// codes of one row: clamp(round(w * inv_scale), -1, 1); clamping before rounding gives the
// same integers as the reference's round-then-clamp.
void ternary_row(const float* src, int8_t* dst, int64_t K, float inv_scale) {
  int64_t k = 0;
#if AF_X86_SIMD
  const __m128 s = _mm_set1_ps(inv_scale), lo = _mm_set1_ps(-1.f), hi = _mm_set1_ps(1.f);
  for (; k + 4 <= K; k += 4) store4_i8(dst + k, round_clamped(_mm_mul_ps(_mm_loadu_ps(src + k), s), lo, hi));
#endif
  for (; k < K; ++k) dst[k] = round_clamped(src[k] * inv_scale, -1.f, 1.f);
}

#if AF_X86_SIMD
// Four consecutive elements as fp32 lanes (fp32 and bf16 rows; fp16 is cast to fp32 first).
template <typename scalar_t>
__m128 load4(const scalar_t* src);

template <>
inline __m128 load4<float>(const float* src) {
  return _mm_loadu_ps(src);
}

// bf16 is the top half of an fp32: one unpack widens it exactly.
template <>
inline __m128 load4<c10::BFloat16>(const c10::BFloat16* src) {
  int64_t bits;
  std::memcpy(&bits, src, 8);
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), _mm_cvtsi64_si128(bits)));
}
#endif

// max |x| over a row, or NaN when the row holds NaN or Inf (|v| <= FLT_MAX fails for both).
template <typename scalar_t>
float absmax_or_nan(const scalar_t* src, int64_t K) {
  int64_t k = 0;
  float result = 0.f;
  bool all_finite = true;
#if AF_X86_SIMD
  const __m128 sign = _mm_set1_ps(-0.f), largest = _mm_set1_ps(FLT_MAX);
  __m128 absmax = _mm_setzero_ps(), finite = _mm_castsi128_ps(_mm_set1_epi32(-1));
  for (; k + 4 <= K; k += 4) {
    const __m128 a = _mm_andnot_ps(sign, load4(src + k));
    absmax = _mm_max_ps(absmax, a);
    finite = _mm_and_ps(finite, _mm_cmple_ps(a, largest));
  }
  alignas(16) float m[4];
  _mm_store_ps(m, absmax);
  result = std::max(std::max(m[0], m[1]), std::max(m[2], m[3]));
  all_finite = _mm_movemask_ps(finite) == 0xF;
#endif
  for (; k < K; ++k) {
    const float a = std::fabs(static_cast<float>(src[k]));
    all_finite = all_finite && a <= FLT_MAX;
    result = a > result ? a : result;
  }
  return all_finite ? result : std::nanf("");
}

template <typename scalar_t>
int32_t activation_row(const scalar_t* src, int8_t* dst, int64_t K, float scale, float qmax) {
  int64_t k = 0;
  int32_t sum = 0;
#if AF_X86_SIMD
  const __m128 s = _mm_set1_ps(scale), lo = _mm_set1_ps(-qmax - 1.f), hi = _mm_set1_ps(qmax);
  __m128i sum4 = _mm_setzero_si128();
  for (; k + 4 <= K; k += 4) {
    __m128i q = round_clamped(_mm_mul_ps(load4(src + k), s), lo, hi);
    sum4 = _mm_add_epi32(sum4, q);
    store4_i8(dst + k, q);
  }
  alignas(16) int32_t lanes[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(lanes), sum4);
  sum = lanes[0] + lanes[1] + lanes[2] + lanes[3];
#endif
  for (; k < K; ++k) {
    dst[k] = round_clamped(static_cast<float>(src[k]) * scale, -qmax - 1.f, qmax);
    sum += dst[k];
  }
  return sum;
}

}  // namespace

void check_cpu(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "agentforge.", op, ": ", name, " is on ", t.device(),
              " but this kernel runs on CPU; move all inputs to one device");
}

void check_float(const Tensor& t, const char* op, const char* name) {
  auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "agentforge.", op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dt);
}

Tensor as_rows(const Tensor& x) {
  const int64_t K = x.size(-1);
  const int64_t M = K > 0 ? x.numel() / K : c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  return x.reshape({M, K}).contiguous();
}

int64_t act_qmax(int64_t bits, const char* op) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "agentforge.", op, ": bits must be in [2, 8], got ", bits);
  return (int64_t{1} << (bits - 1)) - 1;
}

namespace {

// Codes, scale and the scale's fp32 reciprocal (the multiplier the reference rounds with).
std::tuple<Tensor, Tensor, Tensor> ternary_quantize(const Tensor& w, bool per_channel, const char* op) {
  check_cpu(w, op, "w");
  check_float(w, op, "w");
  TORCH_CHECK(w.dim() == 2, "agentforge.", op, ": w must be 2-D [out_features, in_features], got shape ", w.sizes());
  Tensor wf = w.to(at::kFloat).contiguous();
  const int64_t N = wf.size(0), K = wf.size(1);
  // mean|w| through torch's own abs and mean, so the scale is bit for bit the reference
  // formula's (a fused one-pass sum rounds differently in the last bit)
  Tensor absw = wf.abs();
  Tensor scale = per_channel ? absw.mean(1) : absw.mean().reshape({1});
  if (N * K == 0) scale.zero_();  // the mean of nothing is NaN; an empty matrix gets the floor
  scale.clamp_min_(kWeightEps);
  if (!at::isfinite(scale).all().item<bool>()) {
    // finite weights can still overflow the fp32 mean (|w| near 3e38): say which it is
    TORCH_CHECK(at::isfinite(wf).all().item<bool>(), "agentforge.", op,
                ": w contains NaN or Inf; ternary quantization needs finite weights");
    TORCH_CHECK(false, "agentforge.", op, ": mean |w| overflows fp32 (largest |w| is ", absw.max().item<float>(),
                "); scale the weights down before quantizing");
  }
  Tensor inv = at::reciprocal(scale);
  Tensor codes = at::empty({N, K}, wf.options().dtype(at::kChar));
  const float* src = wf.data_ptr<float>();
  const float* iv = inv.data_ptr<float>();
  int8_t* dst = codes.data_ptr<int8_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) ternary_row(src + n * K, dst + n * K, K, iv[per_channel ? n : 0]);
  });
  return {codes, scale, inv};
}

}  // namespace

std::tuple<Tensor, Tensor> ternary_codes(const Tensor& w, bool per_channel, const char* op) {
  auto [codes, scale, inv] = ternary_quantize(w, per_channel, op);
  return {codes, scale};
}

std::tuple<Tensor, Tensor> quantize_ternary(const Tensor& w, bool per_channel) {
  return ternary_codes(w, per_channel, "quantize_ternary");
}

Tensor ternary_fake_quant(const Tensor& w, bool per_channel) {
  auto [codes, scale, inv] = ternary_quantize(w, per_channel, "ternary_fake_quant");
  // code / (1 / scale), as the reference dequantizes (code * scale can differ in the last bit)
  Tensor s = per_channel ? inv.unsqueeze(1) : inv;
  return (codes.to(at::kFloat) / s).to(w.scalar_type());
}

namespace {

template <typename scalar_t>
void quantize_rows_impl(const scalar_t* x, int64_t M, int64_t K, float qmax, int8_t* dst, int64_t Kp, float* scale,
                        int32_t* row_sum) {
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const scalar_t* row = x + m * K;
      int8_t* q = dst + m * Kp;
      const float absmax = absmax_or_nan(row, K);
      int32_t sum = 0;
      if (std::isnan(absmax)) {
        scale[m] = std::nanf("");
        for (int64_t k = 0; k < Kp; ++k) q[k] = 0;
      } else {
        scale[m] = qmax / (absmax > kActEps ? absmax : kActEps);
        sum = activation_row(row, q, K, scale[m], qmax);
        for (int64_t k = K; k < Kp; ++k) q[k] = 0;
      }
      if (row_sum) row_sum[m] = sum;
    }
  });
}

}  // namespace

void quantize_rows(const Tensor& x2d, int bits, int8_t* dst, int64_t Kp, float* scale, int32_t* row_sum) {
  // fp16 has no SSE2 conversion: torch's vectorised cast (exact) beats a scalar one per element
  if (x2d.scalar_type() == at::kHalf) return quantize_rows(x2d.to(at::kFloat), bits, dst, Kp, scale, row_sum);
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  if (x2d.scalar_type() == at::kBFloat16)
    quantize_rows_impl(x2d.data_ptr<c10::BFloat16>(), x2d.size(0), x2d.size(1), qmax, dst, Kp, scale, row_sum);
  else
    quantize_rows_impl(x2d.data_ptr<float>(), x2d.size(0), x2d.size(1), qmax, dst, Kp, scale, row_sum);
}

std::tuple<Tensor, Tensor, Tensor> quantize_activations(const Tensor& x, int64_t bits) {
  const char* op = "quantize_activations";
  check_cpu(x, op, "x");
  check_float(x, op, "x");
  act_qmax(bits, op);
  TORCH_CHECK(x.dim() >= 1, "agentforge.", op, ": x must have at least one dimension (tokens along the last)");
  Tensor x2d = as_rows(x);
  const int64_t M = x2d.size(0), K = x2d.size(1);
  auto lead = x.sizes().slice(0, x.dim() - 1);
  Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  Tensor scale = at::empty(lead, x.options().dtype(at::kFloat));
  Tensor row_sum = at::empty(lead, x.options().dtype(at::kInt));
  if (M > 0)
    quantize_rows(x2d, static_cast<int>(bits), q.data_ptr<int8_t>(), K, scale.data_ptr<float>(),
                  row_sum.data_ptr<int32_t>());
  return {q, scale, row_sum};
}

Tensor act_fake_quant(const Tensor& x, int64_t bits) {
  auto [q, scale, row_sum] = quantize_activations(x, bits);
  return (q.to(at::kFloat) / scale.unsqueeze(-1)).to(x.scalar_type());
}

}  // namespace cpu
}  // namespace agentforge
