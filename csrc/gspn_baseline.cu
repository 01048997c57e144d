// BASELINE FOR THE BENCHMARK ONLY, not used by the library.
//
// The strategy of the GSPN paper's public kernel, reimplemented: one kernel launch per scan line, one thread per
// (batch, row, channel) element of that line, the previous hidden line read back from the output in global
// memory. It shares the geometry and gate helpers of the real kernel and accumulates in fp32 with 64-bit
// indexing, so the benchmark measures the strategy (launch count, state in global memory), not those defects.
#include "gspn_scan_kernel.cuh"

namespace gspn {
namespace {

template <typename T>
__global__ void baseline_line_kernel(const ScanInputs in, int d, int64_t s, T* h) {
  const Direction g = direction_geometry<false>(in, d);
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= in.batch * g.rows * in.channels) return;
  const int64_t c = e % in.channels;
  const int64_t r = (e / in.channels) % g.rows;
  const int64_t b = e / (in.channels * g.rows);
  const int64_t line = image_line(g, s);
  int64_t y, x;
  image_pixel(g, line, r, y, x);
  float value = load_float(static_cast<const T*>(in.lam) + offset4(in.lam_stride, b, y, x, c)) *
                load_float(static_cast<const T*>(in.x) + offset4(in.x_stride, b, y, x, c));
  if (!starts_group(g, s, in.chunk)) {
    float logits[kNumGates];
    load_gate_logits<T>(in, b, y, x, 0, c / (in.channels / in.gate_channels), r, g, logits);
    const GateWeights w = gate_weights(logits, r, g);
    const int64_t prev_line = g.reversed ? line + 1 : line - 1;
#pragma unroll
    for (int k = 0; k < kNumGates; ++k) {
      if (!gate_valid(k, r, g)) continue;
      int64_t py, px;
      image_pixel(g, prev_line, r + k - 1, py, px);
      value += w.p[k] * load_float(h + dense_index(in, b, py, px, c));
    }
  }
  h[dense_index(in, b, y, x, c)] = store_value<T>(value);
}

template <typename T>
void launch_baseline(const ScanInputs& in, int direction, void* h, cudaStream_t stream) {
  const Direction g = direction_geometry<false>(in, direction);
  const int64_t elements = in.batch * g.rows * in.channels;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((elements + threads - 1) / threads);
  for (int64_t s = 0; s < g.length; ++s) {
    baseline_line_kernel<T><<<blocks, threads, 0, stream>>>(in, direction, s, static_cast<T*>(h));
  }
}

}  // namespace

void baseline_scan_fp32(const ScanInputs& in, int direction, void* h, cudaStream_t stream) {
  launch_baseline<float>(in, direction, h, stream);
}
void baseline_scan_fp16(const ScanInputs& in, int direction, void* h, cudaStream_t stream) {
  launch_baseline<__half>(in, direction, h, stream);
}
void baseline_scan_bf16(const ScanInputs& in, int direction, void* h, cudaStream_t stream) {
  launch_baseline<__nv_bfloat16>(in, direction, h, stream);
}

}  // namespace gspn
