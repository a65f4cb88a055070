# dsv32_add_test(NAME n SOURCES s... [LIBS l...] [LABELS unit|golden|integration|failure|gpu...]
#                [TIMEOUT seconds] [ARGS a...] [ENV K=V...])
# Builds one test program and registers it with ctest. Each test runs in its own process with a
# timeout; exit status 77 means "skipped" (no GPU, no etcd binary...).
function(dsv32_add_test)
    cmake_parse_arguments(T "" "NAME;TIMEOUT" "SOURCES;LIBS;LABELS;ARGS;ENV" ${ARGN})
    if(NOT T_TIMEOUT)
        set(T_TIMEOUT 120)
    endif()
    add_executable(${T_NAME} ${T_SOURCES})
    target_link_libraries(${T_NAME} PRIVATE ${T_LIBS})
    dsv32_target_warnings(${T_NAME})
    add_test(NAME ${T_NAME} COMMAND ${T_NAME} ${T_ARGS})
    set_tests_properties(${T_NAME} PROPERTIES LABELS "${T_LABELS}" TIMEOUT ${T_TIMEOUT}
                         SKIP_RETURN_CODE 77)
    if(T_ENV)
        set_tests_properties(${T_NAME} PROPERTIES ENVIRONMENT "${T_ENV}")
    endif()
endfunction()

# Includes every *.cmake fragment of the calling directory: areas add their own fragment file
# (tests/unit/tokenizer.cmake, tools/run.cmake...) instead of editing a shared list.
macro(dsv32_include_fragments)
    file(GLOB _frags CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/*.cmake)
    list(SORT _frags)
    foreach(_f IN LISTS _frags)
        include(${_f})
    endforeach()
endmacro()
