// Host emulation of the GSPN CUDA kernels, for testing on machines without a GPU.
//
// It compiles the SAME kernel source (../gspn_scan_kernel.cuh) with the host C++ compiler and runs every CUDA
// thread of a block as a std::thread: blockIdx/threadIdx/blockDim/gridDim are thread-local, __syncthreads is a
// std::barrier over the block's threads, dynamic shared memory is one buffer per block, atomicAdd takes a lock.
// Blocks run one after another. This checks the index math, the direction geometry, the recurrences, the
// barriers' placement (a missing one shows up as a race against the reference only by luck, so this is not a
// race detector) and the binding logic (gspn_ops.h) against the PyTorch reference. It says nothing about speed,
// occupancy or device-specific behaviour: the GPU tests (tests/test_cuda_kernel.py) remain the real check.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <mutex>
#include <thread>
#include <vector>

#include "../gspn_ops.h"

namespace gspn_emulation {

thread_local uint3 thread_idx;
thread_local uint3 block_idx;
thread_local dim3 block_dim;
thread_local dim3 grid_dim;
thread_local float* shared_memory;
thread_local std::barrier<>* block_barrier;
std::mutex atomic_mutex;

inline void sync_block() { block_barrier->arrive_and_wait(); }

inline float atomic_add(float* address, float value) {
  const std::lock_guard<std::mutex> lock(atomic_mutex);
  const float old = *address;
  *address = old + value;
  return old;
}

}  // namespace gspn_emulation

#define GSPN_HOST_EMULATION 1
#define __launch_bounds__(...)
#define GSPN_SHARED_FLOATS(name) float* name = ::gspn_emulation::shared_memory
#define threadIdx (::gspn_emulation::thread_idx)
#define blockIdx (::gspn_emulation::block_idx)
#define blockDim (::gspn_emulation::block_dim)
#define gridDim (::gspn_emulation::grid_dim)
#define __syncthreads() ::gspn_emulation::sync_block()
#define atomicAdd(address, value) ::gspn_emulation::atomic_add(address, value)

// The kernel source, compiled under the definitions above (torch's headers come first, untouched by them).
#include "../gspn_scan_kernel.cuh"

namespace {

using at::Tensor;
using namespace gspn_ops;

// Runs kernel(in, out) over `grid` (blocks one after another) of `threads` threads each.
template <typename Kernel, typename Out>
void launch(Kernel kernel, const gspn::ScanInputs& in, const Out& out, dim3 grid, int threads, size_t shared_bytes) {
  std::vector<float> shared(shared_bytes / sizeof(float) + 1);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> barrier(threads);
        std::vector<std::thread> workers;
        workers.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          workers.emplace_back([&, t] {
            gspn_emulation::thread_idx = uint3{static_cast<unsigned>(t), 0, 0};
            gspn_emulation::block_idx = uint3{bx, by, bz};
            gspn_emulation::block_dim = dim3(threads);
            gspn_emulation::grid_dim = grid;
            gspn_emulation::shared_memory = shared.data();
            gspn_emulation::block_barrier = &barrier;
            kernel(in, out);
          });
        }
        for (auto& worker : workers) worker.join();
      }
    }
  }
}

template <typename T>
void forward_typed(const gspn::ScanInputs& in, const gspn::ScanForwardOutputs& out) {
  gspn::dispatch_forward<T>(in, [&](auto kernel, dim3 grid, int threads, size_t shared) {
    launch(kernel, in, out, grid, threads, shared);
    return cudaSuccess;
  });
}

template <typename T>
void backward_typed(const gspn::ScanInputs& in, const gspn::ScanBackwardArgs& args) {
  gspn::dispatch_backward<T>(in, [&](auto kernel, dim3 grid, int threads, size_t shared) {
    launch(kernel, in, args, grid, threads, shared);
    return cudaSuccess;
  });
}

// The work split of the last emulated forward, so tests can check which kernel (v1, v2 with which packs) ran.
gspn::ScanInputs last_forward{};

pybind11::dict describe_split(const gspn::ScanInputs& in) {
  pybind11::dict split;
  split["kernel"] = in.pack > 0 ? "v2" : "v1";
  split["tile"] = in.tile;
  split["threads"] = in.threads;
  split["pack"] = in.pack;
  split["vector_x"] = in.vector_x;
  split["vector_lam"] = in.vector_lam;
  split["vector_gate"] = in.vector_gate;
  split["vector_u"] = in.vector_u;
  split["split_directions"] = in.split_directions;
  return split;
}

void emulated_forward(at::ScalarType dtype, const gspn::ScanInputs& in, const gspn::ScanForwardOutputs& out) {
  last_forward = in;
  switch (dtype) {
    case at::kFloat: forward_typed<float>(in, out); break;
    case at::kHalf: forward_typed<__half>(in, out); break;
    default: forward_typed<__nv_bfloat16>(in, out); break;
  }
}

void emulated_backward(at::ScalarType dtype, const gspn::ScanInputs& in, const gspn::ScanBackwardArgs& args) {
  switch (dtype) {
    case at::kFloat: backward_typed<float>(in, args); break;
    case at::kHalf: backward_typed<__half>(in, args); break;
    default: backward_typed<__nv_bfloat16>(in, args); break;
  }
}

// An H100-like device, so the work split (tile, threads) follows the same heuristic as on the GPU. Tests can
// lower the shared memory per block to reach the "line too long" path with small inputs.
size_t shared_per_block = 227 * 1024;

DeviceLimits emulated_limits() { return DeviceLimits{shared_per_block, 228 * 1024, 2048, 132}; }

const Device kEmulated{false, &emulated_limits, &emulated_forward, &emulated_backward};

struct NoGuard {
  explicit NoGuard(const at::Device&) {}
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Host emulation of the GSPN CUDA kernels (tests only; CPU tensors; slow).";
  define_ops<NoGuard>(m, kEmulated);
  m.def(
      "compiled_archs", [] { return std::vector<int>{}; },
      "No GPU machine code: the kernels are compiled for the host (same interface as the CUDA module).");
  m.def(
      "last_forward_split", [] { return describe_split(last_forward); },
      "Work split of the last forward (kernel 'v1' or 'v2', tile, threads, pack, vector loads per array).");
  m.def(
      "plan_fused_forward",
      [](const Tensor& x, const Tensor& lam, const Tensor& gate, const Tensor& u, const Tensor& merge, int64_t tile) {
        const FusedArgs f = check_fused(kEmulated, x, lam, gate, u, merge, std::nullopt);
        gspn::ScanInputs in = make_inputs(x, lam, gate, f.u5, f.merge, f.skip, 0, 0, gspn::kNumDirections, true, 0);
        choose_work_split(kEmulated, in, /*backward=*/false, tile, x.element_size());
        set_vector_loads(in, x.element_size());
        return describe_split(in);
      },
      "The fused forward's work split on the emulated H100 without running it (expanded inputs of any size).",
      pybind11::arg("x"), pybind11::arg("lam"), pybind11::arg("gate_logits"), pybind11::arg("u"),
      pybind11::arg("merge"), pybind11::arg("tile") = 0);
  m.def(
      "set_direction_split", [](int64_t mode) { direction_split_override = static_cast<int>(mode); },
      "Tests: -1 lets the work-split model decide whether the fused forward runs one block per direction (default),"
      " 0 never, 1 wherever kernel v2 runs.",
      pybind11::arg("mode"));
  m.def(
      "set_shared_memory_per_block", [](int64_t bytes) { shared_per_block = static_cast<size_t>(bytes); },
      "Shared memory per block of the emulated device (default 227 KiB, an H100).", pybind11::arg("bytes"));
}
