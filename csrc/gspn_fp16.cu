// The GSPN scan kernels for fp16 storage (fp32 accumulation). One file per dtype so ninja compiles them in parallel.
#include "gspn_scan_kernel.cuh"

namespace gspn {

void forward_fp16(const ScanInputs& in, const ScanForwardOutputs& out, cudaStream_t stream) {
  launch_forward<__half>(in, out, stream);
}

void backward_fp16(const ScanInputs& in, const ScanBackwardArgs& args, cudaStream_t stream) {
  launch_backward<__half>(in, args, stream);
}

}  // namespace gspn
