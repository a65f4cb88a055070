/* dsv32-attn: command line and signals; the daemon itself is attn.c. */
#include "attn.h"

#include "error.h"
#include "log.h"

#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile int stop_flag;

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: dsv32-attn --model DIR [--listen HOST:PORT] [--id ID] [--role both|prefill|decode]\n"
            "                  [--backend cpu|cuda] [--gpu N] [--max-seqs N] [--max-batch-tokens N]\n"
            "                  [--max-seq-len N] [--kv-blocks N] [--max-queue N] [--tokenizer DIR]\n"
            "                  [--port-file PATH] [--etcd HOST:PORT --cluster NAME [--lease-ttl S]\n"
            "                  [--advertise HOST:PORT] [--ep-group G [--comm-host HOST]\n"
            "                  [--ep-timeout-ms N] [--ep-stats FILE] [--ep-wire f32|bf16]]]\n"
            "                  [--cpu-threads N] [--stats-interval S (10; 0: off)]\n"
            "                  [--metrics-listen HOST:PORT [--metrics-port-file PATH]]\n"
            "                  [--log-level error|warn|info|debug]\n");
}

int main(int argc, char **argv)
{
    struct attn_config cfg = {.listen = "127.0.0.1:0", .id = "attn-0", .role = "both",
                              .backend = "cpu", .gpu = -1, .cluster = "default",
                              .lease_ttl_s = 5, .stats_interval_s = 10};
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},        {"listen", required_argument, 0, 'l'},
        {"id", required_argument, 0, 'i'},           {"role", required_argument, 0, 'r'},
        {"backend", required_argument, 0, 'b'},      {"gpu", required_argument, 0, 'g'},
        {"max-seqs", required_argument, 0, 1},       {"max-batch-tokens", required_argument, 0, 2},
        {"max-seq-len", required_argument, 0, 3},    {"kv-blocks", required_argument, 0, 4},
        {"max-queue", required_argument, 0, 5},      {"tokenizer", required_argument, 0, 6},
        {"port-file", required_argument, 0, 7},      {"etcd", required_argument, 0, 8},
        {"cluster", required_argument, 0, 9},        {"lease-ttl", required_argument, 0, 10},
        {"advertise", required_argument, 0, 11},     {"log-level", required_argument, 0, 12},
        {"ep-group", required_argument, 0, 13},      {"comm-host", required_argument, 0, 14},
        {"ep-timeout-ms", required_argument, 0, 15}, {"cpu-threads", required_argument, 0, 16},
        {"ep-stats", required_argument, 0, 17},      {"ep-wire", required_argument, 0, 18},
        {"stats-interval", required_argument, 0, 19},
        {"metrics-listen", required_argument, 0, 20}, {"metrics-port-file", required_argument, 0, 21},
        {"help", no_argument, 0, 'h'},               {0, 0, 0, 0}};
    int c;
    dsv32_log_set_ident("dsv32-attn");
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': cfg.model_dir = optarg; break;
        case 'l': cfg.listen = optarg; break;
        case 'i': cfg.id = optarg; break;
        case 'r': cfg.role = optarg; break;
        case 'b': cfg.backend = optarg; break;
        case 'g': cfg.gpu = atoi(optarg); break;
        case 1: cfg.max_seqs = atoi(optarg); break;
        case 2: cfg.max_batch_tokens = atoi(optarg); break;
        case 3: cfg.max_seq_len = atoi(optarg); break;
        case 4: cfg.kv_blocks = atoi(optarg); break;
        case 5: cfg.max_queue = atoi(optarg); break;
        case 6: cfg.tokenizer_dir = optarg; break;
        case 7: cfg.port_file = optarg; break;
        case 8: cfg.etcd = optarg; break;
        case 9: cfg.cluster = optarg; break;
        case 10: cfg.lease_ttl_s = atoi(optarg); break;
        case 11: cfg.advertise = optarg; break;
        case 12: {
            enum dsv32_log_level l;
            if (dsv32_log_parse_level(optarg, &l) < 0) {
                fprintf(stderr, "dsv32-attn: --log-level: error, warn, info or debug\n");
                return 2;
            }
            dsv32_log_set_level(l);
            break;
        }
        case 13: cfg.ep_group = optarg; break;
        case 14: cfg.comm_host = optarg; break;
        case 15: cfg.ep_timeout_ms = atoi(optarg); break;
        case 16: cfg.cpu_threads = atoi(optarg); break;
        case 17: cfg.ep_stats = optarg; break;
        case 18:
            if (strcmp(optarg, "f32") && strcmp(optarg, "bf16")) {
                fprintf(stderr, "dsv32-attn: --ep-wire: f32 or bf16\n");
                return 2;
            }
            cfg.ep_wire_bf16 = strcmp(optarg, "bf16") == 0;
            break;
        case 19: cfg.stats_interval_s = atoi(optarg); break;
        case 20: cfg.metrics_listen = optarg; break;
        case 21: cfg.metrics_port_file = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (cfg.ep_stats && !cfg.ep_group) {
        fprintf(stderr, "dsv32-attn: --ep-stats needs --ep-group\n");
        return 2;
    }
    if (!cfg.model_dir || optind != argc || (strcmp(cfg.role, "both") && strcmp(cfg.role, "prefill") &&
                                             strcmp(cfg.role, "decode"))) {
        usage(stderr);
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    struct attn *a;
    int r = attn_new(&cfg, &a);
    if (r < 0) {
        fprintf(stderr, "dsv32-attn: cannot start: %s\n", dsv32_strerror(r));
        return 1;
    }
    r = attn_run(a, &stop_flag);
    attn_free(a);
    return r < 0 ? 1 : 0;
}
