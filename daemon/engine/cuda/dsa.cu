/* DSA attention as one op: the lightning indexer (scores + top-k), then sparse MLA over the
 * selected positions. Run in turn, the two leave each other's resource idle: the indexer streams
 * 132 bytes of key per cached token from memory (bandwidth-bound), the sparse MLA reads little and
 * is bound by shared memory and the tensor cores. Rows are independent, so cu_dsa cuts them in
 * chunks and runs chunk i's MLA beside chunk i + 1's indexer, each on its own set of SMs: two
 * green contexts (the driver's SM partitions) with a stream each. The first chunk's indexer and
 * the last chunk's MLA run on the whole GPU, on the backend's stream:
 *
 *   backend stream   idx(0) ........................................ MLA(C-1)
 *   partition A             idx(1)   idx(2)  ...  idx(C-1)
 *   partition B             MLA(0)   MLA(1)  ...  MLA(C-2)
 *
 * Each partition's launches see its SM count (the indexer's work list and the MLA's split over
 * keys size themselves by c->n_sm). The selections equal the plain path's bit for bit (a score
 * is one CTA's sum whatever the work split); the MLA's outputs differ from it by the rounding of
 * its key split only. */
#include <cuda.h>
#include <errno.h>
#include <string.h>

#include "dsa.cuh"
#include "indexer.cuh"
#include "mla.cuh"

/* the driver's green-context calls through the runtime's entry points (no link against libcuda) */
typedef CUresult (*fn_dev_get)(CUdevice *, int);
typedef CUresult (*fn_get_res)(CUdevice, CUdevResource *, CUdevResourceType);
typedef CUresult (*fn_split)(CUdevResource *, unsigned int *, const CUdevResource *,
                             CUdevResource *, unsigned int, unsigned int);
typedef CUresult (*fn_gen_desc)(CUdevResourceDesc *, CUdevResource *, unsigned int);
typedef CUresult (*fn_green_create)(CUgreenCtx *, CUdevResourceDesc, CUdevice, unsigned int);
typedef CUresult (*fn_green_destroy)(CUgreenCtx);
typedef CUresult (*fn_green_stream)(CUstream *, CUgreenCtx, unsigned int, int);

static void *driver_fn(const char *name)
{
    void *f = NULL;
    cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion(name, &f, 12050, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return f;
}

struct cu_green {
    int idx_sms; /* what was asked for partition A */
    int sms[2];  /* the partitions' SM counts: A (indexer), B (MLA) */
    CUgreenCtx g[2];
    cudaStream_t st[2];
    cudaEvent_t ev_idx[CU_DSA_MAX_CHUNKS]; /* chunk i's selection written */
    cudaEvent_t ev_mla;                    /* partition B's MLAs done */
};

int cu_dsa_info(const struct cu_ctx *c, int sms[2], long *overlapped)
{
    *overlapped = c->dsa_overlapped;
    if (!c->green || !c->green->g[0])
        return -1;
    sms[0] = c->green->sms[0];
    sms[1] = c->green->sms[1];
    return 0;
}

/* the partitions' streams, contexts and events (the struct stays, its handles cleared) */
static void green_release(struct cu_green *gr)
{
    fn_green_destroy destroy = (fn_green_destroy)driver_fn("cuGreenCtxDestroy");
    for (int i = 0; i < 2; i++) {
        if (gr->st[i]) {
            cudaStreamSynchronize(gr->st[i]);
            cudaStreamDestroy(gr->st[i]);
        }
        if (gr->g[i] && destroy)
            destroy(gr->g[i]);
    }
    for (int i = 0; i < CU_DSA_MAX_CHUNKS; i++)
        if (gr->ev_idx[i])
            cudaEventDestroy(gr->ev_idx[i]);
    if (gr->ev_mla)
        cudaEventDestroy(gr->ev_mla);
    const int idx_sms = gr->idx_sms;
    memset(gr, 0, sizeof(*gr));
    gr->idx_sms = idx_sms;
}

void cu_green_free(struct cu_ctx *c)
{
    if (!c->green)
        return;
    green_release(c->green);
    free(c->green);
    c->green = NULL;
}

/* The two partitions for an indexer share of idx_sms SMs (the driver rounds it to its granule,
 * 8 on Hopper); 0, or -1 when the driver has no green contexts or refuses the split (logged once
 * per request; the caller then runs the plain path). */
static int green_get(struct cu_ctx *c, int idx_sms)
{
    if (c->green && c->green->idx_sms == idx_sms)
        return c->green->g[0] ? 0 : -1;
    if (c->green) {
        CU_CHECK(cudaStreamSynchronize(c->st));
        cu_green_free(c);
    }
    struct cu_green *gr = (struct cu_green *)calloc(1, sizeof(*gr));
    if (!gr)
        return -1;
    gr->idx_sms = idx_sms;
    c->green = gr; /* kept even when it fails: the failure is not retried */
    fn_dev_get dev_get = (fn_dev_get)driver_fn("cuDeviceGet");
    fn_get_res get_res = (fn_get_res)driver_fn("cuDeviceGetDevResource");
    fn_split split = (fn_split)driver_fn("cuDevSmResourceSplitByCount");
    fn_gen_desc gen_desc = (fn_gen_desc)driver_fn("cuDevResourceGenerateDesc");
    fn_green_create create = (fn_green_create)driver_fn("cuGreenCtxCreate");
    fn_green_stream gstream = (fn_green_stream)driver_fn("cuGreenCtxStreamCreate");
    CUdevice dev;
    CUdevResource all, part[2];
    unsigned int n = 1;
    CUgreenCtx g[2] = {NULL, NULL};
    cudaStream_t st[2] = {NULL, NULL};
    const char *why = NULL;
    if (!dev_get || !get_res || !split || !gen_desc || !create || !gstream)
        why = "the driver has no green contexts";
    else if (dev_get(&dev, c->device) != CUDA_SUCCESS ||
             get_res(dev, &all, CU_DEV_RESOURCE_TYPE_SM) != CUDA_SUCCESS)
        why = "cuDeviceGetDevResource failed";
    else if (split(&part[0], &n, &all, &part[1], 0, (unsigned)idx_sms) != CUDA_SUCCESS || n != 1 ||
             part[1].sm.smCount < 8)
        why = "the SMs could not be split";
    for (int i = 0; i < 2 && !why; i++) {
        CUdevResourceDesc desc;
        if (gen_desc(&desc, &part[i], 1) != CUDA_SUCCESS ||
            create(&g[i], desc, dev, CU_GREEN_CTX_DEFAULT_STREAM) != CUDA_SUCCESS ||
            gstream((CUstream *)&st[i], g[i], CU_STREAM_NON_BLOCKING, 0) != CUDA_SUCCESS)
            why = "a green context could not be created";
    }
    if (!why)
        for (int i = 0; i < CU_DSA_MAX_CHUNKS && !why; i++)
            if (cudaEventCreateWithFlags(&gr->ev_idx[i], cudaEventDisableTiming) != cudaSuccess)
                why = "cudaEventCreate failed";
    if (!why && cudaEventCreateWithFlags(&gr->ev_mla, cudaEventDisableTiming) != cudaSuccess)
        why = "cudaEventCreate failed";
    for (int i = 0; i < 2; i++) {
        gr->g[i] = g[i];
        gr->st[i] = st[i];
    }
    if (why) {
        log_warn(
            "cuda: DSA overlap off (%s, %d SMs asked for the indexer); indexer and MLA in turn",
            why, idx_sms);
        green_release(gr); /* remembered as failed for this idx_sms: g[0] stays NULL */
        return -1;
    }
    gr->sms[0] = (int)part[0].sm.smCount;
    gr->sms[1] = (int)part[1].sm.smCount;
    log_info("cuda: DSA overlap on %d + %d SMs (indexer, MLA)", gr->sms[0], gr->sms[1]);
    return 0;
}

/* rows [r0, r1) of m as a step of their own */
static struct dsv32_step_meta sub_meta(const struct dsv32_step_meta *m, int r0, int r1)
{
    struct dsv32_step_meta s = *m;
    s.n_rows = r1 - r0;
    s.d_row_pos += r0;
    s.h_row_pos += r0;
    s.d_row_seq += r0;
    s.h_row_seq += r0;
    if (s.d_row_slot)
        s.d_row_slot += r0;
    if (s.h_row_slot)
        s.h_row_slot += r0;
    if (s.d_row_mha)
        s.d_row_mha += r0;
    s.max_ctx = 0;
    s.n_mha_rows = 0;
    for (int r = r0; r < r1; r++) {
        if (m->h_row_pos[r] + 1 > s.max_ctx)
            s.max_ctx = m->h_row_pos[r] + 1;
        s.n_mha_rows += m->h_row_mha && m->h_row_mha[r];
    }
    return s;
}

int cu_dsa(struct cu_ctx *c, void *out, int32_t *sel, const uint8_t *q, const float *q_scale,
           const float *w_raw, int topk, const void *q_lat, const float *q_pe, int ldr_pe,
           int ldh_pe, const struct dsv32_kv_layer *kv, const struct dsv32_step_meta *m,
           float scale)
{
    const int T = m->n_rows, IH = c->cfg->index_n_heads, H = c->cfg->num_attention_heads;
    int C = c->dsa_chunks < CU_DSA_MAX_CHUNKS ? c->dsa_chunks : CU_DSA_MAX_CHUNKS;
    /* the plain path: the two ops on the whole GPU */
    auto in_turn = [&]() {
        const int r = cu_indexer(c, sel, q, q_scale, w_raw, kv, m, topk);
        /* the indexer's last kernel is the top-k (the MLA's Q comes from before it) */
        return r < 0 ? r
                     : cu_mla(c, out, q_lat, q_pe, ldr_pe, ldh_pe, sel, topk, kv, m, scale,
                              !c->idx_no_topk);
    };
    if (C < 2) /* the default: no per-row checks on every layer's call */
        return in_turn();
    /* overlap only where the indexer has keys to stream: every row's context beyond 4 selections */
    int deep = T >= 2 * C;
    for (int r = 0; r < T && deep; r++)
        deep = m->h_row_pos[r] + 1 >= 4 * topk;
    const int idx_sms = c->dsa_idx_sms > 0 ? c->dsa_idx_sms : c->n_sm / 2;
    if (!deep || !c->fast || !cu_mla_fast_ok(c) || idx_sms >= c->n_sm || green_get(c, idx_sms) < 0)
        return in_turn();
    struct cu_green *gr = c->green;
    /* chunk bounds: equal row counts, moved forward to the next sequence's first row */
    int b[CU_DSA_MAX_CHUNKS + 1];
    b[0] = 0;
    for (int i = 1; i < C; i++) {
        int e = (int)((int64_t)T * i / C);
        if (e < b[i - 1] + 1)
            e = b[i - 1] + 1;
        while (e < T && m->h_row_seq[e] == m->h_row_seq[e - 1])
            e++;
        b[i] = e < T ? e : T;
    }
    b[C] = T;
    while (C > 1 && b[C - 1] >= T) /* sequences longer than a chunk: fewer chunks */
        C--;
    b[C] = T;
    if (C < 2)
        return in_turn();
    c->dsa_overlapped++;
    const cudaStream_t main_st = c->st;
    const int main_sms = c->n_sm;
    int r = 0;
    /* chunk i's indexer (is_mla false) or MLA on stream st with sms SMs */
    auto chunk = [&](int i, bool is_mla, cudaStream_t st, int sms) {
        if (c->dsa_skip == (is_mla ? 1 : 2))
            return 0;
        const struct dsv32_step_meta s = sub_meta(m, b[i], b[i + 1]);
        /* the bytes of a row's latents */
        const size_t r0 = (size_t)b[i], lat = (size_t)H * c->geom.kv_lora * (c->lat16 ? 2 : 4);
        c->st = st;
        c->n_sm = sms;
        c->dsa_forked = 1;
        const int e = is_mla ? cu_mla(c, (char *)out + r0 * lat, (const char *)q_lat + r0 * lat,
                                      q_pe + r0 * ldr_pe, ldr_pe, ldh_pe, sel + r0 * topk, topk, kv,
                                      &s, scale, 0)
                             : cu_indexer(c, sel + r0 * topk, q + r0 * IH * 128, q_scale + r0 * IH,
                                          w_raw + r0 * IH, kv, &s, topk);
        c->st = main_st;
        c->n_sm = main_sms;
        c->dsa_forked = 0;
        return e;
    };
    /* The scratch the chunks share, sized before the fork for the largest chunk, so that no call
     * reallocates a buffer another stream is using (cu_scratch waits for c->st alone). */
    int max_rows = 0;
    for (int i = 0; i < C; i++)
        if (b[i + 1] - b[i] > max_rows)
            max_rows = b[i + 1] - b[i];
    {
        const size_t ld_s = (size_t)(m->max_ctx + 63) / 64 * 64,
                     blocks = (size_t)max_rows * ld_s / 64;
        /* a chunk's MLA splits its keys only when its CTAs (2 or more a row) are fewer than the
         * SMs, in n_sm / CTAs splits: splits x rows <= n_sm */
        const size_t part_rows = (size_t)c->n_sm;
        if (!cu_scratch(c, SCR_SCORES, sizeof(float) * (size_t)max_rows * ld_s) ||
            !cu_scratch(c, SCR_WORK, sizeof(int4) * (blocks / 2 + (size_t)max_rows + 2)) ||
            !cu_scratch(c, SCR_PART, sizeof(float) * part_rows * H * c->geom.kv_lora) ||
            !cu_scratch(c, SCR_TMP2, sizeof(float2) * part_rows * H))
            return -ENOMEM;
    }
    /* host-side order: each indexer's work-list upload waits for the previous one's copy (one
     * pinned staging buffer), so every MLA is queued before the next indexer's call */
    if ((r = chunk(0, false, main_st, main_sms)) < 0)
        return r;
    CU_CHECK(cudaEventRecord(gr->ev_idx[0], main_st));
    CU_CHECK(cudaStreamWaitEvent(gr->st[0], gr->ev_idx[0], 0));
    for (int i = 1; i < C; i++) {
        CU_CHECK(cudaStreamWaitEvent(gr->st[1], gr->ev_idx[i - 1], 0));
        if ((r = chunk(i - 1, true, gr->st[1], gr->sms[1])) < 0)
            return r;
        if ((r = chunk(i, false, gr->st[0], gr->sms[0])) < 0)
            return r;
        CU_CHECK(cudaEventRecord(gr->ev_idx[i], gr->st[0]));
    }
    CU_CHECK(cudaEventRecord(gr->ev_mla, gr->st[1]));
    CU_CHECK(cudaStreamWaitEvent(main_st, gr->ev_idx[C - 1], 0));
    CU_CHECK(cudaStreamWaitEvent(main_st, gr->ev_mla, 0));
    return chunk(C - 1, true, main_st, main_sms);
}
