# comm: the EP-group transport (tcp always; nccl when CUDA and NCCL are found).
add_library(dsv32_comm STATIC ${CMAKE_CURRENT_LIST_DIR}/comm_tcp.c ${CMAKE_CURRENT_LIST_DIR}/comm_nccl.c)
target_include_directories(dsv32_comm PUBLIC ${CMAKE_CURRENT_LIST_DIR})
target_link_libraries(dsv32_comm PUBLIC dsv32)
dsv32_target_warnings(dsv32_comm)
if(DSV32_HAVE_CUDA AND NCCL_LIBRARY AND NCCL_INCLUDE_DIR)
    target_compile_definitions(dsv32_comm PUBLIC DSV32_HAVE_NCCL)
    target_include_directories(dsv32_comm PRIVATE ${NCCL_INCLUDE_DIR})
    target_link_libraries(dsv32_comm PUBLIC CUDA::cudart ${NCCL_LIBRARY})
endif()

# ep: expert parallelism (placement, dispatch/combine, the shard's step loop) over comm.
add_library(dsv32_ep STATIC ${CMAKE_CURRENT_LIST_DIR}/ep.c)
target_link_libraries(dsv32_ep PUBLIC dsv32_comm dsv32_engine)
dsv32_target_warnings(dsv32_ep)
# row packing of large blocks on a few threads where the compiler has OpenMP
find_package(OpenMP COMPONENTS C)
if(OpenMP_C_FOUND)
    target_link_libraries(dsv32_ep PRIVATE OpenMP::OpenMP_C)
endif()
