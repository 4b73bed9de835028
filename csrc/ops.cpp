// The agentforge op library: every schema is defined here, once. CPU kernels live in
// csrc/cpu/, CUDA kernels in csrc/cuda/ (when built); fake kernels, autograd and the
// pure-PyTorch references are in python/agentforge/ops/.
//
// The module also binds, with pybind11, the few functions that are not ops: cpu_info, set_isa,
// and the two measurements (cold_layout, read_bandwidth) that the layout choice and
// `agentforge bench --cold` rest on.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include "cpu/arch.h"
#include "cpu/ops_cpu.h"

TORCH_LIBRARY(agentforge, m) {
  m.def("quantize_ternary(Tensor w, bool per_channel=False) -> (Tensor codes, Tensor scale)");
  m.def("quantize_activations(Tensor x, int bits=8) -> (Tensor x_q, Tensor scale, Tensor row_sum)");
  m.def("pack_ternary(Tensor codes) -> Tensor");
  m.def("unpack_ternary(Tensor packed, int K) -> Tensor");
  m.def("pack_ternary_base3(Tensor codes) -> Tensor");
  m.def("unpack_ternary_base3(Tensor packed, int K) -> Tensor");
  m.def("prepack_ternary(Tensor packed, int K=-1, str layout=\"2bit\") -> Tensor");
  m.def("unprepack_ternary(Tensor w_prepacked, int K) -> Tensor");
  m.def("ternary_matmul(Tensor x, Tensor w_prepacked, Tensor w_scale, Tensor? bias=None, int act_bits=8) -> Tensor");
  m.def("ternary_fake_quant(Tensor w, bool per_channel=False) -> Tensor");
  m.def("act_fake_quant(Tensor x, int bits=8) -> Tensor");
  m.def("bitlinear(Tensor x, Tensor w, Tensor? bias=None, bool per_channel=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(agentforge, CPU, m) {
  namespace c = agentforge::cpu;
  m.impl("quantize_ternary", &c::quantize_ternary);
  m.impl("quantize_activations", &c::quantize_activations);
  m.impl("pack_ternary", &c::pack_ternary);
  m.impl("unpack_ternary", &c::unpack_ternary);
  m.impl("pack_ternary_base3", &c::pack_ternary_base3);
  m.impl("unpack_ternary_base3", &c::unpack_ternary_base3);
  m.impl("prepack_ternary", &c::prepack_ternary);
  m.impl("unprepack_ternary", &c::unprepack_ternary);
  m.impl("ternary_matmul", &c::ternary_matmul);
  m.impl("ternary_fake_quant", &c::ternary_fake_quant);
  m.impl("act_fake_quant", &c::act_fake_quant);
  m.impl("bitlinear", &c::bitlinear);
}

namespace {

pybind11::dict cpu_info() {
  namespace c = agentforge::cpu;
  pybind11::dict features;
#if AF_X86_SIMD  // else no x86 features to report: an empty dict
  __builtin_cpu_init();
  features["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  features["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
  features["popcnt"] = static_cast<bool>(__builtin_cpu_supports("popcnt"));
  features["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  features["avx512bw"] = static_cast<bool>(__builtin_cpu_supports("avx512bw"));
  features["avx512vl"] = static_cast<bool>(__builtin_cpu_supports("avx512vl"));
  features["avx512vnni"] = static_cast<bool>(__builtin_cpu_supports("avx512vnni"));
  features["avx512vpopcntdq"] = static_cast<bool>(__builtin_cpu_supports("avx512vpopcntdq"));
#endif
  pybind11::list table;
  for (const auto& r : c::dispatch_records()) {
    pybind11::dict row;
    row["shape_class"] = r.shape_class;
    row["backend"] = r.backend;
    row["int8_us"] = r.int8_us;
    row["popcount_us"] = r.popcount_us;
    table.append(row);
  }
  pybind11::dict info;
  info["isa"] = c::isa_name(c::active_isa());
  info["detected_isa"] = c::isa_name(c::detected_isa());
  info["features"] = features;
  info["threads"] = at::get_num_threads();
  info["backend_override"] = c::backend_override();
  info["dispatch"] = table;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "agentforge native core: registers torch.ops.agentforge.* on import";
  m.def("cpu_info", &cpu_info, "Detected CPU features, the active kernel ISA and the measured backend table");
  m.def("set_isa", &agentforge::cpu::set_active_isa,
        "Use the kernels of a lower ISA (scalar, avx2, avx512) than the one detected; for tests and benchmarks");
  m.def(
      "cold_layout",
      [](int64_t N, int64_t K) {
        double us_2bit = 0, us_base3 = 0;
        const auto layout = agentforge::cpu::cold_layout(N, K, &us_2bit, &us_base3);
        return pybind11::make_tuple(agentforge::cpu::layout_name(layout), us_2bit, us_base3);
      },
      "(layout, us_2bit, us_base3): the prepacked layout whose M=1 matmul of N x K weights is faster with the "
      "weights streamed from memory (caches flushed before each timed call), and the two best times");
  m.def("read_bandwidth", &agentforge::cpu::read_bandwidth,
        "Read bandwidth in GB/s of a STREAM-like kernel over a fresh nbytes buffer on torch's threads (one "
        "contiguous share each), the best of reps passes");
}
