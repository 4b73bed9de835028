# Compile each CPU kernel file for its own instruction set. The files include no torch or
# standard-library templates, so no inline function compiled for AVX-512 can be picked by
# the linker for code that runs on an AVX2-only CPU; the choice is made at run time
# (csrc/cpu/cpu_info.cpp) from cpuid.
#
# The AVX2 and AVX-512 kernels, and the x86 code in the other files (SSE2 row loops, clflush,
# cpuid checks), are built only for x86-64: AF_X86_SIMD (ON/OFF here, 1/0 in the C++ through
# csrc/cpu/arch.h) says which. On any other CPU (aarch64 Linux, arm64 macOS) only the portable
# scalar kernels are built and run; there are no NEON kernels. AGENTFORGE_X86_SIMD=OFF builds the
# same portable code on x86-64, to test it there.
if(APPLE AND CMAKE_OSX_ARCHITECTURES)
  set(_af_arch "${CMAKE_OSX_ARCHITECTURES}")  # the target, which may not be the build machine
else()
  set(_af_arch "${CMAKE_SYSTEM_PROCESSOR}")
endif()
string(TOLOWER "${_af_arch}" _af_arch)
if(_af_arch MATCHES "^(x86_64|amd64)$")
  set(_af_is_x86 ON)
else()
  set(_af_is_x86 OFF)
endif()
if(AGENTFORGE_X86_SIMD STREQUAL "OFF")
  set(AF_X86_SIMD OFF)
elseif(AGENTFORGE_X86_SIMD STREQUAL "ON" AND NOT _af_is_x86)
  message(FATAL_ERROR "agentforge: AGENTFORGE_X86_SIMD=ON but the target CPU is '${_af_arch}', not x86-64")
else()
  set(AF_X86_SIMD ${_af_is_x86})
endif()
message(STATUS "agentforge: target CPU '${_af_arch}' -> x86 SIMD kernels (AVX2, AVX-512): ${AF_X86_SIMD}")

set(AF_ISA_FLAGS_scalar "")
set(AF_ISA_FLAGS_avx2 -mavx2 -mfma -mpopcnt -mbmi -mbmi2)
set(AF_ISA_FLAGS_avx512 -mavx2 -mfma -mpopcnt -mbmi -mbmi2 -mavx512f -mavx512bw -mavx512vl -mavx512dq
                        -mavx512vnni -mavx512vpopcntdq)

function(af_add_isa_kernels target)
  add_library(${target} OBJECT)
  set(args ${ARGN})
  while(args)
    list(POP_FRONT args isa source)
    target_sources(${target} PRIVATE ${source})
    set_source_files_properties(${source} PROPERTIES COMPILE_OPTIONS "${AF_ISA_FLAGS_${isa}}")
  endwhile()
  target_include_directories(${target} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc)
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  target_compile_options(${target} PRIVATE -O3 -Wall -Wextra -fno-exceptions)
  # GCC 12 warns inside its own avx512fintrin.h set1 helpers (clang has no such warning option)
  target_compile_options(${target} PRIVATE $<$<CXX_COMPILER_ID:GNU>:-Wno-maybe-uninitialized>)
  if(AGENTFORGE_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=${AGENTFORGE_SANITIZE} -fno-omit-frame-pointer)
  endif()
endfunction()
