# Compiler warnings for C (and host code of CUDA files); -Werror when DSV32_WERROR is on (CI).
set(DSV32_C_WARNINGS -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wvla
    -Wformat=2 -Wno-unused-parameter -Wno-sign-compare)
if(DSV32_WERROR)
    list(APPEND DSV32_C_WARNINGS -Werror)
endif()

# dsv32_target_warnings(target): our own targets only; generated protobuf-c code is exempt.
function(dsv32_target_warnings target)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:C>:${DSV32_C_WARNINGS}>)
endfunction()
