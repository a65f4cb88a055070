# dsv32ctl against real local clusters (cluster up/down, status, nodes, cordon, drain, placement,
# generate, chat), and a Python gRPC client (Debian's python3-grpcio, stubs generated from
# proto/*.proto at test time) against one.
if(TARGET dsv32ctl AND TARGET dsv32-router AND TARGET dsv32-attn AND TARGET dsv32-expert)
    dsv32_add_test(NAME test_ctl SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_ctl.c
                   LIBS dsv32_net PkgConfig::CMOCKA LABELS integration TIMEOUT 600)
    target_compile_definitions(test_ctl PRIVATE DSV32CTL="$<TARGET_FILE:dsv32ctl>")
    add_dependencies(test_ctl dsv32ctl dsv32-router dsv32-attn dsv32-expert dsv32-mkmodel)
endif()

# Debian's python3 (the one with python3-grpcio and python3-grpc-tools), else python3 on PATH.
if(TARGET dsv32ctl)
    if(EXISTS /usr/bin/python3)
        set(_dsv32_py /usr/bin/python3)
    else()
        find_program(_dsv32_py python3)
    endif()
    if(_dsv32_py)
        add_test(NAME test_py_client
                 COMMAND ${_dsv32_py} ${CMAKE_CURRENT_LIST_DIR}/test_py_client.py
                         $<TARGET_FILE:dsv32ctl> ${PROJECT_SOURCE_DIR}/proto)
        set_tests_properties(test_py_client PROPERTIES LABELS integration TIMEOUT 300
                             SKIP_RETURN_CODE 77)
    endif()
endif()
