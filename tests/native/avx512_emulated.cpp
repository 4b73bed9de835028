// Checks the AVX-512 kernels against the scalar ones on CPUs without AVX-512: the AVX-512
// file is compiled with -DAF_SIMDE, so SIMDe supplies portable versions of its intrinsics.
// Built and run by tests/test_avx512_emulated.py. Prints "N passed, 0 failed" or the first
// mismatch and exits non-zero.
//
// Payload bytes are uniformly random, so 2bit fields include the code 3 that prepack never
// writes (every kernel must read it as w = 2) and base3 bytes take all 256 values.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/kernels.h"

using namespace agentforge::cpu;

namespace {

struct Case {
  int64_t M, N, KB;
  int bits;
  bool base3;
};

bool check(const Case& c, std::mt19937& rng) {
  const int64_t bk = c.base3 ? kBase3BlockK : kBlockK;
  std::vector<uint8_t> w(c.N * c.KB * kBlockBytes);
  for (auto& byte : w) byte = (uint8_t)rng();
  const int lo = -(1 << (c.bits - 1)), hi = (1 << (c.bits - 1)) - 1;
  std::vector<int8_t> x(c.M * c.KB * bk + 64, 0);  // 64 bytes of slack, as matmul.cpp allocates
  std::vector<int32_t> x_sum(c.M, 0);
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t k = 0; k < c.KB * bk; ++k) {
      x[m * c.KB * bk + k] = (int8_t)(lo + (int)(rng() % (hi - lo + 1)));
      x_sum[m] += x[m * c.KB * bk + k];
    }
  std::vector<uint64_t> planes(c.M * c.KB * 2 * c.bits + 8, 0);
  if (!c.base3) activation_planes(x.data(), c.M, c.KB, c.bits, planes.data());
  std::vector<int32_t> want(c.M * c.N), got(c.M * c.N);
  MatmulArgs a{w.data(), x.data(), x_sum.data(), planes.data(), want.data(), c.M, c.N, c.KB, c.bits};
  (c.base3 ? base3_matmul_scalar : int8_matmul_scalar)(a, 0, c.N);
  const MatmulKernel kernels[] = {int8_matmul_avx512, popcount_matmul_avx512, base3_matmul_avx512};
  const char* names[] = {"int8", "popcount", "base3"};
  for (int i = c.base3 ? 2 : 0; i < (c.base3 ? 3 : 2); ++i) {
    a.out = got.data();
    // two row ranges, as two threads would split them
    const int64_t split = (c.N / 2) / kTileRows * kTileRows;
    kernels[i](a, 0, split);
    kernels[i](a, split, c.N);
    for (int64_t j = 0; j < c.M * c.N; ++j)
      if (got[j] != want[j]) {
        std::printf("MISMATCH %s M=%ld N=%ld KB=%ld bits=%d at (%ld, %ld): %d != %d\n", names[i], (long)c.M, (long)c.N,
                    (long)c.KB, c.bits, (long)(j / c.N), (long)(j % c.N), got[j], want[j]);
        return false;
      }
  }
  return true;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  int passed = 0, failed = 0;
  for (bool base3 : {false, true})
    for (int64_t M : {1, 2, 3, 4, 5, 7, 64, 67})
      for (int64_t N : {1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 17, 66})
        for (int64_t KB : {1, 2, 3, 17, 33})
          for (int bits : {8, 4, 2}) {
            if (M > 8 && (KB > 3 || N > 9)) continue;  // keep the emulated run short
            if (base3 && bits != 8) continue;          // the base3 kernel does not read act_bits
            check({M, N, KB, bits, base3}, rng) ? ++passed : ++failed;
            if (failed) break;
          }
  // past the base3 kernel's 512-block accumulation window
  for (bool base3 : {false, true})
    for (int64_t M : {1, 2}) check({M, 9, 600, 8, base3}, rng) ? ++passed : ++failed;
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}
