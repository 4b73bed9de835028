// Portable kernels: the reference-speed fallback for any x86-64 (and the oracle the SIMD
// kernels are tested against through the op).
#include "cpu/kernels.h"
#include "cpu/popcount_impl.h"

namespace agentforge {
namespace cpu {

void int8_matmul_scalar(const MatmulArgs& a, int64_t n0, int64_t n1) {
  const int64_t Kp = a.KB * kBlockK;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* x = a.x + m * Kp;
      int32_t acc = 0;
      for (int64_t kb = 0; kb < a.KB; ++kb) {
        const uint8_t* blk = a.w + block_offset(a.N, a.KB, n, kb);
        const int8_t* xb = x + kb * kBlockK;
        for (int s = 0; s < 4; ++s)
          for (int j = 0; j < 32; ++j) acc += ((blk[j] >> (2 * s)) & 3) * xb[32 * s + j];
      }
      a.out[m * a.N + n] = acc - a.x_sum[m];
    }
  }
}

void base3_matmul_scalar(const MatmulArgs& a, int64_t n0, int64_t n1) {
  const int64_t Kp = a.KB * kBase3BlockK;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.M; ++m) {
      const int8_t* x = a.x + m * Kp;
      int32_t acc = 0;
      for (int64_t kb = 0; kb < a.KB; ++kb) {
        const uint8_t* blk = a.w + block_offset(a.N, a.KB, n, kb);
        const int8_t* xb = x + kb * kBase3BlockK;
        for (int j = 0; j < 32; ++j) {
          uint8_t codes[5];
          base3_decode(blk[j], codes);
          for (int s = 0; s < 5; ++s) acc += codes[s] * xb[32 * s + j];
        }
      }
      a.out[m * a.N + n] = acc - a.x_sum[m];
    }
  }
}

void popcount_matmul_scalar(const MatmulArgs& a, int64_t n0, int64_t n1) {
  popcount_matmul_generic(a, n0, n1, weight_planes_scalar);
}

void activation_planes(const int8_t* x, int64_t M, int64_t KB, int bits, uint64_t* planes) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t kb = 0; kb < KB; ++kb)
      for (int h = 0; h < 2; ++h) {
        const uint8_t* v = (const uint8_t*)(x + m * KB * kBlockK + kb * kBlockK + 64 * h);
        uint64_t* out = planes + ((m * KB + kb) * 2 + h) * bits;
        for (int b = 0; b < bits; ++b) {
          uint64_t word = 0;
          for (int i = 0; i < 64; ++i) word |= (uint64_t)((v[i] >> b) & 1) << i;
          out[b] = word;
        }
      }
}

// Eight independent 64-bit sums per cache line keep enough loads in flight; the compiler
// vectorises the loop, and the returned sum keeps it from removing the reads.
uint64_t read_stream_scalar(const uint8_t* p, int64_t bytes) {
  const uint64_t* w = (const uint64_t*)p;
  uint64_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < bytes / 8; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += w[i + j];
  return s[0] ^ s[1] ^ s[2] ^ s[3] ^ s[4] ^ s[5] ^ s[6] ^ s[7];
}

}  // namespace cpu
}  // namespace agentforge
