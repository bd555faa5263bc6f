"""Triton kernels of the fused ops (installed as `fastlenet.kernels`).

`conv_relu_pool` and `linear_relu` each hold their kernels, their launchers registered as
`fastlenet::triton_<stem>_<pass>` ops, and `OPS`, the table the op modules in `fastlenet/` call
for `backend="triton"`. `launch` holds the launch settings (block sizes, reduction splits, TF32
switch) and the registration helper. Nothing is imported here: importing this package does not
import triton; the op modules import a kernel module on first use of the triton backend.

Natively the kernels run on CUDA tensors. With TRITON_INTERPRET=1 set before triton is first
imported they run on CPU tensors through Triton's interpreter (slow; used by the test suite on
machines without a GPU).
"""
