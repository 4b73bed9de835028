// ternary_matmul and the fused bitlinear forward: y = dequant(act_quant(x) · codesᵀ) (+ bias).
//
// Steps: read the prepacked header (prepacked.h); quantize activations per token into
// zero-padded int8 rows; choose a kernel (2bit weights: int8-dot or popcount, measured per
// shape class; base3 weights: their own kernel); run the ISA's kernel over row tiles in
// parallel, each thread on one contiguous run of tiles; scale the exact int32 dot products:
// y = acc / x_scale * w_scale (+ bias).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <string>
#include <vector>

#include "cpu/arch.h"
#include "cpu/ops_cpu.h"

#if AF_X86_SIMD
#include <emmintrin.h>  // _mm_clflush, _mm_mfence
#endif

namespace agentforge {
namespace cpu {
namespace {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t kProbeRows = 256;  // rows timed when a shape class is first measured
constexpr int64_t kMaxK = int64_t{1} << 21;  // accumulator bound of the AVX-512 GEMV (kernels_avx512.cpp)

std::string shape_class(int64_t M, int64_t K, int bits) {
  const char* m = M == 1 ? "1" : M < 4 ? "2-3" : M < 16 ? "4-15" : M < 64 ? "16-63" : "64+";
  int log_k = 0;
  while ((int64_t{1} << (log_k + 1)) <= K) ++log_k;
  return "M=" + std::string(m) + " K~2^" + std::to_string(log_k) + " bits=" + std::to_string(bits);
}

void run_rows(MatmulKernel kernel, const MatmulArgs& a, int64_t n_end) {
  const int64_t tiles = ceil_div(n_end, kTileRows);
  // Enough rows per task to amortise the fork; M large means each row is more work.
  const int64_t grain = ceil_div(std::max<int64_t>(1, 256 / std::max<int64_t>(1, a.M)), kTileRows);
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    kernel(a, t0 * kTileRows, std::min(t1 * kTileRows, n_end));
  });
}

double time_rows_us(MatmulKernel kernel, const MatmulArgs& a, int64_t n_end) {
  auto t0 = std::chrono::steady_clock::now();
  run_rows(kernel, a, n_end);
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
}

template <typename scalar_t>
void epilogue(const int32_t* acc, const float* x_scale, const float* w_scale, bool per_channel, const Tensor& bias,
              scalar_t* y, int64_t M, int64_t N) {
  Tensor bias_f = bias.defined() ? bias.to(at::kFloat).contiguous() : Tensor();
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float v = static_cast<float>(acc[m * N + n]) / x_scale[m] * w_scale[per_channel ? n : 0];
        y[m * N + n] = static_cast<scalar_t>(b ? v + b[n] : v);
      }
  });
}

// Checks every argument; returns the weights' header (w must be contiguous).
Prepacked check_matmul_args(const Tensor& x, const Tensor& w, const Tensor& w_scale, const std::optional<Tensor>& bias,
                            int64_t act_bits, const char* op) {
  check_cpu(x, op, "x");
  check_cpu(w, op, "w_prepacked");
  check_cpu(w_scale, op, "w_scale");
  check_float(x, op, "x");
  act_qmax(act_bits, op);
  TORCH_CHECK(x.dim() >= 1, "agentforge.", op, ": x must have at least one dimension");
  const Prepacked p = read_prepacked(w, op);
  const int64_t N = p.N, K = x.size(-1);
  TORCH_CHECK(K == p.K, "agentforge.", op, ": x has K=", K, " features (x shape ", x.sizes(),
              ") but w_prepacked was packed for K=", p.K, " (w_prepacked shape ", w.sizes(), ")");
  TORCH_CHECK(K < kMaxK, "agentforge.", op, ": K=", K,
              " is too large; the int32 accumulators of the kernels are "
              "exact for K < ",
              kMaxK, " (split the layer along K)");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 &&
                  (w_scale.size(0) == 1 || w_scale.size(0) == N),
              "agentforge.", op, ": w_scale must be float32 of shape [1] or [", N, "], got ", w_scale.scalar_type(),
              " ", w_scale.sizes());
  if (bias.has_value() && bias->defined()) {
    check_cpu(*bias, op, "bias");
    check_float(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "agentforge.", op, ": bias must have shape [", N, "], got ",
                bias->sizes());
  }
  return p;
}

Tensor matmul_prepacked(const Tensor& x, const Prepacked& p, const Tensor& w_scale_in, const Tensor& bias, int bits) {
  const int64_t N = p.N, K = x.size(-1), KB = p.KB, Kp = KB * block_weights(p.layout);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  Tensor x2d = as_rows(x);
  const int64_t M = x2d.size(0);
  Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.reshape(out_shape);

  // 64 bytes of slack: the AVX-512 GEMM reads a base3 chunk's last 64-byte step past the row
  Tensor x_q = at::empty({M * Kp + 64}, x.options().dtype(at::kChar));
  Tensor x_scale = at::empty({M}, x.options().dtype(at::kFloat));
  Tensor x_sum = at::empty({M}, x.options().dtype(at::kInt));
  quantize_rows(x2d, bits, x_q.data_ptr<int8_t>(), Kp, x_scale.data_ptr<float>(), x_sum.data_ptr<int32_t>());
  Tensor acc = at::empty({M, N}, x.options().dtype(at::kInt));

  MatmulArgs args{
      p.payload, x_q.data_ptr<int8_t>(), x_sum.data_ptr<int32_t>(), nullptr, acc.data_ptr<int32_t>(), M, N, KB, bits};
  const Isa isa = active_isa();
  if (KB == 0) {
    acc.zero_();
  } else if (p.layout == Layout::base3) {
    TORCH_CHECK(backend_override() != "popcount", "agentforge.ternary_matmul: AGENTFORGE_BACKEND=popcount, but the "
                                                  "popcount backend reads the 2bit layout and these weights are base3");
    run_rows(base3_kernel(isa), args, N);
  } else {
    Tensor planes;
    auto ensure_planes = [&] {
      if (planes.defined()) return;
      // 8 words of padding: the AVX-512 kernel loads a full zmm of planes and masks it
      planes = at::zeros({M * KB * 2 * bits + 8}, x.options().dtype(at::kLong));
      args.planes = reinterpret_cast<const uint64_t*>(planes.data_ptr<int64_t>());
      activation_planes(args.x, M, KB, bits, reinterpret_cast<uint64_t*>(planes.data_ptr<int64_t>()));
    };
    const Backend backend = choose_backend(shape_class(M, K, bits), [&](Backend b) {
      if (b == Backend::popcount) ensure_planes();
      return time_rows_us(matmul_kernel(b, isa), args, std::min(N, kProbeRows));
    });
    if (backend == Backend::popcount) ensure_planes();
    run_rows(matmul_kernel(backend, isa), args, N);
  }

  Tensor w_scale = w_scale_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ternary_matmul_epilogue", [&] {
    epilogue<scalar_t>(acc.data_ptr<int32_t>(), x_scale.data_ptr<float>(), w_scale.data_ptr<float>(),
                       w_scale.size(0) == N && N != 1, bias, y.data_ptr<scalar_t>(), M, N);
  });
  return y.reshape(out_shape);
}

}  // namespace

Tensor ternary_matmul(const Tensor& x, const Tensor& w_in, const Tensor& w_scale, const std::optional<Tensor>& bias,
                      int64_t act_bits) {
  Tensor w = w_in.contiguous();
  const Prepacked p = check_matmul_args(x, w, w_scale, bias, act_bits, "ternary_matmul");
  return matmul_prepacked(x, p, w_scale, bias.has_value() ? *bias : Tensor(), static_cast<int>(act_bits));
}

Tensor bitlinear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, bool per_channel) {
  const char* op = "bitlinear";
  check_cpu(x, op, "x");
  check_float(x, op, "x");
  auto [codes, scale] = ternary_codes(w, per_channel, op);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "agentforge.", op, ": x has ", x.dim() ? x.size(-1) : 0,
              " features but w expects ", w.size(1));
  Tensor prepacked = prepack_codes(codes, Layout::two_bit);
  const Prepacked p = check_matmul_args(x, prepacked, scale, bias, 8, op);
  return matmul_prepacked(x, p, scale, bias.has_value() ? *bias : Tensor(), 8);
}

namespace {

// Evicts a tensor from every cache level: clflush on x86-64 (it is part of SSE2), DC CIVAC on
// aarch64 Linux (which lets user space clean and invalidate by address). Elsewhere nothing is
// evicted, and cold_layout times weights that may still be cached.
void evict(const Tensor& t) {
  const char* p = static_cast<const char*>(t.data_ptr());
#if AF_X86_SIMD
  for (int64_t i = 0; i < t.nbytes(); i += 64) _mm_clflush(p + i);
  _mm_mfence();
#elif defined(__aarch64__) && defined(__linux__)
  for (int64_t i = 0; i < t.nbytes(); i += 64) asm volatile("dc civac, %0" : : "r"(p + i) : "memory");
  asm volatile("dsb ish" : : : "memory");
#else
  (void)p;
#endif
}

}  // namespace

Layout cold_layout(int64_t N, int64_t K, double* us_2bit, double* us_base3) {
  TORCH_CHECK(N > 0 && K > 0 && K < kMaxK, "agentforge.cold_layout: N=", N, " and K=", K, " must be positive, K < ",
              kMaxK);
  // Fixed pseudo-random codes and activations: the measurement must not touch torch's RNG.
  Tensor codes = at::empty({N, K}, at::kChar);
  uint32_t state = 12345;
  int8_t* c = codes.data_ptr<int8_t>();
  for (int64_t i = 0; i < N * K; ++i) {
    state = state * 1664525u + 1013904223u;
    c[i] = static_cast<int8_t>(static_cast<int>(state >> 30) % 3 - 1);
  }
  Tensor x = at::arange(K, at::kFloat).sin_().reshape({1, K});
  Tensor one = at::ones({1}, at::kFloat);
  const Tensor w[2] = {prepack_codes(codes, Layout::two_bit), prepack_codes(codes, Layout::base3)};
  double best[2] = {1e30, 1e30};
  for (int rep = 0; rep < 7; ++rep)
    for (int l = 0; l < 2; ++l) {
      evict(w[l]);
      const auto t0 = std::chrono::steady_clock::now();
      matmul_prepacked(x, read_prepacked(w[l], "cold_layout"), one, Tensor(), 8);
      best[l] = std::min(best[l],
                         std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    }
  *us_2bit = best[0];
  *us_base3 = best[1];
  return best[1] < best[0] ? Layout::base3 : Layout::two_bit;
}

double read_bandwidth(int64_t nbytes, int64_t reps) {
  TORCH_CHECK(nbytes >= 256 && reps >= 1, "agentforge.read_bandwidth: nbytes=", nbytes, " and reps=", reps,
              " must be at least 256 and 1");
  // written once, so every page is mapped before timing; torch allocates 64-byte aligned
  Tensor buffer = at::ones({nbytes}, at::kByte);
  const uint8_t* p = buffer.data_ptr<uint8_t>();
  const int64_t threads = at::get_num_threads(), share = nbytes / threads / 128 * 128;
  // the machine's ability, not the active ISA's: the widest read this CPU has
#if AF_X86_SIMD
  const auto read_stream = detected_isa() == Isa::scalar ? read_stream_scalar : read_stream_avx2;
#else
  const auto read_stream = read_stream_scalar;
#endif
  std::atomic<uint64_t> sink{0};
  double best = 1e30;
  for (int64_t rep = 0; rep <= reps; ++rep) {  // rep 0 warms up
    const auto t0 = std::chrono::steady_clock::now();
    // one contiguous share per thread, as the GEMV's threads each stream their own run of tiles
    // (read_stream is in another translation unit, so the reads cannot be optimised away)
    at::parallel_for(0, threads, 1, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) sink += read_stream(p + t * share, share);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (rep > 0) best = std::min(best, s);
  }
  return static_cast<double>(share * threads) / best / 1e9;
}

}  // namespace cpu
}  // namespace agentforge
