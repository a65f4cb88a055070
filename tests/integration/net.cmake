# Integration tests of the control plane against a real etcd (Debian's /usr/bin/etcd, started by
# each test on 127.0.0.1; they skip with 77 without it): the etcd client, the node registry.
if(DSV32_HAVE_GRPC)
    foreach(t etcd registry)
        dsv32_add_test(NAME test_${t} SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_${t}.c
                       LIBS dsv32_net dsv32_etcd_fixture PkgConfig::CMOCKA
                       LABELS integration TIMEOUT 120)
    endforeach()
endif()
