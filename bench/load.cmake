# load_test: concurrent Generate streams against a running local cluster, checking for errors and
# leaks (bench/load.sh brings the cluster up and down around it; docs/BENCHMARKS.md "Load test").
if(TARGET dsv32_net)
    add_executable(load_test ${CMAKE_CURRENT_LIST_DIR}/load_test.c ${CMAKE_CURRENT_LIST_DIR}/gen_stream.c)
    target_link_libraries(load_test PRIVATE dsv32_net)
    dsv32_target_warnings(load_test)
endif()
