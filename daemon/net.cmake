# dsv32_net: the control-plane libraries of the daemons and tools (gRPC layer, health service,
# etcd client with leases, watches and elections, node registry, systemd notify). Only with gRPC.
# It links dsv32_proto from proto/, which the top-level CMakeLists.txt adds after daemon/: target
# names in target_link_libraries resolve when the build is generated, so the order is harmless.
if(DSV32_HAVE_GRPC)
    add_library(dsv32_net STATIC
        ${CMAKE_CURRENT_LIST_DIR}/rpc.c ${CMAKE_CURRENT_LIST_DIR}/rpc_client.c
        ${CMAKE_CURRENT_LIST_DIR}/rpc_health.c
        ${CMAKE_CURRENT_LIST_DIR}/etcd.c ${CMAKE_CURRENT_LIST_DIR}/registry.c
        ${CMAKE_CURRENT_LIST_DIR}/notify.c)
    target_include_directories(dsv32_net PUBLIC ${CMAKE_CURRENT_LIST_DIR})
    target_link_libraries(dsv32_net PUBLIC dsv32 dsv32_proto PkgConfig::GRPC PkgConfig::PROTOBUFC
                          PkgConfig::SYSTEMD PkgConfig::CJSON)
    dsv32_target_warnings(dsv32_net)
endif()
