if(TARGET dsv32_textgen)
    dsv32_add_test(NAME test_textgen SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_textgen.c
                   LIBS dsv32_textgen PkgConfig::CMOCKA LABELS unit TIMEOUT 120)
    target_compile_definitions(test_textgen PRIVATE MKMODEL="$<TARGET_FILE:dsv32-mkmodel>")
    add_dependencies(test_textgen dsv32-mkmodel)
endif()
