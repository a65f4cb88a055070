/* EP exchange benchmark on GPUs: the time of one MoE layer's dispatch + combine through the nccl
 * transport of comm.h, between an attention daemon (GPU 0) and an expert shard (GPU 1), at
 * DeepSeek-V3.2's hidden size 7168, for 128, 1024 and 4096 tokens per attention daemon, with bf16
 * and with FP8 + 1x128 scales dispatch payloads (combine returns bf16). Next to it, in the same
 * run: NCCL's own send/recv bandwidth between the two GPUs on large buffers, and the NVLink floor
 * (bytes over 450 GB/s per direction). One process per GPU; rank 0 prints the table.
 *   ep_bench [--iters N] */
#include "comm.h"
#include "error.h"

#include <cuda_runtime_api.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define D 7168
#define TOPK 8
#define NVLINK_GBPS 450.0

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static size_t dispatch_bytes(int T, int fp8)
{
    size_t rows = fp8 ? (size_t)T * D + (size_t)T * (D / 128) * 4 : (size_t)T * D * 2;
    return 32 + rows + (size_t)T * TOPK * 8;
}
static size_t combine_bytes(int T) { return 32 + (size_t)T * D * 2; }

static int rank_main(int rank, int id_fd_r, int id_fd_w, int iters)
{
    uint8_t id[DSV32_NCCL_ID_BYTES];
    if (rank == 0) {
        if (dsv32_comm_nccl_unique_id(id) < 0 || write(id_fd_w, id, sizeof(id)) != sizeof(id))
            return 1;
    } else if (read(id_fd_r, id, sizeof(id)) != sizeof(id)) {
        return 1;
    }
    struct dsv32_comm *c;
    if (dsv32_comm_nccl_new(id, rank, 2, rank, 1, 60000, 0, &c) < 0)
        return 2;
    const size_t big = 512u << 20;
    void *sbuf, *peerbuf;
    if (cudaSetDevice(rank) != cudaSuccess || cudaMalloc(&sbuf, big) != cudaSuccess ||
        cudaMemset(sbuf, rank + 1, big) != cudaSuccess)
        return 3;
    (void)peerbuf;
    const void *send[2] = {0};
    size_t sb[2] = {0}, rb[2];
    uint8_t from[2] = {0};
    void *recv[2];
    struct dsv32_comm_xchg x = {.send = send, .send_bytes = sb, .recv_from = from, .recv = recv,
                                .recv_bytes = rb};
    const int peer = 1 - rank;
    double *t = malloc(sizeof(double) * (size_t)iters);

    /* NCCL bandwidth: both directions at once, 512 MiB each way (what an exchange can reach) */
    send[peer] = sbuf;
    sb[peer] = big;
    from[peer] = 1;
    for (int i = 0; i < 3 + iters / 5; i++) {
        double t0 = now_s();
        if (dsv32_comm_exchange(c, &x, 60000) < 0)
            return 4;
        if (i >= 3)
            t[i - 3] = now_s() - t0;
    }
    qsort(t, (size_t)(iters / 5), sizeof(double), cmp_d);
    double bw = (double)big / t[iters / 10] / 1e9;
    if (rank == 0)
        printf("NCCL send/recv between the 2 GPUs, 512 MiB each way at once: %.1f GB/s per "
               "direction (NVLink floor %.0f GB/s)\n\n", bw, NVLINK_GBPS);

    if (rank == 0)
        printf("%-8s %-14s %12s %12s %10s %12s %12s %8s\n", "tokens", "payload", "dispatch B",
               "combine B", "time us", "floor(meas)", "floor(NVL)", "x floor");
    const int Ts[3] = {128, 1024, 4096};
    for (int fp8 = 0; fp8 < 2; fp8++)
        for (int ti = 0; ti < 3; ti++) {
            const int T = Ts[ti];
            const size_t db = dispatch_bytes(T, fp8), cb = combine_bytes(T);
            for (int i = 0; i < 5 + iters; i++) {
                double t0 = now_s();
                /* dispatch: attention (0) -> shard (1) */
                memset(from, 0, sizeof(from));
                send[0] = send[1] = NULL;
                sb[0] = sb[1] = 0;
                if (rank == 0) {
                    send[1] = sbuf;
                    sb[1] = db;
                } else {
                    from[0] = 1;
                }
                if (dsv32_comm_exchange(c, &x, 60000) < 0)
                    return 5;
                /* combine: shard -> attention; sizes known from the dispatch (as in ep.c) */
                memset(from, 0, sizeof(from));
                send[0] = send[1] = NULL;
                size_t expect[2] = {0, 0};
                if (rank == 1) {
                    send[0] = sbuf;
                    sb[0] = cb;
                } else {
                    from[1] = 1;
                    expect[1] = cb;
                }
                x.recv_expect = expect;
                int rc = dsv32_comm_exchange(c, &x, 60000);
                x.recv_expect = NULL;
                if (rc < 0)
                    return 6;
                if (i >= 5)
                    t[i - 5] = now_s() - t0;
            }
            qsort(t, (size_t)iters, sizeof(double), cmp_d);
            double med = t[iters / 2];
            double floor_meas = (double)db / (bw * 1e9) + (double)cb / (bw * 1e9);
            double floor_nvl = (double)(db + cb) / (NVLINK_GBPS * 1e9);
            if (rank == 0)
                printf("%-8d %-14s %12zu %12zu %10.1f %12.1f %12.1f %8.2f\n", T,
                       fp8 ? "fp8+scales" : "bf16", db, cb, med * 1e6, floor_meas * 1e6,
                       floor_nvl * 1e6, med / floor_nvl);
        }
    free(t);
    dsv32_comm_free(c);
    cudaFree(sbuf);
    return 0;
}

int main(int argc, char **argv)
{
    int iters = 50;
    if (argc == 3 && strcmp(argv[1], "--iters") == 0)
        iters = atoi(argv[2]);
    if (iters < 10) {
        fprintf(stderr, "usage: ep_bench [--iters N>=10]\n");
        return 2;
    }
    int p[2];
    if (pipe(p) < 0)
        return 1;
    pid_t pid[2];
    for (int r = 0; r < 2; r++) {
        pid[r] = fork();
        if (pid[r] == 0) {
            int st = rank_main(r, p[0], p[1], iters);
            fflush(stdout); /* _exit does not flush stdio */
            _exit(st);
        }
    }
    int status = 0;
    for (int r = 0; r < 2; r++) {
        int st;
        waitpid(pid[r], &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            fprintf(stderr, "ep_bench: rank %d failed (status %d)\n", r,
                    WIFEXITED(st) ? WEXITSTATUS(st) : -1);
            status = 1;
        }
    }
    return status;
}
