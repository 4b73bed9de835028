# Locate the torch that the build's Python imports, so the extension is compiled
# against exactly the headers and ABI it will run with.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import torch; print(torch.utils.cmake_prefix_path)"
  OUTPUT_VARIABLE AF_TORCH_PREFIX OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE AF_TORCH_FOUND)
if(NOT AF_TORCH_FOUND EQUAL 0)
  message(FATAL_ERROR "agentforge: 'import torch' failed in ${Python_EXECUTABLE}; install torch>=2.6 first "
                      "(pip install torch) and build with --no-build-isolation")
endif()
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c "import torch; print(torch.version.cuda or '')"
  OUTPUT_VARIABLE AF_TORCH_CUDA_VERSION OUTPUT_STRIP_TRAILING_WHITESPACE)
list(APPEND CMAKE_PREFIX_PATH "${AF_TORCH_PREFIX}")
