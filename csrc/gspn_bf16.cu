// The GSPN scan kernels for bf16 storage (fp32 accumulation). One file per dtype so ninja compiles them in parallel.
#include "gspn_scan_kernel.cuh"

namespace gspn {

cudaError_t forward_bf16(const ScanInputs& in, const ScanForwardOutputs& out, cudaStream_t stream) {
  return launch_forward<__nv_bfloat16>(in, out, stream);
}

cudaError_t backward_bf16(const ScanInputs& in, const ScanBackwardArgs& args, cudaStream_t stream) {
  return launch_backward<__nv_bfloat16>(in, args, stream);
}

}  // namespace gspn
