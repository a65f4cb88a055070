# dsv32-attn as a process, through gRPC.
if(TARGET dsv32-attn)
    dsv32_add_test(NAME test_attn SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_attn.c
                   LIBS dsv32_net dsv32_engine dsv32_test_procs PkgConfig::CMOCKA LABELS integration TIMEOUT 300)
    target_compile_definitions(test_attn PRIVATE MKMODEL="$<TARGET_FILE:dsv32-mkmodel>"
                               ATTN="$<TARGET_FILE:dsv32-attn>")
    add_dependencies(test_attn dsv32-mkmodel dsv32-attn)
endif()
