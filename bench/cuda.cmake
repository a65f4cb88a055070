# cuda_bench: DSA decode, context sweep, sparse prefill and one full decoder layer at DeepSeek-V3.2's
# dimensions on the cuda backend (docs/BENCHMARKS.md, "CUDA kernels (H200)"). The PyTorch baseline
# (dsa_torch.py) and the plot (plot_dsa.py) are scripts beside it.
if(DSV32_HAVE_CUDA)
    add_executable(cuda_bench ${CMAKE_CURRENT_LIST_DIR}/cuda_bench.c)
    target_link_libraries(cuda_bench PRIVATE dsv32_engine)
    dsv32_target_warnings(cuda_bench)
endif()
