# Operator actions through etcd (ops.c: drain requests and the daemons' drain watch, node and EP
# group reading) join dsv32_net, which every daemon, the router and dsv32ctl already link. This
# fragment sorts after net.cmake, so dsv32_net exists here.
if(TARGET dsv32_net)
    target_sources(dsv32_net PRIVATE ${CMAKE_CURRENT_LIST_DIR}/ops.c)
endif()
