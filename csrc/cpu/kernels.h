// Raw-pointer CPU kernels for ternary matmul, one implementation per instruction set.
//
// This header is included by the ISA-specific translation units, so it must stay free of
// torch and standard-library templates (see cmake/CpuIsaKernels.cmake).
//
// Two prepacked payload layouts (prepacked.h adds the header that describes them). Both group
// rows in tiles of kTileRows (the last tile may be shorter); inside a tile, for each block of
// weights along K, the tile's rows follow each other, kBlockBytes bytes per row. So a tile is
// one contiguous run of memory that the GEMV reads front to back: one sequential stream.
// Byte offset of (row n, block kb) = (n - r) * KB * 32 + (kb * rows_in_tile + r) * 32, r = n % 8.
//
//   2bit:  a block holds kBlockK = 128 weights; byte j holds, in bits 2s..2s+1, the code
//          c = w + 1 of element 32s + j. Padding (K up to KB * 128) holds code 1 (w = 0).
//          Every kernel reads any 2-bit field c as w = c - 1, so the code 3 that prepack never
//          writes still means one thing (w = 2) on every ISA and backend.
//   base3: a block holds kBase3BlockK = 160 weights, 5 per byte: byte j holds the codes c_0..c_4
//          of elements j, 32 + j, 64 + j, 96 + j, 128 + j as the 8-bit fixed-point fraction
//          q' = ceil(256 q / 243) of q = sum_s c_s 3^(4-s). Code c_s is then
//          floor(3 m_s / 256) with m_0 = q', m_(s+1) = 3 m_s mod 256: a decode with byte adds and
//          compares, no tables. Every byte value decodes to valid codes (q' in 0..255 always gives
//          q = floor(243 q' / 256) in 0..242). Padding holds code 1.
#pragma once
#include <stdint.h>

namespace agentforge {
namespace cpu {

constexpr int64_t kBlockK = 128;
constexpr int64_t kBase3BlockK = 160;
constexpr int64_t kBlockBytes = 32;
constexpr int64_t kTileRows = 8;

// How far ahead of its loads the GEMV prefetches the weight stream, in bytes, and into L2
// (_MM_HINT_T1 in both x86 kernels). Measured kernel-only (no Python, no activation
// quantization), M = 1, one thread, weights rotated through 2 GiB of copies, as % of a plain
// AVX2 read of the same bytes in the same process:
// - 2-core Sapphire/Emerald Rapids guest (AVX-512 kernel; 4096 x 4096 and 11008 x 4096): into
//   L1 (T0) 2 KiB ahead 92-94 %, 4 KiB 93-94 %, no prefetch 70 %; into L2 (T1) 2 KiB 89 %,
//   4 KiB 97-103 %, 8 KiB 91-98 %. The AVX2 kernel there: T0 2 KiB 82-85 %, T1 4 KiB 83-95 %.
// - 2-core Zen 3 (AVX2 kernel, 4096 x 4096): no prefetch 14.4 GB/s, 2 KiB 17.6-18.7,
//   3-6 KiB 16.8-18.7 of a 21.3 GB/s read; T1 vs T0 within run-to-run noise (±5 %).
constexpr int64_t kPrefetchBytes = 4096;

static inline int64_t rows_in_tile(int64_t N, int64_t n) {
  int64_t start = n - n % kTileRows;
  return N - start < kTileRows ? N - start : kTileRows;
}

static inline int64_t block_offset(int64_t N, int64_t KB, int64_t n, int64_t kb) {
  int64_t r = n % kTileRows;
  return (n - r) * KB * kBlockBytes + (kb * rows_in_tile(N, n) + r) * kBlockBytes;
}

// The 5 codes (c = w + 1) of a base3 byte, in element order (element 32s + j is codes[s]).
static inline void base3_decode(uint8_t byte, uint8_t codes[5]) {
  unsigned m = byte;
  for (int s = 0; s < 5; ++s) {
    m *= 3;
    codes[s] = (uint8_t)(m >> 8);
    m &= 255;
  }
}

static inline uint8_t base3_encode(const uint8_t codes[5]) {
  unsigned q = 0;
  for (int s = 0; s < 5; ++s) q = 3 * q + codes[s];
  return (uint8_t)((256 * q + 242) / 243);  // ceil(256 q / 243)
}

// Integer part of y = x_q · wᵀ for prepacked ternary w.
struct MatmulArgs {
  const uint8_t* w;       // prepacked payload, N rows
  const int8_t* x;        // quantized activations [M, KB * block weights], zero padded
  const int32_t* x_sum;   // [M] sum of each activation row (kernels compute Σ(w+1)·x − Σx)
  const uint64_t* planes; // popcount path only: activation bit-planes, see activation_planes()
  int32_t* out;           // [M, N] exact Σ w·x
  int64_t M, N, KB;
  int act_bits;           // popcount path only: number of activation bit-planes
};

// Each kernel computes out[:, n0:n1]; n0 is a multiple of kTileRows.
typedef void (*MatmulKernel)(const MatmulArgs& a, int64_t n0, int64_t n1);

void int8_matmul_scalar(const MatmulArgs& a, int64_t n0, int64_t n1);
void int8_matmul_avx2(const MatmulArgs& a, int64_t n0, int64_t n1);
void int8_matmul_avx512(const MatmulArgs& a, int64_t n0, int64_t n1);
void popcount_matmul_scalar(const MatmulArgs& a, int64_t n0, int64_t n1);
void popcount_matmul_avx2(const MatmulArgs& a, int64_t n0, int64_t n1);
void popcount_matmul_avx512(const MatmulArgs& a, int64_t n0, int64_t n1);
// base3 layout (KB counts 160-weight blocks; x rows are KB * 160 long plus 64 bytes of slack)
void base3_matmul_scalar(const MatmulArgs& a, int64_t n0, int64_t n1);
void base3_matmul_avx2(const MatmulArgs& a, int64_t n0, int64_t n1);
void base3_matmul_avx512(const MatmulArgs& a, int64_t n0, int64_t n1);

// A STREAM-like read of `bytes` bytes (a multiple of 128, 64-byte aligned) that the compiler
// cannot elide; the return value is a checksum. For measuring the machine's read bandwidth
// (agentforge bench). The AVX2 one is the faster on the dev machine (20.4 vs 18.4 GB/s on one
// thread); software prefetch slowed both (15.6-18.1 GB/s), so neither uses it.
uint64_t read_stream_scalar(const uint8_t* p, int64_t bytes);
uint64_t read_stream_avx2(const uint8_t* p, int64_t bytes);

// Activation bit-planes for the popcount path: for row m, block kb, half h (elements
// 64h .. 64h+63 of the block) and bit b, one 64-bit word whose bit i is bit b of the
// two's-complement int8 activation at element 64h + i. Index: ((m * KB + kb) * 2 + h) * bits + b.
// The buffer is followed by 8 zero words, so a kernel may load 8 planes at any index.
void activation_planes(const int8_t* x, int64_t M, int64_t KB, int bits, uint64_t* planes);

// Weight bit-planes of one 32-byte block, same element order as activation_planes: lo[h] has
// bit i set where bit 0 of the code is set, hi[h] where bit 1 is, so w = lo + 2 hi - 1.
static inline void weight_planes_scalar(const uint8_t* block, uint64_t lo[2], uint64_t hi[2]) {
  for (int h = 0; h < 2; ++h) {
    uint64_t l = 0, g = 0;
    for (int i = 0; i < 64; ++i) {
      int s = 2 * h + i / 32, j = i % 32;
      int code = (block[j] >> (2 * s)) & 3;
      l |= (uint64_t)(code & 1) << i;
      g |= (uint64_t)(code >> 1) << i;
    }
    lo[h] = l;
    hi[h] = g;
  }
}

}  // namespace cpu
}  // namespace agentforge
