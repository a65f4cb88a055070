# cpu_bench: prefill/decode tokens/s of the cpu backend (docs/BENCHMARKS.md, "CPU engine").
add_executable(cpu_bench ${CMAKE_CURRENT_LIST_DIR}/cpu_bench.c)
target_link_libraries(cpu_bench PRIVATE dsv32_engine)
target_compile_definitions(cpu_bench PRIVATE DSV32_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
dsv32_target_warnings(cpu_bench)
