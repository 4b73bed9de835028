// ternary_matmul and the fused bitlinear forward: y = dequant(act_quant(x) · codesᵀ) (+ bias).
//
// Steps: quantize activations per token into zero-padded int8 rows; choose a backend
// (int8-dot or popcount, measured per shape class); run the ISA's kernel over row tiles in
// parallel; scale the exact int32 dot products: y = acc / x_scale * w_scale (+ bias).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <cmath>
#include <string>
#include <vector>

#include "cpu/ops_cpu.h"

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
  const int64_t grain = std::max<int64_t>(1, 64 / std::max<int64_t>(1, a.M));
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

void check_matmul_args(const Tensor& x, const Tensor& w, const Tensor& w_scale, const std::optional<Tensor>& bias,
                       int64_t act_bits, const char* op) {
  check_cpu(x, op, "x");
  check_cpu(w, op, "w_prepacked");
  check_cpu(w_scale, op, "w_scale");
  check_float(x, op, "x");
  act_qmax(act_bits, op);
  TORCH_CHECK(x.dim() >= 1, "agentforge.", op, ": x must have at least one dimension");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "agentforge.", op,
              ": w_prepacked must be a 2-D uint8 tensor from prepack_ternary, got ", w.scalar_type(), " ",
              w.sizes());
  TORCH_CHECK(w.size(1) % kBlockBytes == 0, "agentforge.", op, ": w_prepacked has ", w.size(1),
              " bytes per row, not a multiple of ", kBlockBytes, "; was it made by prepack_ternary?");
  const int64_t N = w.size(0), K = x.size(-1), KB = w.size(1) / kBlockBytes;
  TORCH_CHECK(K < kMaxK, "agentforge.", op, ": K=", K, " is too large; the int32 accumulators of the kernels are "
              "exact for K < ", kMaxK, " (split the layer along K)");
  TORCH_CHECK(ceil_div(K, kBlockK) == KB, "agentforge.", op, ": x has K=", K, " features but w_prepacked holds ",
              KB, " blocks of ", kBlockK, " (K in ", KB == 0 ? 0 : (KB - 1) * kBlockK + 1, "..", KB * kBlockK, ")");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 &&
                  (w_scale.size(0) == 1 || w_scale.size(0) == N),
              "agentforge.", op, ": w_scale must be float32 of shape [1] or [", N, "], got ", w_scale.scalar_type(),
              " ", w_scale.sizes());
  if (bias.has_value() && bias->defined()) {
    check_cpu(*bias, op, "bias");
    check_float(*bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "agentforge.", op, ": bias must have shape [", N,
                "], got ", bias->sizes());
  }
}

Tensor matmul_prepacked(const Tensor& x, const Tensor& w, const Tensor& w_scale_in, const Tensor& bias,
                        int bits) {
  const int64_t N = w.size(0), K = x.size(-1), KB = w.size(1) / kBlockBytes, Kp = KB * kBlockK;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  Tensor x2d = as_rows(x);
  const int64_t M = x2d.size(0);
  Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y.reshape(out_shape);

  Tensor x_q = at::empty({M, Kp}, x.options().dtype(at::kChar));
  Tensor x_scale = at::empty({M}, x.options().dtype(at::kFloat));
  Tensor x_sum = at::empty({M}, x.options().dtype(at::kInt));
  quantize_rows(x2d, bits, x_q.data_ptr<int8_t>(), Kp, x_scale.data_ptr<float>(), x_sum.data_ptr<int32_t>());
  Tensor acc = at::empty({M, N}, x.options().dtype(at::kInt));

  MatmulArgs args{w.data_ptr<uint8_t>(), x_q.data_ptr<int8_t>(), x_sum.data_ptr<int32_t>(), nullptr,
                  acc.data_ptr<int32_t>(), M, N, KB, bits};
  Tensor planes;
  auto ensure_planes = [&] {
    if (planes.defined()) return;
    // 8 words of padding: the AVX-512 kernel loads a full zmm of planes and masks it
    planes = at::zeros({M * KB * 2 * bits + 8}, x.options().dtype(at::kLong));
    args.planes = reinterpret_cast<const uint64_t*>(planes.data_ptr<int64_t>());
    activation_planes(args.x, M, KB, bits, reinterpret_cast<uint64_t*>(planes.data_ptr<int64_t>()));
  };
  const Isa isa = active_isa();
  Backend backend = Backend::int8;
  if (KB > 0) {
    backend = choose_backend(shape_class(M, K, bits), [&](Backend b) {
      if (b == Backend::popcount) ensure_planes();
      return time_rows_us(matmul_kernel(b, isa), args, std::min(N, kProbeRows));
    });
    if (backend == Backend::popcount) ensure_planes();
    run_rows(matmul_kernel(backend, isa), args, N);
  } else {
    acc.zero_();
  }

  Tensor w_scale = w_scale_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ternary_matmul_epilogue", [&] {
    epilogue<scalar_t>(acc.data_ptr<int32_t>(), x_scale.data_ptr<float>(), w_scale.data_ptr<float>(),
                       w_scale.size(0) == N && N != 1, bias, y.data_ptr<scalar_t>(), M, N);
  });
  return y.reshape(out_shape);
}

}  // namespace

Tensor ternary_matmul(const Tensor& x, const Tensor& w, const Tensor& w_scale, const std::optional<Tensor>& bias,
                      int64_t act_bits) {
  check_matmul_args(x, w, w_scale, bias, act_bits, "ternary_matmul");
  return matmul_prepacked(x, w.contiguous(), w_scale, bias.has_value() ? *bias : Tensor(),
                          static_cast<int>(act_bits));
}

Tensor bitlinear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, bool per_channel) {
  const char* op = "bitlinear";
  check_cpu(x, op, "x");
  check_float(x, op, "x");
  auto [codes, scale] = ternary_codes(w, per_channel, op);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.size(1), "agentforge.", op, ": x has ", x.dim() ? x.size(-1) : 0,
              " features but w expects ", w.size(1));
  Tensor prepacked = prepack_codes(codes);
  check_matmul_args(x, prepacked, scale, bias, 8, op);
  return matmul_prepacked(x, prepacked, scale, bias.has_value() ? *bias : Tensor(), 8);
}

}  // namespace cpu
}  // namespace agentforge
