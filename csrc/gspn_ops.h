// Tensor-level logic of the GSPN ops, shared by the CUDA binding (gspn_binding.cpp) and the host emulation
// (emulation/gspn_emulation.cpp): checks every input, fills the plain parameter structs, allocates outputs and
// scratch, picks the work split, and calls the Device's launcher. Included by exactly one file per module.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "gspn_params.h"

namespace gspn_ops {

using at::Tensor;

constexpr int kMaxThreads = 512;  // matches __launch_bounds__ of the kernels
// Registers per thread (ptxas -v, sm_90, bf16: v1 forward 81, v2 forward 124 with 16-byte packs and 64 with single
// channels, backward 120; rounded up to the allocation unit of 8), for occupancy.
constexpr int64_t kForwardRegisters = 88;
constexpr int64_t kForwardV2PackRegisters = 128;
constexpr int64_t kForwardV2SingleRegisters = 64;
constexpr int64_t kBackwardRegisters = 120;
constexpr int64_t kRegistersPerSm = 65536;  // every architecture from sm_70 to sm_90
// Latency/bandwidth model of a scan step (see choose_work_split): the bytes one SM must have in flight to cover
// one DRAM round trip at its share of the bandwidth (H100: 3.35 TB/s x ~0.8 us / 132 SMs ~ 20 KB; A100: ~15 KB),
// and the arrays a step moves per pixel (x, lam, 3 gates, the output or accumulator).
constexpr double kBytesInFlightPerSm = 20480;
constexpr int64_t kArraysPerStep = 6;

struct DeviceLimits {
  size_t shared_per_block;  // opt-in maximum of dynamic shared memory per block
  size_t shared_per_sm;
  int64_t threads_per_sm;
  int64_t sms;
};

// Where the kernels run: the CUDA device (gspn_binding.cpp) or the host emulation (emulation/).
struct Device {
  bool cuda;  // inputs must be CUDA tensors
  DeviceLimits (*limits)();
  void (*forward)(at::ScalarType, const gspn::ScanInputs&, const gspn::ScanForwardOutputs&);
  void (*backward)(at::ScalarType, const gspn::ScanInputs&, const gspn::ScanBackwardArgs&);
};

void check_same(const Tensor& t, const Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "GSPN CUDA kernel: ", name, " is on ", t.device(), " but x is on ", x.device(),
              ".");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "GSPN CUDA kernel: ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type(), "; pass all tensors in one dtype.");
}

void check_shape(const Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "GSPN CUDA kernel: ", name, " must have shape ", expected, ", got ", t.sizes(),
              ".");
}

// x, lam: (B, H, W, C) with any strides (Diffusers' channels-last views are read in place).
void check_image_inputs(const Device& device, const Tensor& x, const Tensor& lam) {
  TORCH_CHECK(x.is_cuda() == device.cuda, "GSPN CUDA kernel: x must be a ", device.cuda ? "CUDA" : "CPU",
              " tensor (got ", x.device(), ").");
  TORCH_CHECK(x.dim() == 4, "GSPN CUDA kernel: x must be (B, H, W, C), got ", x.sizes(), ".");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "GSPN CUDA kernel: dtype ", dtype,
              " is not supported (use float32, float16 or bfloat16).");
  check_same(lam, x, "lam");
  check_shape(lam, x.sizes(), "lam");
  TORCH_CHECK(x.size(0) <= 65535, "GSPN CUDA kernel: batch ", x.size(0), " exceeds 65535; split the batch.");
}

void copy_strides(const Tensor& t, int64_t* out) {
  for (int64_t i = 0; i < t.dim(); ++i) out[i] = t.stride(i);
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Tests (the emulation's set_direction_split): -1 lets the model decide whether the fused forward splits the
// directions over blocks, 0 never splits, 1 splits wherever v2 runs.
int direction_split_override = -1;

// Channels per block, threads per block and (forward) kernel version, by a latency/bandwidth model. A step of
// the scan costs max(its round trips, the bytes the resident blocks move in it over the bandwidth): v2 has its
// line's loads in flight before the step (one round trip at most); v1 and the backward issue theirs after the
// barrier, kForwardUnroll (backward: kBackwardUnroll) elements per thread at a time, so a step waits one round
// trip per pass.
// Bytes count whole 32-byte sectors per pixel (a 2-channel bf16 tile pays 32 bytes for 4). Times the number of
// waves; ties go to the wider tile. `requested` > 0 forces the tile (tuning, GSPN_DIFFUSERS_CUDA_TILE).
void choose_work_split(const Device& device, gspn::ScanInputs& in, bool backward, int64_t requested,
                       int64_t element_size) {
  const DeviceLimits limits = device.limits();
  const int64_t widest = requested > 0 ? requested : 16;
  TORCH_CHECK(widest >= 1 && widest <= 16 && (widest & (widest - 1)) == 0,
              "GSPN CUDA kernel: tile must be a power of two in [1, 16], got ", widest, ".");
  // Steps a block walks: every direction of the call in turn, or (split) the longest one; the merge pass of a
  // split reads the 4 fp32 planes, x and u and writes y.
  int64_t all_steps = 0, longest = 0;
  for (int d = in.dir_begin; d < in.dir_end; ++d) {
    const int64_t length = d >= 2 ? in.height : in.width;  // vertical scans walk H lines, horizontal ones W
    all_steps += length;
    longest = std::max(longest, length);
  }
  const double bytes_per_round_trip = static_cast<double>(limits.sms) * kBytesInFlightPerSm;
  const double merge_cost =
      1.0 + static_cast<double>(in.batch * in.height * in.width * in.channels * (16 + 3 * element_size)) /
                bytes_per_round_trip;
  const bool fused = in.dir_end - in.dir_begin == gspn::kNumDirections;
  int best_tile = 0, best_threads = 0, best_pack = 0;
  bool best_split = false;
  double best_cost = 0;
  for (int64_t tile = widest; tile >= (requested > 0 ? widest : 1); tile /= 2) {
    in.tile = static_cast<int>(tile);
    const int pack = backward ? 0 : gspn::pack_width(tile, in.channels, element_size);
    const bool v2 = !backward && gspn::forward_v2_fits(in, pack);
    const int64_t v1_threads =
        std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, round_up(gspn::max_rows(in) * tile, 32)));
    // v1 and the backward also try fewer threads per block (more passes per step, more blocks per SM).
    for (const int64_t option : {kMaxThreads, kMaxThreads / 2, kMaxThreads / 4}) {
      if (option != kMaxThreads && (v2 || option >= v1_threads)) continue;
      const int64_t threads = v2 ? gspn::forward_v2_threads(in, pack) : std::min(option, v1_threads);
      in.threads = static_cast<int>(threads);
      const size_t bytes = backward ? gspn::backward_shared_bytes(in)
                                    : (v2 ? gspn::forward_v2_shared_bytes(in) : gspn::forward_shared_bytes(in));
      if (bytes > limits.shared_per_block) continue;
      const int64_t v2_registers = pack > 1 ? kForwardV2PackRegisters : kForwardV2SingleRegisters;
      const int64_t registers = backward ? kBackwardRegisters : (v2 ? v2_registers : kForwardRegisters);
      const int64_t by_smem = static_cast<int64_t>(limits.shared_per_sm / std::max<size_t>(bytes, 1));
      const int64_t by_threads = limits.threads_per_sm / threads;
      const int64_t by_registers = kRegistersPerSm / (threads * registers);
      const int64_t per_wave = std::max<int64_t>(1, std::min({by_smem, by_threads, by_registers})) * limits.sms;
      const int64_t per_pass = threads * (backward ? gspn::kBackwardUnroll : gspn::kForwardUnroll);
      const int64_t passes = v2 ? 1 : (gspn::max_rows(in) * tile + per_pass - 1) / per_pass;
      for (const bool split : {false, true}) {
        if (split && !(fused && v2 && direction_split_override != 0)) continue;
        if (!split && fused && v2 && direction_split_override == 1) continue;
        const int64_t blocks = in.batch * ((in.channels + tile - 1) / tile) * (split ? gspn::kNumDirections : 1);
        const int64_t waves = (blocks + per_wave - 1) / per_wave;
        // Whole 32-byte sectors per pixel and array: even where neighbouring tiles' blocks share a sector in L2,
        // each block's reads cost L1/L2 a whole sector (L2 bandwidth is ~2-3x HBM's, not 8x).
        const int64_t pixel_bytes = round_up(tile * element_size, 32);
        const double step_bytes =
            static_cast<double>(std::min(blocks, per_wave) * gspn::max_rows(in) * kArraysPerStep * pixel_bytes);
        const double step = std::max(static_cast<double>(passes), step_bytes / bytes_per_round_trip);
        const double walked = static_cast<double>(split ? longest : all_steps);
        const double cost = static_cast<double>(waves) * step * walked + (split ? merge_cost : 0.0);
        if (best_tile == 0 || cost < best_cost) {
          best_tile = in.tile;
          best_threads = in.threads;
          best_pack = v2 ? pack : 0;
          best_split = split;
          best_cost = cost;
        }
      }
    }
  }
  TORCH_CHECK(best_tile > 0, "GSPN CUDA kernel: a scan line of ", gspn::max_rows(in),
              " positions does not fit in shared memory (", limits.shared_per_block,
              " bytes per block on this GPU); use GSPN_DIFFUSERS_BACKEND=reference for this size.");
  in.tile = best_tile;
  in.threads = best_threads;
  in.pack = best_pack;
  in.split_directions = best_split;
}

// Whether an array allows one aligned vector load per pack: channel stride 1 (or a pack of 1), the other strides
// and the pointer multiples of the pack.
bool vector_loads(const void* data, const int64_t* stride, int dims, int64_t pack, int64_t element_size) {
  if (pack == 1) return true;
  if (stride[dims - 1] != 1 || reinterpret_cast<uintptr_t>(data) % (pack * element_size) != 0) return false;
  for (int i = 0; i < dims - 1; ++i) {
    if (stride[i] % pack != 0) return false;
  }
  return true;
}

void set_vector_loads(gspn::ScanInputs& in, int64_t element_size) {
  if (in.pack == 0) return;
  in.vector_x = vector_loads(in.x, in.x_stride, 4, in.pack, element_size);
  in.vector_lam = vector_loads(in.lam, in.lam_stride, 4, in.pack, element_size);
  in.vector_gate =
      in.gate_channels == in.channels && vector_loads(in.gate, in.gate_stride, 6, in.pack, element_size);
  in.vector_u = in.u != nullptr && vector_loads(in.u, in.u_stride, 5, in.pack, element_size);
}

// Fills the inputs shared by forward and backward. gate is 6-D (B, H, W, slots, 3, G); u is 5-D
// (B, H, W, 4 or expanded, C) or undefined; merge and skip share one dtype (fp32 or x's) or are undefined.
gspn::ScanInputs make_inputs(const Tensor& x, const Tensor& lam, const Tensor& gate, const Tensor& u,
                             const Tensor& merge, const Tensor& skip, int64_t chunk, int dir_begin, int dir_end,
                             bool normalize, double eps) {
  TORCH_CHECK(chunk >= 0, "GSPN CUDA kernel: chunk must be 0 (global) or positive, got ", chunk, ".");
  gspn::ScanInputs in{};
  in.batch = x.size(0);
  in.height = x.size(1);
  in.width = x.size(2);
  in.channels = x.size(3);
  in.gate_channels = gate.size(5);
  TORCH_CHECK(in.gate_channels > 0 && in.channels % in.gate_channels == 0, "GSPN CUDA kernel: gate channels ",
              in.gate_channels, " must divide the channels ", in.channels, ".");
  in.chunk = chunk;
  in.dir_begin = dir_begin;
  in.dir_end = dir_end;
  in.normalize = normalize;
  in.eps = static_cast<float>(eps);
  in.x = x.data_ptr();
  in.lam = lam.data_ptr();
  in.gate = gate.data_ptr();
  copy_strides(x, in.x_stride);
  copy_strides(lam, in.lam_stride);
  copy_strides(gate, in.gate_stride);
  in.gate_slot_is_direction = gate.size(3) == gspn::kNumDirections;
  if (u.defined()) {
    in.u = u.data_ptr();
    copy_strides(u, in.u_stride);
  }
  in.params_are_float = !merge.defined() || merge.scalar_type() == at::kFloat;  // skip has merge's dtype
  if (merge.defined()) {
    in.merge = merge.data_ptr();
    in.merge_stride[0] = merge.stride(0);
    in.merge_stride[1] = merge.dim() == 2 ? merge.stride(1) : 0;
  }
  if (skip.defined()) {
    in.skip = skip.data_ptr();
    in.skip_stride = skip.stride(0);
  }
  return in;
}

// Fused-op inputs: gate (B, H, W, 4, 3, G); u (B, H, W, C) shared or (B, H, W, 4, C); merge (4,) or (4, C);
// skip (C,) or None. Returns u as a 5-D view (stride 0 over the directions when shared), merge/skip in one dtype.
struct FusedArgs {
  Tensor u5, merge, skip;
  bool u_per_direction;
};

FusedArgs check_fused(const Device& device, const Tensor& x, const Tensor& lam, const Tensor& gate, const Tensor& u,
                      const Tensor& merge, const std::optional<Tensor>& skip) {
  check_image_inputs(device, x, lam);
  const int64_t b = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  check_same(gate, x, "gate_logits");
  TORCH_CHECK(gate.dim() == 6 && gate.size(0) == b && gate.size(1) == h && gate.size(2) == w &&
                  gate.size(3) == gspn::kNumDirections && gate.size(4) == gspn::kNumGates,
              "GSPN CUDA kernel: fused gate_logits must be (B, H, W, 4, 3, G), got ", gate.sizes(), ".");
  check_same(u, x, "u");
  FusedArgs out;
  out.u_per_direction = u.dim() == 5;
  if (out.u_per_direction) {
    check_shape(u, {b, h, w, gspn::kNumDirections, c}, "u");
    out.u5 = u;
  } else {
    check_shape(u, x.sizes(), "u");
    out.u5 = u.unsqueeze(3).expand({b, h, w, gspn::kNumDirections, c});
  }
  TORCH_CHECK(merge.device() == x.device(), "GSPN CUDA kernel: merge must be on ", x.device(), ".");
  TORCH_CHECK((merge.dim() == 1 && merge.size(0) == gspn::kNumDirections) ||
                  (merge.dim() == 2 && merge.size(0) == gspn::kNumDirections && merge.size(1) == c),
              "GSPN CUDA kernel: merge must be (4,) or (4, C), got ", merge.sizes(), ".");
  // merge and skip are read in x's dtype when both have it (no cast launch), else both as fp32.
  const bool native = merge.scalar_type() == x.scalar_type() &&
                      (!skip.has_value() || !skip->defined() || skip->scalar_type() == x.scalar_type());
  const auto param_dtype = native ? x.scalar_type() : at::kFloat;
  out.merge = merge.to(param_dtype);
  if (skip.has_value() && skip->defined()) {
    TORCH_CHECK(skip->device() == x.device(), "GSPN CUDA kernel: skip must be on ", x.device(), ".");
    check_shape(*skip, {c}, "skip");
    out.skip = skip->to(param_dtype);
  }
  return out;
}

Tensor check_single(const Device& device, const Tensor& x, const Tensor& lam, const Tensor& gate, int64_t direction) {
  check_image_inputs(device, x, lam);
  TORCH_CHECK(direction >= 0 && direction < gspn::kNumDirections, "GSPN CUDA kernel: direction index ", direction,
              " is not in [0, 4).");
  check_same(gate, x, "gate_logits");
  TORCH_CHECK(gate.dim() == 5 && gate.size(0) == x.size(0) && gate.size(1) == x.size(1) && gate.size(2) == x.size(2) &&
                  gate.size(3) == gspn::kNumGates,
              "GSPN CUDA kernel: gate_logits must be (B, H, W, 3, G), got ", gate.sizes(), ".");
  return gate.unsqueeze(3);  // one direction slot
}

// The carried state of the single op, checked: (B, n_perp, C) in x's dtype and device, any strides; undefined
// when absent.
Tensor carried_state(const std::optional<Tensor>& state, const Tensor& x, int64_t direction, const char* name) {
  if (!state.has_value() || !state->defined()) return Tensor();
  check_same(*state, x, name);
  const int64_t rows = direction >= 2 ? x.size(2) : x.size(1);
  TORCH_CHECK(state->dim() == 3 && state->size(0) == x.size(0) && state->size(1) == rows &&
                  state->size(2) == x.size(3),
              "GSPN CUDA kernel: ", name, " must be (B, n_perp, C) = (", x.size(0), ", ", rows, ", ", x.size(3),
              ") for direction ", direction, " (n_perp = H for the horizontal scans, W for the vertical ones), got ",
              state->sizes(), ".");
  return *state;
}

// A band edge row of the single op, checked: (B, W, C) in x's dtype and device, any strides, horizontal scans only,
// never beside a carried state; undefined when absent.
Tensor edge_row(const std::optional<Tensor>& row, const Tensor& x, int64_t direction, const Tensor& initial,
                const char* name) {
  if (!row.has_value() || !row->defined()) return Tensor();
  TORCH_CHECK(direction < 2, "GSPN CUDA kernel: ", name, " is for the horizontal scans (direction 0 or 1), not ",
              direction, "; the vertical scans of a band chain the bands with initial_state.");
  TORCH_CHECK(!initial.defined(), "GSPN CUDA kernel: ", name, " and initial_state cannot be combined.");
  check_same(*row, x, name);
  TORCH_CHECK(row->dim() == 3 && row->size(0) == x.size(0) && row->size(1) == x.size(2) && row->size(2) == x.size(3),
              "GSPN CUDA kernel: ", name, " must be (B, W, C) = (", x.size(0), ", ", x.size(2), ", ", x.size(3),
              "), got ", row->sizes(), ".");
  return *row;
}

// final_state: undefined, or a contiguous (B, rows, C) tensor the kernel fills with the last line in scan order.
Tensor run_forward(const Device& device, const Tensor& x, gspn::ScanInputs in, int64_t tile,
                   const Tensor& final_state = Tensor()) {
  Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  choose_work_split(device, in, /*backward=*/false, tile, x.element_size());
  set_vector_loads(in, x.element_size());
  Tensor accum;
  gspn::ScanForwardOutputs out{};
  out.y = y.data_ptr();
  if (final_state.defined()) out.final_state = final_state.data_ptr();
  if (in.split_directions) {  // one fp32 plane per direction
    accum = at::empty({gspn::kNumDirections, in.batch, in.height, in.width, in.channels},
                      x.options().dtype(at::kFloat));
    out.accum = accum.data_ptr<float>();
  } else if (in.dir_end - in.dir_begin > 1) {
    accum = x.scalar_type() == at::kFloat ? y : at::empty(x.sizes(), x.options().dtype(at::kFloat));
    out.accum = accum.data_ptr<float>();
  }
  device.forward(x.scalar_type(), in, out);
  return y;
}

// Backward outputs common to both ops; returns {grad_x, grad_lam, grad_gate (6-D), grad_u, merge part,
// skip part}.
// Carried state of the single op: grad_final (checked by carried_state, or undefined) and grad_initial (a
// contiguous (B, rows, C) output, or undefined).
// Band edges: grad_above / grad_below (zero-initialised contiguous (B, W, C) outputs, or undefined).
std::vector<Tensor> run_backward(const Device& device, const Tensor& grad_y, const Tensor& x, gspn::ScanInputs in,
                                 bool u_per_direction, int64_t slots, int64_t tile,
                                 const Tensor& grad_final = Tensor(), const Tensor& grad_initial = Tensor(),
                                 const Tensor& grad_above = Tensor(), const Tensor& grad_below = Tensor()) {
  check_same(grad_y, x, "grad_output");
  check_shape(grad_y, x.sizes(), "grad_output");
  const auto f32 = x.options().dtype(at::kFloat);
  const bool many = in.dir_end - in.dir_begin > 1;
  const bool is_float = x.scalar_type() == at::kFloat;
  Tensor grad_x = at::empty(x.sizes(), x.options());
  Tensor grad_lam = at::empty(x.sizes(), x.options());
  // Gates shared by channel groups are summed atomically in fp32; per-channel gates are written once, directly.
  const std::vector<int64_t> gate_shape{in.batch, in.height, in.width, slots, gspn::kNumGates, in.gate_channels};
  Tensor grad_gate = in.gate_channels != in.channels ? at::zeros(gate_shape, f32) : at::empty(gate_shape, x.options());
  Tensor grad_u, merge_part, skip_part;
  if (in.u != nullptr) {
    grad_u = u_per_direction
                 ? at::empty({in.batch, in.height, in.width, gspn::kNumDirections, in.channels}, x.options())
                 : at::empty(x.sizes(), x.options());
  }
  if (in.merge != nullptr) merge_part = at::zeros({in.batch, gspn::kNumDirections, in.channels}, f32);
  if (in.skip != nullptr) skip_part = at::zeros({in.batch, in.channels}, f32);
  if (x.numel() == 0) {
    grad_x.zero_();
    grad_lam.zero_();
    grad_gate.zero_();
    if (grad_u.defined()) grad_u.zero_();
    return {grad_x, grad_lam, grad_gate, grad_u, merge_part, skip_part};
  }
  choose_work_split(device, in, /*backward=*/true, tile, x.element_size());

  gspn::ScanBackwardArgs args{};
  args.grad_y = grad_y.data_ptr();
  copy_strides(grad_y, args.grad_y_stride);
  args.grad_x = grad_x.data_ptr();
  args.grad_lam = grad_lam.data_ptr();
  Tensor accum_x, accum_lam, accum_u;
  if (many) {
    accum_x = is_float ? grad_x : at::empty(x.sizes(), f32);
    accum_lam = is_float ? grad_lam : at::empty(x.sizes(), f32);
    args.accum_x = accum_x.data_ptr<float>();
    args.accum_lam = accum_lam.data_ptr<float>();
  }
  args.u_per_direction = u_per_direction;
  if (grad_u.defined()) {
    args.grad_u = grad_u.data_ptr();
    if (!u_per_direction && many) {
      accum_u = is_float ? grad_u : at::empty(x.sizes(), f32);
      args.accum_u = accum_u.data_ptr<float>();
    }
  }
  args.grad_gate = grad_gate.data_ptr();
  if (merge_part.defined()) args.grad_merge_part = merge_part.data_ptr<float>();
  if (skip_part.defined()) args.grad_skip_part = skip_part.data_ptr<float>();
  if (grad_final.defined()) {
    args.grad_final = grad_final.data_ptr();
    copy_strides(grad_final, args.grad_final_stride);
  }
  if (grad_initial.defined()) args.grad_initial = grad_initial.data_ptr();
  if (grad_above.defined()) args.grad_edge_above = grad_above.data_ptr();
  if (grad_below.defined()) args.grad_edge_below = grad_below.data_ptr();

  const int64_t length = gspn::max_rows(in);  // max(H, W) bounds every direction's scan length
  args.segment = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(length)))));
  args.num_segments = (length + args.segment - 1) / args.segment;
  const int64_t blocks = in.batch * ((in.channels + in.tile - 1) / in.tile);
  Tensor scratch =
      at::empty({blocks * gspn::backward_scratch_floats_per_block(in, args.segment, args.num_segments)}, f32);
  args.scratch = scratch.data_ptr<float>();
  device.backward(x.scalar_type(), in, args);
  return {grad_x, grad_lam, grad_gate, grad_u, merge_part, skip_part};
}

// ---- Python entry points -----------------------------------------------------------------------------------

Tensor fused_forward(const Device& device, const Tensor& x, const Tensor& lam, const Tensor& gate, const Tensor& u,
                     const Tensor& merge, const std::optional<Tensor>& skip, int64_t chunk, bool normalize, double eps,
                     int64_t tile) {
  const FusedArgs f = check_fused(device, x, lam, gate, u, merge, skip);
  return run_forward(device, x,
                     make_inputs(x, lam, gate, f.u5, f.merge, f.skip, chunk, 0, gspn::kNumDirections, normalize, eps),
                     tile);
}

// Returns {grad_x, grad_lam, grad_gate, grad_u, grad_merge, grad_skip (undefined without skip)}.
std::vector<Tensor> fused_backward(const Device& device, const Tensor& grad_y, const Tensor& x, const Tensor& lam,
                                   const Tensor& gate, const Tensor& u, const Tensor& merge,
                                   const std::optional<Tensor>& skip, int64_t chunk, bool normalize, double eps,
                                   int64_t tile) {
  const FusedArgs f = check_fused(device, x, lam, gate, u, merge, skip);
  gspn::ScanInputs in =
      make_inputs(x, lam, gate, f.u5, f.merge, f.skip, chunk, 0, gspn::kNumDirections, normalize, eps);
  auto g = run_backward(device, grad_y, x, in, f.u_per_direction, gspn::kNumDirections, tile);
  Tensor grad_merge = g[4].sum(0);  // (4, C)
  if (merge.dim() == 1) grad_merge = grad_merge.sum(1);
  Tensor grad_skip;
  if (f.skip.defined()) grad_skip = g[5].sum(0).to(skip->scalar_type());
  return {g[0], g[1], g[2].to(gate.scalar_type()), g[3], grad_merge.to(merge.scalar_type()), grad_skip};
}

// Sets the carried initial state (undefined: none) of a single-direction call.
void set_initial(gspn::ScanInputs& in, const Tensor& initial) {
  if (!initial.defined()) return;
  in.initial = initial.data_ptr();
  copy_strides(initial, in.initial_stride);
}

// Sets the band's edge rows (undefined: a true image edge) of a single-direction call.
void set_edges(gspn::ScanInputs& in, const Tensor& above, const Tensor& below) {
  if (above.defined()) {
    in.edge_above = above.data_ptr();
    copy_strides(above, in.edge_above_stride);
  }
  if (below.defined()) {
    in.edge_below = below.data_ptr();
    copy_strides(below, in.edge_below_stride);
  }
}

Tensor state_like(const Tensor& x, int64_t direction) {
  return at::empty({x.size(0), direction >= 2 ? x.size(2) : x.size(1), x.size(3)}, x.options());
}

// Returns {h, final_state (undefined unless requested)}.
std::vector<Tensor> scan_forward(const Device& device, const Tensor& x, const Tensor& lam, const Tensor& gate,
                                 int64_t direction, int64_t chunk, const std::optional<Tensor>& initial_state,
                                 bool return_final_state, int64_t tile, const std::optional<Tensor>& edge_above,
                                 const std::optional<Tensor>& edge_below) {
  const Tensor gate6 = check_single(device, x, lam, gate, direction);
  const Tensor initial = carried_state(initial_state, x, direction, "initial_state");
  const Tensor above = edge_row(edge_above, x, direction, initial, "edge_above");
  const Tensor below = edge_row(edge_below, x, direction, initial, "edge_below");
  const int d = static_cast<int>(direction);
  gspn::ScanInputs in = make_inputs(x, lam, gate6, Tensor(), Tensor(), Tensor(), chunk, d, d + 1, false, 0.0);
  set_initial(in, initial);
  set_edges(in, above, below);
  const Tensor final_state = return_final_state ? state_like(x, direction) : Tensor();
  if (final_state.defined() && x.numel() == 0) {  // an empty block passes the state through
    if (initial.defined()) {
      final_state.copy_(initial);
    } else {
      final_state.zero_();
    }
  }
  return {run_forward(device, x, in, tile, final_state), final_state};
}

// Returns {grad_x, grad_lam, grad_gate, grad_initial_state, grad_edge_above, grad_edge_below} (the last three
// undefined where that input is absent).
std::vector<Tensor> scan_backward(const Device& device, const Tensor& grad_h, const Tensor& x, const Tensor& lam,
                                  const Tensor& gate, int64_t direction, int64_t chunk,
                                  const std::optional<Tensor>& initial_state,
                                  const std::optional<Tensor>& grad_final_state, int64_t tile,
                                  const std::optional<Tensor>& edge_above, const std::optional<Tensor>& edge_below) {
  const Tensor gate6 = check_single(device, x, lam, gate, direction);
  const Tensor initial = carried_state(initial_state, x, direction, "initial_state");
  const Tensor grad_final = carried_state(grad_final_state, x, direction, "grad_final_state");
  const Tensor above = edge_row(edge_above, x, direction, initial, "edge_above");
  const Tensor below = edge_row(edge_below, x, direction, initial, "edge_below");
  const int d = static_cast<int>(direction);
  gspn::ScanInputs in = make_inputs(x, lam, gate6, Tensor(), Tensor(), Tensor(), chunk, d, d + 1, false, 0.0);
  set_initial(in, initial);
  set_edges(in, above, below);
  const Tensor grad_above = above.defined() ? at::zeros(above.sizes(), x.options()) : Tensor();
  const Tensor grad_below = below.defined() ? at::zeros(below.sizes(), x.options()) : Tensor();
  const Tensor grad_initial = initial.defined() ? state_like(x, direction) : Tensor();
  if (grad_initial.defined() && x.numel() == 0) {  // an empty block passed the state through
    if (grad_final.defined()) {
      grad_initial.copy_(grad_final);
    } else {
      grad_initial.zero_();
    }
  }
  auto g = run_backward(device, grad_h, x, in, false, 1, tile, grad_final, grad_initial, grad_above, grad_below);
  return {g[0], g[1], g[2].squeeze(3).to(gate.scalar_type()), grad_initial, grad_above, grad_below};
}

// Registers the ops of `device` on a Python module; a `Guard` built from x.device() is held around each call.
template <typename Guard>
void define_ops(pybind11::module& m, const Device& device) {
  namespace py = pybind11;
  m.def(
      "fused_forward",
      [&device](const Tensor& x, const Tensor& lam, const Tensor& gate, const Tensor& u, const Tensor& merge,
                const std::optional<Tensor>& skip, int64_t chunk, bool normalize, double eps, int64_t tile) {
        const Guard guard(x.device());
        return fused_forward(device, x, lam, gate, u, merge, skip, chunk, normalize, eps, tile);
      },
      "Four-direction scan, merged (B, H, W, C).", py::arg("x"), py::arg("lam"), py::arg("gate_logits"), py::arg("u"),
      py::arg("merge"), py::arg("skip"), py::arg("chunk"), py::arg("normalize"), py::arg("eps"), py::arg("tile") = 0);
  m.def(
      "fused_backward",
      [&device](const Tensor& grad_y, const Tensor& x, const Tensor& lam, const Tensor& gate, const Tensor& u,
                const Tensor& merge, const std::optional<Tensor>& skip, int64_t chunk, bool normalize, double eps,
                int64_t tile) {
        const Guard guard(x.device());
        return fused_backward(device, grad_y, x, lam, gate, u, merge, skip, chunk, normalize, eps, tile);
      },
      "Gradients of fused_forward: [x, lam, gate_logits, u, merge, skip (None without skip)].", py::arg("grad_y"),
      py::arg("x"), py::arg("lam"), py::arg("gate_logits"), py::arg("u"), py::arg("merge"), py::arg("skip"),
      py::arg("chunk"), py::arg("normalize"), py::arg("eps"), py::arg("tile") = 0);
  m.def(
      "scan_forward",
      [&device](const Tensor& x, const Tensor& lam, const Tensor& gate, int64_t direction, int64_t chunk,
                const std::optional<Tensor>& initial_state, bool return_final_state, int64_t tile,
                const std::optional<Tensor>& edge_above, const std::optional<Tensor>& edge_below) {
        const Guard guard(x.device());
        return scan_forward(device, x, lam, gate, direction, chunk, initial_state, return_final_state, tile,
                            edge_above, edge_below);
      },
      "One-direction scan: [h (B, H, W, C), final_state (B, n_perp, C) or None unless return_final_state]. "
      "edge_above / edge_below (B, W, C): a band's hidden rows just outside it (horizontal scans).",
      py::arg("x"), py::arg("lam"), py::arg("gate_logits"), py::arg("direction"), py::arg("chunk"),
      py::arg("initial_state") = py::none(), py::arg("return_final_state") = false, py::arg("tile") = 0,
      py::arg("edge_above") = py::none(), py::arg("edge_below") = py::none());
  m.def(
      "scan_backward",
      [&device](const Tensor& grad_h, const Tensor& x, const Tensor& lam, const Tensor& gate, int64_t direction,
                int64_t chunk, const std::optional<Tensor>& initial_state,
                const std::optional<Tensor>& grad_final_state, int64_t tile, const std::optional<Tensor>& edge_above,
                const std::optional<Tensor>& edge_below) {
        const Guard guard(x.device());
        return scan_backward(device, grad_h, x, lam, gate, direction, chunk, initial_state, grad_final_state, tile,
                             edge_above, edge_below);
      },
      "Gradients of scan_forward: [x, lam, gate_logits, initial_state, edge_above, edge_below] (None for an "
      "absent input).",
      py::arg("grad_h"), py::arg("x"), py::arg("lam"), py::arg("gate_logits"), py::arg("direction"), py::arg("chunk"),
      py::arg("initial_state") = py::none(), py::arg("grad_final_state") = py::none(), py::arg("tile") = 0,
      py::arg("edge_above") = py::none(), py::arg("edge_below") = py::none());
}

}  // namespace gspn_ops
