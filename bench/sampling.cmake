# sampling_bench: one token draw over the full vocabulary (docs/BENCHMARKS.md).
add_executable(sampling_bench ${CMAKE_CURRENT_LIST_DIR}/sampling_bench.c)
target_link_libraries(sampling_bench PRIVATE dsv32_engine)
dsv32_target_warnings(sampling_bench)
