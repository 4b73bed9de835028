# CUDA kernels are built only when torch is a CUDA build AND a CUDA compiler exists.
# AGENTFORGE_CUDA=ON makes a missing piece an error; OFF never builds them.
set(AF_WITH_CUDA OFF)
if(NOT AGENTFORGE_CUDA STREQUAL "OFF" AND AF_TORCH_CUDA_VERSION)
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
      set(CMAKE_CUDA_ARCHITECTURES "80-real;90a-real;90-virtual")
    endif()
    # Torch's CMake otherwise appends its own -gencode list.
    set(TORCH_CUDA_ARCH_LIST "8.0;9.0a")
    enable_language(CUDA)
    set(AF_WITH_CUDA ON)
  endif()
endif()
if(AGENTFORGE_CUDA STREQUAL "ON" AND NOT AF_WITH_CUDA)
  message(FATAL_ERROR "agentforge: AGENTFORGE_CUDA=ON but torch is not a CUDA build "
                      "(torch.version.cuda='${AF_TORCH_CUDA_VERSION}') or no nvcc was found")
endif()
message(STATUS "agentforge: torch cuda='${AF_TORCH_CUDA_VERSION}' -> CUDA kernels: ${AF_WITH_CUDA}")
