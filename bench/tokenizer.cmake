# tokenizer_bench: encode throughput of dsv32_tok against the npm package's JavaScript tokenizer on
# the same few MB of mixed text, ids compared (docs/BENCHMARKS.md, "Tokenizer").
add_executable(tokenizer_bench ${CMAKE_CURRENT_LIST_DIR}/tokenizer_bench.c)
target_link_libraries(tokenizer_bench PRIVATE dsv32_tok)
target_compile_definitions(tokenizer_bench PRIVATE DSV32_SOURCE_DIR="${PROJECT_SOURCE_DIR}")
dsv32_target_warnings(tokenizer_bench)
