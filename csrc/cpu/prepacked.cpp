// The self-describing prepacked tensor: header layout in prepacked.h.
#include "cpu/prepacked.h"

#include <ATen/ATen.h>

#include <cstring>

namespace agentforge {
namespace cpu {
namespace {

constexpr uint8_t kMagic[4] = {'A', 'F', 'T', 'W'};
constexpr int64_t kMaxDim = int64_t{1} << 48;

uint32_t fnv1a(const uint8_t* p, int64_t n) {
  uint32_t h = 2166136261u;
  for (int64_t i = 0; i < n; ++i) h = (h ^ p[i]) * 16777619u;
  return h;
}

void put64(uint8_t* p, int64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(static_cast<uint64_t>(v) >> (8 * i));
}

int64_t get64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return static_cast<int64_t>(v);
}

std::string shape_str(int64_t rows, int64_t cols) {
  return "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
}

}  // namespace

const char* layout_name(Layout layout) { return layout == Layout::base3 ? "base3" : "2bit"; }

Layout parse_layout(const std::string& name, const char* op) {
  if (name == "2bit") return Layout::two_bit;
  if (name == "base3") return Layout::base3;
  TORCH_CHECK(false, "agentforge.", op, ": unknown layout '", name, "'; use '2bit' or 'base3'");
}

int64_t block_weights(Layout layout) { return layout == Layout::base3 ? kBase3BlockK : kBlockK; }

int64_t row_bytes(Layout layout, int64_t K) {
  const int64_t bw = block_weights(layout);
  return std::max<int64_t>((K + bw - 1) / bw * kBlockBytes, kHeaderBytes) + (layout == Layout::base3 ? 1 : 0);
}

at::Tensor new_prepacked(int64_t N, int64_t K, Layout layout, const at::TensorOptions& options) {
  const int64_t R = row_bytes(layout, K), KB = (K + block_weights(layout) - 1) / block_weights(layout);
  at::Tensor w = at::empty({N + 1, R}, options.dtype(at::kByte));
  uint8_t* base = w.data_ptr<uint8_t>();
  std::memset(base + N * KB * kBlockBytes, 0, (N + 1) * R - N * KB * kBlockBytes);
  uint8_t* h = base + N * R;
  std::memcpy(h, kMagic, 4);
  h[4] = kFormatVersion;
  h[5] = static_cast<uint8_t>(layout);
  h[6] = static_cast<uint8_t>(kTileRows);
  put64(h + 8, N);
  put64(h + 16, K);
  const uint32_t hash = fnv1a(h, 28);
  std::memcpy(h + 28, &hash, 4);
  return w;
}

Prepacked read_prepacked(const at::Tensor& w, const char* op) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "agentforge.", op,
              ": w_prepacked must be a 2-D uint8 tensor from prepack_ternary, got ", w.scalar_type(), " ", w.sizes());
  const int64_t rows = w.size(0), cols = w.size(1);
  const uint8_t* h = rows >= 1 ? w.data_ptr<uint8_t>() + (rows - 1) * cols : nullptr;
  TORCH_CHECK(rows >= 1 && cols >= kHeaderBytes && std::memcmp(h, kMagic, 4) == 0, "agentforge.", op,
              ": w_prepacked of shape ", shape_str(rows, cols),
              " has no prepacked header in its last row: it was not made by prepack_ternary, it is a slice or "
              "view of a prepacked tensor, or it was made by an agentforge older than prepack format 2 (prepack "
              "the canonical weights again)");
  uint32_t stored;
  std::memcpy(&stored, h + 28, 4);
  TORCH_CHECK(stored == fnv1a(h, 28), "agentforge.", op, ": the header of w_prepacked (shape ", shape_str(rows, cols),
              ") is corrupt: its checksum does not match");
  TORCH_CHECK(h[4] == kFormatVersion, "agentforge.", op, ": w_prepacked has prepack format version ", int(h[4]),
              "; this build reads version ", int(kFormatVersion), " (prepack the canonical weights again)");
  TORCH_CHECK(h[5] == static_cast<uint8_t>(Layout::two_bit) || h[5] == static_cast<uint8_t>(Layout::base3),
              "agentforge.", op, ": w_prepacked names layout ", int(h[5]), ", which this build does not know");
  TORCH_CHECK(h[6] == kTileRows, "agentforge.", op, ": w_prepacked was laid out in tiles of ", int(h[6]),
              " rows; this build's kernels read tiles of ", kTileRows, " (prepack the canonical weights again)");
  const Layout layout = static_cast<Layout>(h[5]);
  const int64_t N = get64(h + 8), K = get64(h + 16);
  const bool sane = N >= 0 && N < kMaxDim && K >= 0 && K < kMaxDim;  // keeps the arithmetic below in range
  TORCH_CHECK(sane && N == rows - 1 && row_bytes(layout, K) == cols, "agentforge.", op, ": w_prepacked has shape ",
              shape_str(rows, cols), " but its header describes N=", N, ", K=", K, " in the ", layout_name(layout),
              " layout, i.e. shape ", sane ? shape_str(N + 1, row_bytes(layout, K)) : std::string("(invalid)"),
              ": a slice, reshape or view of a prepacked tensor is not a prepacked tensor");
  return {layout, N, K, (K + block_weights(layout) - 1) / block_weights(layout), w.data_ptr<uint8_t>(), h};
}

}  // namespace cpu
}  // namespace agentforge
