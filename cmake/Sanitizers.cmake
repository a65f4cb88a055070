# -DDSV32_SANITIZE=address,undefined (or thread): instrument every target, C and host code alike.
if(DSV32_SANITIZE)
    string(REPLACE "," ";" _san_list "${DSV32_SANITIZE}")
    foreach(s IN LISTS _san_list)
        if(NOT s MATCHES "^(address|undefined|thread|leak)$")
            message(FATAL_ERROR "DSV32_SANITIZE: unknown sanitizer '${s}'")
        endif()
    endforeach()
    add_compile_options($<$<COMPILE_LANGUAGE:C>:-fsanitize=${DSV32_SANITIZE}>
                        $<$<COMPILE_LANGUAGE:C>:-fno-omit-frame-pointer>
                        $<$<COMPILE_LANGUAGE:C>:-fno-sanitize-recover=undefined>)
    add_link_options(-fsanitize=${DSV32_SANITIZE})
    set(DSV32_SANITIZED ON)
endif()
