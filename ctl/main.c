/* dsv32ctl: command line and dispatch; the commands live in nodes.c, placement.c, cluster.c and
 * generate.c (see ctl.h). */
#include "ctl.h"

#include <getopt.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f)
{
    fprintf(f,
        "usage: dsv32ctl COMMAND [OPTIONS]\n"
        "\n"
        "cluster (where it is; by default the local cluster in ./" CTL_DEFAULT_DIR "):\n"
        "  --router HOST:PORT      the router (Admin calls, generation)\n"
        "  --admin-token T | --admin-token-file F   Admin bearer token (else $DSV32_ADMIN_TOKEN,\n"
        "                          else the local cluster's STATE/admin-token)\n"
        "  --etcd HOST:PORT --cluster NAME          read and act through etcd directly\n"
        "  --dir STATE             a local cluster's state directory\n"
        "  --json                  machine-readable output\n"
        "\n"
        "commands:\n"
        "  status                  nodes, roles, states, load, lease time left, EP groups\n"
        "  nodes [--kind K]        the nodes as the router sees them\n"
        "  drain ID [--kind K] [--no-wait] [--timeout S]\n"
        "                          no new work for ID; waits until what it runs has finished\n"
        "  cordon ID [--reason TEXT] | uncordon ID\n"
        "  placement [--group G]   EP groups: epoch, members with ranks, (layer, expert) -> shard\n"
        "  generate --text TEXT [--max-tokens N] [--temperature T] [--seed S]\n"
        "  chat [--thinking] [--system TEXT] [--max-tokens N] [--temperature T] [--seed S] MESSAGE\n"
        "                          streams the reply to stdout as it comes\n"
        "  cluster up --local [--model DIR] [--attn N] [--experts M] [--dir STATE] [--timeout S]\n"
        "             [--watch-pid PID]\n"
        "                          etcd, dsv32-router, N dsv32-attn, M dsv32-expert on 127.0.0.1,\n"
        "                          in the background; prints the router's address. Without\n"
        "                          --model: a small random-weight model (meaningless text).\n"
        "                          --watch-pid: down by itself once that process ends (tests)\n"
        "  cluster down [--dir STATE]\n");
}

struct command {
    const char *name;
    int (*fn)(const struct ctl_opts *o);
};

static const struct command commands[] = {
    {"status", ctl_cmd_status},       {"nodes", ctl_cmd_nodes},
    {"drain", ctl_cmd_drain},         {"cordon", ctl_cmd_cordon},
    {"uncordon", ctl_cmd_uncordon},   {"placement", ctl_cmd_placement},
    {"generate", ctl_cmd_generate},   {"chat", ctl_cmd_chat},
    {"cluster up", ctl_cmd_cluster_up}, {"cluster down", ctl_cmd_cluster_down},
    {"cluster watch", ctl_cmd_cluster_watch},
};

static int parse_int(const char *s, const char *what, int lo, int hi, int *ret)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (!s[0] || *end || v < lo || v > hi) {
        fprintf(stderr, "dsv32ctl: %s: a number from %d to %d\n", what, lo, hi);
        return -1;
    }
    *ret = (int)v;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    struct ctl_opts o = {.n_experts = -1};
    static const struct option opts[] = {
        {"router", required_argument, 0, 'r'},     {"etcd", required_argument, 0, 'e'},
        {"cluster", required_argument, 0, 'c'},    {"admin-token", required_argument, 0, 't'},
        {"admin-token-file", required_argument, 0, 'T'}, {"dir", required_argument, 0, 'd'},
        {"json", no_argument, 0, 'j'},             {"timeout", required_argument, 0, 1},
        {"reason", required_argument, 0, 2},       {"kind", required_argument, 0, 3},
        {"group", required_argument, 0, 4},        {"no-wait", no_argument, 0, 5},
        {"local", no_argument, 0, 6},              {"model", required_argument, 0, 7},
        {"attn", required_argument, 0, 8},         {"experts", required_argument, 0, 9},
        {"text", required_argument, 0, 10},        {"system", required_argument, 0, 11},
        {"thinking", no_argument, 0, 12},          {"max-tokens", required_argument, 0, 13},
        {"temperature", required_argument, 0, 14}, {"seed", required_argument, 0, 15},
        {"watch-pid", required_argument, 0, 16},   {"watch-start", required_argument, 0, 17},
        {"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
    int c;
    /* options go anywhere (getopt permutes): the command is the first words left */
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case 'r': o.router = optarg; break;
        case 'e': o.etcd = optarg; break;
        case 'c': o.cluster = optarg; break;
        case 't': o.token = optarg; break;
        case 'T': o.token_file = optarg; break;
        case 'd': o.dir = optarg; break;
        case 'j': o.json = true; break;
        case 1:
            if (parse_int(optarg, "--timeout", 1, 86400, &o.timeout_s) < 0)
                return 2;
            break;
        case 2: o.reason = optarg; break;
        case 3: o.kind = optarg; break;
        case 4: o.group = optarg; break;
        case 5: o.no_wait = true; break;
        case 6: o.local = true; break;
        case 7: o.model = optarg; break;
        case 8:
            if (parse_int(optarg, "--attn", 1, 1000, &o.n_attn) < 0)
                return 2;
            break;
        case 9:
            if (parse_int(optarg, "--experts", 0, 1000, &o.n_experts) < 0)
                return 2;
            break;
        case 10: o.text = optarg; break;
        case 11: o.system = optarg; break;
        case 12: o.thinking = true; break;
        case 13:
            if (parse_int(optarg, "--max-tokens", 1, 1 << 24, &o.max_tokens) < 0)
                return 2;
            break;
        case 14: {
            char *end;
            o.temperature = strtof(optarg, &end);
            if (!optarg[0] || *end) {
                fprintf(stderr, "dsv32ctl: --temperature: a number (0: greedy)\n");
                return 2;
            }
            o.has_temperature = true;
            break;
        }
        case 15: {
            char *end;
            o.seed = strtoull(optarg, &end, 10);
            if (!optarg[0] || *end) {
                fprintf(stderr, "dsv32ctl: --seed: a number\n");
                return 2;
            }
            o.has_seed = true;
            break;
        }
        case 16:
            if (parse_int(optarg, "--watch-pid", 1, 1 << 30, &o.watch_pid) < 0)
                return 2;
            break;
        case 17: {
            char *end;
            o.watch_start = strtoull(optarg, &end, 10);
            if (!optarg[0] || *end)
                return 2;
            break;
        }
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    char **rest = argv + optind;
    int n_rest = argc - optind;
    if (n_rest < 1) {
        usage(stderr);
        return 2;
    }
    /* the command: one word, or "cluster up|down" */
    char name[32];
    int words = 1;
    snprintf(name, sizeof(name), "%.31s", rest[0]);
    if (!strcmp(rest[0], "cluster") && n_rest > 1) {
        snprintf(name, sizeof(name), "cluster %.20s", rest[1]);
        words = 2;
    }
    const struct command *cmd = NULL;
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (!strcmp(commands[i].name, name))
            cmd = &commands[i];
    if (!cmd) {
        fprintf(stderr, "dsv32ctl: unknown command '%s'\n\n", name);
        usage(stderr);
        return 2;
    }
    o.args = rest + words;
    o.n_args = n_rest - words;
    signal(SIGPIPE, SIG_IGN); /* `dsv32ctl chat ... | head` ends with a write error, not a signal */
    return cmd->fn(&o);
}
