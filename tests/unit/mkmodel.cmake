# dsv32-mkmodel writes models the loader and the engine accept: the golden shape in bf16 and FP8.
foreach(fmt bf16 fp8)
    if(fmt STREQUAL "bf16")
        set(_flag --bf16)
    else()
        set(_flag "")
    endif()
    add_test(NAME mkmodel_tiny_${fmt}
             COMMAND sh -c "d=$(mktemp -d) && trap 'rm -rf $d' EXIT && \
                 $<TARGET_FILE:dsv32-mkmodel> --out $d/m --shape tiny --layers 3 ${_flag} >/dev/null 2>&1 && \
                 $<TARGET_FILE:dsv32-run> --model $d/m --prompt-ids 5,17,42 --max-tokens 4")
    set_tests_properties(mkmodel_tiny_${fmt} PROPERTIES LABELS unit TIMEOUT 120
                         PASS_REGULAR_EXPRESSION "^[0-9]+,[0-9]+,[0-9]+,[0-9]+\n$")
endforeach()

# dsv32 generate on a model with DeepSeek's tokenizer: loads, renders a chat, streams 4 tokens.
if(TARGET dsv32_cli)
    add_test(NAME dsv32_generate
             COMMAND sh -c "d=$(mktemp -d) && trap 'rm -rf $d' EXIT && \
                 $<TARGET_FILE:dsv32-mkmodel> --out $d/m --layers 2 >/dev/null 2>&1 && \
                 $<TARGET_FILE:dsv32_cli> generate --model $d/m --prompt 'Hi there' --chat \
                     --max-tokens 4 --temperature 0 --ignore-eos 2>&1 >/dev/null")
    set_tests_properties(dsv32_generate PROPERTIES LABELS unit TIMEOUT 120
                         PASS_REGULAR_EXPRESSION "4 tokens in .* finish: length")
endif()
