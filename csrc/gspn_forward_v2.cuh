// Kernel v2 of the forward (included by gspn_scan_kernel.cuh after the shared helpers; design and traffic notes
// at the top of that file).
//
// What changes against forward_kernel (v1, kept for lines too long for v2):
//   * a thread owns V consecutive channels of one pixel (a "pack": 16 bytes, 8 bf16/fp16 or 4 fp32 channels) and
//     reads them with one vector load where the layout allows (channel stride 1, aligned), so a warp reads whole
//     32-byte sectors; V = 1 for tiles narrower than a pack or channel counts it does not divide;
//   * every input of the next line (x, lam, the 3 gates, u, the running sum) is loaded into a pack's registers as
//     soon as the pack's current values are consumed, before the step's barrier: a step waits on loads issued one
//     step earlier (in flight during the rest of the step and the barrier), not on a fresh round trip after the
//     barrier as v1 does. One register buffer (double buffering would spill at 16-byte packs);
//   * merge and skip of the tile are read once per direction into shared memory.
// The hidden line still lives in shared memory ([row][tile] floats, double-buffered by step parity, one barrier
// per step): a row needs rows r-1..r+1 of the previous line, which other threads own.
#pragma once

namespace gspn {

// V consecutive storage elements of one pixel, one aligned access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p, int64_t channel_stride, bool vector) {
  if (vector) return *reinterpret_cast<const Pack<T, V>*>(p);
  Pack<T, V> r;
#pragma unroll
  for (int i = 0; i < V; ++i) r.v[i] = p[i * channel_stride];
  return r;
}

// The band's edge rows at the predecessor column (kEdges: a single-direction scan given them), read by the packs
// of the first row (above) and the last row (below). Separate registers only where they can be given, so the fused
// kernel keeps its register budget.
template <typename T, int V, bool kEdges>
struct EdgePacks {
  Pack<T, V> above, below;
};
template <typename T, int V>
struct EdgePacks<T, V, false> {};

// Every input of one pack of one line (the edge packs a base: no storage without edges).
template <typename T, int V, bool kEdges>
struct PackInputs : EdgePacks<T, V, kEdges> {
  Pack<T, V> x, lam, gate[kNumGates], u;
  Pack<float, V> acc;  // running sum of the earlier directions
};

// Per-thread geometry of one pack in the current direction.
struct PackSlot {
  int64_t row;
  int lane0;  // first channel of the pack within the tile
  int64_t c0;
  bool active;
  int64_t group0;  // gate channel of c0, and c0's offset within it: channel c0 + i has gate channel
  int group_rem;   // group0 + (group_rem + i) / per_group (a 32-bit division, no 64-bit division in the loop)
};

// What a direction reads besides x, lam and its gates.
struct DirectionReads {
  int d;
  int64_t slot;       // gate direction slot
  bool accum;         // the running sum of the earlier directions
  bool u;             // u (read by every direction, or only the last one when factored out)
  int per_group;  // channels per gate channel
};

template <typename T, int V, bool kEdges>
__device__ __forceinline__ void load_pack_inputs(const ScanInputs& in, const ScanForwardOutputs& out,
                                                 const Direction& g, const DirectionReads& rd, int64_t b, int64_t s,
                                                 const PackSlot& p, PackInputs<T, V, kEdges>& to) {
  if (!p.active) return;
  int64_t y, x;
  image_pixel(g, image_line(g, s), p.row, y, x);
  to.x = load_pack<T, V>(static_cast<const T*>(in.x) + offset4(in.x_stride, b, y, x, p.c0), in.x_stride[3],
                         in.vector_x);
  to.lam = load_pack<T, V>(static_cast<const T*>(in.lam) + offset4(in.lam_stride, b, y, x, p.c0), in.lam_stride[3],
                           in.vector_lam);
  if (rd.accum) to.acc = *reinterpret_cast<const Pack<float, V>*>(out.accum + dense_index(in, b, y, x, p.c0));
  if (rd.u) {
    to.u = load_pack<T, V>(static_cast<const T*>(in.u) + b * in.u_stride[0] + y * in.u_stride[1] +
                               x * in.u_stride[2] + rd.d * in.u_stride[3] + p.c0 * in.u_stride[4],
                           in.u_stride[4], in.vector_u);
  }
  if (!has_predecessor(in, g, s)) return;  // a group start reads no gates (nor edge rows)
  if constexpr (kEdges) {
    const int64_t column = image_line(g, s - 1);
    if (g.above && p.row == 0) {
      to.above = load_pack<T, V>(
          static_cast<const T*>(in.edge_above) + state_offset(in.edge_above_stride, b, column, p.c0),
          in.edge_above_stride[2], false);
    }
    if (g.below && p.row == g.rows - 1) {
      to.below = load_pack<T, V>(
          static_cast<const T*>(in.edge_below) + state_offset(in.edge_below_stride, b, column, p.c0),
          in.edge_below_stride[2], false);
    }
  }
  const T* gate = static_cast<const T*>(in.gate) + b * in.gate_stride[0] + y * in.gate_stride[1] +
                  x * in.gate_stride[2] + rd.slot * in.gate_stride[3];
#pragma unroll
  for (int k = 0; k < kNumGates; ++k) {
    const T* base = gate + k * in.gate_stride[4];
    if (in.vector_gate) {  // one gate channel per channel
      to.gate[k] = *reinterpret_cast<const Pack<T, V>*>(base + p.c0 * in.gate_stride[5]);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        to.gate[k].v[i] = base[(p.group0 + (p.group_rem + i) / rd.per_group) * in.gate_stride[5]];
      }
    }
  }
}

// Single channels (V == 1) ask for two blocks of 512 threads per SM: at most 64 registers, what the work split's
// occupancy model assumes (kForwardV2SingleRegisters; ptxas -v sm_90 bf16: 64, no spill, with or without edges).
template <typename T, int V, int kUnits, bool kEdges>
__global__ void __launch_bounds__(kV2MaxThreads, V == 1 ? 2 : 1) forward_kernel_v2(const ScanInputs in, const ScanForwardOutputs out) {
  GSPN_SHARED_FLOATS(smem);
  const int tile = in.tile;
  const int packs_per_row = tile / V;
  int pack_shift = 0;
  while ((1 << pack_shift) < packs_per_row) ++pack_shift;
  const int64_t b = blockIdx.y;
  const int64_t c_tile = static_cast<int64_t>(blockIdx.x) * tile;
  const int64_t line_floats = max_rows(in) * tile;
  const int per_group = static_cast<int>(in.channels / in.gate_channels);
  float* h_lines = smem;                                                 // [2][line_floats]
  float* z_lines = smem + 2 * line_floats;                               // [2][line_floats], normalising only
  float* merge_tile = smem + 2 * line_floats * (in.normalize ? 2 : 1);  // [tile]
  float* skip_tile = merge_tile + tile;                                  // [tile]
  const T* up = static_cast<const T*>(in.u);
  // A u shared by the directions (stride 0 over them) is factored out: y = u * sum_d merge_d * q_d + skip * x.
  const bool factor_u = up != nullptr && in.u_stride[3] == 0;

  // Split directions: this block walks direction blockIdx.z alone and writes its term to that direction's plane.
  const int d_begin = in.split_directions ? static_cast<int>(blockIdx.z) : in.dir_begin;
  const int d_end = in.split_directions ? d_begin + 1 : in.dir_end;
  const int64_t plane = in.batch * in.height * in.width * in.channels;
  float* const accum = out.accum + (in.split_directions ? d_begin * plane : 0);

  for (int d = d_begin; d < d_end; ++d) {
    const Direction g = direction_geometry<kEdges>(in, d);
    const bool first = d == d_begin;
    const bool last = d == d_end - 1 && !in.split_directions;  // writes y
    const bool read_u = up != nullptr && (!factor_u || last);
    const int64_t slot = in.gate_slot_is_direction ? d : 0;

    PackSlot p[kUnits];
#pragma unroll
    for (int i = 0; i < kUnits; ++i) {
      const int64_t unit = threadIdx.x + static_cast<int64_t>(i) * blockDim.x;
      p[i].row = unit >> pack_shift;
      p[i].lane0 = static_cast<int>(unit & (packs_per_row - 1)) * V;
      p[i].c0 = c_tile + p[i].lane0;
      p[i].active = p[i].row < g.rows && p[i].c0 < in.channels;
      p[i].group0 = p[i].c0 / per_group;
      p[i].group_rem = static_cast<int>(p[i].c0 - p[i].group0 * per_group);
    }
    for (int i = threadIdx.x; i < tile; i += blockDim.x) {
      const int64_t c = c_tile + i;
      const bool valid = c < in.channels;
      merge_tile[i] = (in.merge != nullptr && valid)
                          ? load_param<T>(in, in.merge, d * in.merge_stride[0] + c * in.merge_stride[1])
                          : 1.f;
      skip_tile[i] = (in.skip != nullptr && valid) ? load_param<T>(in, in.skip, c * in.skip_stride) : 0.f;
    }
    if (in.initial != nullptr) {  // the carried line is step 0's predecessor (h_lines[0])
#pragma unroll
      for (int i = 0; i < kUnits; ++i) {
        if (!p[i].active) continue;
        const Pack<T, V> init = load_pack<T, V>(
            static_cast<const T*>(in.initial) + state_offset(in.initial_stride, b, p[i].row, p[i].c0),
            in.initial_stride[2], false);
#pragma unroll
        for (int j = 0; j < V; ++j) h_lines[p[i].row * tile + p[i].lane0 + j] = load_float(&init.v[j]);
      }
    }

    const DirectionReads rd{d, slot, !first, read_u, per_group};
    PackInputs<T, V, kEdges> cur[kUnits];
#pragma unroll
    for (int i = 0; i < kUnits; ++i) load_pack_inputs<T, V, kEdges>(in, out, g, rd, b, 0, p[i], cur[i]);
    __syncthreads();  // merge/skip of the tile and the carried line

    for (int64_t s = 0; s < g.length; ++s) {
      const int64_t line = image_line(g, s);
      const bool pred = has_predecessor(in, g, s);
      const bool final_line = out.final_state != nullptr && s == g.length - 1;
      const float* h_prev = h_lines + (s & 1) * line_floats;
      float* h_cur = h_lines + ((s + 1) & 1) * line_floats;
      const float* z_prev = z_lines + (s & 1) * line_floats;
      float* z_cur = z_lines + ((s + 1) & 1) * line_floats;
#pragma unroll
      for (int i = 0; i < kUnits; ++i) {
        if (!p[i].active) continue;
        const int64_t r = p[i].row;
        int64_t y, x;
        image_pixel(g, line, r, y, x);
        Pack<T, V> result;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int c = p[i].lane0 + j;
          const float lv = load_float(&cur[i].lam.v[j]);
          const float xv = load_float(&cur[i].x.v[j]);
          float h = lv * xv;
          float z = lv;
          if (pred) {
            float logits[kNumGates];
#pragma unroll
            for (int k = 0; k < kNumGates; ++k) logits[k] = load_float(&cur[i].gate[k].v[j]);
            const GateWeights w = gate_weights(logits, r, g);
            EdgeValues edges{0.f, 0.f};
            if constexpr (kEdges) {
              if (g.above && r == 0) edges.above = load_float(&cur[i].above.v[j]);
              if (g.below && r == g.rows - 1) edges.below = load_float(&cur[i].below.v[j]);
            }
            h += carried<kEdges>(w, h_prev, r, g, tile, c, edges);
            if (in.normalize) z += carried<false>(w, z_prev, r, g, tile, c, edges);  // never with edges
          }
          h_cur[r * tile + c] = h;
          if (final_line) result.v[j] = store_value<T>(h);
          float q = h;
          if (in.normalize) {
            z_cur[r * tile + c] = z;
            q = h / fmaxf(z, in.eps);
          }
          const float u = read_u ? load_float(&cur[i].u.v[j]) : 1.f;
          const float term = factor_u ? merge_tile[c] * q : merge_tile[c] * u * q;
          float acc = first ? term : cur[i].acc.v[j] + term;
          if (last) acc = (factor_u ? u * acc : acc) + skip_tile[c] * xv;
          cur[i].acc.v[j] = acc;
        }
        if (final_line) {
          *reinterpret_cast<Pack<T, V>*>(static_cast<T*>(out.final_state) + (b * g.rows + r) * in.channels +
                                         p[i].c0) = result;
        }
        const int64_t idx = dense_index(in, b, y, x, p[i].c0);
        if (last) {
#pragma unroll
          for (int j = 0; j < V; ++j) result.v[j] = store_value<T>(cur[i].acc.v[j]);
          *reinterpret_cast<Pack<T, V>*>(static_cast<T*>(out.y) + idx) = result;
        } else {
          *reinterpret_cast<Pack<float, V>*>(accum + idx) = cur[i].acc;
        }
        // This pack's registers are free: the next line's loads go out now, before the barrier.
        if (s + 1 < g.length) load_pack_inputs<T, V, kEdges>(in, out, g, rd, b, s + 1, p[i], cur[i]);
      }
      // The line just written is the next step's predecessor; the accumulator written here is read by other
      // threads in the next direction (a block barrier orders global memory within the block too).
      __syncthreads();
    }
  }
}

constexpr int kMergeThreads = 256;

// Split directions: y = u * (plane_0 + plane_1 + plane_2 + plane_3) + skip * x with u shared (factored out of the
// terms), else y = the sum + skip * x; summed in direction order, as the fused kernel does.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads) merge_directions_kernel(const ScanInputs in,
                                                                        const ScanForwardOutputs out) {
  const int64_t plane = in.batch * in.height * in.width * in.channels;
  const T* up = static_cast<const T*>(in.u);
  const bool factor_u = up != nullptr && in.u_stride[3] == 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < plane; i += stride) {
    const int64_t c = i % in.channels;
    const int64_t pixel = i / in.channels;
    const int64_t x = pixel % in.width;
    const int64_t y = (pixel / in.width) % in.height;
    const int64_t b = pixel / (in.width * in.height);
    float acc = out.accum[i];
#pragma unroll
    for (int d = 1; d < kNumDirections; ++d) acc += out.accum[d * plane + i];
    if (factor_u) {
      acc *= load_float(up + b * in.u_stride[0] + y * in.u_stride[1] + x * in.u_stride[2] + c * in.u_stride[4]);
    }
    if (in.skip != nullptr) {
      const float xv = load_float(static_cast<const T*>(in.x) + offset4(in.x_stride, b, y, x, c));
      acc += load_param<T>(in, in.skip, c * in.skip_stride) * xv;
    }
    static_cast<T*>(out.y)[i] = store_value<T>(acc);
  }
}

}  // namespace gspn
