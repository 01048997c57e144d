// PyTorch binding of the GSPN CUDA kernels: device guard, current stream and dtype dispatch around the shared
// tensor logic of gspn_ops.h. Only c10 CUDA headers (not ATen/cuda/CUDAContext.h, which needs the
// cuSPARSE/cuBLAS headers installed).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>
#include <vector>

#include "gspn_ops.h"

namespace {

using at::Tensor;
using namespace gspn_ops;

DeviceLimits cuda_limits() {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  DeviceLimits limits{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  limits.shared_per_block = static_cast<size_t>(value);
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  limits.shared_per_sm = static_cast<size_t>(value);
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  limits.threads_per_sm = value;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device));
  limits.sms = value;
  return limits;
}

#ifndef GSPN_COMPILED_ARCHS
#error "GSPN_COMPILED_ARCHS (the SM versions of the build) is set by gspn_diffusers/ops/cuda_build.compile_flags()"
#endif

std::vector<int> compiled_archs() { return {GSPN_COMPILED_ARCHS}; }

// The launch setup's error (the shared-memory attribute, the first call that touches the kernel image), in words
// that say what to do; then the launch's own error.
void check_setup(cudaError_t error, const char* pass) {
  if (error != cudaSuccess) {
    int device = 0;
    cudaDeviceProp prop{};
    const bool known = cudaGetDevice(&device) == cudaSuccess && cudaGetDeviceProperties(&prop, device) == cudaSuccess;
    std::string archs;
    for (int arch : compiled_archs()) archs += (archs.empty() ? "" : ", ") + std::to_string(arch);
    TORCH_CHECK(false, "GSPN CUDA kernel: setting up the ", pass, " kernel failed on device ", device,
                known ? " (sm_" + std::to_string(prop.major * 10 + prop.minor) + ")" : std::string(), ": ",
                cudaGetErrorString(error), ". The build covers sm ", archs,
                " (and newer GPUs through PTX); rebuild for this GPU with GSPN_DIFFUSERS_CUDA_ARCH, or use "
                "GSPN_DIFFUSERS_BACKEND=reference.");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void cuda_forward(at::ScalarType dtype, const gspn::ScanInputs& in, const gspn::ScanForwardOutputs& out) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kFloat: check_setup(gspn::forward_fp32(in, out, stream), "forward"); break;
    case at::kHalf: check_setup(gspn::forward_fp16(in, out, stream), "forward"); break;
    default: check_setup(gspn::forward_bf16(in, out, stream), "forward"); break;
  }
}

void cuda_backward(at::ScalarType dtype, const gspn::ScanInputs& in, const gspn::ScanBackwardArgs& args) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (dtype) {
    case at::kFloat: check_setup(gspn::backward_fp32(in, args, stream), "backward"); break;
    case at::kHalf: check_setup(gspn::backward_fp16(in, args, stream), "backward"); break;
    default: check_setup(gspn::backward_bf16(in, args, stream), "backward"); break;
  }
}

const Device kCuda{true, &cuda_limits, &cuda_forward, &cuda_backward};

Tensor baseline_scan(const Tensor& x, const Tensor& lam, const Tensor& gate, int64_t direction, int64_t chunk) {
  const Tensor gate6 = check_single(kCuda, x, lam, gate, direction);
  const c10::cuda::CUDAGuard guard(x.device());
  const int d = static_cast<int>(direction);
  const gspn::ScanInputs in = make_inputs(x, lam, gate6, Tensor(), Tensor(), Tensor(), chunk, d, d + 1, false, 0.0);
  Tensor h = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return h;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kFloat: gspn::baseline_scan_fp32(in, d, h.data_ptr(), stream); break;
    case at::kHalf: gspn::baseline_scan_fp16(in, d, h.data_ptr(), stream); break;
    default: gspn::baseline_scan_bf16(in, d, h.data_ptr(), stream); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "GSPN line-scan CUDA kernels (gspn_diffusers.ops.cuda wraps them in autograd Functions).";
  define_ops<c10::cuda::CUDAGuard>(m, kCuda);
  m.def("compiled_archs", &compiled_archs,
        "SM versions with machine code in this build, e.g. [75, 80, 86, 89, 90]; the newest also ships as PTX, "
        "which the driver compiles for newer GPUs.");
  m.def("baseline_scan", &baseline_scan, "BENCHMARK BASELINE: one launch per line, state in global memory.",
        py::arg("x"), py::arg("lam"), py::arg("gate_logits"), py::arg("direction"), py::arg("chunk"));
}
