dsv32_add_test(NAME test_comm SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_comm.c
               LIBS dsv32_comm PkgConfig::CMOCKA LABELS unit TIMEOUT 120)
