// Run-time CPU detection, kernel selection and the measured backend table.
#include <cstdlib>
#include <map>
#include <mutex>

#include <c10/util/Exception.h>

#include "cpu/arch.h"
#include "cpu/ops_cpu.h"

namespace agentforge {
namespace cpu {
namespace {

#if AF_X86_SIMD
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vpopcntdq");
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt") &&
         __builtin_cpu_supports("bmi2");
}
#endif

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::scalar;
  if (name == "avx2") return Isa::avx2;
  if (name == "avx512") return Isa::avx512;
  TORCH_CHECK(false, "agentforge: unknown ISA '", name, "'; use one of scalar, avx2, avx512");
}

Isa initial_isa() {
  Isa isa = detected_isa();
  if (const char* env = std::getenv("AGENTFORGE_ISA")) {
    Isa wanted = parse_isa(env);
    TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(isa), "agentforge: AGENTFORGE_ISA=", env,
                " but this CPU supports at most ", isa_name(isa));
    isa = wanted;
  }
  return isa;
}

std::mutex table_mutex;
std::map<std::string, DispatchRecord>& table() {
  static std::map<std::string, DispatchRecord> t;
  return t;
}
Isa& active() {
  static Isa isa = initial_isa();
  return isa;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "scalar";
  }
}

Isa detected_isa() {
#if AF_X86_SIMD
  static const Isa isa = cpu_has_avx512() ? Isa::avx512 : cpu_has_avx2() ? Isa::avx2 : Isa::scalar;
#else
  static const Isa isa = Isa::scalar;  // the only kernels built for this CPU
#endif
  return isa;
}

Isa active_isa() { return active(); }

void set_active_isa(const std::string& name) {
  Isa wanted = parse_isa(name);
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(detected_isa()), "agentforge: cannot use ISA ", name,
              ": this CPU supports at most ", isa_name(detected_isa()));
  std::lock_guard<std::mutex> lock(table_mutex);
  active() = wanted;
  table().clear();  // measurements belong to the previous ISA's kernels
}

#if AF_X86_SIMD
MatmulKernel matmul_kernel(Backend backend, Isa isa) {
  static const MatmulKernel int8[] = {int8_matmul_scalar, int8_matmul_avx2, int8_matmul_avx512};
  static const MatmulKernel popcount[] = {popcount_matmul_scalar, popcount_matmul_avx2, popcount_matmul_avx512};
  return (backend == Backend::int8 ? int8 : popcount)[static_cast<int>(isa)];
}

MatmulKernel base3_kernel(Isa isa) {
  static const MatmulKernel kernels[] = {base3_matmul_scalar, base3_matmul_avx2, base3_matmul_avx512};
  return kernels[static_cast<int>(isa)];
}
#else
// Only the scalar kernels exist here; set_active_isa admits no other ISA (detected_isa is scalar).
MatmulKernel matmul_kernel(Backend backend, Isa) {
  return backend == Backend::int8 ? int8_matmul_scalar : popcount_matmul_scalar;
}

MatmulKernel base3_kernel(Isa) { return base3_matmul_scalar; }
#endif

std::string backend_override() {
  const char* env = std::getenv("AGENTFORGE_BACKEND");
  std::string value = env ? env : "";
  TORCH_CHECK(value.empty() || value == "auto" || value == "int8" || value == "popcount",
              "agentforge: AGENTFORGE_BACKEND='", value, "' is not one of auto, int8, popcount");
  return value == "auto" ? "" : value;
}

Backend choose_backend(const std::string& shape_class, const std::function<double(Backend)>& time_us) {
  std::string forced = backend_override();
  if (!forced.empty()) return forced == "int8" ? Backend::int8 : Backend::popcount;
  const std::string key = std::string(isa_name(active_isa())) + " " + shape_class;
  {
    std::lock_guard<std::mutex> lock(table_mutex);
    auto it = table().find(key);
    if (it != table().end()) return it->second.backend == "int8" ? Backend::int8 : Backend::popcount;
  }
  // Two rounds each, best of two, so a cold first run does not decide.
  double t_int8 = time_us(Backend::int8), t_pop = time_us(Backend::popcount);
  t_int8 = std::min(t_int8, time_us(Backend::int8));
  t_pop = std::min(t_pop, time_us(Backend::popcount));
  DispatchRecord rec{shape_class, t_pop < t_int8 ? "popcount" : "int8", t_int8, t_pop};
  std::lock_guard<std::mutex> lock(table_mutex);
  table()[key] = rec;
  return rec.backend == "int8" ? Backend::int8 : Backend::popcount;
}

std::vector<DispatchRecord> dispatch_records() {
  std::lock_guard<std::mutex> lock(table_mutex);
  std::vector<DispatchRecord> out;
  for (auto& kv : table()) out.push_back(kv.second);
  return out;
}

}  // namespace cpu
}  // namespace agentforge
