// GSPN line scan: forward and backward kernels (bodies only; gspn_<dtype>.cu instantiate them). The forward has
// two kernels: v2 (gspn_forward_v2.cuh: 16-byte packs of channels, the next line's loads in flight during the
// current step) where a thread can hold its share of a line, and v1 (forward_kernel below) that streams longer
// lines; gspn_ops.h's work split picks one (model in choose_work_split). Where the fused forward is latency bound
// (small latents), v2 runs one block per direction (4x the blocks, a quarter of the serial steps) and a merge
// pass sums the four fp32 direction planes in the fused order (bitwise the same y, deterministic).
//
// Thread mapping (v1 and the backward). One block per (channel tile, batch item) runs the directions of the call
// one after the other (all four for the fused op). A step of a direction is one line across the scan axis: rows
// x tile channels, element e = row * tile + lane, thread t owns e = t, t + threads, ... so a thread keeps one
// channel (threads is a multiple of tile) and consecutive threads read consecutive channels of a pixel (whole
// 32-byte sectors per pixel from 16 bf16 / 8 fp32 channels on). v2 maps a thread to a pack of V channels of one
// pixel instead. The recurrence couples a row only to rows +-1 of the previous line of the same channel, so a
// block needs the whole line of its channels and nothing of other blocks.
//
// Directions are strides and loop order: line s of direction d is image column s (or W-1-s) for the horizontal
// scans and image row s (or H-1-s) for the vertical ones; nothing is transposed or flipped in memory.
//
// Band edges (the single-direction horizontal scans of a band of rows, patch parallelism): the first row's offset -1
// and the last row's offset +1 neighbours at step s are given rows (in.edge_above / in.edge_below at the image
// column of step s - 1), valid like any neighbour. Those two rows read them with the line's other inputs (v2: in
// registers of their own, prefetched); the backward writes what reaches them, p_k * dh, once per column (the row
// that reads an edge value is its only consumer, so no atomics). Every kernel has a kEdges instantiation for them,
// so the others (the fused op, every scan without a band) keep their code and registers (ptxas -v sm_90, bf16:
// backward 128, v1 81, v2 124 / 64, none spilling; the kEdges ones spill 12-28 bytes, unmeasured on a GPU).
//
// How the four directions meet in one y without extra passes: the block that owns (b, channel tile) runs the
// four directions in turn, so the running sum of the direction terms belongs to that block alone. It lives in
// an fp32 accumulator (the output itself when the output is fp32): the first direction writes it, the middle
// ones read-modify-write it, the last one writes y in the storage dtype. Deterministic (fixed order, no
// atomics), fp32 accumulation, one launch, and no separate merge or cast pass (except v2's direction split).
//
// Memory traffic of the forward per pixel and channel, bf16, shared u, G = C (what the processor runs), both
// kernels: the unavoidable minimum reads x, lam, the 12 gate logits, u and writes y: 32 bytes. These kernels
// read x and lam once per direction (16 B), each direction's 3 gates once (24 B; none on the first line of a
// chunk), u once (2 B), and move the fp32 running sum (write 4 B, two read-modify-writes 16 B, read 4 B) and y
// (2 B): 68 bytes. Where the resident blocks' slices of x, lam and the running sum stay in L2 (50 MB on an H100:
// latents up to about 64x64 at C = 640, batch 2) the re-reads hit L2 and DRAM sees about 36 bytes; at 1024x512
// they do not. So at full HBM speed the forward reaches 47% (large latents) to ~90% (small ones) of peak by the
// "minimum bytes" metric; the accumulator (24 B) and the x/lam re-reads (12 B) are the price of keeping the
// hidden line on chip with a deterministic merge. Cheaper alternatives considered: fp32 atomics of four
// direction blocks into one accumulator (more traffic: a miss per red, a cast pass, and nondeterministic), a
// bf16 running sum (12 B less, but three extra roundings of y), one direction per block with per-direction
// output planes (4x the memory of y, and a merge pass).
//
// Expected speed (a model, not measured: no GPU was available when v2 was written). Small latents are latency
// bound: every block walks 4 x L steps, one after the other; v1 waits a DRAM round trip (~0.8 us) after every
// step's barrier, and one more per pass of kForwardUnroll elements per thread; v2 issues every load of line s+1
// while it computes line s, so a step costs at most one round trip. The direction split walks L steps instead
// of 4 L for about 10 more bytes per pixel-channel (78 instead of 68: four fp32 planes written by the scan and
// read by the merge, and x read again for the skip) and a second launch; at 64x64/C=640/B=2 bf16 the model
// picks it (64 steps + a merge worth ~45 round trips of bandwidth, against 256 steps). Lines longer than 512
// packs (v2 holds one 16-byte pack per thread at 124 registers; two spill) run v1. At 1024x512/C=640/B=2 bf16,
// normalised, the model picks v1 with 8-channel tiles: 160 blocks of 128 KB of h/z lines, one per SM, so two
// waves; the first moves ~18 MB per step (bandwidth bound, ~5.5 us at peak), the second is latency bound (4
// passes per step): about 35 ms, short of issue 10's 20 ms. What would close it: single-buffered lines or a
// line split over a thread block cluster (one wave), and cp.async/TMA staging so long lines prefetch without
// registers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <utility>

#include "gspn_params.h"

// The kernels' dynamic shared memory. csrc/emulation/ redefines it to run this same source on the CPU.
#ifndef GSPN_SHARED_FLOATS
#define GSPN_SHARED_FLOATS(name) extern __shared__ float name[]
#endif

namespace gspn {

template <typename T>
__device__ __forceinline__ float load_float(const T* p) {
  return static_cast<float>(*p);
}
template <>
__device__ __forceinline__ float load_float<__half>(const __half* p) {
  return __half2float(*p);
}
template <>
__device__ __forceinline__ float load_float<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}

template <typename T>
__device__ __forceinline__ T store_value(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half store_value<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_value<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ int64_t offset4(const int64_t* stride, int64_t b, int64_t y, int64_t x, int64_t c) {
  return b * stride[0] + y * stride[1] + x * stride[2] + c * stride[3];
}

// Geometry of one direction: `length` lines along the scan axis, `rows` positions across it; `above` / `below`: the
// band's edge rows are given, so row 0's offset -1 and row rows-1's offset +1 neighbours are valid.
struct Direction {
  int64_t length;
  int64_t rows;
  bool vertical;
  bool reversed;
  bool above;
  bool below;
};

// kEdges: the kernel instantiation that takes a band's edge rows; without it they are known absent at compile time,
// so the kernels that never see them (the fused op, every scan without a band) compile as if they did not exist.
template <bool kEdges>
__host__ __device__ __forceinline__ Direction direction_geometry(const ScanInputs& in, int d) {
  Direction g;
  g.vertical = d >= 2;        // top_to_bottom, bottom_to_top scan along H
  g.reversed = (d & 1) == 1;  // right_to_left, bottom_to_top
  g.length = g.vertical ? in.height : in.width;
  g.rows = g.vertical ? in.width : in.height;
  g.above = kEdges && !g.vertical && in.edge_above != nullptr;
  g.below = kEdges && !g.vertical && in.edge_below != nullptr;
  return g;
}

// Image line (column for horizontal scans, row for vertical ones) visited at step s.
__host__ __device__ __forceinline__ int64_t image_line(const Direction& g, int64_t s) {
  return g.reversed ? g.length - 1 - s : s;
}

// A line without predecessor: the first step, and the first line of every chunk (groups aligned to image
// coordinates, so a reversed scan starts a group at its last image line).
__host__ __device__ __forceinline__ bool starts_group(const Direction& g, int64_t s, int64_t chunk) {
  if (s == 0) return true;
  if (chunk == 0) return false;
  const int64_t l = image_line(g, s);
  return g.reversed ? (l % chunk == chunk - 1) : (l % chunk == 0);
}

// Whether step s has a predecessor line: every step that does not start a group, and the first step of a global
// scan given a carried initial state.
__host__ __device__ __forceinline__ bool has_predecessor(const ScanInputs& in, const Direction& g, int64_t s) {
  if (s == 0) return in.initial != nullptr && in.chunk == 0;
  return !starts_group(g, s, in.chunk);
}

// Element r * C + c of a (B, rows, C) carried-state line, b fixed.
__device__ __forceinline__ int64_t state_offset(const int64_t* stride, int64_t b, int64_t r, int64_t c) {
  return b * stride[0] + r * stride[1] + c * stride[2];
}

// (line, row) of a direction -> image (y, x).
__host__ __device__ __forceinline__ void image_pixel(const Direction& g, int64_t line, int64_t row, int64_t& y,
                                                     int64_t& x) {
  y = g.vertical ? line : row;
  x = g.vertical ? row : line;
}

// Gate k of row r is valid when the neighbour r + k - 1 of the previous line exists: inside the line, or a given
// edge row.
__device__ __forceinline__ bool gate_valid(int k, int64_t r, const Direction& g) {
  return (k != 0 || r > 0 || g.above) && (k != 2 || r < g.rows - 1 || g.below);
}

// The edge rows' values a row of step s sees (at the image column of step s - 1): `above` for row 0, `below` for
// the last row; 0 where not given or not that row (unused: those gates are invalid or inside the line).
struct EdgeValues {
  float above;
  float below;
};

template <typename T>
__device__ __forceinline__ EdgeValues load_edge_values(const ScanInputs& in, const Direction& g, int64_t b,
                                                       int64_t s, int64_t r, int64_t c) {
  EdgeValues v{0.f, 0.f};
  const int64_t column = image_line(g, s - 1);
  if (g.above && r == 0) {
    v.above = load_float(static_cast<const T*>(in.edge_above) + state_offset(in.edge_above_stride, b, column, c));
  }
  if (g.below && r == g.rows - 1) {
    v.below = load_float(static_cast<const T*>(in.edge_below) + state_offset(in.edge_below_stride, b, column, c));
  }
  return v;
}

// Sigmoids of the valid gates (0 for the dropped ones); p = sig / sum: row-stochastic weights.
struct GateWeights {
  float sig[kNumGates];
  float p[kNumGates];
  float inv_sum;
};

__device__ __forceinline__ GateWeights gate_weights(const float logits[kNumGates], int64_t r, const Direction& g) {
  GateWeights w;
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kNumGates; ++k) {
    w.sig[k] = gate_valid(k, r, g) ? 1.f / (1.f + expf(-logits[k])) : 0.f;
    sum += w.sig[k];
  }
  w.inv_sum = 1.f / sum;
#pragma unroll
  for (int k = 0; k < kNumGates; ++k) w.p[k] = w.sig[k] * w.inv_sum;
  return w;
}

template <typename T>
__device__ __forceinline__ void load_gate_logits(const ScanInputs& in, int64_t b, int64_t y, int64_t x, int64_t slot,
                                                 int64_t group, int64_t r, const Direction& g,
                                                 float logits[kNumGates]) {
  const T* gate = static_cast<const T*>(in.gate);
  const int64_t base = b * in.gate_stride[0] + y * in.gate_stride[1] + x * in.gate_stride[2] +
                       slot * in.gate_stride[3] + group * in.gate_stride[5];
#pragma unroll
  for (int k = 0; k < kNumGates; ++k) {
    logits[k] = gate_valid(k, r, g) ? load_float(gate + base + k * in.gate_stride[4]) : 0.f;
  }
}

// Neighbour r + k - 1 (a valid one) of the previous line, laid out [row * tile + lane]; with kEdges, the rows
// outside it are the band's edge rows.
template <bool kEdges>
__device__ __forceinline__ float neighbour(const float* prev, int64_t r, int k, const Direction& g, int tile, int lane,
                                           const EdgeValues& edges) {
  const int64_t row = r + k - 1;
  if constexpr (kEdges) {
    if (row < 0) return edges.above;
    if (row >= g.rows) return edges.below;
  }
  return prev[row * tile + lane];
}

// sum_k p_k * h[r + k - 1] of the previous line over the valid neighbours.
template <bool kEdges>
__device__ __forceinline__ float carried(const GateWeights& w, const float* prev, int64_t r, const Direction& g,
                                         int tile, int lane, const EdgeValues& edges) {
  float acc = 0.f;
#pragma unroll
  for (int k = 0; k < kNumGates; ++k) {
    if (gate_valid(k, r, g)) acc += w.p[k] * neighbour<kEdges>(prev, r, k, g, tile, lane, edges);
  }
  return acc;
}

// merge / skip entry i: fp32 parameters, or parameters in the storage dtype (read without a cast launch).
template <typename T>
__device__ __forceinline__ float load_param(const ScanInputs& in, const void* p, int64_t i) {
  return in.params_are_float ? static_cast<const float*>(p)[i] : load_float(static_cast<const T*>(p) + i);
}

// Per-thread constants of a block.
struct Lane {
  int64_t b;
  int64_t c;       // channel owned by this thread
  int lane;        // c - first channel of the tile
  bool active;     // c < C (the last tile may be partial)
  int64_t group;   // gate channel of c
  int tile_shift;  // log2(tile): row of element e is e >> tile_shift (tile is a power of two)
};

__device__ __forceinline__ Lane block_lane(const ScanInputs& in) {
  Lane t;
  t.lane = threadIdx.x % in.tile;
  t.b = blockIdx.y;
  t.c = static_cast<int64_t>(blockIdx.x) * in.tile + t.lane;
  t.active = t.c < in.channels;
  t.group = t.c / (in.channels / in.gate_channels);
  t.tile_shift = 0;
  while ((1 << t.tile_shift) < in.tile) ++t.tile_shift;
  return t;
}

__host__ __device__ __forceinline__ int64_t dense_index(const ScanInputs& in, int64_t b, int64_t y, int64_t x,
                                                        int64_t c) {
  return ((b * in.height + y) * in.width + x) * in.channels + c;
}

// ------------------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------------------

template <typename T, int kUnroll, bool kEdges>
__global__ void __launch_bounds__(512) forward_kernel(const ScanInputs in, const ScanForwardOutputs out) {
  GSPN_SHARED_FLOATS(smem);
  const Lane t = block_lane(in);
  const int tile = in.tile;
  const int64_t line_floats = max_rows(in) * tile;
  float* h_lines = smem;                    // [2][line_floats]
  float* z_lines = smem + 2 * line_floats;  // [2][line_floats], normalising only
  const T* xp = static_cast<const T*>(in.x);
  const T* lamp = static_cast<const T*>(in.lam);
  const T* up = static_cast<const T*>(in.u);
  T* yp = static_cast<T*>(out.y);
  const float skip_c = (in.skip != nullptr && t.active) ? load_param<T>(in, in.skip, t.c * in.skip_stride) : 0.f;
  // A u shared by the directions (stride 0 over them, as the GSPN processor passes it) is factored out,
  // y = u * sum_d merge_d * q_d + skip * x, so only the last direction reads it.
  const bool factor_u = up != nullptr && in.u_stride[3] == 0;

  for (int d = in.dir_begin; d < in.dir_end; ++d) {
    const Direction g = direction_geometry<kEdges>(in, d);
    const bool first = d == in.dir_begin;
    const bool last = d == in.dir_end - 1;
    const bool read_u = up != nullptr && (!factor_u || last);
    const float merge_c = (in.merge != nullptr && t.active)
                              ? load_param<T>(in, in.merge, d * in.merge_stride[0] + t.c * in.merge_stride[1])
                              : 1.f;
    const int64_t slot = in.gate_slot_is_direction ? d : 0;
    const int64_t n = g.rows * tile;
    if (in.initial != nullptr) {  // the carried line is step 0's predecessor (h_lines[0])
      const T* init = static_cast<const T*>(in.initial);
      for (int64_t e = threadIdx.x; t.active && e < n; e += blockDim.x) {
        h_lines[e] = load_float(init + state_offset(in.initial_stride, t.b, e >> t.tile_shift, t.c));
      }
      __syncthreads();
    }

    for (int64_t s = 0; s < g.length; ++s) {
      const int64_t line = image_line(g, s);
      const bool start = !has_predecessor(in, g, s);
      const bool final_line = out.final_state != nullptr && s == g.length - 1;
      const float* h_prev = h_lines + (s & 1) * line_floats;
      float* h_cur = h_lines + ((s + 1) & 1) * line_floats;
      const float* z_prev = z_lines + (s & 1) * line_floats;
      float* z_cur = z_lines + ((s + 1) & 1) * line_floats;

      // kUnroll elements per thread per pass: all their global loads are issued before any use.
      for (int64_t e0 = threadIdx.x; e0 < n; e0 += kUnroll * static_cast<int64_t>(blockDim.x)) {
        float xv[kUnroll], lv[kUnroll], uv[kUnroll], av[kUnroll], logits[kUnroll][kNumGates];
        EdgeValues ev[kUnroll]{};
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) {
          const int64_t e = e0 + i * static_cast<int64_t>(blockDim.x);
          xv[i] = lv[i] = av[i] = 0.f;
          uv[i] = 1.f;
          if (!t.active || e >= n) continue;
          const int64_t r = e >> t.tile_shift;
          int64_t y, x;
          image_pixel(g, line, r, y, x);
          xv[i] = load_float(xp + offset4(in.x_stride, t.b, y, x, t.c));
          lv[i] = load_float(lamp + offset4(in.lam_stride, t.b, y, x, t.c));
          if (read_u) {
            uv[i] = load_float(up + t.b * in.u_stride[0] + y * in.u_stride[1] + x * in.u_stride[2] +
                               d * in.u_stride[3] + t.c * in.u_stride[4]);
          }
          if (!first) av[i] = out.accum[dense_index(in, t.b, y, x, t.c)];
          if (!start) {
            load_gate_logits<T>(in, t.b, y, x, slot, t.group, r, g, logits[i]);
            if constexpr (kEdges) ev[i] = load_edge_values<T>(in, g, t.b, s, r, t.c);
          }
        }
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) {
          const int64_t e = e0 + i * static_cast<int64_t>(blockDim.x);
          if (!t.active || e >= n) continue;
          const int64_t r = e >> t.tile_shift;
          int64_t y, x;
          image_pixel(g, line, r, y, x);
          float h = lv[i] * xv[i];
          float z = lv[i];
          if (!start) {
            const GateWeights w = gate_weights(logits[i], r, g);
            h += carried<kEdges>(w, h_prev, r, g, tile, t.lane, ev[i]);
            if (in.normalize) z += carried<false>(w, z_prev, r, g, tile, t.lane, ev[i]);  // never with edges
          }
          h_cur[e] = h;
          if (final_line) static_cast<T*>(out.final_state)[(t.b * g.rows + r) * in.channels + t.c] = store_value<T>(h);
          float q = h;
          if (in.normalize) {
            z_cur[e] = z;
            q = h / fmaxf(z, in.eps);
          }
          const float term = factor_u ? merge_c * q : merge_c * uv[i] * q;
          const float acc = first ? term : av[i] + term;
          const int64_t idx = dense_index(in, t.b, y, x, t.c);
          if (last) {
            yp[idx] = store_value<T>((factor_u ? uv[i] * acc : acc) + skip_c * xv[i]);
          } else {
            out.accum[idx] = acc;
          }
        }
      }
      // The line just written is the next step's predecessor; the accumulator written here is read by other
      // threads in the next direction (a block barrier orders global memory within the block too).
      __syncthreads();
    }
  }
}

}  // namespace gspn

#include "gspn_forward_v2.cuh"

namespace gspn {

// ------------------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------------------
//
// Reverse sweep per direction, recomputing the hidden lines instead of storing them:
//   phase A: a forward sweep that keeps only one checkpoint line per segment of `segment` (~sqrt(L)) lines;
//   phase B: segments from last to first: recompute the segment's lines from its checkpoint (into per-block
//            scratch), then sweep them in reverse carrying the adjoint line.
// The hidden lines of phase A/B live in per-block global scratch (a few lines, L1/L2 resident); the adjoint
// carry lives in shared memory. With q = h (or h / max(z, eps)), term = merge * u * q, and the adjoint
//   dh_s[r] = dL/dq * dq/dh + sum over the rows r' of line s+1 fed by r of p_{s+1}[r', k] * dh_{s+1}[r'],
// each row of line s+1 sends p_k * dh to its three neighbours of line s; those contributions are what the
// shared memory holds (double-buffered by step parity, one barrier per step).

// Scratch line j of this block (h lines first, then the same number of z lines).
struct Scratch {
  float* base;
  int64_t line_floats;
  int64_t lines;
  __device__ __forceinline__ float* h(int64_t j) const { return base + j * line_floats; }
  __device__ __forceinline__ float* z(int64_t j) const { return base + (lines + j) * line_floats; }
};

// Hidden (and normaliser) line s of direction d from line s-1 (unused at a group start). No outputs.
template <typename T, bool kEdges>
__device__ void recompute_line(const ScanInputs& in, const Lane& t, const Direction& g, int64_t slot, int64_t s,
                               const float* h_prev, float* h_cur, const float* z_prev, float* z_cur) {
  const T* xp = static_cast<const T*>(in.x);
  const T* lamp = static_cast<const T*>(in.lam);
  const int64_t line = image_line(g, s);
  const bool start = !has_predecessor(in, g, s);
  const int64_t n = g.rows * in.tile;
  if (!t.active) return;
  // kRecomputeUnroll elements per thread per pass: all their global loads are issued before any use.
  for (int64_t e0 = threadIdx.x; e0 < n; e0 += kRecomputeUnroll * static_cast<int64_t>(blockDim.x)) {
    float xv[kRecomputeUnroll], lv[kRecomputeUnroll], logits[kRecomputeUnroll][kNumGates];
    EdgeValues ev[kRecomputeUnroll]{};
#pragma unroll
    for (int i = 0; i < kRecomputeUnroll; ++i) {
      const int64_t e = e0 + i * static_cast<int64_t>(blockDim.x);
      if (e >= n) continue;
      const int64_t r = e >> t.tile_shift;
      int64_t y, x;
      image_pixel(g, line, r, y, x);
      lv[i] = load_float(lamp + offset4(in.lam_stride, t.b, y, x, t.c));
      xv[i] = load_float(xp + offset4(in.x_stride, t.b, y, x, t.c));
      if (!start) {
        load_gate_logits<T>(in, t.b, y, x, slot, t.group, r, g, logits[i]);
        if constexpr (kEdges) ev[i] = load_edge_values<T>(in, g, t.b, s, r, t.c);
      }
    }
#pragma unroll
    for (int i = 0; i < kRecomputeUnroll; ++i) {
      const int64_t e = e0 + i * static_cast<int64_t>(blockDim.x);
      if (e >= n) continue;
      const int64_t r = e >> t.tile_shift;
      float h = lv[i] * xv[i];
      float z = lv[i];
      if (!start) {
        const GateWeights w = gate_weights(logits[i], r, g);
        h += carried<kEdges>(w, h_prev, r, g, in.tile, t.lane, ev[i]);
        if (in.normalize) z += carried<false>(w, z_prev, r, g, in.tile, t.lane, ev[i]);  // never with edges
      }
      h_cur[e] = h;
      if (in.normalize) z_cur[e] = z;
    }
  }
}

template <typename T, bool kEdges>
__global__ void __launch_bounds__(512) backward_kernel(const ScanInputs in, const ScanBackwardArgs a) {
  GSPN_SHARED_FLOATS(smem);
  const Lane t = block_lane(in);
  const int tile = in.tile;
  const int64_t line_floats = max_rows(in) * tile;
  // Contributions to the previous line: [parity][k][line_floats] for h, then the same for z.
  float* contrib_h = smem;
  float* contrib_z = smem + 2 * kNumGates * line_floats;
  float* reduce = smem + 2 * kNumGates * line_floats * (in.normalize ? 2 : 1);

  const int64_t lines = backward_scratch_lines(a.segment, a.num_segments);
  const int64_t block = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const Scratch scratch{a.scratch + block * backward_scratch_floats_per_block(in, a.segment, a.num_segments),
                        line_floats, lines};
  const int64_t seg_line0 = a.num_segments;               // recomputed lines of the current segment
  const int64_t roll_line0 = a.num_segments + a.segment;  // two rolling lines of phase A

  const T* xp = static_cast<const T*>(in.x);
  const T* lamp = static_cast<const T*>(in.lam);
  const T* up = static_cast<const T*>(in.u);
  const T* gyp = static_cast<const T*>(a.grad_y);
  const float skip_c = (in.skip != nullptr && t.active) ? load_param<T>(in, in.skip, t.c * in.skip_stride) : 0.f;
  const int64_t slots = in.gate_slot_is_direction ? kNumDirections : 1;
  const bool shared_gates = in.gate_channels != in.channels;
  float skip_acc = 0.f;

  for (int d = in.dir_begin; d < in.dir_end; ++d) {
    const Direction g = direction_geometry<kEdges>(in, d);
    const bool first = d == in.dir_begin;
    const bool last = d == in.dir_end - 1;
    const float merge_c = (in.merge != nullptr && t.active)
                              ? load_param<T>(in, in.merge, d * in.merge_stride[0] + t.c * in.merge_stride[1])
                              : 1.f;
    const int64_t slot = in.gate_slot_is_direction ? d : 0;
    const int64_t n = g.rows * tile;
    const int64_t segments = (g.length + a.segment - 1) / a.segment;
    float merge_acc = 0.f;

    // Checkpoint 0 holds the carried initial state (step 0's predecessor), unused without one.
    if (in.initial != nullptr) {
      const T* init = static_cast<const T*>(in.initial);
      for (int64_t e = threadIdx.x; t.active && e < n; e += blockDim.x) {
        scratch.h(0)[e] = load_float(init + state_offset(in.initial_stride, t.b, e >> t.tile_shift, t.c));
      }
      __syncthreads();
    }

    // Phase A: checkpoint j (1 <= j < segments) holds line j * segment - 1.
    const float* h_prev = scratch.h(0);
    const float* z_prev = scratch.z(0);
    for (int64_t s = 0; s < (segments - 1) * a.segment; ++s) {
      const bool checkpoint = (s + 1) % a.segment == 0;
      const int64_t j = checkpoint ? (s + 1) / a.segment : roll_line0 + (s & 1);
      recompute_line<T, kEdges>(in, t, g, slot, s, h_prev, scratch.h(j), z_prev, scratch.z(j));
      h_prev = scratch.h(j);
      z_prev = scratch.z(j);
      __syncthreads();
    }

    // Phase B.
    for (int64_t seg = segments - 1; seg >= 0; --seg) {
      const int64_t s0 = seg * a.segment;
      const int64_t s1 = s0 + a.segment < g.length ? s0 + a.segment : g.length;
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t prev_line = s == s0 ? seg : seg_line0 + (s - 1 - s0);  // checkpoint `seg` unused at s = 0
        recompute_line<T, kEdges>(in, t, g, slot, s, scratch.h(prev_line), scratch.h(seg_line0 + s - s0), scratch.z(prev_line),
                          scratch.z(seg_line0 + s - s0));
        __syncthreads();
      }
      for (int64_t s = s1 - 1; s >= s0; --s) {
        const int64_t line = image_line(g, s);
        const bool start = !has_predecessor(in, g, s);
        const bool has_next = s + 1 < g.length;
        const int64_t prev_line = s == s0 ? seg : seg_line0 + (s - 1 - s0);
        const float* hp = scratch.h(prev_line);
        const float* zp = scratch.z(prev_line);
        const float* hc = scratch.h(seg_line0 + s - s0);
        const float* zc = scratch.z(seg_line0 + s - s0);
        const float* in_h = contrib_h + ((s + 1) & 1) * kNumGates * line_floats;  // written at step s + 1
        const float* in_z = contrib_z + ((s + 1) & 1) * kNumGates * line_floats;
        float* out_h = contrib_h + (s & 1) * kNumGates * line_floats;  // read at step s - 1
        float* out_z = contrib_z + (s & 1) * kNumGates * line_floats;

        // kBackwardUnroll elements per thread per pass: all their global loads are issued before any use (no
        // element's stores touch another's loads: inputs are read only, the running sums are per element).
        const int64_t per_pass = kBackwardUnroll * static_cast<int64_t>(blockDim.x);
        for (int64_t e0 = threadIdx.x; t.active && e0 < n; e0 += per_pass) {
          float xs[kBackwardUnroll], ls[kBackwardUnroll], gys[kBackwardUnroll], us[kBackwardUnroll];
          float hs[kBackwardUnroll], zs[kBackwardUnroll], logit_s[kBackwardUnroll][kNumGates];
          EdgeValues evs[kBackwardUnroll]{};
          float axs[kBackwardUnroll], als[kBackwardUnroll], aus[kBackwardUnroll];
#pragma unroll
          for (int i = 0; i < kBackwardUnroll; ++i) {
            const int64_t e = e0 + i * static_cast<int64_t>(blockDim.x);
            if (e >= n) continue;
            const int64_t r = e >> t.tile_shift;
            int64_t y, x;
            image_pixel(g, line, r, y, x);
            xs[i] = load_float(xp + offset4(in.x_stride, t.b, y, x, t.c));
            ls[i] = load_float(lamp + offset4(in.lam_stride, t.b, y, x, t.c));
            gys[i] = load_float(gyp + offset4(a.grad_y_stride, t.b, y, x, t.c));
            us[i] = up != nullptr ? load_float(up + t.b * in.u_stride[0] + y * in.u_stride[1] + x * in.u_stride[2] +
                                               d * in.u_stride[3] + t.c * in.u_stride[4])
                                  : 1.f;
            hs[i] = hc[e];
            zs[i] = in.normalize ? zc[e] : 0.f;
            if (!start) {
              load_gate_logits<T>(in, t.b, y, x, slot, t.group, r, g, logit_s[i]);
              if constexpr (kEdges) evs[i] = load_edge_values<T>(in, g, t.b, s, r, t.c);
            }
            if (!first) {
              const int64_t idx = dense_index(in, t.b, y, x, t.c);
              axs[i] = a.accum_x[idx];
              als[i] = a.accum_lam[idx];
              aus[i] = (up != nullptr && !a.u_per_direction) ? a.accum_u[idx] : 0.f;
            }
          }
#pragma unroll
          for (int i = 0; i < kBackwardUnroll; ++i) {
            const int64_t e = e0 + i * static_cast<int64_t>(blockDim.x);
            if (e >= n) continue;
            const int64_t r = e >> t.tile_shift;
            int64_t y, x;
            image_pixel(g, line, r, y, x);
            const float xv = xs[i];
            const float lv = ls[i];
            const float gy = gys[i];
            const float uv = us[i];
            const float h = hs[i];

            // Gradients of this direction's term with respect to q, h, z, u and merge.
            float q = h, dh = gy * merge_c * uv, dz = 0.f;
            if (in.normalize) {
              const float z = zs[i];
              const float zclamped = fmaxf(z, in.eps);
              q = h / zclamped;
              dh = gy * merge_c * uv / zclamped;
              dz = z >= in.eps ? -dh * q : 0.f;  // d(h / z)/dz = -(h / z) / z
            }
            merge_acc += gy * uv * q;

            // Adjoint carried back from line s + 1: rows r + 1 (k = 0), r (k = 1), r - 1 (k = 2).
            if (has_next) {
              float ch = in_h[1 * line_floats + e];
              float cz = in.normalize ? in_z[1 * line_floats + e] : 0.f;
              if (r + 1 < g.rows) {
                ch += in_h[0 * line_floats + e + tile];
                if (in.normalize) cz += in_z[0 * line_floats + e + tile];
              }
              if (r > 0) {
                ch += in_h[2 * line_floats + e - tile];
                if (in.normalize) cz += in_z[2 * line_floats + e - tile];
              }
              dh += ch;
              dz += cz;
            }
            if (a.grad_final != nullptr && s == g.length - 1) {  // the final state is h of the last line
              dh += load_float(static_cast<const T*>(a.grad_final) + state_offset(a.grad_final_stride, t.b, r, t.c));
            }

            // Gates (and what this line sends back to line s - 1).
            const int64_t gate_base =
                ((((t.b * in.height + y) * in.width + x) * slots + slot) * kNumGates) * in.gate_channels + t.group;
            if (!start) {
              const GateWeights w = gate_weights(logit_s[i], r, g);
              float gp[kNumGates];
              float dot = 0.f;
#pragma unroll
              for (int k = 0; k < kNumGates; ++k) {
                gp[k] = 0.f;
                if (gate_valid(k, r, g)) {  // the normaliser has no edge rows (never given with normalize)
                  gp[k] = dh * neighbour<kEdges>(hp, r, k, g, tile, t.lane, evs[i]) +
                          (in.normalize ? dz * zp[e + (k - 1) * tile] : 0.f);
                }
                dot += gp[k] * w.p[k];
              }
              if constexpr (kEdges) {  // what reaches the band's edge rows: once per column, by its only reader
                const int64_t edge_idx = (t.b * in.width + image_line(g, s - 1)) * in.channels + t.c;
                if (g.above && r == 0) static_cast<T*>(a.grad_edge_above)[edge_idx] = store_value<T>(w.p[0] * dh);
                if (g.below && r == g.rows - 1) {
                  static_cast<T*>(a.grad_edge_below)[edge_idx] = store_value<T>(w.p[2] * dh);
                }
              }
#pragma unroll
              for (int k = 0; k < kNumGates; ++k) {
                // p_k = sig_k / S over the valid k: dL/dsig_j = (gp_j - sum_k gp_k p_k) / S, zero when dropped.
                const float dsig = gate_valid(k, r, g) ? (gp[k] - dot) * w.inv_sum : 0.f;
                const float dlogit = dsig * w.sig[k] * (1.f - w.sig[k]);
                const int64_t gate_idx = gate_base + k * in.gate_channels;
                if (shared_gates) {
                  if (dlogit != 0.f) atomicAdd(static_cast<float*>(a.grad_gate) + gate_idx, dlogit);
                } else {
                  static_cast<T*>(a.grad_gate)[gate_idx] = store_value<T>(dlogit);
                }
                out_h[k * line_floats + e] = w.p[k] * dh;
                if (in.normalize) out_z[k * line_floats + e] = w.p[k] * dz;
              }
            } else {
#pragma unroll
              for (int k = 0; k < kNumGates; ++k) {
                if (!shared_gates) {
                  static_cast<T*>(a.grad_gate)[gate_base + k * in.gate_channels] = store_value<T>(0.f);
                }
                out_h[k * line_floats + e] = 0.f;
                if (in.normalize) out_z[k * line_floats + e] = 0.f;
              }
            }

            // x, lam, u: sums over the directions in a block-private fp32 accumulator (fixed order).
            const int64_t idx = dense_index(in, t.b, y, x, t.c);
            float gx = dh * lv;
            float glam = dh * xv + dz;
            if (first) {
              gx += skip_c * gy;
              skip_acc += gy * xv;
            } else {
              gx += axs[i];
              glam += als[i];
            }
            if (last) {
              static_cast<T*>(a.grad_x)[idx] = store_value<T>(gx);
              static_cast<T*>(a.grad_lam)[idx] = store_value<T>(glam);
            } else {
              a.accum_x[idx] = gx;
              a.accum_lam[idx] = glam;
            }
            if (up != nullptr) {
              const float gu = gy * merge_c * q;
              if (a.u_per_direction) {
                static_cast<T*>(
                    a.grad_u)[(((t.b * in.height + y) * in.width + x) * kNumDirections + d) * in.channels + t.c] =
                    store_value<T>(gu);
              } else {
                const float acc = first ? gu : aus[i] + gu;
                if (last) {
                  static_cast<T*>(a.grad_u)[idx] = store_value<T>(acc);
                } else {
                  a.accum_u[idx] = acc;
                }
              }
            }
          }
        }
        __syncthreads();
      }
    }

    // Gradient of the carried initial state: what step 0 sent back to its predecessor (zero when it had none).
    if (a.grad_initial != nullptr) {
      for (int64_t e = threadIdx.x; t.active && e < n; e += blockDim.x) {
        const int64_t r = e >> t.tile_shift;
        float gi = contrib_h[1 * line_floats + e];
        if (r + 1 < g.rows) gi += contrib_h[0 * line_floats + e + tile];
        if (r > 0) gi += contrib_h[2 * line_floats + e - tile];
        static_cast<T*>(a.grad_initial)[(t.b * g.rows + r) * in.channels + t.c] = store_value<T>(gi);
      }
    }

    // Merge gradient of this direction: sum over the threads of each channel, one partial per batch item.
    if (a.grad_merge_part != nullptr) {
      reduce[threadIdx.x] = merge_acc;
      __syncthreads();
      if (threadIdx.x < tile && t.active) {
        float sum = 0.f;
        for (int i = static_cast<int>(threadIdx.x); i < static_cast<int>(blockDim.x); i += tile) sum += reduce[i];
        a.grad_merge_part[(t.b * kNumDirections + d) * in.channels + t.c] = sum;
      }
      __syncthreads();
    }
  }

  if (a.grad_skip_part != nullptr) {
    reduce[threadIdx.x] = skip_acc;
    __syncthreads();
    if (threadIdx.x < tile && t.active) {
      float sum = 0.f;
      for (int i = static_cast<int>(threadIdx.x); i < static_cast<int>(blockDim.x); i += tile) sum += reduce[i];
      a.grad_skip_part[t.b * in.channels + t.c] = sum;
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Launchers (the host emulation of csrc/emulation/ launches the same kernels its own way)
// ------------------------------------------------------------------------------------------------------------

inline bool has_edges(const ScanInputs& in) {
  return in.edge_above != nullptr || in.edge_below != nullptr;
}

// The backward kernel on a grid of (channel tiles, batch), given to `launch` as dispatch_forward does.
template <typename T, typename Launch>
cudaError_t dispatch_backward(const ScanInputs& in, Launch&& launch) {
  const dim3 grid(static_cast<unsigned>((in.channels + in.tile - 1) / in.tile), static_cast<unsigned>(in.batch));
  const size_t shared = backward_shared_bytes(in);
  return has_edges(in) ? launch(backward_kernel<T, true>, grid, in.threads, shared)
                       : launch(backward_kernel<T, false>, grid, in.threads, shared);
}

// The forward of the work split: the scan kernel (v2 with packs of in.pack channels, or v1) on a grid of
// (channel tiles, batch, 4 directions when split), then the merge of the direction planes when split. Each
// kernel goes to `launch(kernel, grid, threads, shared bytes)` (the CUDA launcher below, or the emulation's).
template <typename T, typename Launch>
cudaError_t dispatch_forward(const ScanInputs& in, Launch&& launch) {
  constexpr int kPack = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>((in.channels + in.tile - 1) / in.tile), static_cast<unsigned>(in.batch),
                  in.split_directions ? kNumDirections : 1);
  const size_t v2_shared = forward_v2_shared_bytes(in);
  const bool edges = has_edges(in);
  cudaError_t error;
  if (in.pack == kPack) {
    error = edges ? launch(forward_kernel_v2<T, kPack, forward_v2_units(kPack), true>, grid, in.threads, v2_shared)
                  : launch(forward_kernel_v2<T, kPack, forward_v2_units(kPack), false>, grid, in.threads, v2_shared);
  } else if (in.pack == 1) {
    error = edges ? launch(forward_kernel_v2<T, 1, forward_v2_units(1), true>, grid, in.threads, v2_shared)
                  : launch(forward_kernel_v2<T, 1, forward_v2_units(1), false>, grid, in.threads, v2_shared);
  } else {
    error = edges ? launch(forward_kernel<T, kForwardUnroll, true>, grid, in.threads, forward_shared_bytes(in))
                  : launch(forward_kernel<T, kForwardUnroll, false>, grid, in.threads, forward_shared_bytes(in));
  }
  if (error != cudaSuccess || !in.split_directions) return error;
  const int64_t elements = in.batch * in.height * in.width * in.channels;
  const int64_t blocks = std::min<int64_t>((elements + kMergeThreads - 1) / kMergeThreads, 1 << 20);
  return launch(merge_directions_kernel<T>, dim3(static_cast<unsigned>(blocks)), kMergeThreads, 0);
}

#ifndef GSPN_HOST_EMULATION

// A kernel's dynamic shared-memory limit, raised to the device's opt-in maximum once per (kernel, device) rather
// than per launch, with the error returned: on a GPU whose arch the build lacks, this is where "no kernel image"
// shows up.
template <typename Kernel>
cudaError_t raise_shared_memory_limit(Kernel kernel) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> raised;
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  if (raised.count(key) != 0) return cudaSuccess;
  int optin = 0;
  error = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error == cudaSuccess) error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  if (error == cudaSuccess) raised.insert(key);
  return error;
}

// Launch errors are checked by the binding (C10_CUDA_KERNEL_LAUNCH_CHECK).
template <typename T>
cudaError_t launch_forward(const ScanInputs& in, const ScanForwardOutputs& out, cudaStream_t stream) {
  return dispatch_forward<T>(in, [&](auto kernel, dim3 grid, int threads, size_t shared) {
    const cudaError_t error = raise_shared_memory_limit(kernel);
    if (error == cudaSuccess) kernel<<<grid, threads, shared, stream>>>(in, out);
    return error;
  });
}

template <typename T>
cudaError_t launch_backward(const ScanInputs& in, const ScanBackwardArgs& args, cudaStream_t stream) {
  return dispatch_backward<T>(in, [&](auto kernel, dim3 grid, int threads, size_t shared) {
    const cudaError_t error = raise_shared_memory_limit(kernel);
    if (error == cudaSuccess) kernel<<<grid, threads, shared, stream>>>(in, args);
    return error;
  });
}
#endif  // GSPN_HOST_EMULATION

}  // namespace gspn
