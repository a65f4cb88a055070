dsv32_add_test(NAME test_core SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_core.c
               LIBS dsv32 PkgConfig::CMOCKA LABELS unit)
