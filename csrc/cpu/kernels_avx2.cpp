// AVX2 kernels: vpmaddubsw (u8 code × s8 activation) with int16 partial sums widened to
// int32 before they can overflow; codes are decoded in registers with shifts and masks
// (2bit) or byte adds and compares (base3).
#include <immintrin.h>

#include "cpu/avx2_helpers.h"
#include "cpu/kernels.h"
#include "cpu/popcount_impl.h"

namespace agentforge {
namespace cpu {
namespace {

constexpr int64_t kChunkBlocks = 32;      // GEMM: K chunk decoded at once (4 rows × up to 5 KiB)
constexpr int64_t kGemvChunkBlocks = 16;  // GEMV with M > 1: blocks of a tile reused from L1 per row of x

inline __m256i load(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }

// Prefetch the tile's bytes kPrefetchBytes ahead of the block being read into L2, one per cache line.
template <int R>
inline void prefetch_ahead(const uint8_t* blk) {
  for (int l = 0; l < (R * kBlockBytes + 63) / 64; ++l)
    _mm_prefetch((const char*)(blk + kPrefetchBytes + 64 * l), _MM_HINT_T1);
}

// acc[r] += Σ c·x over blocks [kb0, kb1) of one 2bit tile of R rows. Each 2-bit field is
// shifted down and masked (3 shifts and 4 ands per 128 weights) so all four products go to
// one int16 accumulator per row. Bound: a vpmaddubsw lane is at most 2·3·128 = 768 (code 3
// included), four per block, so int16 holds kInt16Blocks = 10 blocks.
constexpr int64_t kInt16Blocks = 10;

template <int R>
void gemv_tile_2bit(const uint8_t* tile, int64_t kb0, int64_t kb1, const int8_t* x, int32_t* acc) {
  const __m256i m03 = _mm256_set1_epi8(0x03), ones = _mm256_set1_epi16(1);
  __m256i acc32[R];
  for (int r = 0; r < R; ++r) acc32[r] = _mm256_setzero_si256();
  for (int64_t w0 = kb0; w0 < kb1; w0 += kInt16Blocks) {
    const int64_t w1 = kb1 - w0 < kInt16Blocks ? kb1 : w0 + kInt16Blocks;
    __m256i a16[R];
    for (int r = 0; r < R; ++r) a16[r] = _mm256_setzero_si256();
    for (int64_t kb = w0; kb < w1; ++kb) {
      const int8_t* xb = x + kb * kBlockK;
      const uint8_t* blk = tile + kb * R * kBlockBytes;
      prefetch_ahead<R>(blk);
      for (int r = 0; r < R; ++r) {
        const __m256i v = load(blk + r * kBlockBytes);
        const __m256i p0 = _mm256_maddubs_epi16(_mm256_and_si256(v, m03), load(xb));
        const __m256i p1 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 2), m03), load(xb + 32));
        const __m256i p2 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m03), load(xb + 64));
        const __m256i p3 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 6), m03), load(xb + 96));
        a16[r] = _mm256_add_epi16(a16[r], _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3)));
      }
    }
    for (int r = 0; r < R; ++r) acc32[r] = _mm256_add_epi32(acc32[r], _mm256_madd_epi16(a16[r], ones));
  }
  for (int r = 0; r < R; ++r) acc[r] += hsum256(acc32[r]);
}

// acc[r] += Σ c·x over blocks [kb0, kb1) of one base3 tile. The fixed-point state is kept as
// s = m − 128 (m ^ 0x80), where unsigned thresholds become signed compares: the code
// floor(3m / 256) is [m ≥ 86] + [m ≥ 171] = [s > −43] + [s > 42], and m → 3m mod 256 is
// s → 3s (byte adds wrap alike in both forms). Bound: five vpmaddubsw lanes of at most
// 2·2·128 = 512 per block, so int16 holds kInt16Base3Blocks = 12 blocks.
constexpr int64_t kInt16Base3Blocks = 12;

template <int R>
void gemv_tile_base3(const uint8_t* tile, int64_t kb0, int64_t kb1, const int8_t* x, int32_t* acc) {
  const __m256i flip = _mm256_set1_epi8((char)0x80), t1 = _mm256_set1_epi8(-43), t2 = _mm256_set1_epi8(42);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc32[R];
  for (int r = 0; r < R; ++r) acc32[r] = _mm256_setzero_si256();
  for (int64_t w0 = kb0; w0 < kb1; w0 += kInt16Base3Blocks) {
    const int64_t w1 = kb1 - w0 < kInt16Base3Blocks ? kb1 : w0 + kInt16Base3Blocks;
    __m256i a16[R];
    for (int r = 0; r < R; ++r) a16[r] = _mm256_setzero_si256();
    for (int64_t kb = w0; kb < w1; ++kb) {
      const int8_t* xb = x + kb * kBase3BlockK;
      const uint8_t* blk = tile + kb * R * kBlockBytes;
      prefetch_ahead<R>(blk);
      for (int r = 0; r < R; ++r) {
        __m256i s = _mm256_xor_si256(load(blk + r * kBlockBytes), flip);
        for (int p = 0; p < 5; ++p) {
          const __m256i code = _mm256_abs_epi8(_mm256_add_epi8(_mm256_cmpgt_epi8(s, t1), _mm256_cmpgt_epi8(s, t2)));
          a16[r] = _mm256_add_epi16(a16[r], _mm256_maddubs_epi16(code, load(xb + 32 * p)));
          if (p < 4) s = _mm256_add_epi8(_mm256_add_epi8(s, s), s);
        }
      }
    }
    for (int r = 0; r < R; ++r) acc32[r] = _mm256_add_epi32(acc32[r], _mm256_madd_epi16(a16[r], ones));
  }
  for (int r = 0; r < R; ++r) acc[r] += hsum256(acc32[r]);
}

// GEMV (M ≤ 3): every tile is read once, front to back. With M > 1, a chunk of the tile is
// multiplied by each row of x while it sits in L1, so memory sees one stream whatever M is.
template <template <int> class Tile>
void gemv_rows(const MatmulArgs& a, int64_t block_k, int64_t n0, int64_t n1) {
  const int64_t Kp = a.KB * block_k;
  const int64_t chunk = a.M == 1 ? a.KB : kGemvChunkBlocks;
  for (int64_t n = n0; n < n1; n += kTileRows) {
    const int64_t rows = rows_in_tile(a.N, n);
    const uint8_t* tile = a.w + block_offset(a.N, a.KB, n, 0);
    int32_t acc[3][kTileRows] = {};
    for (int64_t kb0 = 0; kb0 < a.KB; kb0 += chunk) {
      const int64_t kb1 = a.KB - kb0 < chunk ? a.KB : kb0 + chunk;
      for (int64_t m = 0; m < a.M; ++m) Tile<kTileRows>::dispatch(rows, tile, kb0, kb1, a.x + m * Kp, acc[m]);
    }
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t r = 0; r < rows; ++r) a.out[m * a.N + n + r] = acc[m][r] - a.x_sum[m];
  }
}

// Tile<8>::dispatch(rows, ...) calls the kernel instantiated for a tile of `rows` rows.
#define AF_TILE_DISPATCH(Name, fn)                                                                                  \
  template <int R>                                                                                                  \
  struct Name {                                                                                                     \
    static void dispatch(int64_t rows, const uint8_t* t, int64_t kb0, int64_t kb1, const int8_t* x, int32_t* acc) { \
      if (rows == R) return fn<R>(t, kb0, kb1, x, acc);                                                             \
      if constexpr (R > 1) Name<R - 1>::dispatch(rows, t, kb0, kb1, x, acc);                                        \
    }                                                                                                               \
  };
AF_TILE_DISPATCH(Tile2bit, gemv_tile_2bit)
AF_TILE_DISPATCH(TileBase3, gemv_tile_base3)
#undef AF_TILE_DISPATCH

// GEMM: decode a K chunk of (up to) 4 rows of a tile into plain u8 codes, then run MR
// activation rows against the 4 code rows with int32 accumulation.
constexpr int64_t kChunkCodes = kChunkBlocks * kBase3BlockK;

void decode_2bit(const MatmulArgs& a, int64_t n, int64_t rows, int64_t kb0, int64_t nkb, uint8_t codes[][kChunkCodes]) {
  const __m256i mask3 = _mm256_set1_epi8(3);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const __m256i v = load(a.w + block_offset(a.N, a.KB, n + r, kb0 + kb));
      for (int s = 0; s < 4; ++s)
        _mm256_storeu_si256((__m256i*)(codes[r] + kb * kBlockK + 32 * s), code_plane(v, s, mask3));
    }
}

void decode_base3(const MatmulArgs& a, int64_t n, int64_t rows, int64_t kb0, int64_t nkb,
                  uint8_t codes[][kChunkCodes]) {
  const __m256i flip = _mm256_set1_epi8((char)0x80), t1 = _mm256_set1_epi8(-43), t2 = _mm256_set1_epi8(42);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t kb = 0; kb < nkb; ++kb) {
      __m256i s = _mm256_xor_si256(load(a.w + block_offset(a.N, a.KB, n + r, kb0 + kb)), flip);
      for (int p = 0; p < 5; ++p) {
        const __m256i code = _mm256_abs_epi8(_mm256_add_epi8(_mm256_cmpgt_epi8(s, t1), _mm256_cmpgt_epi8(s, t2)));
        _mm256_storeu_si256((__m256i*)(codes[r] + kb * kBase3BlockK + 32 * p), code);
        s = _mm256_add_epi8(_mm256_add_epi8(s, s), s);
      }
    }
}

// One vpmaddubsw lane is at most 2 · 3 · 128 = 768, so 32 of them (one window) fit int16.
constexpr int64_t kInt16Window = 32 * 32;

// acc[i][r] += Σ_k codes[r][k] · x[i][k] for MR activation rows and the 4 code rows.
template <int MR>
void gemm_micro(const uint8_t codes[][kChunkCodes], const int8_t* x, int64_t x_stride, int64_t len, int32_t acc[][4]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc32[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r) acc32[i][r] = _mm256_setzero_si256();
  for (int64_t k0 = 0; k0 < len; k0 += kInt16Window) {
    const int64_t k1 = len - k0 < kInt16Window ? len : k0 + kInt16Window;
    __m256i acc16[MR][4];
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < 4; ++r) acc16[i][r] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 32) {
      const __m256i c0 = load(codes[0] + k), c1 = load(codes[1] + k);
      const __m256i c2 = load(codes[2] + k), c3 = load(codes[3] + k);
      for (int i = 0; i < MR; ++i) {
        const __m256i xv = load(x + i * x_stride + k);
        acc16[i][0] = _mm256_add_epi16(acc16[i][0], _mm256_maddubs_epi16(c0, xv));
        acc16[i][1] = _mm256_add_epi16(acc16[i][1], _mm256_maddubs_epi16(c1, xv));
        acc16[i][2] = _mm256_add_epi16(acc16[i][2], _mm256_maddubs_epi16(c2, xv));
        acc16[i][3] = _mm256_add_epi16(acc16[i][3], _mm256_maddubs_epi16(c3, xv));
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < 4; ++r) acc32[i][r] = _mm256_add_epi32(acc32[i][r], _mm256_madd_epi16(acc16[i][r], ones));
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r) acc[i][r] += hsum256(acc32[i][r]);
}

// Outputs of 4 rows for a block of activation rows are summed locally and written once, so
// threads on neighbouring tiles never share a cache line in the inner loop. A tile's two
// halves are decoded in turn; the second reads the chunk from cache.
constexpr int64_t kRowBlock = 64;

typedef void (*DecodeChunk)(const MatmulArgs&, int64_t, int64_t, int64_t, int64_t, uint8_t[][kChunkCodes]);

void gemm_rows(const MatmulArgs& a, int64_t block_k, DecodeChunk decode, int64_t n0, int64_t n1) {
  alignas(64) uint8_t codes[4][kChunkCodes];
  int32_t acc[kRowBlock][4];
  const int64_t Kp = a.KB * block_k;
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t rows = n1 - n < 4 ? n1 - n : 4;
    for (int64_t m0 = 0; m0 < a.M; m0 += kRowBlock) {
      const int64_t mb = a.M - m0 < kRowBlock ? a.M - m0 : kRowBlock;
      for (int64_t i = 0; i < mb; ++i)
        for (int64_t r = 0; r < 4; ++r) acc[i][r] = -a.x_sum[m0 + i];
      for (int64_t kb0 = 0; kb0 < a.KB; kb0 += kChunkBlocks) {
        const int64_t nkb = a.KB - kb0 < kChunkBlocks ? a.KB - kb0 : kChunkBlocks;
        // rows past the end of a short tile decode as zeros and are never stored
        for (int64_t r = rows; r < 4; ++r)
          for (int64_t k = 0; k < nkb * block_k; ++k) codes[r][k] = 0;
        decode(a, n, rows, kb0, nkb, codes);
        const int8_t* x = a.x + m0 * Kp + kb0 * block_k;
        int64_t i = 0;
        for (; i + 2 <= mb; i += 2) gemm_micro<2>(codes, x + i * Kp, Kp, nkb * block_k, acc + i);
        if (i < mb) gemm_micro<1>(codes, x + i * Kp, Kp, nkb * block_k, acc + i);
      }
      for (int64_t i = 0; i < mb; ++i)
        for (int64_t r = 0; r < rows; ++r) a.out[(m0 + i) * a.N + n + r] = acc[i][r];
    }
  }
}

}  // namespace

void int8_matmul_avx2(const MatmulArgs& a, int64_t n0, int64_t n1) {
  if (a.M < 4) return gemv_rows<Tile2bit>(a, kBlockK, n0, n1);
  gemm_rows(a, kBlockK, decode_2bit, n0, n1);
}

void base3_matmul_avx2(const MatmulArgs& a, int64_t n0, int64_t n1) {
  if (a.M < 4) return gemv_rows<TileBase3>(a, kBase3BlockK, n0, n1);
  gemm_rows(a, kBase3BlockK, decode_base3, n0, n1);
}

void popcount_matmul_avx2(const MatmulArgs& a, int64_t n0, int64_t n1) {
  popcount_matmul_generic(a, n0, n1, weight_planes_simd);
}

// Four independent 32-byte loads per 128 bytes, and the GEMV's own prefetch, keep enough
// cache-line reads in flight: without the prefetch this read was 10-12 % slower than with it
// (13.0-13.3 vs 14.2-15.0 GB/s on one thread of the Rapids guest, kernels.h), and fp32 F.linear
// streamed its weights faster than the "bandwidth" it was compared with.
uint64_t read_stream_avx2(const uint8_t* p, int64_t bytes) {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t i = 0; i < bytes; i += 128) {
    _mm_prefetch((const char*)(p + i + kPrefetchBytes), _MM_HINT_T1);
    _mm_prefetch((const char*)(p + i + kPrefetchBytes + 64), _MM_HINT_T1);
    s0 = _mm256_add_epi64(s0, _mm256_load_si256((const __m256i*)(p + i)));
    s1 = _mm256_add_epi64(s1, _mm256_load_si256((const __m256i*)(p + i + 32)));
    s2 = _mm256_add_epi64(s2, _mm256_load_si256((const __m256i*)(p + i + 64)));
    s3 = _mm256_add_epi64(s3, _mm256_load_si256((const __m256i*)(p + i + 96)));
  }
  const __m256i s = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
  return (uint64_t)_mm256_extract_epi64(s, 0) ^ (uint64_t)_mm256_extract_epi64(s, 3);
}

}  // namespace cpu
}  // namespace agentforge
