/* The nccl backend of comm.h: grouped ncclSend/ncclRecv on a non-blocking communicator. Every
 * wait polls the stream and ncclCommGetAsyncError against the deadline; on an error or at the
 * deadline the communicator is aborted (ncclCommAbort), which also frees peers blocked on it.
 * An exchange is two grouped rounds: the block sizes (one u64 per peer), then the blocks. */
#include "comm.h"

#include "error.h"
#include "log.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#ifdef DSV32_HAVE_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <time.h>

struct nccl_comm {
    struct dsv32_comm c;
    ncclComm_t comm;
    cudaStream_t stream;
    int device;
    uint64_t *d_sizes;   /* (2 * world): sizes to send, sizes received */
    uint64_t *h_sizes;   /* pinned (2 * world) */
    void **rbuf;         /* (world) device receive buffers */
    size_t *rcap;
    int aborted;
    int host;            /* DSV32_COMM_NCCL_HOST_BUFFERS */
    void **sstage;       /* (world) device copies of host send blocks */
    size_t *scap;
    void **hrecv;        /* (world) host copies of received blocks */
    size_t *hcap;
    uint8_t *hhead; /* device blocks: pinned (world, DSV32_COMM_MAX_HEAD), their heads */
};

/* grows a device buffer to n bytes */
static int dgrow(void **p, size_t *cap, size_t n)
{
    if (n <= *cap)
        return 0;
    if (*p)
        cudaFree(*p);
    *p = NULL;
    *cap = 0;
    if (cudaMalloc(p, n) != cudaSuccess)
        return DSV32_ECUDA;
    *cap = n;
    return 0;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int nccl_fail(struct nccl_comm *n, int err, const char *what, const char *detail)
{
    log_error("nccl comm epoch %llu rank %d/%d: %s: %s", (unsigned long long)n->c.epoch, n->c.rank,
              n->c.world, what, detail);
    if (!n->c.failed)
        n->c.failed = err;
    if (n->comm && !n->aborted) {
        ncclCommAbort(n->comm);
        n->aborted = 1;
        n->comm = NULL;
    }
    return err;
}

/* Waits until the communicator's pending operations left the in-progress state. */
static int wait_comm(struct nccl_comm *n, int64_t deadline)
{
    for (;;) {
        ncclResult_t st;
        ncclResult_t r = ncclCommGetAsyncError(n->comm, &st);
        if (r != ncclSuccess)
            return nccl_fail(n, DSV32_ENCCL, "ncclCommGetAsyncError", ncclGetErrorString(r));
        if (st == ncclSuccess)
            return 0;
        if (st != ncclInProgress)
            return nccl_fail(n, DSV32_EPEER, "async error", ncclGetErrorString(st));
        if (now_ms() >= deadline)
            return nccl_fail(n, DSV32_ETIMEOUT, "timeout", "operations still in progress");
    }
}

/* Waits for the stream, watching the communicator. */
static int wait_stream(struct nccl_comm *n, int64_t deadline)
{
    for (;;) {
        cudaError_t e = cudaStreamQuery(n->stream);
        if (e == cudaSuccess)
            return 0;
        if (e != cudaErrorNotReady)
            return nccl_fail(n, DSV32_ECUDA, "cudaStreamQuery", cudaGetErrorString(e));
        ncclResult_t st;
        if (ncclCommGetAsyncError(n->comm, &st) == ncclSuccess && st != ncclSuccess &&
            st != ncclInProgress)
            return nccl_fail(n, DSV32_EPEER, "async error", ncclGetErrorString(st));
        if (now_ms() >= deadline)
            return nccl_fail(n, DSV32_ETIMEOUT, "timeout", "a peer did not take part in time");
    }
}

#define NCCL_TRY(n, call)                                                                          \
    do {                                                                                           \
        ncclResult_t r_ = (call);                                                                  \
        if (r_ != ncclSuccess && r_ != ncclInProgress)                                             \
            return nccl_fail(n, DSV32_ENCCL, #call, ncclGetErrorString(r_));                       \
    } while (0)
#define CUDA_TRY(n, call)                                                                          \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess)                                                                     \
            return nccl_fail(n, DSV32_ECUDA, #call, cudaGetErrorString(e_));                       \
    } while (0)

static int nccl_exchange(struct dsv32_comm *c, struct dsv32_comm_xchg *x, int timeout_ms)
{
    struct nccl_comm *n = (struct nccl_comm *)c;
    const int W = c->world;
    const int64_t deadline = now_ms() + timeout_ms;
    uint8_t sz_out[DSV32_COMM_MAX_WORLD], sz_in[DSV32_COMM_MAX_WORLD];
    CUDA_TRY(n, cudaSetDevice(n->device));
    for (int p = 0; p < W; p++) {
        n->h_sizes[p] = x->send[p] ? (uint64_t)x->send_bytes[p] : 0;
        x->recv[p] = NULL;
        x->recv_bytes[p] = 0;
    }
    int r;
    /* the pairs whose size is not known to the receiver: only they take part in the sizes
     * round, and without any it is skipped */
    int round1 = 0;
    for (int p = 0; p < W; p++) {
        const int known_in = x->recv_expect && x->recv_expect[p] != DSV32_COMM_SIZE_UNKNOWN;
        n->h_sizes[W + p] = x->recv_from[p] && known_in ? (uint64_t)x->recv_expect[p] : 0;
        sz_out[p] = p != c->rank && x->send[p] &&
                    !(x->send_known ? x->send_known[p] : x->recv_expect != NULL);
        sz_in[p] = p != c->rank && x->recv_from[p] && !known_in;
        round1 |= sz_out[p] | sz_in[p];
    }
    if (!round1)
        goto sized;
    CUDA_TRY(n, cudaMemcpyAsync(n->d_sizes, n->h_sizes, sizeof(uint64_t) * W,
                                cudaMemcpyHostToDevice, n->stream));
    /* round 1: sizes */
    NCCL_TRY(n, ncclGroupStart());
    for (int p = 0; p < W; p++) {
        if (sz_out[p])
            NCCL_TRY(n, ncclSend(n->d_sizes + p, 1, ncclUint64, p, n->comm, n->stream));
        if (sz_in[p])
            NCCL_TRY(n, ncclRecv(n->d_sizes + W + p, 1, ncclUint64, p, n->comm, n->stream));
    }
    NCCL_TRY(n, ncclGroupEnd());
    if ((r = wait_comm(n, deadline)) < 0)
        return r;
    {
        /* the received sizes; the expected ones (and 0 where a peer sends nothing) kept */
        uint64_t known[DSV32_COMM_MAX_WORLD];
        memcpy(known, n->h_sizes + W, sizeof(uint64_t) * W);
        CUDA_TRY(n, cudaMemcpyAsync(n->h_sizes + W, n->d_sizes + W, sizeof(uint64_t) * W,
                                    cudaMemcpyDeviceToHost, n->stream));
        if ((r = wait_stream(n, deadline)) < 0)
            return r;
        for (int p = 0; p < W; p++)
            if (!sz_in[p])
                n->h_sizes[W + p] = known[p];
    }
sized:
    for (int p = 0; p < W; p++) {
        if (p == c->rank || !x->recv_from[p])
            continue;
        size_t want = (size_t)n->h_sizes[W + p];
        if (want > n->rcap[p]) {
            if (n->rbuf[p])
                cudaFree(n->rbuf[p]);
            n->rbuf[p] = NULL;
            n->rcap[p] = 0;
            CUDA_TRY(n, cudaMalloc(&n->rbuf[p], want));
            n->rcap[p] = want;
        }
    }
    /* host blocks: copy them to the device first */
    const void *sendp[DSV32_COMM_MAX_WORLD];
    for (int p = 0; p < W; p++) {
        sendp[p] = x->send[p];
        if (n->host && p != c->rank && x->send[p] && x->send_bytes[p]) {
            if (dgrow(&n->sstage[p], &n->scap[p], x->send_bytes[p]) < 0)
                return nccl_fail(n, DSV32_ECUDA, "cudaMalloc", "staging buffer");
            CUDA_TRY(n, cudaMemcpyAsync(n->sstage[p], x->send[p], x->send_bytes[p],
                                        cudaMemcpyHostToDevice, n->stream));
            sendp[p] = n->sstage[p];
        }
    }
    /* round 2: the blocks */
    NCCL_TRY(n, ncclGroupStart());
    for (int p = 0; p < W; p++) {
        if (p == c->rank)
            continue;
        if (x->send[p] && x->send_bytes[p])
            NCCL_TRY(n, ncclSend(sendp[p], x->send_bytes[p], ncclUint8, p, n->comm, n->stream));
        if (x->recv_from[p] && n->h_sizes[W + p])
            NCCL_TRY(n, ncclRecv(n->rbuf[p], (size_t)n->h_sizes[W + p], ncclUint8, p, n->comm,
                                 n->stream));
    }
    NCCL_TRY(n, ncclGroupEnd());
    if ((r = wait_comm(n, deadline)) < 0)
        return r;
    if (n->host)
        for (int p = 0; p < W; p++) {
            size_t got = (size_t)n->h_sizes[W + p];
            if (p == c->rank || !x->recv_from[p] || !got)
                continue;
            if (got > n->hcap[p]) { /* page-locked: the copy runs at the link's rate */
                if (n->hrecv[p])
                    cudaFreeHost(n->hrecv[p]);
                n->hrecv[p] = NULL;
                n->hcap[p] = 0;
                CUDA_TRY(n, cudaMallocHost(&n->hrecv[p], got + got / 2));
                n->hcap[p] = got + got / 2;
            }
            CUDA_TRY(n, cudaMemcpyAsync(n->hrecv[p], n->rbuf[p], got, cudaMemcpyDeviceToHost,
                                        n->stream));
        }
    if (!n->host && x->recv_head)
        for (int p = 0; p < W; p++) {
            size_t got = (size_t)n->h_sizes[W + p], hb = got < x->head_bytes ? got : x->head_bytes;
            if (p != c->rank && x->recv_from[p] && hb)
                CUDA_TRY(n, cudaMemcpyAsync(n->hhead + (size_t)p * DSV32_COMM_MAX_HEAD, n->rbuf[p],
                                            hb, cudaMemcpyDeviceToHost, n->stream));
        }
    if ((r = wait_stream(n, deadline)) < 0)
        return r;
    for (int p = 0; x->recv_head && p < W; p++)
        x->recv_head[p] = NULL;
    for (int p = 0; p < W; p++)
        if (p != c->rank && x->recv_from[p]) {
            if (x->recv_head)
                x->recv_head[p] =
                    n->host ? n->hrecv[p] : n->hhead + (size_t)p * DSV32_COMM_MAX_HEAD;
            x->recv[p] = n->host ? n->hrecv[p] : n->rbuf[p];
            x->recv_bytes[p] = (size_t)n->h_sizes[W + p];
            c->bytes_received += n->h_sizes[W + p];
        } else if (x->send[p]) {
            c->bytes_sent += x->send_bytes[p];
        }
    c->exchanges++;
    return 0;
}

static int nccl_p2p(struct dsv32_comm *c, int peer, void *buf, size_t bytes, int timeout_ms, int out)
{
    struct nccl_comm *n = (struct nccl_comm *)c;
    if (c->failed)
        return c->failed;
    if (peer < 0 || peer >= c->world || peer == c->rank)
        return -EINVAL;
    const int64_t deadline = now_ms() + timeout_ms;
    CUDA_TRY(n, cudaSetDevice(n->device));
    void *dev = buf;
    if (n->host) {
        if (dgrow(&n->sstage[peer], &n->scap[peer], bytes ? bytes : 1) < 0)
            return nccl_fail(n, DSV32_ECUDA, "cudaMalloc", "staging buffer");
        dev = n->sstage[peer];
        if (out)
            CUDA_TRY(n, cudaMemcpyAsync(dev, buf, bytes, cudaMemcpyHostToDevice, n->stream));
    }
    if (out)
        NCCL_TRY(n, ncclSend(dev, bytes, ncclUint8, peer, n->comm, n->stream));
    else
        NCCL_TRY(n, ncclRecv(dev, bytes, ncclUint8, peer, n->comm, n->stream));
    int r;
    if ((r = wait_comm(n, deadline)) < 0)
        return r;
    if (n->host && !out)
        CUDA_TRY(n, cudaMemcpyAsync(buf, dev, bytes, cudaMemcpyDeviceToHost, n->stream));
    if ((r = wait_stream(n, deadline)) < 0)
        return r;
    if (out)
        c->bytes_sent += bytes;
    else
        c->bytes_received += bytes;
    return 0;
}

static int nccl_send(struct dsv32_comm *c, int peer, const void *buf, size_t bytes, int timeout_ms)
{
    return nccl_p2p(c, peer, (void *)buf, bytes, timeout_ms, 1);
}

static int nccl_recv(struct dsv32_comm *c, int peer, void *buf, size_t bytes, int timeout_ms)
{
    return nccl_p2p(c, peer, buf, bytes, timeout_ms, 0);
}

static void nccl_abort(struct dsv32_comm *c)
{
    struct nccl_comm *n = (struct nccl_comm *)c;
    if (n->comm && !n->aborted) {
        ncclCommAbort(n->comm);
        n->aborted = 1;
        n->comm = NULL;
    }
    if (!c->failed)
        c->failed = DSV32_EEPOCH; /* torn down on purpose: the group moves to another epoch */
}

static void nccl_free(struct dsv32_comm *c)
{
    struct nccl_comm *n = (struct nccl_comm *)c;
    if (!n)
        return;
    cudaSetDevice(n->device);
    if (n->comm && !n->aborted) {
        /* a clean finalize can block on a dead peer: abort is always safe */
        ncclCommAbort(n->comm);
    }
    for (int p = 0; n->rbuf && p < c->world; p++)
        if (n->rbuf[p])
            cudaFree(n->rbuf[p]);
    for (int p = 0; n->sstage && p < c->world; p++)
        if (n->sstage[p])
            cudaFree(n->sstage[p]);
    for (int p = 0; n->hrecv && p < c->world; p++)
        if (n->hrecv[p])
            cudaFreeHost(n->hrecv[p]);
    free(n->sstage);
    free(n->scap);
    free(n->hrecv);
    free(n->hcap);
    if (n->d_sizes)
        cudaFree(n->d_sizes);
    if (n->h_sizes)
        cudaFreeHost(n->h_sizes);
    if (n->hhead)
        cudaFreeHost(n->hhead);
    if (n->stream)
        cudaStreamDestroy(n->stream);
    free(n->rbuf);
    free(n->rcap);
    free(n);
}

static const struct dsv32_comm_ops nccl_ops = {
    .name = "nccl",
    .exchange = nccl_exchange,
    .send = nccl_send,
    .recv = nccl_recv,
    .abort = nccl_abort,
    .free = nccl_free,
};

int dsv32_comm_nccl_devices(int *ret_n)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess)
        return DSV32_ECUDA;
    *ret_n = n;
    return 0;
}

int dsv32_comm_nccl_unique_id(uint8_t id[DSV32_NCCL_ID_BYTES])
{
    ncclUniqueId u;
    _Static_assert(sizeof(u) == DSV32_NCCL_ID_BYTES, "NCCL unique id size");
    ncclResult_t r = ncclGetUniqueId(&u);
    if (r != ncclSuccess) {
        log_error("ncclGetUniqueId: %s", ncclGetErrorString(r));
        return DSV32_ENCCL;
    }
    memcpy(id, &u, sizeof(u));
    return 0;
}

int dsv32_comm_nccl_new(const uint8_t id[DSV32_NCCL_ID_BYTES], int rank, int world, int device,
                        uint64_t epoch, int timeout_ms, int flags, struct dsv32_comm **ret)
{
    if (world < 1 || world > DSV32_COMM_MAX_WORLD || rank < 0 || rank >= world)
        return -EINVAL;
    struct nccl_comm *n = calloc(1, sizeof(*n));
    if (!n)
        return -ENOMEM;
    n->c = (struct dsv32_comm){.ops = &nccl_ops, .rank = rank, .world = world, .epoch = epoch};
    n->device = device;
    n->host = (flags & DSV32_COMM_NCCL_HOST_BUFFERS) != 0;
    n->c.device_blocks = !n->host;
    n->rbuf = calloc((size_t)world, sizeof(void *));
    n->rcap = calloc((size_t)world, sizeof(size_t));
    n->sstage = calloc((size_t)world, sizeof(void *));
    n->scap = calloc((size_t)world, sizeof(size_t));
    n->hrecv = calloc((size_t)world, sizeof(void *));
    n->hcap = calloc((size_t)world, sizeof(size_t));
    int r = -ENOMEM;
    if (!n->rbuf || !n->rcap || !n->sstage || !n->scap || !n->hrecv || !n->hcap)
        goto fail;
    cudaError_t ce;
    if ((ce = cudaSetDevice(device)) != cudaSuccess ||
        (ce = cudaStreamCreateWithFlags(&n->stream, cudaStreamNonBlocking)) != cudaSuccess ||
        (ce = cudaMalloc((void **)&n->d_sizes, sizeof(uint64_t) * 2 * (size_t)world)) !=
            cudaSuccess ||
        (ce = cudaMallocHost((void **)&n->h_sizes, sizeof(uint64_t) * 2 * (size_t)world)) !=
            cudaSuccess ||
        (!n->host && (ce = cudaMallocHost((void **)&n->hhead,
                                          (size_t)DSV32_COMM_MAX_HEAD * world)) != cudaSuccess)) {
        log_error("nccl comm: CUDA: %s", cudaGetErrorString(ce));
        r = DSV32_ECUDA;
        goto fail;
    }
    ncclUniqueId u;
    memcpy(&u, id, sizeof(u));
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclResult_t nr = ncclCommInitRankConfig(&n->comm, world, u, rank, &cfg);
    if (nr != ncclSuccess && nr != ncclInProgress) {
        log_error("ncclCommInitRankConfig: %s", ncclGetErrorString(nr));
        n->comm = NULL;
        r = DSV32_ENCCL;
        goto fail;
    }
    if ((r = wait_comm(n, now_ms() + timeout_ms)) < 0)
        goto fail;
    *ret = &n->c;
    return 0;
fail:
    nccl_free(&n->c);
    return r;
}

#else /* no CUDA in this build */

int dsv32_comm_nccl_devices(int *ret_n)
{
    (void)ret_n;
    return DSV32_EUNSUPPORTED;
}

int dsv32_comm_nccl_unique_id(uint8_t id[DSV32_NCCL_ID_BYTES])
{
    (void)id;
    return DSV32_EUNSUPPORTED;
}

int dsv32_comm_nccl_new(const uint8_t id[DSV32_NCCL_ID_BYTES], int rank, int world, int device,
                        uint64_t epoch, int timeout_ms, int flags, struct dsv32_comm **ret)
{
    (void)id, (void)rank, (void)world, (void)device, (void)epoch, (void)timeout_ms, (void)flags;
    (void)ret;
    log_error("this build has no CUDA/NCCL: the nccl transport is not available");
    return DSV32_EUNSUPPORTED;
}

#endif
