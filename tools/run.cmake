# dsv32-run: golden comparison and greedy generation from the command line.
add_library(dsv32_golden STATIC ${CMAKE_CURRENT_LIST_DIR}/golden.c)
target_include_directories(dsv32_golden PUBLIC ${CMAKE_CURRENT_LIST_DIR})
target_link_libraries(dsv32_golden PUBLIC dsv32_engine)
dsv32_target_warnings(dsv32_golden)
add_executable(dsv32-run ${CMAKE_CURRENT_LIST_DIR}/run.c)
target_link_libraries(dsv32-run PRIVATE dsv32_golden)
dsv32_target_warnings(dsv32-run)
install(TARGETS dsv32-run)
