# dsv32-tokenize: JSON lines of text to JSON arrays of ids and back, with any tokenizer.json.
add_executable(dsv32-tokenize ${CMAKE_CURRENT_LIST_DIR}/tokenize.c)
target_link_libraries(dsv32-tokenize PRIVATE dsv32_tok)
dsv32_target_warnings(dsv32-tokenize)
install(TARGETS dsv32-tokenize)
