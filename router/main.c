/* dsv32-router: command line and signals; the router itself is router.c and generate.c. */
#include "router.h"

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
    fprintf(f, "usage: dsv32-router --model DIR --etcd HOST:PORT [--cluster NAME] [--id ID]\n"
               "                    [--listen HOST:PORT] [--admin-token TOKEN | --admin-token-file F]\n"
               "                    [--admin-allow-remote] [--max-inflight N] [--max-attempts N]\n"
               "                    [--daemon-timeout-ms N] [--metrics-listen HOST:PORT\n"
               "                     [--metrics-port-file PATH]]\n"
               "                    [--context N] [--tokenizer DIR] [--port-file PATH]\n"
               "                    [--lease-ttl S] [--log-level error|warn|info|debug]\n"
               "                    [--ep-group G [--ep-transport tcp|nccl] [--ep-redundant N]\n"
               "                     [--ep-load STATS[,STATS...]]]\n");
}

int main(int argc, char **argv)
{
    struct router_config cfg = {.listen = "127.0.0.1:50051", .cluster = "default", .id = "router-0",
                                .lease_ttl_s = 5};
    static const struct option opts[] = {
        {"model", required_argument, 0, 'm'},      {"etcd", required_argument, 0, 'e'},
        {"cluster", required_argument, 0, 'c'},    {"id", required_argument, 0, 'i'},
        {"listen", required_argument, 0, 'l'},     {"admin-token", required_argument, 0, 1},
        {"admin-token-file", required_argument, 0, 2}, {"admin-allow-remote", no_argument, 0, 3},
        {"max-inflight", required_argument, 0, 4}, {"max-attempts", required_argument, 0, 5},
        {"context", required_argument, 0, 6},      {"tokenizer", required_argument, 0, 7},
        {"port-file", required_argument, 0, 8},    {"lease-ttl", required_argument, 0, 9},
        {"log-level", required_argument, 0, 10},   {"model-name", required_argument, 0, 11},
        {"ep-group", required_argument, 0, 12},    {"ep-transport", required_argument, 0, 13},
        {"ep-redundant", required_argument, 0, 14}, {"ep-load", required_argument, 0, 15},
        {"daemon-timeout-ms", required_argument, 0, 16},
        {"metrics-listen", required_argument, 0, 17}, {"metrics-port-file", required_argument, 0, 18},
        {"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
    static char token_buf[256];
    int c;
    dsv32_log_set_ident("dsv32-router");
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'm': cfg.model_dir = optarg; break;
        case 'e': cfg.etcd = optarg; break;
        case 'c': cfg.cluster = optarg; break;
        case 'i': cfg.id = optarg; break;
        case 'l': cfg.listen = optarg; break;
        case 1: cfg.admin_token = optarg; break;
        case 2: {
            FILE *f = fopen(optarg, "r");
            if (!f || !fgets(token_buf, sizeof(token_buf), f)) {
                fprintf(stderr, "dsv32-router: cannot read %s\n", optarg);
                return 2;
            }
            fclose(f);
            token_buf[strcspn(token_buf, "\r\n")] = 0;
            cfg.admin_token = token_buf;
            break;
        }
        case 3: cfg.admin_allow_remote = 1; break;
        case 4: cfg.max_inflight = atoi(optarg); break;
        case 5: cfg.max_attempts = atoi(optarg); break;
        case 6: cfg.context = atoi(optarg); break;
        case 7: cfg.tokenizer_dir = optarg; break;
        case 8: cfg.port_file = optarg; break;
        case 9: cfg.lease_ttl_s = atoi(optarg); break;
        case 10: {
            enum dsv32_log_level l;
            if (dsv32_log_parse_level(optarg, &l) < 0) {
                fprintf(stderr, "dsv32-router: --log-level: error, warn, info or debug\n");
                return 2;
            }
            dsv32_log_set_level(l);
            break;
        }
        case 11: cfg.model_name = optarg; break;
        case 12: cfg.ep_group = optarg; break;
        case 13:
            if (strcmp(optarg, "tcp") && strcmp(optarg, "nccl")) {
                fprintf(stderr, "dsv32-router: --ep-transport is tcp or nccl\n");
                return 2;
            }
            cfg.ep_transport = optarg;
            break;
        case 14: cfg.ep_redundant = atoi(optarg); break;
        case 15: cfg.ep_load = optarg; break;
        case 16: cfg.daemon_timeout_ms = atoi(optarg); break;
        case 17: cfg.metrics_listen = optarg; break;
        case 18: cfg.metrics_port_file = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (!cfg.model_dir || !cfg.etcd || optind != argc) {
        usage(stderr);
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    struct router *r;
    int rc = router_new(&cfg, &r);
    if (rc < 0) {
        fprintf(stderr, "dsv32-router: cannot start: %s\n", dsv32_strerror(rc));
        return 1;
    }
    rc = router_run(r, &stop_flag);
    router_free(r);
    return rc < 0 ? 1 : 0;
}
