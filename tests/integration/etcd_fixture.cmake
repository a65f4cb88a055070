# dsv32_etcd_fixture: the throwaway etcd of the integration tests (etcd_fixture.h), for every test
# that needs a real etcd: link it and include "etcd_fixture.h".
add_library(dsv32_etcd_fixture STATIC ${CMAKE_CURRENT_LIST_DIR}/etcd_fixture.c)
target_include_directories(dsv32_etcd_fixture PUBLIC ${CMAKE_CURRENT_LIST_DIR})
dsv32_target_warnings(dsv32_etcd_fixture)
