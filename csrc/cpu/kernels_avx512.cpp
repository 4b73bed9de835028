// AVX-512 kernels: VNNI vpdpbusd (u8 code × s8 activation, int32 accumulation, no int16
// overflow window) and VPOPCNTDQ for the bit-serial path.
//
// Built with -DAF_SIMDE by tests/native/, this file compiles against SIMDe's portable
// implementations of the same intrinsics, so its logic is tested on CPUs without AVX-512.
#ifdef AF_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#else
#include <immintrin.h>
#endif

#include "cpu/avx2_helpers.h"
#include "cpu/kernels.h"

namespace agentforge {
namespace cpu {
namespace {

constexpr int64_t kChunkBlocks = 32;      // GEMM: K chunk decoded at once
constexpr int64_t kGemvChunkBlocks = 16;  // GEMV with M > 1: blocks of a tile reused from L1 per row of x

// acc + Σ4 u8·s8 per int32 lane. GCC 12 copies every accumulator twice around each
// _mm512_dpbusd_epi32 inside a loop (two register moves per multiply, which halved the GEMV
// rate); the inline-asm form lets it keep accumulators in place. SIMDe builds use the intrinsic.
#ifdef AF_SIMDE
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }
inline __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) { return _mm256_dpbusd_epi32(acc, u8, s8); }
#else
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}
inline __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}
#endif

inline int32_t hsum512(__m512i v) {
  return hsum256(_mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)));
}

inline __m512i lo256(__m256i v) { return _mm512_castsi256_si512(v); }
inline __m256i half(__m512i v, int h) { return h ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v); }

// Arithmetic right shift of every int32 lane (SIMDe 0.7 has no _mm512_srai_epi32: shift each
// 256-bit half there).
template <int S>
inline __m512i srai(__m512i v) {
#ifdef AF_SIMDE
  return _mm512_inserti64x4(lo256(_mm256_srai_epi32(half(v, 0), S)), _mm256_srai_epi32(half(v, 1), S), 1);
#else
  return _mm512_srai_epi32(v, S);
#endif
}

// c0 + c1/4 + c2/16 + c3/64 for the mask-decoded code planes of gemv_tile_2bit; exact,
// because each plane's accumulator only ever holds multiples of its scale.
inline __m256i combine_planes(const __m256i c[4]) {
  return _mm256_add_epi32(_mm256_add_epi32(c[0], _mm256_srai_epi32(c[1], 2)),
                          _mm256_add_epi32(_mm256_srai_epi32(c[2], 4), _mm256_srai_epi32(c[3], 6)));
}

inline __m512i combine_planes(const __m512i c[4]) {
  return _mm512_add_epi32(_mm512_add_epi32(c[0], srai<2>(c[1])), _mm512_add_epi32(srai<4>(c[2]), srai<6>(c[3])));
}

// Row sums of four row-pair vectors (lanes 0-7: row 2q, lanes 8-15: row 2q + 1), returned
// as rows 0..7 in order: a transposing reduction, 7 adds and shuffles instead of 8 hsums.
inline __m256i row_sums(const __m512i s[4]) {
  // per 128-bit chunk: [Σ s0, Σ s1, Σ s2, Σ s3] over that chunk's four lanes
  const __m512i a01 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[0], s[1]), _mm512_unpackhi_epi32(s[0], s[1]));
  const __m512i a23 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[2], s[3]), _mm512_unpackhi_epi32(s[2], s[3]));
  const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi64(a01, a23), _mm512_unpackhi_epi64(a01, a23));
  // chunks 0 + 1 hold the even rows 0, 2, 4, 6; chunks 2 + 3 the odd rows
  const __m512i c = _mm512_add_epi32(b, _mm512_shuffle_i32x4(b, b, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512i order = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castsi512_si256(_mm512_permutexvar_epi32(order, c));
}

// Adds the row sums of the P row-pair vectors and of the odd last row (when R is odd) to acc.
template <int R>
inline void add_rows(const __m512i pairs[], __m256i odd, int32_t* acc) {
  constexpr int P = R / 2;
  __m512i s[4];
  for (int q = 0; q < 4; ++q) s[q] = q < P ? pairs[q] : _mm512_setzero_si512();
  alignas(32) int32_t rows[8];
  _mm256_store_si256((__m256i*)rows, row_sums(s));
  for (int r = 0; r < 2 * P; ++r) acc[r] += rows[r];
  if (R % 2) acc[R - 1] += hsum256(odd);
}

template <int R>
inline void prefetch_ahead(const uint8_t* blk) {
  for (int l = 0; l < (R * kBlockBytes + 63) / 64; ++l)
    _mm_prefetch((const char*)(blk + kPrefetchBytes + 64 * l), _MM_HINT_T1);
}

// acc[r] += Σ c·x over blocks [kb0, kb1) of one 2bit tile of R ≤ 8 rows. A tile stores the R
// rows of one block back to back, so one 64-byte load holds two rows; the block's activations
// are broadcast to both halves. Codes are decoded by masks alone: byte & 0x03 is code c0,
// & 0x0C is 4·c1, & 0x30 is 16·c2 and & 0xC0 is 64·c3 (elements 0..31, 32..63, 64..95,
// 96..127 of the block), each multiplied into its own accumulator, which is divided back
// (exactly) at the end: 4 ands and 4 vpdpbusd per 256 weights, no shifts. Bound: the 64·
// accumulator gains at most 4·192·128 per block and lane (code 3 included), so it stays
// inside int32 for K < 2^21 (checked in matmul.cpp).
template <int R>
void gemv_tile_2bit(const uint8_t* tile, int64_t kb0, int64_t kb1, const int8_t* x, int32_t* acc) {
  constexpr int P = R / 2;  // row pairs in zmm registers; an odd last row uses a ymm
  const __m512i mask[4] = {_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0C), _mm512_set1_epi8(0x30),
                           _mm512_set1_epi8((char)0xC0)};
  __m512i a[P > 0 ? P : 1][4];
  __m256i a_odd[4];
  for (int p = 0; p < P; ++p)
    for (int s = 0; s < 4; ++s) a[p][s] = _mm512_setzero_si512();
  for (int s = 0; s < 4; ++s) a_odd[s] = _mm256_setzero_si256();
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const uint8_t* blk = tile + kb * R * kBlockBytes;
    prefetch_ahead<R>(blk);
    __m512i xs[4];
    for (int s = 0; s < 4; ++s)
      xs[s] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(x + kb * kBlockK + 32 * s)));
    for (int p = 0; p < P; ++p) {
      const __m512i v = _mm512_loadu_si512((const void*)(blk + 2 * p * kBlockBytes));
      for (int s = 0; s < 4; ++s) a[p][s] = dpbusd(a[p][s], _mm512_and_si512(v, mask[s]), xs[s]);
    }
    if (R % 2) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(blk + (R - 1) * kBlockBytes));
      for (int s = 0; s < 4; ++s) a_odd[s] = dpbusd(a_odd[s], _mm256_and_si256(v, half(mask[s], 0)), half(xs[s], 0));
    }
  }
  __m512i pairs[P > 0 ? P : 1];
  for (int p = 0; p < P; ++p) pairs[p] = combine_planes(a[p]);
  add_rows<R>(pairs, combine_planes(a_odd), acc);
}

// acc[r] += Σ c·x over blocks [kb0, kb1) of one base3 tile. With states m_0 = q' and
// m_(p+1) = 3 m_p mod 256 (byte adds), code c_p = floor(3 m_p / 256) = (3 m_p − m_(p+1)) / 256,
// so Σ c_p x_p = (3 Σ m_p x_p − Σ m_(p+1) x_p) / 256: two vpdpbusd per code plane and no
// decode at all. Per lane, 3A − B is a multiple of 256, so the shift is exact. Bound: A and B
// gain at most 5·4·255·128 per block and lane; the window of kBase3Window blocks keeps
// |3A − B| < 2^31.
constexpr int64_t kBase3Window = 512;

template <int R>
void gemv_tile_base3(const uint8_t* tile, int64_t kb0, int64_t kb1, const int8_t* x, int32_t* acc) {
  constexpr int P = R / 2;
  constexpr int V = P + R % 2;  // vectors per block: row pairs, plus the odd last row in a low half
  __m512i total[V];
  for (int v = 0; v < V; ++v) total[v] = _mm512_setzero_si512();
  for (int64_t w0 = kb0; w0 < kb1; w0 += kBase3Window) {
    const int64_t w1 = kb1 - w0 < kBase3Window ? kb1 : w0 + kBase3Window;
    __m512i A[V], B[V];
    for (int v = 0; v < V; ++v) A[v] = B[v] = _mm512_setzero_si512();
    for (int64_t kb = w0; kb < w1; ++kb) {
      const uint8_t* blk = tile + kb * R * kBlockBytes;
      prefetch_ahead<R>(blk);
      __m512i xs[5];
      for (int p = 0; p < 5; ++p)
        xs[p] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(x + kb * kBase3BlockK + 32 * p)));
      for (int v = 0; v < V; ++v) {
        // the odd row's vector has zeros above it: m = 0 contributes nothing
        __m512i m = v < P ? _mm512_loadu_si512((const void*)(blk + 2 * v * kBlockBytes))
                          : lo256(_mm256_loadu_si256((const __m256i*)(blk + (R - 1) * kBlockBytes)));
        if (v == P) m = _mm512_inserti64x4(m, _mm256_setzero_si256(), 1);
        for (int p = 0; p < 5; ++p) {
          A[v] = dpbusd(A[v], m, xs[p]);
          m = _mm512_add_epi8(_mm512_add_epi8(m, m), m);
          B[v] = dpbusd(B[v], m, xs[p]);
        }
      }
    }
    for (int v = 0; v < V; ++v)
      total[v] = _mm512_add_epi32(total[v],
                                  srai<8>(
                                      _mm512_sub_epi32(_mm512_add_epi32(_mm512_add_epi32(A[v], A[v]), A[v]), B[v])));
  }
  add_rows<R>(total, R % 2 ? half(total[V - 1], 0) : _mm256_setzero_si256(), acc);
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

// GEMM: a K chunk of (up to) 4 rows of a tile decoded into plain u8 codes, zero padded to a
// multiple of 64, then MR activation rows against the 4 code rows.
constexpr int64_t kChunkCodes = kChunkBlocks * kBase3BlockK;

void decode_2bit(const MatmulArgs& a, int64_t n, int64_t rows, int64_t kb0, int64_t nkb, uint8_t codes[][kChunkCodes]) {
  const __m256i mask3 = _mm256_set1_epi8(3);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(a.w + block_offset(a.N, a.KB, n + r, kb0 + kb)));
      for (int s = 0; s < 4; ++s)
        _mm256_storeu_si256((__m256i*)(codes[r] + kb * kBlockK + 32 * s), code_plane(v, s, mask3));
    }
}

void decode_base3(const MatmulArgs& a, int64_t n, int64_t rows, int64_t kb0, int64_t nkb,
                  uint8_t codes[][kChunkCodes]) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const uint8_t* blk = a.w + block_offset(a.N, a.KB, n + r, kb0 + kb);
      for (int j = 0; j < 32; ++j) {
        uint8_t c[5];
        base3_decode(blk[j], c);
        for (int p = 0; p < 5; ++p) codes[r][kb * kBase3BlockK + 32 * p + j] = c[p];
      }
    }
}

// acc[i][r] += Σ_k codes[r][k] · x[i][k]; len is a multiple of 64 (codes zero padded).
template <int MR>
void gemm_micro(const uint8_t codes[][kChunkCodes], const int8_t* x, int64_t x_stride, int64_t len,
                int32_t acc_out[][4]) {
  __m512i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r) acc[i][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < len; k += 64) {
    __m512i c0 = _mm512_loadu_si512((const void*)(codes[0] + k));
    __m512i c1 = _mm512_loadu_si512((const void*)(codes[1] + k));
    __m512i c2 = _mm512_loadu_si512((const void*)(codes[2] + k));
    __m512i c3 = _mm512_loadu_si512((const void*)(codes[3] + k));
    for (int i = 0; i < MR; ++i) {
      __m512i xv = _mm512_loadu_si512((const void*)(x + i * x_stride + k));
      acc[i][0] = dpbusd(acc[i][0], c0, xv);
      acc[i][1] = dpbusd(acc[i][1], c1, xv);
      acc[i][2] = dpbusd(acc[i][2], c2, xv);
      acc[i][3] = dpbusd(acc[i][3], c3, xv);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r) acc_out[i][r] += hsum512(acc[i][r]);
}

// Outputs of 4 rows for a block of activation rows are summed locally and written once, so
// threads on neighbouring tiles never share a cache line in the inner loop. A tile's two
// halves are decoded in turn; the second reads the chunk from cache. With base3 blocks a
// chunk's length may end mid-64: its zero codes meet activations past the row (or the 64
// bytes of slack after the last row), which add nothing.
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
        const int64_t len = nkb * block_k, padded = (len + 63) / 64 * 64;
        for (int64_t r = 0; r < 4; ++r)
          for (int64_t k = r < rows ? len : 0; k < padded; ++k) codes[r][k] = 0;
        decode(a, n, rows, kb0, nkb, codes);
        const int8_t* x = a.x + m0 * Kp + kb0 * block_k;
        int64_t i = 0;
        for (; i + 4 <= mb; i += 4) gemm_micro<4>(codes, x + i * Kp, Kp, padded, acc + i);
        switch (mb - i) {
          case 3: gemm_micro<3>(codes, x + i * Kp, Kp, padded, acc + i); break;
          case 2: gemm_micro<2>(codes, x + i * Kp, Kp, padded, acc + i); break;
          case 1: gemm_micro<1>(codes, x + i * Kp, Kp, padded, acc + i); break;
          default: break;
        }
      }
      for (int64_t i = 0; i < mb; ++i)
        for (int64_t r = 0; r < rows; ++r) a.out[(m0 + i) * a.N + n + r] = acc[i][r];
    }
  }
}

}  // namespace

void int8_matmul_avx512(const MatmulArgs& a, int64_t n0, int64_t n1) {
  if (a.M < 4) return gemv_rows<Tile2bit>(a, kBlockK, n0, n1);
  gemm_rows(a, kBlockK, decode_2bit, n0, n1);
}

void base3_matmul_avx512(const MatmulArgs& a, int64_t n0, int64_t n1) {
  if (a.M < 4) return gemv_rows<TileBase3>(a, kBase3BlockK, n0, n1);
  gemm_rows(a, kBase3BlockK, decode_base3, n0, n1);
}

// All activation bit-planes of a 64-element half fit one zmm (bits ≤ 8 lanes): one vpopcntq
// per weight plane counts every bit at once; the 2^b weights are applied once per output.
// The dot product is Σ (lo + 2 hi) x − Σ x (see weight_planes_scalar).
void popcount_matmul_avx512(const MatmulArgs& a, int64_t n0, int64_t n1) {
  const int bits = a.act_bits;
  const uint8_t lanes = (uint8_t)((1u << bits) - 1);  // a __mmask8
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.M; ++m) {
      __m512i counts = _mm512_setzero_si512();
      for (int64_t kb = 0; kb < a.KB; ++kb) {
        uint64_t lo[2], hi[2];
        weight_planes_simd(a.w + block_offset(a.N, a.KB, n, kb), lo, hi);
        const uint64_t* xp = a.planes + (m * a.KB + kb) * 2 * bits;
        for (int h = 0; h < 2; ++h) {
          // planes is padded by 8 words (matmul.cpp), so the full load stays in bounds
          __m512i xv = _mm512_maskz_mov_epi64(lanes, _mm512_loadu_si512((const void*)(xp + h * bits)));
          __m512i lc = _mm512_popcnt_epi64(_mm512_and_si512(xv, _mm512_set1_epi64((long long)lo[h])));
          __m512i hc = _mm512_popcnt_epi64(_mm512_and_si512(xv, _mm512_set1_epi64((long long)hi[h])));
          counts = _mm512_add_epi64(counts, _mm512_add_epi64(lc, _mm512_add_epi64(hc, hc)));
        }
      }
      alignas(64) int64_t c[8];
      _mm512_store_si512((void*)c, counts);
      int64_t dot = 0;
      for (int b = 0; b < bits; ++b) dot += (b == bits - 1) ? -c[b] * (1LL << b) : c[b] * (1LL << b);
      a.out[m * a.N + n] = (int32_t)(dot - a.x_sum[m]);
    }
  }
}

}  // namespace cpu
}  // namespace agentforge
