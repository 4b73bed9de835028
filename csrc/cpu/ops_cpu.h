// CPU implementations of the agentforge ops (registered in csrc/ops.cpp) and the helpers
// they share.
#pragma once
#include <ATen/core/Tensor.h>

#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/prepacked.h"

namespace agentforge {
namespace cpu {

using at::Tensor;

constexpr float kWeightEps = 1e-5f;  // scale = max(mean|w|, eps)
constexpr float kActEps = 1e-5f;     // scale = Qp / max(absmax, eps)

std::tuple<Tensor, Tensor> quantize_ternary(const Tensor& w, bool per_channel);
std::tuple<Tensor, Tensor, Tensor> quantize_activations(const Tensor& x, int64_t bits);
Tensor pack_ternary(const Tensor& codes);
Tensor unpack_ternary(const Tensor& packed, int64_t K);
Tensor pack_ternary_base3(const Tensor& codes);
Tensor unpack_ternary_base3(const Tensor& packed, int64_t K);
Tensor prepack_ternary(const Tensor& packed, int64_t K, c10::string_view layout);
Tensor unprepack_ternary(const Tensor& w, int64_t K);
Tensor ternary_matmul(const Tensor& x, const Tensor& w, const Tensor& w_scale, const std::optional<Tensor>& bias,
                      int64_t act_bits);
Tensor ternary_fake_quant(const Tensor& w, bool per_channel);
Tensor act_fake_quant(const Tensor& x, int64_t bits);
Tensor bitlinear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, bool per_channel);

// --- shared helpers --------------------------------------------------------------------

// Ternary codes of a weight matrix plus its scale (per tensor: [1], per channel: [N]).
std::tuple<Tensor, Tensor> ternary_codes(const Tensor& w, bool per_channel, const char* op);

// A prepacked tensor (prepacked.h) straight from int8 codes in {-1, 0, 1}.
Tensor prepack_codes(const Tensor& codes, Layout layout);

// Per-token absmax quantization of a contiguous [M, K] float matrix into int8 rows of
// length Kp >= K (zero padded). Rows with NaN/Inf get scale NaN and zero codes, so the
// matmul output of that row is NaN, as F.linear's would be non-finite.
void quantize_rows(const Tensor& x2d, int bits, int8_t* dst, int64_t Kp, float* scale, int32_t* row_sum);

// x [..., K] as a contiguous [M, K] matrix of tokens (K = 0 included, where reshape(-1, K) fails).
Tensor as_rows(const Tensor& x);

int64_t act_qmax(int64_t bits, const char* op);  // 2^(bits-1) - 1, bits checked in [2, 8]

void check_cpu(const Tensor& t, const char* op, const char* name);
void check_float(const Tensor& t, const char* op, const char* name);

// The faster layout for M = 1 with N x K weights streamed from memory (every cache flushed
// before each timed call), measured here; the two best times in microseconds.
Layout cold_layout(int64_t N, int64_t K, double* us_2bit, double* us_base3);

// The read bandwidth in GB/s of a STREAM-like kernel over a fresh nbytes buffer on torch's
// threads (each reads one contiguous share): the best of `reps` passes after a warm-up pass.
double read_bandwidth(int64_t nbytes, int64_t reps);

// --- instruction sets and backend choice (cpu_info.cpp) ---------------------------------

enum class Isa { scalar = 0, avx2 = 1, avx512 = 2 };
enum class Backend { int8 = 0, popcount = 1 };

const char* isa_name(Isa isa);
Isa detected_isa();
Isa active_isa();
void set_active_isa(const std::string& name);  // only ISAs the CPU supports
MatmulKernel matmul_kernel(Backend backend, Isa isa);
MatmulKernel base3_kernel(Isa isa);

// The backend for a call, from measurements: the first call of a shape class times both
// backends on its own inputs and the winner is kept. AGENTFORGE_BACKEND forces one.
Backend choose_backend(const std::string& shape_class, const std::function<double(Backend)>& time_us);

struct DispatchRecord {
  std::string shape_class;
  std::string backend;
  double int8_us, popcount_us;
};
std::vector<DispatchRecord> dispatch_records();
std::string backend_override();

}  // namespace cpu
}  // namespace agentforge
