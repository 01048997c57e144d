// The GSPN scan kernels for bf16 storage (fp32 accumulation). One file per dtype so ninja compiles them in parallel.
#include "gspn_scan_kernel.cuh"

namespace gspn {

void forward_bf16(const ScanInputs& in, const ScanForwardOutputs& out, cudaStream_t stream) {
  launch_forward<__nv_bfloat16>(in, out, stream);
}

void backward_bf16(const ScanInputs& in, const ScanBackwardArgs& args, cudaStream_t stream) {
  launch_backward<__nv_bfloat16>(in, args, stream);
}

}  // namespace gspn
