# Golden tests: DeepSeek's reference outputs on the tiny models, every schedule (sequential,
# batched, staggered prefill/decode mixes), through dsv32-run.
foreach(model tiny-bf16 tiny-fp8)
    add_test(NAME golden_${model}
             COMMAND dsv32-run --model ${CMAKE_CURRENT_SOURCE_DIR}/${model}
                     --golden ${CMAKE_CURRENT_SOURCE_DIR}/${model}/golden.safetensors
                     --schedule all --quiet)
    set_tests_properties(golden_${model} PROPERTIES LABELS golden TIMEOUT 300
                         PASS_REGULAR_EXPRESSION "PASS" FAIL_REGULAR_EXPRESSION "FAIL")
endforeach()
