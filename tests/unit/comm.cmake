dsv32_add_test(NAME test_comm SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_comm.c
               LIBS dsv32_comm PkgConfig::CMOCKA LABELS unit TIMEOUT 120)
dsv32_add_test(NAME test_ep SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_ep.c
               LIBS dsv32_ep PkgConfig::CMOCKA LABELS unit TIMEOUT 300)
target_compile_definitions(test_ep PRIVATE GOLDEN_DIR="${PROJECT_SOURCE_DIR}/tests/golden")
# the same cases over NCCL, one process per GPU (skips with 77 without 2 GPUs)
add_test(NAME test_ep_nccl COMMAND test_ep --nccl)
set_tests_properties(test_ep_nccl PROPERTIES LABELS gpu TIMEOUT 300 SKIP_RETURN_CODE 77)
