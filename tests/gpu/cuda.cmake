# GPU tests of the cuda backend (label gpu; each exits 77 where there is no GPU): every op against
# the cpu backend, and the golden sets through dsv32-run --backend cuda. test_cuda_ops --probe
# answers 77 without a GPU, which the golden wrappers pass on as a skip.
if(DSV32_HAVE_CUDA)
    dsv32_add_test(NAME test_cuda_ops SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_cuda_ops.c
                   LIBS dsv32_golden LABELS gpu TIMEOUT 1200
                   ARGS --model ${PROJECT_SOURCE_DIR}/tests/golden/tiny-fp8)
    add_test(NAME test_cuda_replay_bf16
             COMMAND test_cuda_ops --only forward --model ${PROJECT_SOURCE_DIR}/tests/golden/tiny-bf16)
    set_tests_properties(test_cuda_replay_bf16 PROPERTIES LABELS gpu TIMEOUT 300 SKIP_RETURN_CODE 77)
    foreach(model tiny-bf16 tiny-fp8)
        set(_dir ${PROJECT_SOURCE_DIR}/tests/golden/${model})
        add_test(NAME golden_cuda_${model}
                 COMMAND sh -c "\"$1\" --probe || exit 77; shift; exec \"$@\"" sh
                         $<TARGET_FILE:test_cuda_ops> $<TARGET_FILE:dsv32-run> --model ${_dir}
                         --golden ${_dir}/golden.safetensors --backend cuda --schedule all --quiet)
        set_tests_properties(golden_cuda_${model} PROPERTIES LABELS gpu TIMEOUT 900
                             SKIP_RETURN_CODE 77 FAIL_REGULAR_EXPRESSION "FAIL"
                             ENVIRONMENT "DSV32_CUDA_MATH=exact")
    endforeach()
endif()

# The cuda backend's stream discipline (common.cuh, cu_ctx.st): no synchronous copy or memset,
# which run on the legacy default stream that the backend's non-blocking stream does not wait for
# (prepare_weight's cudaMemcpy raced the dequantization reading it). A source check: it runs
# without a GPU too (label unit).
file(GLOB _dsv32_cuda_srcs ${PROJECT_SOURCE_DIR}/daemon/engine/cuda/*.cu
     ${PROJECT_SOURCE_DIR}/daemon/engine/cuda/*.cuh)
set(_dsv32_sync_calls "Memcpy|Memcpy2D|Memcpy3D|MemcpyPeer|MemcpyToSymbol|MemcpyFromSymbol")
string(APPEND _dsv32_sync_calls "|Memset|Memset2D|Memset3D")
add_test(NAME cuda_stream_lint
         COMMAND sh -c "grep -nE 'cuda(${_dsv32_sync_calls})[[:space:]]*\\(' \"$@\"; test $? -eq 1"
                 sh ${_dsv32_cuda_srcs})
set_tests_properties(cuda_stream_lint PROPERTIES LABELS unit TIMEOUT 30)
