/* The engine path of expert parallelism, with real processes over tcp on 127.0.0.1: the golden
 * cases run on attention processes whose routed experts live in expert-shard processes (each
 * loading only the experts its placement gives it) must equal the single-process engine: the
 * same indexer selections and logits within 1e-5 relative. Groups of 1 attention + 2 shards and
 * 2 attention + 3 shards (the latter with redundant copies of hot experts), on both tiny models.
 * Also: a shard killed mid-run makes every attention process fail its step (not hang). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "comm.h"
#include "engine.h"
#include "ep.h"
#include "error.h"
#include "safetensors.h"

#define MAX_CASES 3
#define MAX_STEPS 8
#define MAX_LAYERS 4
#define TOPK 16
#define VOCAB 1024

struct ref {
    int n_cases, steps[MAX_CASES], plen[MAX_CASES];
    int32_t prompt[MAX_CASES][64], tokens[MAX_CASES][MAX_STEPS];
    float logits[MAX_CASES][MAX_STEPS][VOCAB];
    int32_t sel[MAX_CASES][MAX_STEPS][MAX_LAYERS][TOPK];
};

static struct ref ref; /* computed before fork, inherited by every process */

struct cap {
    int32_t sel[MAX_LAYERS][TOPK];
    struct dsv32_ep_client *cl; /* NULL: experts in this process */
};

static void on_sel(void *ctx, int layer, const int32_t *sel, int rows, int topk)
{
    struct cap *c = ctx;
    memcpy(c->sel[layer], sel + (size_t)(rows - 1) * topk, sizeof(int32_t) * TOPK);
}

static int on_moe(void *ctx, int layer, float *y, const float *x, int rows, const int32_t *ids,
                  const float *w, int k)
{
    struct cap *c = ctx;
    return dsv32_ep_moe_routed(c->cl, layer, y, x, rows, ids, w, k);
}

static const struct dsv32_st_tensor *gt(struct dsv32_st_file *f, const char *name)
{
    for (int i = 0; i < dsv32_st_file_count(f); i++)
        if (strcmp(dsv32_st_file_tensor(f, i)->name, name) == 0)
            return dsv32_st_file_tensor(f, i);
    return NULL;
}

/* DSV32_TEST_BACKEND=cuda runs the same checks on the cuda backend */
static const char *backend_name(void)
{
    const char *b = getenv("DSV32_TEST_BACKEND");
    return b ? b : "cpu";
}

static struct dsv32_engine_opts eng_opts = {.max_seqs = 4, .max_seq_len = 128, .kv_rope_f32 = 1,
                                            .max_batch_tokens = 128};

/* One case, teacher-forced, with optional hooks; logits and selections of every row. */
static int run_case(struct dsv32_engine *e, int c, struct dsv32_ep_client *cl,
                    float (*logits)[VOCAB], int32_t (*sel)[MAX_LAYERS][TOPK])
{
    struct cap cap = {.cl = cl};
    struct dsv32_step_hooks h = {.ctx = &cap, .selection = on_sel, .moe_routed = cl ? on_moe : NULL};
    int seq = dsv32_kv_seq_new(e->kv), r = 0;
    if (seq < 0)
        return seq;
    for (int s = 0; s < ref.steps[c] && r == 0; s++) {
        struct dsv32_seq_input in = {.seq = seq, .logits = DSV32_LOGITS_LAST,
                                     .n_tokens = s == 0 ? ref.plen[c] : 1,
                                     .tokens = s == 0 ? ref.prompt[c] : &ref.tokens[c][s - 1]};
        r = dsv32_engine_step(e, &in, 1, logits[s], &h);
        memcpy(sel[s], cap.sel, sizeof(cap.sel));
    }
    dsv32_kv_seq_free(e->kv, seq);
    return r;
}

static void compute_reference(const char *model)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/golden.safetensors", model);
    struct dsv32_st_file *g;
    assert_int_equal(dsv32_st_file_open(path, &g), 0);
    memset(&ref, 0, sizeof(ref));
    for (int c = 0; c < MAX_CASES; c++) {
        char name[64];
        snprintf(name, sizeof(name), "case%d.prompt", c);
        const struct dsv32_st_tensor *t = gt(g, name);
        if (!t)
            break;
        ref.plen[c] = (int)t->numel;
        memcpy(ref.prompt[c], t->data, t->n_bytes);
        snprintf(name, sizeof(name), "case%d.tokens", c);
        t = gt(g, name);
        ref.steps[c] = (int)t->numel;
        memcpy(ref.tokens[c], t->data, t->n_bytes);
        ref.n_cases++;
    }
    dsv32_st_file_close(g);
    /* in a child process: CUDA must not be initialized in a process that forks afterwards */
    struct ref *shared = mmap(NULL, sizeof(ref), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert_true(shared != MAP_FAILED);
    memcpy(shared, &ref, sizeof(ref));
    pid_t pid = fork();
    if (pid == 0) {
        struct dsv32_model *m;
        struct dsv32_engine *e;
        struct dsv32_engine_opts eo = eng_opts;
        eo.backend = backend_name();
        if (dsv32_model_load(model, NULL, &m) < 0 || dsv32_engine_new(m, &eo, &e) < 0)
            _exit(1);
        for (int c = 0; c < shared->n_cases; c++)
            if (run_case(e, c, NULL, shared->logits[c], shared->sel[c]) < 0)
                _exit(2);
        dsv32_engine_free(e);
        dsv32_model_free(m);
        _exit(0);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    memcpy(&ref, shared, sizeof(ref));
    munmap(shared, sizeof(ref));
}

struct group {
    const char *model;
    int n_attn, n_shards, redundant;
    int nccl;                 /* transport: tcp, or nccl (one GPU per process) */
    int id_pipe[16][2];       /* nccl: the unique id, from rank 0 through the parent */
    struct dsv32_comm_listener *lis[16];
    char addr[16][32];
    const char *addrs[16];
    struct dsv32_placement pl;
    int kill_shard; /* >= 0: this shard dies after its first step */
    int bf16;       /* bf16 activations on the wire: within bf16 rounding, selections may move */
    double bf16_tol; /* the logits' rel error allowed then (rows whose selections did not move) */
    /* every member's backend without rows_pack/rows_unpack: the rows go through host memory
     * (the way of a GPU backend on tcp or on nccl with host buffers), not packed in place */
    int rows_via_host;
};

/* The backend's ops without the in-place packing (group.rows_via_host). */
static void drop_rows_ops(struct dsv32_backend *be)
{
    static struct dsv32_backend_ops ops;
    ops = *be->ops;
    ops.rows_pack = NULL;
    ops.rows_unpack = NULL;
    be->ops = &ops;
}

struct want_ctx {
    const struct dsv32_placement *pl;
    int shard;
};

static int want(void *vctx, int layer, int expert)
{
    struct want_ctx *w = vctx;
    return dsv32_placement_has(w->pl, w->shard, layer, expert);
}

/* The group's communicator for this rank: tcp over the listeners, or nccl on GPU `rank` with the
 * unique id made by rank 0 and passed on by the parent, taking device blocks where the backend
 * packs them there (as the daemons choose). */
static int make_comm(struct group *G, int rank, const struct dsv32_backend *be,
                     struct dsv32_comm **c)
{
    const int world = G->n_attn + G->n_shards;
    if (!G->nccl)
        return dsv32_comm_tcp_new(G->lis[rank], rank, world, G->addrs, 1, 20000, c);
    uint8_t id[DSV32_NCCL_ID_BYTES];
    if (rank == 0) {
        if (dsv32_comm_nccl_unique_id(id) < 0 ||
            write(G->id_pipe[0][1], id, sizeof(id)) != (ssize_t)sizeof(id))
            return -EIO;
    } else if (read(G->id_pipe[rank][0], id, sizeof(id)) != (ssize_t)sizeof(id)) {
        return -EIO;
    }
    return dsv32_comm_nccl_new(id, rank, world, rank, 1, 60000,
                               dsv32_ep_device_blocks(be) ? 0 : DSV32_COMM_NCCL_HOST_BUFFERS, c);
}

static int shard_main(struct group *G, int shard)
{
    const int rank = G->n_attn + shard, world = G->n_attn + G->n_shards;
    struct want_ctx wc = {&G->pl, shard};
    struct dsv32_load_opts lo = {.skip_attention = 1, .want_expert = want, .want_ctx = &wc};
    struct dsv32_model *m;
    if (dsv32_model_load(G->model, &lo, &m) < 0)
        return 10;
    /* only its experts: 3 tensors each */
    int mine = 0;
    for (int l = 1; l < MAX_LAYERS; l++)
        for (int e = 0; e < m->cfg.n_routed_experts; e++)
            mine += dsv32_placement_has(&G->pl, shard, l, e);
    if (m->n_weights_loaded != 3 * mine)
        return 11;
    struct dsv32_kv_geom geom;
    dsv32_kv_geom_init(&geom, &m->cfg, 1);
    struct dsv32_backend *be;
    /* nccl: the backend on the communicator's GPU (the blocks are its memory) */
    if (dsv32_backend_new(backend_name(), &m->cfg, &geom, G->nccl ? rank : 0, &be) < 0 ||
        dsv32_model_prepare(m, be) < 0)
        return 12;
    const struct dsv32_backend_ops *real_ops = be->ops;
    if (G->rows_via_host)
        drop_rows_ops(be);
    struct dsv32_comm *c;
    (void)world;
    if (make_comm(G, rank, be, &c) < 0)
        return 13;
    struct dsv32_ep_server *s;
    if (dsv32_ep_server_new(c, G->n_attn, shard, &G->pl, m, be, G->nccl ? 8000 : 20000, &s) < 0)
        return 14;
    int steps = 0, r;
    while ((r = dsv32_ep_server_step(s)) >= 0) {
        steps += r;
        if (G->kill_shard == shard && steps >= 2)
            raise(SIGKILL);
    }
    /* the attention processes hang up when they are done: that ends the loop */
    dsv32_ep_server_free(s);
    dsv32_comm_free(c);
    be->ops = real_ops;
    dsv32_model_release(m, be);
    dsv32_backend_free(be);
    dsv32_model_free(m);
    /* tcp sees the hang-up as EOF; nccl cannot tell a peer that left from a slow one and ends
     * at the deadline */
    return (r == DSV32_EPEER || (G->nccl && r == DSV32_ETIMEOUT)) && steps > 0 ? 0 : 15;
}

/* The routed load the client reports adds up: its pairs per shard are the pairs of the experts
 * each shard holds (only exact without replicas: a replicated expert's pairs are split), the
 * per-expert record reads back through dsv32_ep_load_add_json with the same total. */
static int check_stats(const struct dsv32_ep_client *cl, const struct dsv32_config *cfg,
                       const struct dsv32_placement *pl)
{
    char *js = dsv32_ep_client_stats_json(cl);
    const size_t LE = (size_t)cfg->num_hidden_layers * cfg->n_routed_experts;
    double *load = calloc(LE, sizeof(double));
    int ok = js && load && dsv32_ep_load_add_json(js, cfg, load) == 0;
    double total = 0, per_shard[16] = {0};
    for (int l = 0; ok && l < cfg->num_hidden_layers; l++)
        for (int e = 0; e < cfg->n_routed_experts; e++) {
            double v = load[(size_t)l * cfg->n_routed_experts + e];
            total += v;
            if (v > 0 && !dsv32_config_is_moe_layer(cfg, l))
                ok = 0;
            if (pl->max_replicas == 1 && v > 0)
                per_shard[dsv32_placement_owners(pl, l, e)[0]] += v;
        }
    /* shard_pairs from the text itself */
    const char *sp = js ? strstr(js, "\"shard_pairs\":[") : NULL;
    double sum = 0;
    for (int s = 0; ok && sp && s < pl->n_shards; s++) {
        sp += strcspn(sp, "0123456789");
        double v = strtod(sp, (char **)&sp);
        sum += v;
        if (pl->max_replicas == 1 && v != per_shard[s])
            ok = 0;
    }
    if (!sp || total <= 0 || sum != total)
        ok = 0;
    if (!ok)
        fprintf(stderr, "EP stats do not add up: %.0f pairs by expert, %.0f by shard: %s\n",
                total, sum, js ? js : "(null)");
    free(js);
    free(load);
    return ok ? 0 : -1;
}

static int attn_main(struct group *G, int a)
{
    const int world = G->n_attn + G->n_shards;
    struct dsv32_load_opts lo = {.skip_experts = 1};
    struct dsv32_model *m;
    struct dsv32_engine *e;
    struct dsv32_engine_opts eo = eng_opts;
    eo.backend = backend_name();
    eo.gpu = G->nccl ? a : 0; /* the communicator's GPU */
    if (dsv32_model_load(G->model, &lo, &m) < 0 || dsv32_engine_new(m, &eo, &e) < 0)
        return 20;
    const struct dsv32_backend_ops *real_ops = e->be->ops;
    if (G->rows_via_host)
        drop_rows_ops(e->be);
    struct dsv32_comm *c;
    (void)world;
    if (make_comm(G, a, e->be, &c) < 0)
        return 21;
    struct dsv32_ep_client *cl;
    if (dsv32_ep_client_new(c, G->n_attn, &G->pl, &m->cfg, e->be,
                            G->bf16 ? DSV32_EP_WIRE_BF16 : DSV32_EP_WIRE_F32, 20000, &cl) < 0)
        return 22;
    static float logits[MAX_STEPS][VOCAB];
    static int32_t sel[MAX_STEPS][MAX_LAYERS][TOPK];
    int status = 0, rows_bf16 = 0, moved_bf16 = 0;
    for (int c2 = a; c2 < ref.n_cases && status == 0; c2 += G->n_attn) {
        int r = run_case(e, c2, cl, logits, sel);
        if (r < 0) {
            status = (r == DSV32_EPEER || r == DSV32_ETIMEOUT) ? 30 : 23;
            break;
        }
        for (int s = 0; s < ref.steps[c2]; s++) {
            double num = 0, den = 0;
            for (int v = 0; v < VOCAB; v++) {
                double d = (double)logits[s][v] - ref.logits[c2][s][v];
                num += d * d;
                den += (double)ref.logits[c2][s][v] * ref.logits[c2][s][v];
            }
            const int moved = memcmp(sel[s], ref.sel[c2][s], sizeof(sel[s])) != 0;
            const double rel = sqrt(num / den);
            if (G->bf16 && getenv("DSV32_TEST_VERBOSE"))
                fprintf(stderr, "bf16 wire: attn %d case %d row %d: rel %.3e%s\n", a, c2, s, rel,
                        moved ? " (selections moved)" : "");
            if (G->bf16) {
                /* bf16 rounding may move a near-tie indexer selection, and a moved selection
                 * moves the logits of a tiny model a lot: those rows are counted, not bounded */
                rows_bf16++;
                moved_bf16 += moved;
                if (!moved && rel > G->bf16_tol) {
                    fprintf(stderr, "attn %d case %d row %d: rel %.3e (bf16 wire)\n", a, c2, s, rel);
                    status = 24;
                }
                continue;
            }
            if (moved) {
                fprintf(stderr, "attn %d case %d row %d: selections differ\n", a, c2, s);
                status = 27;
            }
            if (rel > 1e-5) {
                fprintf(stderr, "attn %d case %d row %d: rel %.3e\n", a, c2, s, rel);
                status = 24;
            }
        }
    }
    if (status == 0 && G->bf16 && (rows_bf16 == 0 || moved_bf16 * 4 > rows_bf16)) {
        fprintf(stderr, "bf16 wire: selections moved in %d of %d rows\n", moved_bf16, rows_bf16);
        status = 27;
    }
    /* wait for the others: idle steps until the whole group is idle */
    while (status == 0) {
        int r = dsv32_ep_client_idle_step(cl);
        if (r == 0)
            break;
        if (r < 0)
            status = 25;
    }
    struct dsv32_ep_stats st;
    dsv32_ep_client_get_stats(cl, &st);
    if (status == 0 && st.steps == 0)
        status = 26;
    if (status == 0 && (st.moe_calls == 0 || check_stats(cl, &m->cfg, &G->pl) < 0))
        status = 28;
    dsv32_ep_client_free(cl);
    dsv32_comm_free(c);
    e->be->ops = real_ops;
    dsv32_engine_free(e);
    dsv32_model_free(m);
    return status;
}

static void run_group(struct group *G, const int *want_status)
{
    const int world = G->n_attn + G->n_shards;
    for (int r = 0; G->nccl && r < world; r++)
        assert_int_equal(pipe(G->id_pipe[r]), 0);
    for (int r = 0; r < world; r++) {
        int port;
        assert_int_equal(dsv32_comm_tcp_listen("127.0.0.1", 0, &G->lis[r], &port), 0);
        snprintf(G->addr[r], sizeof(G->addr[r]), "127.0.0.1:%d", port);
        G->addrs[r] = G->addr[r];
    }
    struct dsv32_config cfg;
    assert_int_equal(dsv32_config_load(G->model, &cfg), 0);
    assert_int_equal(dsv32_placement_build(&cfg, G->n_shards, G->redundant, NULL, &G->pl), 0);
    pid_t pids[16];
    for (int r = 0; r < world; r++) {
        pids[r] = fork();
        if (pids[r] == 0) {
            for (int q = 0; q < world; q++)
                if (q != r)
                    dsv32_comm_tcp_listener_free(G->lis[q]);
            alarm(120); /* never outlive a stuck test */
            _exit(r < G->n_attn ? attn_main(G, r) : shard_main(G, r - G->n_attn));
        }
    }
    if (G->nccl) {
        /* relay rank 0's unique id to the others */
        uint8_t id[DSV32_NCCL_ID_BYTES];
        if (read(G->id_pipe[0][0], id, sizeof(id)) == (ssize_t)sizeof(id))
            for (int r = 1; r < world; r++)
                if (write(G->id_pipe[r][1], id, sizeof(id)) != (ssize_t)sizeof(id))
                    break;
        for (int r = 0; r < world; r++) {
            close(G->id_pipe[r][0]);
            close(G->id_pipe[r][1]);
        }
    }
    for (int r = 0; r < world; r++) {
        int st;
        assert_int_equal(waitpid(pids[r], &st, 0), pids[r]);
        int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (code != want_status[r])
            fail_msg("rank %d exited with %d, expected %d", r, code, want_status[r]);
    }
    for (int r = 0; r < world; r++)
        dsv32_comm_tcp_listener_free(G->lis[r]);
    dsv32_placement_done(&G->pl);
}

static void test_placement(void **state)
{
    struct dsv32_config cfg;
    assert_int_equal(dsv32_config_load(GOLDEN_DIR "/tiny-fp8", &cfg), 0);
    struct dsv32_placement p, q;
    assert_int_equal(dsv32_placement_build(&cfg, 3, 2, NULL, &p), 0);
    for (int l = 1; l < 4; l++) {
        int per[3] = {0};
        for (int e = 0; e < 16; e++) {
            const int16_t *o = dsv32_placement_owners(&p, l, e);
            assert_true(o[0] >= 0 && o[0] < 3);
            per[o[0]]++;
        }
        for (int s = 0; s < 3; s++)
            assert_true(per[s] == 5 || per[s] == 6);
    }
    /* with a load profile: expert 7 is hot and gets a second copy elsewhere */
    double load[4 * 16];
    for (int i = 0; i < 64; i++)
        load[i] = 1.0;
    load[1 * 16 + 7] = 50.0;
    dsv32_placement_done(&p);
    assert_int_equal(dsv32_placement_build(&cfg, 3, 1, load, &p), 0);
    const int16_t *o = dsv32_placement_owners(&p, 1, 7);
    assert_true(o[1] >= 0 && o[1] != o[0]);
    char *js = dsv32_placement_to_json(&p);
    assert_int_equal(dsv32_placement_from_json(js, &q), 0);
    assert_memory_equal(p.owner, q.owner, sizeof(int16_t) * 4 * 16 * 2);
    assert_int_equal(dsv32_placement_from_json("{\"layers\": 1}", &q), DSV32_EFORMAT);
    /* a routed-load record: only one of this config's shape is read, and a bad one adds nothing */
    double acc[4 * 16] = {0};
    assert_int_equal(dsv32_ep_load_add_json("{\"expert_pairs\":[[],[1],[],[]]}", &cfg, acc),
                     DSV32_EFORMAT);
    assert_int_equal(dsv32_ep_load_add_json("not json", &cfg, acc), DSV32_EFORMAT);
    char rec[1024] = "{\"expert_pairs\":[[]";
    for (int l = 1; l < 4; l++) {
        strcat(rec, ",[");
        for (int e = 0; e < 16; e++)
            snprintf(rec + strlen(rec), sizeof(rec) - strlen(rec), "%s%d", e ? "," : "",
                     l == 2 && e == 3 ? -1 : l * 100 + e);
        strcat(rec, "]");
    }
    strcat(rec, "]}");
    assert_int_equal(dsv32_ep_load_add_json(rec, &cfg, acc), DSV32_EFORMAT); /* negative count */
    for (int i = 0; i < 64; i++)
        assert_true(acc[i] == 0.0);
    char *neg = strstr(rec, "-1");
    memcpy(neg, "23", 2);
    assert_int_equal(dsv32_ep_load_add_json(rec, &cfg, acc), 0);
    assert_int_equal(dsv32_ep_load_add_json(rec, &cfg, acc), 0);
    assert_true(acc[0] == 0.0 && acc[1 * 16 + 5] == 210.0 && acc[2 * 16 + 3] == 2 * 23.0 &&
                acc[3 * 16 + 15] == 2 * 315.0);
    free(js);
    dsv32_placement_done(&p);
    dsv32_placement_done(&q);
}

static void test_1x2(void **state)
{
    const char *models[] = {GOLDEN_DIR "/tiny-bf16", GOLDEN_DIR "/tiny-fp8"};
    for (int i = 0; i < 2; i++) {
        compute_reference(models[i]);
        struct group G = {.model = models[i], .n_attn = 1, .n_shards = 2, .kill_shard = -1};
        const int ok[3] = {0, 0, 0};
        run_group(&G, ok);
    }
}

static void test_2x3_redundant(void **state)
{
    const char *models[] = {GOLDEN_DIR "/tiny-bf16", GOLDEN_DIR "/tiny-fp8"};
    for (int i = 0; i < 2; i++) {
        compute_reference(models[i]);
        struct group G = {.model = models[i], .n_attn = 2, .n_shards = 3, .redundant = 2,
                          .kill_shard = -1};
        const int ok[5] = {0, 0, 0, 0, 0};
        run_group(&G, ok);
    }
}

/* bf16 on the wire (dsv32-attn --ep-wire bf16): the logits stay near the single-process
 * engine's. On tiny-bf16: 7.6e-3 to 8.1e-3 per row, no selection moved. Not on tiny-fp8: its
 * experts quantize their input to e4m3 per 1x128 block, a bf16-rounded input crosses about 1 in
 * 30 of those rounding boundaries, and that random model amplifies it (5e-2 to 7e-2 per row,
 * indexer selections moved in 15 of 22 rows), so it says nothing about the wire. A broken
 * conversion gives errors of order 1. */
static void test_1x2_bf16_wire(void **state)
{
    compute_reference(GOLDEN_DIR "/tiny-bf16");
    struct group G = {.model = GOLDEN_DIR "/tiny-bf16", .n_attn = 1, .n_shards = 2,
                      .kill_shard = -1, .bf16 = 1, .bf16_tol = 2e-2};
    const int ok[3] = {0, 0, 0};
    run_group(&G, ok);
}

/* The rows through host memory instead of packed in place by the backend (the way of a GPU
 * backend on tcp): the same results, f32 and bf16 on the wire. */
static void test_1x2_rows_via_host(void **state)
{
    compute_reference(GOLDEN_DIR "/tiny-bf16");
    struct group G = {.model = GOLDEN_DIR "/tiny-bf16",
                      .n_attn = 1,
                      .n_shards = 2,
                      .kill_shard = -1,
                      .rows_via_host = 1};
    const int ok[3] = {0, 0, 0};
    run_group(&G, ok);
    struct group B = {.model = GOLDEN_DIR "/tiny-bf16",
                      .n_attn = 1,
                      .n_shards = 2,
                      .kill_shard = -1,
                      .bf16 = 1,
                      .bf16_tol = 2e-2,
                      .rows_via_host = 1};
    run_group(&B, ok);
}

static void test_shard_dies(void **state)
{
    compute_reference(GOLDEN_DIR "/tiny-fp8");
    struct group G = {.model = GOLDEN_DIR "/tiny-fp8", .n_attn = 2, .n_shards = 2,
                      .kill_shard = 1};
    /* attention ranks fail their step with EPEER (status 30); shard 0 sees the others hang up */
    const int want[4] = {30, 30, 0, 128 + SIGKILL};
    run_group(&G, want);
}

/* nccl: one process per GPU; 1 attention + 1 shard on a 2-GPU machine. On the cuda backend
 * (DSV32_TEST_BACKEND=cuda) the blocks are device memory, packed in place; then also through
 * host buffers (rows_via_host) and with bf16 on the wire. */
static void test_nccl_1x1(void **state)
{
    const char *models[] = {GOLDEN_DIR "/tiny-bf16", GOLDEN_DIR "/tiny-fp8"};
    const int ok[2] = {0, 0};
    for (int i = 0; i < 2; i++) {
        compute_reference(models[i]);
        struct group G = {
            .model = models[i], .n_attn = 1, .n_shards = 1, .nccl = 1, .kill_shard = -1};
        run_group(&G, ok);
        if (i == 1)
            break;
        struct group H = {.model = models[i],
                          .n_attn = 1,
                          .n_shards = 1,
                          .nccl = 1,
                          .kill_shard = -1,
                          .rows_via_host = 1};
        run_group(&H, ok);
        struct group B = {.model = models[i],
                          .n_attn = 1,
                          .n_shards = 1,
                          .nccl = 1,
                          .kill_shard = -1,
                          .bf16 = 1,
                          .bf16_tol = 2e-2};
        run_group(&B, ok);
    }
}

/* Number of CUDA devices, asked in a child (the parent must not initialize CUDA). */
static int gpu_count(void)
{
    pid_t pid = fork();
    if (pid == 0) {
        int n = 0;
        if (dsv32_comm_nccl_devices(&n) < 0)
            _exit(0);
        _exit(n > 100 ? 100 : n);
    }
    int st;
    if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st))
        return 0;
    return WEXITSTATUS(st);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--nccl") == 0) {
        int n = gpu_count();
        if (n < 2) {
            printf("skipped: %d CUDA devices, the nccl test needs 2\n", n);
            return 77;
        }
        const struct CMUnitTest gpu_tests[] = {cmocka_unit_test(test_nccl_1x1)};
        return cmocka_run_group_tests(gpu_tests, NULL, NULL);
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_placement),         cmocka_unit_test(test_1x2),
        cmocka_unit_test(test_2x3_redundant),     cmocka_unit_test(test_1x2_bf16_wire),
        cmocka_unit_test(test_1x2_rows_via_host), cmocka_unit_test(test_shard_dies),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
