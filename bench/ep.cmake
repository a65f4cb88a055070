# ep_bench: dispatch+combine time per MoE layer over NCCL on two GPUs (docs/BENCHMARKS.md).
if(DSV32_HAVE_CUDA AND NCCL_LIBRARY)
    add_executable(ep_bench ${CMAKE_CURRENT_LIST_DIR}/ep_bench.c)
    target_link_libraries(ep_bench PRIVATE dsv32_comm CUDA::cudart)
    dsv32_target_warnings(ep_bench)
endif()
