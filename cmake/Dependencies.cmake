# Third-party libraries, all from Debian 12 packages (deploy/setup.sh installs them).
find_package(PkgConfig REQUIRED)
find_package(Threads REQUIRED)

# The engine needs only these three.
pkg_check_modules(CJSON REQUIRED IMPORTED_TARGET libcjson)
pkg_check_modules(OPENBLAS REQUIRED IMPORTED_TARGET openblas)
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)
find_library(MATH_LIBRARY m REQUIRED)

# Unit tests.
pkg_check_modules(CMOCKA IMPORTED_TARGET cmocka)

# The control plane: gRPC core, protobuf-c, libsystemd. Optional so that the engine and its CUDA
# backend build on machines without them (the GPU machine has none).
set(DSV32_HAVE_GRPC OFF)
if(NOT DSV32_GRPC STREQUAL "OFF")
    pkg_check_modules(GRPC IMPORTED_TARGET grpc)
    pkg_check_modules(PROTOBUFC IMPORTED_TARGET libprotobuf-c)
    pkg_check_modules(SYSTEMD IMPORTED_TARGET libsystemd)
    find_program(PROTOC_C protoc-c)
    if(GRPC_FOUND AND PROTOBUFC_FOUND AND SYSTEMD_FOUND AND PROTOC_C)
        set(DSV32_HAVE_GRPC ON)
    elseif(DSV32_GRPC STREQUAL "ON")
        message(FATAL_ERROR "DSV32_GRPC=ON but grpc, libprotobuf-c, libsystemd or protoc-c is missing "
                            "(run deploy/setup.sh)")
    endif()
endif()
