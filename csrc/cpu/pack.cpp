// Storage formats for ternary codes and the CPU kernels' prepacked layouts.
//
// Canonical 2-bit: uint8 [N, ceil(K/4)], code c = w + 1 in {0, 1, 2}, element k of a row in
// bits 2*(k%4) of byte k/4 (first element lowest); the tail is padded with code 1 (w = 0).
// Base-3 (1.6 bits): uint8 [N, ceil(K/5)], byte = sum_i c_i * 3^i over 5 elements, tail code 1.
// Prepacked (kernels.h, prepacked.h): a header row, then the 2bit or base3 payload.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <string>

#include "cpu/ops_cpu.h"
#include "cpu/prepacked.h"

namespace agentforge {
namespace cpu {
namespace {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_codes(const Tensor& codes, const char* op) {
  check_cpu(codes, op, "codes");
  TORCH_CHECK(codes.scalar_type() == at::kChar, "agentforge.", op, ": codes must be int8, got ", codes.scalar_type());
  TORCH_CHECK(codes.dim() == 2, "agentforge.", op, ": codes must be 2-D [N, K], got shape ", codes.sizes());
  TORCH_CHECK(codes.numel() == 0 || (codes.min().item<int8_t>() >= -1 && codes.max().item<int8_t>() <= 1),
              "agentforge.", op, ": codes must be in {-1, 0, 1}; quantize with quantize_ternary first");
}

void check_packed(const Tensor& packed, const char* op) {
  check_cpu(packed, op, "packed");
  TORCH_CHECK(packed.scalar_type() == at::kByte, "agentforge.", op, ": packed must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() == 2, "agentforge.", op, ": packed must be 2-D, got shape ", packed.sizes());
}

// Reads the 2-bit code of element k from a canonical row, or 1 (zero) past its end.
inline int code_at(const uint8_t* row, int64_t bytes, int64_t k) {
  return k / 4 < bytes ? (row[k / 4] >> (2 * (k % 4))) & 3 : 1;
}

// Every code must be 0..2, and codes past element K (the padding) must be 1. The hint about
// K is only given to callers that chose K themselves.
void check_canonical(const Tensor& packed, int64_t K, const char* op, bool caller_gave_k) {
  const int64_t N = packed.size(0), B = packed.size(1);
  const uint8_t* src = packed.data_ptr<uint8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < B * 4; ++k) {
      int c = (src[n * B + k / 4] >> (2 * (k % 4))) & 3;
      TORCH_CHECK(c != 3 && (k < K || c == 1), "agentforge.", op,
                  ": corrupt packed ternary tensor: ", c == 3 ? "invalid code 3" : "non-zero padding", " at row ", n,
                  ", element ", k, caller_gave_k ? " (is K=" + std::to_string(K) + " right?)" : std::string());
    }
}

// Canonical packed rows -> int8 codes, for an already validated tensor.
Tensor unpack_codes(const Tensor& packed, int64_t K) {
  const int64_t N = packed.size(0), B = packed.size(1);
  Tensor out = at::empty({N, K}, packed.options().dtype(at::kChar));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) dst[n * K + k] = static_cast<int8_t>(code_at(src + n * B, B, k) - 1);
  });
  return out;
}

}  // namespace

Tensor pack_ternary(const Tensor& codes_in) {
  check_codes(codes_in, "pack_ternary");
  Tensor codes = codes_in.contiguous();
  const int64_t N = codes.size(0), K = codes.size(1), B = ceil_div(K, 4);
  Tensor out = at::empty({N, B}, codes.options().dtype(at::kByte));
  const int8_t* src = codes.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < B; ++b) {
        uint8_t byte = 0;
        for (int64_t i = 0; i < 4; ++i) {
          int64_t k = 4 * b + i;
          byte |= static_cast<uint8_t>((k < K ? src[n * K + k] + 1 : 1) << (2 * i));
        }
        dst[n * B + b] = byte;
      }
  });
  return out;
}

Tensor unpack_ternary(const Tensor& packed_in, int64_t K) {
  const char* op = "unpack_ternary";
  check_packed(packed_in, op);
  TORCH_CHECK(K >= 0 && ceil_div(K, 4) == packed_in.size(1), "agentforge.", op, ": K=", K, " needs ", ceil_div(K, 4),
              " bytes per row, packed has ", packed_in.size(1));
  Tensor packed = packed_in.contiguous();
  check_canonical(packed, K, op, true);
  return unpack_codes(packed, K);
}

Tensor pack_ternary_base3(const Tensor& codes_in) {
  check_codes(codes_in, "pack_ternary_base3");
  Tensor codes = codes_in.contiguous();
  const int64_t N = codes.size(0), K = codes.size(1), B = ceil_div(K, 5);
  Tensor out = at::empty({N, B}, codes.options().dtype(at::kByte));
  const int8_t* src = codes.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < B; ++b) {
        int value = 0;
        for (int64_t i = 4; i >= 0; --i) {
          int64_t k = 5 * b + i;
          value = value * 3 + (k < K ? src[n * K + k] + 1 : 1);
        }
        dst[n * B + b] = static_cast<uint8_t>(value);
      }
  });
  return out;
}

Tensor unpack_ternary_base3(const Tensor& packed_in, int64_t K) {
  const char* op = "unpack_ternary_base3";
  check_packed(packed_in, op);
  TORCH_CHECK(K >= 0 && ceil_div(K, 5) == packed_in.size(1), "agentforge.", op, ": K=", K, " needs ", ceil_div(K, 5),
              " bytes per row, packed has ", packed_in.size(1));
  Tensor packed = packed_in.contiguous();
  const int64_t N = packed.size(0), B = packed.size(1);
  Tensor out = at::empty({N, K}, packed.options().dtype(at::kChar));
  const uint8_t* src = packed.data_ptr<uint8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < B; ++b) {
      int value = src[n * B + b];
      TORCH_CHECK(value <= 242, "agentforge.", op, ": corrupt base-3 tensor: byte ", value, " > 242 at row ", n,
                  ", byte ", b);
      for (int64_t i = 0; i < 5; ++i, value /= 3) {
        int64_t k = 5 * b + i;
        TORCH_CHECK(k < K || value % 3 == 1, "agentforge.", op, ": corrupt base-3 tensor: non-zero padding at row ", n,
                    " (is K=", K, " right?)");
        if (k < K) dst[n * K + k] = static_cast<int8_t>(value % 3 - 1);
      }
    }
  return out;
}

Tensor prepack_codes(const Tensor& codes_in, Layout layout) {
  Tensor codes = codes_in.contiguous();
  const int64_t N = codes.size(0), K = codes.size(1);
  Tensor out = new_prepacked(N, K, layout, codes.options());
  const int64_t KB = (K + block_weights(layout) - 1) / block_weights(layout);
  const int8_t* src = codes.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = src + n * K;
      for (int64_t kb = 0; kb < KB; ++kb) {
        uint8_t* blk = dst + block_offset(N, KB, n, kb);
        const int64_t base = kb * block_weights(layout);
        for (int64_t j = 0; j < kBlockBytes; ++j) {
          uint8_t c[5];
          for (int s = 0; s < (layout == Layout::base3 ? 5 : 4); ++s) {
            const int64_t k = base + 32 * s + j;
            c[s] = static_cast<uint8_t>(k < K ? row[k] + 1 : 1);
          }
          blk[j] = layout == Layout::base3 ? base3_encode(c)
                                           : static_cast<uint8_t>(c[0] | c[1] << 2 | c[2] << 4 | c[3] << 6);
        }
      }
    }
  });
  return out;
}

Tensor prepack_ternary(const Tensor& packed_in, int64_t K, c10::string_view layout_name) {
  const char* op = "prepack_ternary";
  check_packed(packed_in, op);
  const Layout layout = parse_layout(std::string(layout_name), op);
  const int64_t B = packed_in.size(1);
  // K = -1: every code of the canonical rows is a weight (its zero padding included)
  if (K == -1) K = 4 * B;
  TORCH_CHECK(K >= 0 && ceil_div(K, 4) == B, "agentforge.", op, ": K=", K, " needs ", ceil_div(K, 4),
              " bytes per canonical row, packed has ", B);
  Tensor packed = packed_in.contiguous();
  check_canonical(packed, K, op, true);  // codes in {0, 1, 2}, padding zero: files reach kernels only through here
  return prepack_codes(unpack_codes(packed, K), layout);
}

Tensor unprepack_ternary(const Tensor& w_in, int64_t K) {
  const char* op = "unprepack_ternary";
  check_cpu(w_in, op, "w_prepacked");
  Tensor w = w_in.contiguous();
  const Prepacked p = read_prepacked(w, op);
  TORCH_CHECK(K == p.K, "agentforge.", op, ": K=", K, " but w_prepacked (shape ", w.sizes(),
              ") was packed for K=", p.K);
  const int64_t N = p.N, B = ceil_div(K, 4), bw = block_weights(p.layout);
  Tensor out = at::empty({N, B}, w.options());
  uint8_t* dst = out.data_ptr<uint8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < B; ++b) {
      uint8_t byte = 0;
      for (int64_t i = 0; i < 4; ++i) {
        const int64_t k = 4 * b + i, kb = k / bw, e = k % bw;
        int c = 1;
        if (k < K && p.layout == Layout::base3) {
          uint8_t codes[5];
          base3_decode(p.payload[block_offset(N, p.KB, n, kb) + e % 32], codes);
          c = codes[e / 32];
        } else if (k < K) {
          c = (p.payload[block_offset(N, p.KB, n, kb) + e % 32] >> (2 * (e / 32))) & 3;
        }
        TORCH_CHECK(c != 3, "agentforge.", op, ": corrupt prepacked tensor: invalid code 3 at row ", n, ", element ",
                    k);
        byte |= static_cast<uint8_t>(c << (2 * i));
      }
      dst[n * B + b] = byte;
    }
  return out;
}

}  // namespace cpu
}  // namespace agentforge
