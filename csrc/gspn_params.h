// Plain parameter structs shared by the binding (host C++) and the kernels (CUDA). No torch types here, so the
// .cu files compile without torch headers.
//
// Layout conventions (DESIGN.md section 1): every image tensor is indexed (b, y, x, ...) in image coordinates;
// strides are in elements and 64-bit, so any view (channels-last from Diffusers, slices, expanded u) is read in
// place. A direction is only a choice of scan axis, perpendicular axis and sweep order over these strides.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#if defined(__CUDACC__)
#define GSPN_HOST_DEVICE __host__ __device__
#else
#define GSPN_HOST_DEVICE
#endif

namespace gspn {

constexpr int kNumDirections = 4;  // left_to_right, right_to_left, top_to_bottom, bottom_to_top
constexpr int kNumGates = 3;       // neighbour offsets -1, 0, +1 across the scan

// Inputs of one call, forward or backward. A null pointer means "absent":
//   u == nullptr     -> u = 1        (single-direction gspn_scan)
//   merge == nullptr -> merge = 1    (single-direction gspn_scan)
//   skip == nullptr  -> no skip term
struct ScanInputs {
  int64_t batch, height, width, channels, gate_channels;
  int64_t chunk;           // 0: global scan; k > 0: groups of k lines aligned to image coordinates
  int dir_begin, dir_end;  // directions handled by this call, [begin, end) in the order above
  bool normalize;          // divide h by the scan of lam alone (x = 1), clamped at eps
  float eps;

  const void* x;
  const void* lam;
  const void* gate;  // logits
  const void* u;
  const void* merge;  // fp32 or the storage dtype, see params_are_float
  const void* skip;
  bool params_are_float;    // merge and skip are fp32 (else they have the dtype of x)
  int64_t x_stride[4];      // b, y, x, c
  int64_t lam_stride[4];    // b, y, x, c
  int64_t gate_stride[6];   // b, y, x, direction slot, gate k, gate channel
  int64_t u_stride[5];      // b, y, x, direction (0 when shared), c
  int64_t merge_stride[2];  // direction, c (0 when one scalar per direction)
  int64_t skip_stride;
  bool gate_slot_is_direction;  // fused op: gate direction slot = direction; single op: slot 0
  // Carried state (single-direction op only, no normalisation): the hidden line (B, rows, C) that precedes the
  // first line in scan order, any strides, x's dtype; null: none. Used only by a global scan (chunk == 0): a
  // chunked scan is cut into blocks at group boundaries, so its first line has no predecessor.
  const void* initial;
  int64_t initial_stride[3];  // b, row, c
  // Band edges (single-direction horizontal scans of a band of rows, no normalisation, never with `initial`): the
  // hidden rows just above and below the band, (B, W, C) in image coordinates, any strides, x's dtype; null: a true
  // image edge (that neighbour is dropped and the gates renormalised). Given, the neighbour is valid: at step s it
  // is the edge row at the image column of step s - 1.
  const void* edge_above;
  const void* edge_below;
  int64_t edge_above_stride[3];  // b, column, c
  int64_t edge_below_stride[3];

  // Work split: one block per (channel tile, batch); ``tile`` channels per block, ``threads`` per block.
  int tile;
  int threads;
  // Forward kernel: pack == 0 runs v1; pack >= 1 runs v2 with packs of `pack` channels per thread. The vector_*
  // flags say which arrays allow one aligned vector load per pack (channel stride 1, aligned strides and pointer;
  // gates: also one gate channel per channel); the others are read element by element within the pack.
  int pack;
  bool vector_x, vector_lam, vector_gate, vector_u;
  // Fused forward where the scan is latency bound (v2 only): one block per (channel tile, batch, direction),
  // gridDim.z = 4, so each block walks one direction instead of four; each writes its term merge_d * u_d * q_d
  // (u_d = 1 when u is shared: factored out) in fp32 to plane d of ScanForwardOutputs::accum, and a merge kernel
  // sums the planes in direction order (the fused kernel's order: bitwise the same y) and applies u and skip.
  bool split_directions;
};

// Forward outputs. y and accum are contiguous (B, H, W, C). accum (fp32) carries the running sum of the
// direction terms between the directions a block processes in turn; it may alias y when y is fp32. With
// split_directions it is (4, B, H, W, C), one plane per direction, and never aliases y.
struct ScanForwardOutputs {
  void* y;
  float* accum;
  void* final_state;  // contiguous (B, rows, C) in x's dtype: the last line in scan order; null: not requested
};

// Backward: the upstream gradient and the gradients. Image-shaped outputs are contiguous.
struct ScanBackwardArgs {
  const void* grad_y;
  int64_t grad_y_stride[4];  // b, y, x, c
  void* grad_x;              // (B, H, W, C), input dtype
  void* grad_lam;            // (B, H, W, C), input dtype
  float* accum_x;            // fp32 running sums across directions (may alias grad_x/grad_lam when fp32)
  float* accum_lam;
  void* grad_u;    // (B, H, W, C) shared or (B, H, W, 4, C) per direction, input dtype; null without u
  float* accum_u;  // fp32 running sum when u is shared by the directions (may alias grad_u)
  bool u_per_direction;
  // (B, H, W, slots, 3, G): G == C: input dtype, every entry written; G < C (gates shared by channel groups):
  // fp32, zero-initialised, summed atomically.
  void* grad_gate;
  float* grad_merge_part;  // fp32 (B, 4, C) per-batch partial sums, null without merge
  float* grad_skip_part;   // fp32 (B, C) per-batch partial sums, null without skip
  // Carried state: the gradient of the final state (added to the adjoint of the last line in scan order; any
  // strides, x's dtype; null: none) and that of in.initial (contiguous (B, rows, C), x's dtype; null: none).
  const void* grad_final;
  int64_t grad_final_stride[3];  // b, row, c
  void* grad_initial;
  // Band edges: the gradients of in.edge_above / in.edge_below, contiguous (B, W, C) in x's dtype, zero-initialised
  // (a column that precedes no step keeps its zero); null where that edge is absent.
  void* grad_edge_above;
  void* grad_edge_below;
  // Per-block scratch for the recomputation (fp32): checkpoint lines and the lines of one segment.
  float* scratch;
  int64_t segment;       // lines per segment (about sqrt of the scan length)
  int64_t num_segments;  // ceil(max scan length / segment)
};

GSPN_HOST_DEVICE inline int64_t max_rows(const ScanInputs& in) { return in.height > in.width ? in.height : in.width; }

// Forward: the hidden line (and the normaliser line) of the current and previous step, in shared memory.
inline size_t forward_shared_bytes(const ScanInputs& in) {
  return sizeof(float) * 2 * (in.normalize ? 2 : 1) * max_rows(in) * in.tile;
}

// Elements per thread per pass (all their loads issued before any use): the v1 forward, the backward's reverse
// step (2 elements spill at the 128 registers of 512 threads, ptxas sm_90) and its recomputation of the lines.
constexpr int kForwardUnroll = 4;
constexpr int kBackwardUnroll = 1;
constexpr int kRecomputeUnroll = 4;

// Forward kernel v2 (gspn_forward_v2.cuh).
constexpr int kV2MaxThreads = 512;  // __launch_bounds__ of forward_kernel_v2

// Packs per thread per line, all held in registers with the next line's loads in flight: one 16-byte pack uses
// the 128 registers a thread has at 512 threads (ptxas -v, sm_90; two spill), single channels fit two.
GSPN_HOST_DEVICE constexpr int forward_v2_units(int pack) { return pack == 1 ? 2 : 1; }

// Channels per pack: a 16-byte vector (8 bf16/fp16, 4 fp32) when the tile and the channel count allow, else 1.
GSPN_HOST_DEVICE inline int pack_width(int64_t tile, int64_t channels, int64_t element_size) {
  const int64_t full = 16 / element_size;
  return (tile % full == 0 && channels % full == 0) ? static_cast<int>(full) : 1;
}

// Whether v2 takes this split: every pack of the longest line has a thread. Longer lines run v1, which streams
// them (their steps move enough bytes to cover the load latency without prefetching).
GSPN_HOST_DEVICE inline bool forward_v2_fits(const ScanInputs& in, int pack) {
  return max_rows(in) * (in.tile / pack) <= static_cast<int64_t>(forward_v2_units(pack)) * kV2MaxThreads;
}

GSPN_HOST_DEVICE inline int64_t forward_v2_threads(const ScanInputs& in, int pack) {
  const int64_t packs = max_rows(in) * (in.tile / pack);
  const int64_t threads = (packs + forward_v2_units(pack) - 1) / forward_v2_units(pack);
  return threads < 32 ? 32 : (threads + 31) / 32 * 32;
}

// Hidden (and normaliser) lines as in v1, then merge and skip of the tile.
inline size_t forward_v2_shared_bytes(const ScanInputs& in) {
  return forward_shared_bytes(in) + sizeof(float) * 2 * in.tile;
}

// Backward: the three adjoint contributions a line sends to its neighbours of the previous line (double-buffered,
// also for the normaliser), plus one float per thread for the block reductions of the merge and skip gradients.
inline size_t backward_shared_bytes(const ScanInputs& in) {
  return sizeof(float) * (2 * kNumGates * (in.normalize ? 2 : 1) * max_rows(in) * in.tile + in.threads);
}

// Scratch lines per block: checkpoints (one per segment; checkpoint 0 holds the carried initial state), the
// recomputed lines of one segment, two rolling lines.
GSPN_HOST_DEVICE inline int64_t backward_scratch_lines(int64_t segment, int64_t num_segments) {
  return num_segments + segment + 2;
}

GSPN_HOST_DEVICE inline int64_t backward_scratch_floats_per_block(const ScanInputs& in, int64_t segment,
                                                                  int64_t num_segments) {
  return (in.normalize ? 2 : 1) * backward_scratch_lines(segment, num_segments) * max_rows(in) * in.tile;
}

// One instantiation per storage dtype (gspn_fp32.cu, gspn_fp16.cu, gspn_bf16.cu). They return the error of the
// launch setup (the shared-memory attribute); the launch itself is checked by the caller.
cudaError_t forward_fp32(const ScanInputs& in, const ScanForwardOutputs& out, cudaStream_t stream);
cudaError_t forward_fp16(const ScanInputs& in, const ScanForwardOutputs& out, cudaStream_t stream);
cudaError_t forward_bf16(const ScanInputs& in, const ScanForwardOutputs& out, cudaStream_t stream);
cudaError_t backward_fp32(const ScanInputs& in, const ScanBackwardArgs& args, cudaStream_t stream);
cudaError_t backward_fp16(const ScanInputs& in, const ScanBackwardArgs& args, cudaStream_t stream);
cudaError_t backward_bf16(const ScanInputs& in, const ScanBackwardArgs& args, cudaStream_t stream);

// Baseline for the benchmark only: the strategy of the paper's public kernel (one launch per scan line, hidden
// state in global memory), reimplemented here with fp32 accumulation so that only the strategy differs.
// h: contiguous (B, H, W, C) output in the input dtype; gate uses the single-direction layout (slot 0).
void baseline_scan_fp32(const ScanInputs& in, int direction, void* h, cudaStream_t stream);
void baseline_scan_fp16(const ScanInputs& in, int direction, void* h, cudaStream_t stream);
void baseline_scan_bf16(const ScanInputs& in, int direction, void* h, cudaStream_t stream);

}  // namespace gspn
