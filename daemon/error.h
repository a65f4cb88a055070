/* One error table for the whole project: negative errno values pass through, our own codes live
 * above 1000 so they never collide. Generated from an X-macro (the libuv way): the enum, the names
 * and the messages cannot drift apart. */
#ifndef DSV32_ERROR_H
#define DSV32_ERROR_H

#define DSV32_ERRNO_BASE 1000

/* X(name, message) */
#define DSV32_ERROR_MAP(X)                                                                         \
    X(EFORMAT, "malformed input")                                                                  \
    X(ETRUNC, "file is truncated")                                                                 \
    X(EMISSING, "required item is missing")                                                        \
    X(ESHAPE, "tensor shape does not match the model config")                                     \
    X(EDTYPE, "tensor dtype is not the expected one")                                             \
    X(ECONFIG, "invalid or unsupported model configuration")                                       \
    X(EFULL, "cache or pool is full")                                                              \
    X(EOVERLOAD, "overloaded: queue limit reached")                                                \
    X(EUNSUPPORTED, "operation not supported by this build or backend")                           \
    X(ECUDA, "CUDA runtime error")                                                                 \
    X(ECUBLAS, "cuBLAS error")                                                                     \
    X(ENCCL, "NCCL error")                                                                         \
    X(EPEER, "communication peer failed")                                                          \
    X(ETIMEOUT, "operation timed out")                                                             \
    X(ECANCELLED, "operation cancelled")                                                           \
    X(EGRPC, "gRPC call failed")                                                                   \
    X(EETCD, "etcd request failed")                                                                \
    X(ENOTLEADER, "not the leader")                                                                \
    X(EEPOCH, "group epoch changed")                                                               \
    X(EUTF8, "invalid UTF-8")                                                                      \
    X(ETOKEN, "token id out of range")                                                             \
    X(ECONTEXT, "sequence exceeds the context length")

enum dsv32_error {
    DSV32_EOK = 0,
#define X(name, msg) DSV32_##name##_N,
    DSV32_ERROR_FIRST_ = DSV32_ERRNO_BASE,
    DSV32_ERROR_MAP(X)
#undef X
};

/* Negative codes as functions return them. */
#define X(name, msg) DSV32_##name = -(DSV32_##name##_N),
enum { DSV32_ERROR_MAP(X) DSV32_ERROR_LAST_ = 0 };
#undef X

/* Message for a code (negative errno or -DSV32_E*); never NULL, never freed. */
const char *dsv32_strerror(int err);
/* Symbolic name ("DSV32_ESHAPE", "ENOENT"...). */
const char *dsv32_err_name(int err);

#endif
