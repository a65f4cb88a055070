# The cuda backend (daemon/engine/cuda): kernels and cuBLAS/cuBLASLt calls behind backend.h's ops,
# linked into dsv32_engine, which then defines DSV32_HAVE_CUDA. Included by the engine's
# CMakeLists.txt when CUDA is enabled. The sources include the engine headers by relative path, so
# that no project directory lands on nvcc's include path (daemon/engine/sched.h would shadow the
# system <sched.h> that the C++ standard headers include).
add_library(dsv32_cuda STATIC
    ${CMAKE_CURRENT_LIST_DIR}/backend.cu
    ${CMAKE_CURRENT_LIST_DIR}/small_ops.cu
    ${CMAKE_CURRENT_LIST_DIR}/quant.cu
    ${CMAKE_CURRENT_LIST_DIR}/gemm.cu
    ${CMAKE_CURRENT_LIST_DIR}/indexer.cu
    ${CMAKE_CURRENT_LIST_DIR}/dsa.cu
    ${CMAKE_CURRENT_LIST_DIR}/mla.cu
    ${CMAKE_CURRENT_LIST_DIR}/mla_prefill.cu
    ${CMAKE_CURRENT_LIST_DIR}/moe.cu
    ${CMAKE_CURRENT_LIST_DIR}/sample.cu)
target_compile_definitions(dsv32_cuda PRIVATE DSV32_HAVE_CUDA)
separate_arguments(_dsv32_gencode UNIX_COMMAND "${DSV32_CUDA_GENCODE}")
target_compile_options(dsv32_cuda PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:${_dsv32_gencode} -lineinfo -Xcompiler=-Wall>)
set_target_properties(dsv32_cuda PROPERTIES CUDA_SEPARABLE_COMPILATION OFF CUDA_ARCHITECTURES OFF
                      POSITION_INDEPENDENT_CODE ON)
target_link_libraries(dsv32_cuda PUBLIC CUDA::cudart CUDA::cublas CUDA::cublasLt
                      $<LINK_ONLY:dsv32_engine> $<LINK_ONLY:dsv32>)
target_link_libraries(dsv32_engine PUBLIC dsv32_cuda)
target_compile_definitions(dsv32_engine PUBLIC DSV32_HAVE_CUDA)
