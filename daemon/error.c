/* dsv32_strerror / dsv32_err_name, generated from DSV32_ERROR_MAP. */
#define _GNU_SOURCE 1 /* strerrorname_np */
#include "error.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

const char *dsv32_strerror(int err)
{
    if (err == 0)
        return "success";
    switch (err) {
#define X(name, msg)                                                                               \
    case DSV32_##name:                                                                             \
        return msg;
        DSV32_ERROR_MAP(X)
#undef X
    default:
        break;
    }
    if (err < 0 && -err < DSV32_ERRNO_BASE)
        return strerror(-err);
    return "unknown error";
}

const char *dsv32_err_name(int err)
{
    if (err == 0)
        return "OK";
    switch (err) {
#define X(name, msg)                                                                               \
    case DSV32_##name:                                                                             \
        return "DSV32_" #name;
        DSV32_ERROR_MAP(X)
#undef X
    default:
        break;
    }
    if (err < 0 && -err < DSV32_ERRNO_BASE) {
        const char *n = strerrorname_np(-err);
        return n ? n : "E?";
    }
    return "E?";
}
