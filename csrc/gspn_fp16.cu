// The GSPN scan kernels for fp16 storage (fp32 accumulation). One file per dtype so ninja compiles them in parallel.
#include "gspn_scan_kernel.cuh"

namespace gspn {

cudaError_t forward_fp16(const ScanInputs& in, const ScanForwardOutputs& out, cudaStream_t stream) {
  return launch_forward<__half>(in, out, stream);
}

cudaError_t backward_fp16(const ScanInputs& in, const ScanBackwardArgs& args, cudaStream_t stream) {
  return launch_backward<__half>(in, args, stream);
}

}  // namespace gspn
