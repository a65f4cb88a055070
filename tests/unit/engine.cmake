# Unit tests of the engine: loader, number formats, KV cache, forward invariants.
foreach(t loader dtype kvcache engine sampling sched)
    dsv32_add_test(NAME test_${t} SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_${t}.c
                   LIBS dsv32_engine PkgConfig::CMOCKA LABELS unit)
    target_compile_definitions(test_${t} PRIVATE GOLDEN_DIR="${PROJECT_SOURCE_DIR}/tests/golden")
endforeach()
