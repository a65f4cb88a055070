# dsv32_tok: the byte-level BPE tokenizer (tokenizer.json, PCRE2 regexes) and the DeepSeek-V3.2 chat
# format (prompt encoder, DSML tool-call parser). The engine links it; so do dsv32-tokenize and tests.
set(_tok_dir ${CMAKE_CURRENT_LIST_DIR}/engine)
add_library(dsv32_tok STATIC
    ${_tok_dir}/tokenizer.c ${_tok_dir}/tok_encode.c ${_tok_dir}/tok_decode.c
    ${_tok_dir}/chat.c ${_tok_dir}/chat_json.c)
target_include_directories(dsv32_tok PUBLIC ${_tok_dir})
target_link_libraries(dsv32_tok PUBLIC dsv32 PkgConfig::CJSON PRIVATE PkgConfig::PCRE2)
dsv32_target_warnings(dsv32_tok)
