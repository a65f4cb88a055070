# scale_client: throughput through the public API for the scale run (bench/scale.sh,
# docs/BENCHMARKS.md "Scale run").
if(TARGET dsv32_net)
    add_executable(scale_client ${CMAKE_CURRENT_LIST_DIR}/scale_client.c ${CMAKE_CURRENT_LIST_DIR}/gen_stream.c)
    target_link_libraries(scale_client PRIVATE dsv32_net Threads::Threads)
    dsv32_target_warnings(scale_client)
endif()
