/* dsv32ctl: the operator's command line. main.c parses the options into struct ctl_opts and calls
 * one command; conn.c finds the cluster (flags, a local cluster's state directory, environment)
 * and opens connections; nodes.c: status, nodes, drain, cordon, uncordon; placement.c: the EP
 * groups; cluster.c: a local cluster's up and down; generate.c: generate and chat. */
#ifndef DSV32_CTL_H
#define DSV32_CTL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "etcd.h"
#include "rpc.h"

/* The state directory of `cluster up --local` when --dir is not given (relative to the current
 * directory; git-ignored). */
#define CTL_DEFAULT_DIR ".dsv32-local"
#define CTL_LOCAL_CLUSTER "local"
#define CTL_LOCAL_GROUP "g0"

struct ctl_opts {
    /* where the cluster is */
    const char *router;     /* --router HOST:PORT */
    const char *etcd;       /* --etcd HOST:PORT */
    const char *cluster;    /* --cluster NAME */
    const char *token;      /* --admin-token */
    const char *token_file; /* --admin-token-file */
    const char *dir;        /* --dir STATE */
    bool json;
    int timeout_s;          /* --timeout: how long a command waits (0: its default) */
    /* commands */
    const char *reason;     /* cordon --reason */
    const char *kind;       /* drain/nodes --kind */
    const char *group;      /* placement --group */
    bool no_wait;           /* drain --no-wait */
    bool local;             /* cluster up --local */
    const char *model;      /* cluster up --model */
    int n_attn, n_experts;  /* cluster up --attn --experts */
    int watch_pid;          /* cluster up --watch-pid: down when that process ends (tests) */
    unsigned long long watch_start; /* (the watcher) its start time, /proc/<pid>/stat field 22 */
    const char *text;       /* generate --text */
    const char *system;     /* chat --system */
    bool thinking;          /* chat --thinking */
    int max_tokens;         /* 0: the command's default */
    bool has_temperature, has_seed;
    float temperature;
    uint64_t seed;
    char **args; /* what is left after the options */
    int n_args;
};

/* ---- conn.c ---- */

/* Where the cluster is, resolved from the flags, then the state directory (--dir, or the default
 * one when it holds a cluster and no --router/--etcd was given), then the environment. */
struct ctl_target {
    char router[128]; /* "" when unknown */
    char etcd[128];   /* "" when unknown */
    char cluster[64];
    char token[256];  /* "" when none */
    char dir[4096];   /* the state directory used ("" when none) */
};

/* Fills t; -EINVAL (after a message) when nothing says where the cluster is and `need` asks for
 * it: need_router, need_etcd as bits. */
#define CTL_NEED_ROUTER 1
#define CTL_NEED_ETCD 2
#define CTL_NEED_ANY 4
int ctl_target_resolve(const struct ctl_opts *o, unsigned need, struct ctl_target *t);
/* The state directory of the options (absolute; --dir or the default). */
void ctl_state_dir(const struct ctl_opts *o, char *buf, size_t cap);
/* Reads key=value lines of <dir>/cluster.env: 0 or -ENOENT. */
int ctl_state_read(const char *dir, const char *key, char *buf, size_t cap);

/* Clients: an Admin client carries the bearer token. */
int ctl_router_client(const struct ctl_target *t, bool admin, struct dsv32_rpc_client **ret);
int ctl_etcd_client(const struct ctl_target *t, struct dsv32_etcd **ret);
/* A unary call with a message; reports a failure on stderr (naming the method and what to do
 * about UNAUTHENTICATED and UNAVAILABLE) and returns <0 then. */
int ctl_call(struct dsv32_rpc_client *c, const struct ctl_target *t, const char *method,
             const ProtobufCMessage *req, const ProtobufCMessageDescriptor *resp_desc,
             int64_t timeout_ms, ProtobufCMessage **ret);

/* Prints the JSON text (cJSON's *) formatted on stdout and frees it. */
struct cJSON;
void ctl_print_json(struct cJSON *j);
/* "3s", "-" for < 0. */
const char *ctl_fmt_secs(int64_t s, char *buf, size_t cap);

/* ---- commands (each returns the process exit status) ---- */
int ctl_cmd_status(const struct ctl_opts *o);
int ctl_cmd_nodes(const struct ctl_opts *o);
int ctl_cmd_drain(const struct ctl_opts *o);
int ctl_cmd_cordon(const struct ctl_opts *o);
int ctl_cmd_uncordon(const struct ctl_opts *o);
int ctl_cmd_placement(const struct ctl_opts *o);
int ctl_cmd_cluster_up(const struct ctl_opts *o);
int ctl_cmd_cluster_down(const struct ctl_opts *o);
int ctl_cmd_cluster_watch(const struct ctl_opts *o); /* started by up --watch-pid */
int ctl_cmd_generate(const struct ctl_opts *o);
int ctl_cmd_chat(const struct ctl_opts *o);

#endif
