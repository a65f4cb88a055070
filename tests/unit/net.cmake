# Unit tests of the control-plane layers that need no etcd: the gRPC layer (server and client on
# 127.0.0.1), generated protobuf messages, systemd notify through a fake NOTIFY_SOCKET.
if(DSV32_HAVE_GRPC)
    foreach(t rpc notify)
        dsv32_add_test(NAME test_${t} SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_${t}.c
                       LIBS dsv32_net PkgConfig::CMOCKA LABELS unit TIMEOUT 120)
    endforeach()
    dsv32_add_test(NAME test_proto SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_proto.c
                   LIBS dsv32_proto PkgConfig::CMOCKA LABELS unit)
endif()
