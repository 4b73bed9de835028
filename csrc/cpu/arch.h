// Which CPU-specific code is compiled. AF_X86_SIMD is 1 where the build targets x86-64: the
// AVX2/AVX-512 kernels, the SSE2 row loops, clflush and the cpuid checks are built, and the best
// ISA is picked at run time. It is 0 elsewhere (aarch64 Linux, arm64 macOS): only portable C++ is
// built and the scalar kernels run. CMake defines it (cmake/CpuIsaKernels.cmake, which also
// decides which kernel files to compile); the fallback below is for other compiles of these files.
#pragma once

#ifndef AF_X86_SIMD
#if defined(__x86_64__) || defined(_M_X64)
#define AF_X86_SIMD 1
#else
#define AF_X86_SIMD 0
#endif
#endif
