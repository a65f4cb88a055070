/* Communication between the members of an EP group: attention daemons and expert shards exchange
 * variable-sized blocks every MoE layer (dispatch, then combine), and daemons send KV blocks to
 * each other point to point. One interface, two backends chosen at run time:
 *   tcp  - host memory; one TCP connection per peer pair and epoch, length-prefixed frames,
 *          a deadline on every exchange; EOF, ECONNRESET or the deadline = the peer failed.
 *   nccl - GPU memory; grouped ncclSend/ncclRecv on a non-blocking communicator, watched with
 *          ncclCommGetAsyncError against the deadline and torn down with ncclCommAbort.
 * A communicator belongs to one epoch of one group (ranks 0..world-1). After any error it is
 * dead: every later call fails fast with the first error, and the caller builds a new one for the
 * next epoch. Not thread-safe: one thread drives a communicator. */
#ifndef DSV32_COMM_H
#define DSV32_COMM_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#define DSV32_COMM_MAX_WORLD 256

struct dsv32_comm;

/* One exchange: what this rank sends to each peer and which peers it expects a block from.
 * A participating peer may send 0 bytes (a member with nothing to do still takes part). */
struct dsv32_comm_xchg {
    const void *const *send;   /* (world) NULL = send nothing to this peer */
    const size_t *send_bytes;  /* (world) */
    const uint8_t *recv_from;  /* (world) 1 = expect a block from this peer */
    /* (world) sizes the caller already knows (the combine's, known from the dispatch), or NULL:
     * none known; DSV32_COMM_SIZE_UNKNOWN for a peer whose size is not known. A block of another
     * size is an error. */
    const size_t *recv_expect;
    /* (world) 1 where the peer knows the size of the block this rank sends it (its recv_expect
     * has it), or NULL: every size known to its receiver when recv_expect is given, none
     * otherwise. nccl sends a size only where it is not known and receives one only where it is
     * not expected, and skips its sizes round when no pair needs one: both sides of a pair must
     * agree on what is known. */
    const uint8_t *send_known;
    /* filled by the call: pointers into the communicator's receive buffers, valid until the
     * next call on it (backend memory: host for tcp, device for nccl) */
    void **recv;               /* (world) */
    size_t *recv_bytes;        /* (world) */
    /* Optional: the first head_bytes (<= DSV32_COMM_MAX_HEAD) of every received block in host
     * memory, whichever memory the blocks are in (all of a shorter block), so that a caller whose
     * blocks stay on the device reads their headers without a copy of its own. recv_head NULL:
     * not wanted; else filled by the call, valid as long as recv. */
    size_t head_bytes;
    void **recv_head; /* (world) */
};

#define DSV32_COMM_MAX_HEAD 256
#define DSV32_COMM_SIZE_UNKNOWN ((size_t)-1)

struct dsv32_comm_ops {
    const char *name;
    /* the all-to-all-v of the step protocol */
    int (*exchange)(struct dsv32_comm *c, struct dsv32_comm_xchg *x, int timeout_ms);
    /* point to point (KV transfer), fixed sizes agreed by the caller */
    int (*send)(struct dsv32_comm *c, int peer, const void *buf, size_t bytes, int timeout_ms);
    int (*recv)(struct dsv32_comm *c, int peer, void *buf, size_t bytes, int timeout_ms);
    /* tears the communicator down at once, so that peers blocked on it fail fast */
    void (*abort)(struct dsv32_comm *c);
    void (*free)(struct dsv32_comm *c);
};

struct dsv32_comm {
    const struct dsv32_comm_ops *ops;
    int rank, world;
    uint64_t epoch;
    int failed;        /* first error, 0 while healthy */
    int device_blocks; /* blocks passed and received are device memory (nccl without
                          DSV32_COMM_NCCL_HOST_BUFFERS), else host memory */
    uint64_t bytes_sent, bytes_received, exchanges;
};

static inline int dsv32_comm_exchange(struct dsv32_comm *c, struct dsv32_comm_xchg *x, int timeout_ms)
{
    if (x->recv_head && x->head_bytes > DSV32_COMM_MAX_HEAD)
        return -EINVAL;
    return c->failed ? c->failed : c->ops->exchange(c, x, timeout_ms);
}
static inline void dsv32_comm_free(struct dsv32_comm *c)
{
    if (c)
        c->ops->free(c);
}

/* ---- tcp ---- */

/* A process listens once (its address goes into etcd with its node entry) and accepts the
 * connections of every epoch on it. */
struct dsv32_comm_listener;
/* host "127.0.0.1", port 0 = any free port; ret_port gets the port bound. */
int dsv32_comm_tcp_listen(const char *host, int port, struct dsv32_comm_listener **ret,
                          int *ret_port);
void dsv32_comm_tcp_listener_free(struct dsv32_comm_listener *l);

/* Builds the communicator of `epoch`: connects to every lower rank's address ("host:port") and
 * accepts every higher rank on the listener, checking each peer's epoch and rank in a handshake.
 * Connections of other epochs are refused. -DSV32_ETIMEOUT if the group does not form in time. */
int dsv32_comm_tcp_new(struct dsv32_comm_listener *l, int rank, int world, const char *const *addrs,
                       uint64_t epoch, int timeout_ms, struct dsv32_comm **ret);

/* ---- nccl (built with CUDA) ---- */

#define DSV32_NCCL_ID_BYTES 128
/* Number of CUDA devices visible (-DSV32_EUNSUPPORTED without CUDA). */
int dsv32_comm_nccl_devices(int *ret_n);
/* The group leader makes the unique id and publishes it under the epoch key. */
int dsv32_comm_nccl_unique_id(uint8_t id[DSV32_NCCL_ID_BYTES]);
/* Blocks passed to exchange/send/recv are host memory, staged through device buffers (for
 * callers that pack on the host); without it they are device memory. */
#define DSV32_COMM_NCCL_HOST_BUFFERS 1
/* Non-blocking init on `device` with the leader's id; -DSV32_EUNSUPPORTED without CUDA. */
int dsv32_comm_nccl_new(const uint8_t id[DSV32_NCCL_ID_BYTES], int rank, int world, int device,
                        uint64_t epoch, int timeout_ms, int flags, struct dsv32_comm **ret);

#endif
