# Compile each CPU kernel file for its own instruction set. The files include no torch or
# standard-library templates, so no inline function compiled for AVX-512 can be picked by
# the linker for code that runs on an AVX2-only CPU; the choice is made at run time
# (csrc/cpu/cpu_info.cpp) from cpuid.
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
  # -Wno-maybe-uninitialized: GCC 12 warns inside its own avx512fintrin.h set1 helpers
  target_compile_options(${target} PRIVATE -O3 -Wall -Wextra -Wno-maybe-uninitialized -fno-exceptions)
  if(AGENTFORGE_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=${AGENTFORGE_SANITIZE} -fno-omit-frame-pointer)
  endif()
endfunction()
