"""numba kernels (the only place numba is imported).

config    numba flags, thread count, CPU-feature kernel choice (QLINEAR_KERNELS)
vnni      the AVX512-VNNI register-blocked micro-kernel (LLVM IR intrinsic)
gemm      weight packing, the tiled GEMM driver and its int32/8-bit/float epilogues
conv      implicit-GEMM convolution over padded channels-last buffers, depthwise
requant   the one requantization every quantized op shares
parallel  work-claiming helper threads (the caller never waits for a sleeping thread)
"""
