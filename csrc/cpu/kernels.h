// Raw-pointer CPU kernels for ternary matmul, one implementation per instruction set.
//
// This header is included by the ISA-specific translation units, so it must stay free of
// torch and standard-library templates (see cmake/CpuIsaKernels.cmake).
//
// Prepacked CPU layout (one layout for both backends, 2 bits per weight):
//   rows are grouped in tiles of kTileRows (the last tile may be shorter);
//   inside a tile, for each block of kBlockK weights along K, the tile's rows follow
//   each other, kBlockBytes bytes per row;
//   byte j of a row's block holds, in bits 2s..2s+1, the code (w + 1) of element 32*s + j.
//   Byte offset of (row n, block kb) = (n - r) * KB * 32 + (kb * rows_in_tile + r) * 32,
//   r = n % 4. Padding (K up to KB * 128) holds code 1, i.e. weight 0.
#pragma once
#include <stdint.h>

namespace agentforge {
namespace cpu {

constexpr int64_t kBlockK = 128;
constexpr int64_t kBlockBytes = 32;
constexpr int64_t kTileRows = 4;

static inline int64_t rows_in_tile(int64_t N, int64_t n) {
  int64_t start = n - n % kTileRows;
  return N - start < kTileRows ? N - start : kTileRows;
}

static inline int64_t block_offset(int64_t N, int64_t KB, int64_t n, int64_t kb) {
  int64_t r = n % kTileRows;
  return (n - r) * KB * kBlockBytes + (kb * rows_in_tile(N, n) + r) * kBlockBytes;
}

// Integer part of y = x_q · wᵀ for prepacked ternary w.
struct MatmulArgs {
  const uint8_t* w;       // prepacked weights, N rows
  const int8_t* x;        // quantized activations [M, KB * 128], zero padded
  const int32_t* x_sum;   // [M] sum of each activation row (the int8 path computes Σ(w+1)·x − Σx)
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

// Activation bit-planes for the popcount path: for row m, block kb, half h (elements
// 64h .. 64h+63 of the block) and bit b, one 64-bit word whose bit i is bit b of the
// two's-complement int8 activation at element 64h + i. Index: ((m * KB + kb) * 2 + h) * bits + b.
// The buffer is followed by 8 zero words, so a kernel may load 8 planes at any index.
void activation_planes(const int8_t* x, int64_t M, int64_t KB, int bits, uint64_t* planes);

// Weight bit-planes of one 32-byte block, same element order as activation_planes:
// pos[h] has bit i set where w = +1, neg[h] where w = -1.
static inline void weight_planes_scalar(const uint8_t* block, uint64_t pos[2], uint64_t neg[2]) {
  for (int h = 0; h < 2; ++h) {
    uint64_t p = 0, q = 0;
    for (int i = 0; i < 64; ++i) {
      int s = 2 * h + i / 32, j = i % 32;
      int code = (block[j] >> (2 * s)) & 3;
      p |= (uint64_t)(code == 2) << i;
      q |= (uint64_t)(code == 0) << i;
    }
    pos[h] = p;
    neg[h] = q;
  }
}

}  // namespace cpu
}  // namespace agentforge
