// Prepacked weights describe themselves: a prepacked tensor is uint8 [N + 1, R]. Its last row
// is a header; the payload, in the layout the header names (kernels.h), starts at byte 0 (so
// it keeps the allocation's alignment) and fills N * KB * 32 bytes of the first N rows, with
// KB blocks of 128 (2bit) or 160 (base3) weights per row of weights. The row width says the
// layout too, so that shape-only checks (torch.compile's fake kernels) can tell the two apart:
// R = max(KB * 32, 32) for 2bit and that plus one byte for base3.
//
// Header (little-endian, the first 32 bytes of the last row, the rest of the row zero):
//   0..3   magic "AFTW"            4  format version (kFormatVersion)
//   5      layout (Layout)         6  tile rows (kTileRows)        7  zero
//   8..15  N (int64)               16..23  K (int64)               24..27  zero
//   28..31 FNV-1a hash of bytes 0..27
// A slice, reshape or view changes the shape (or drops the header row), and a header of the wrong
// version, layout or tile is refused by name, so none of them can reach a kernel. The payload
// itself is not re-validated per call (that would read the weights twice): prepack_ternary
// writes only valid codes, and every byte pattern a payload can hold decodes to one defined
// weight on every ISA and backend (kernels.h).
#pragma once
#include <ATen/core/Tensor.h>

#include <string>

#include "cpu/kernels.h"

namespace agentforge {
namespace cpu {

enum class Layout : uint8_t { two_bit = 1, base3 = 2 };

constexpr int64_t kHeaderBytes = 32;
constexpr uint8_t kFormatVersion = 2;  // 1 was the headerless [N, KB * 32] layout of 4-row tiles

const char* layout_name(Layout layout);
Layout parse_layout(const std::string& name, const char* op);
int64_t block_weights(Layout layout);  // weights per 32-byte row block
int64_t row_bytes(Layout layout, int64_t K);  // R above

struct Prepacked {
  Layout layout;
  int64_t N, K, KB;       // KB: blocks per row
  const uint8_t* payload; // row n's blocks: payload + block_offset(N, KB, n, kb)
  const uint8_t* header;
};

// A prepacked tensor for N x K weights in `layout`: header written, payload (at data_ptr)
// uninitialised, any bytes between payload and header zero.
at::Tensor new_prepacked(int64_t N, int64_t K, Layout layout, const at::TensorOptions& options);

// Reads and checks the header of a contiguous uint8 tensor; errors name the op and both shapes.
Prepacked read_prepacked(const at::Tensor& w, const char* op);

}  // namespace cpu
}  // namespace agentforge
