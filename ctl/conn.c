/* dsv32ctl: finding the cluster (flags, the local cluster's state directory, DSV32_ADMIN_TOKEN)
 * and talking to it: router clients with the admin token, etcd clients, calls that explain their
 * failures, and output helpers. */
#include "ctl.h"

#include "error.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

void ctl_state_dir(const struct ctl_opts *o, char *buf, size_t cap)
{
    const char *d = o->dir && o->dir[0] ? o->dir : CTL_DEFAULT_DIR;
    if (d[0] == '/') {
        snprintf(buf, cap, "%s", d);
        return;
    }
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof(cwd)))
        snprintf(cwd, sizeof(cwd), ".");
    snprintf(buf, cap, "%s/%s", cwd, d);
}

int ctl_state_read(const char *dir, const char *key, char *buf, size_t cap)
{
    char path[PATH_MAX + 16], line[4200];
    snprintf(path, sizeof(path), "%s/cluster.env", dir);
    FILE *f = fopen(path, "r");
    if (!f)
        return -ENOENT;
    size_t kl = strlen(key);
    int r = -ENOENT;
    while (fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (strncmp(line, key, kl) == 0 && line[kl] == '=') {
            snprintf(buf, cap, "%s", line + kl + 1);
            r = 0;
            break;
        }
    }
    fclose(f);
    return r;
}

static int read_token_file(const char *path, char *buf, size_t cap)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -errno;
    int r = fgets(buf, (int)cap, f) ? 0 : -EINVAL;
    fclose(f);
    buf[strcspn(buf, "\r\n")] = 0;
    return r;
}

int ctl_target_resolve(const struct ctl_opts *o, unsigned need, struct ctl_target *t)
{
    memset(t, 0, sizeof(*t));
    if (o->router)
        snprintf(t->router, sizeof(t->router), "%s", o->router);
    if (o->etcd)
        snprintf(t->etcd, sizeof(t->etcd), "%s", o->etcd);
    /* the state directory: when named, or when nothing else says where the cluster is */
    char dir[sizeof(t->dir)], v[256];
    ctl_state_dir(o, dir, sizeof(dir));
    bool use_state = (o->dir && o->dir[0]) || (!o->router && !o->etcd);
    if (use_state && ctl_state_read(dir, "cluster", v, sizeof(v)) == 0) {
        snprintf(t->dir, sizeof(t->dir), "%s", dir);
        if (!o->router)
            ctl_state_read(dir, "router", t->router, sizeof(t->router));
        if (!o->etcd)
            ctl_state_read(dir, "etcd", t->etcd, sizeof(t->etcd));
        if (!o->cluster)
            ctl_state_read(dir, "cluster", t->cluster, sizeof(t->cluster));
    } else if (o->dir && o->dir[0]) {
        fprintf(stderr, "dsv32ctl: no cluster is up in %s (dsv32ctl cluster up --local --dir %s)\n",
                dir, o->dir);
        return -ENOENT;
    }
    if (o->cluster)
        snprintf(t->cluster, sizeof(t->cluster), "%s", o->cluster);
    if (!t->cluster[0])
        snprintf(t->cluster, sizeof(t->cluster), "default");
    /* the admin token: flag, file, environment, then the local cluster's */
    const char *env = getenv("DSV32_ADMIN_TOKEN");
    if (o->token) {
        snprintf(t->token, sizeof(t->token), "%s", o->token);
    } else if (o->token_file) {
        int r = read_token_file(o->token_file, t->token, sizeof(t->token));
        if (r < 0) {
            fprintf(stderr, "dsv32ctl: --admin-token-file %s: %s\n", o->token_file,
                    dsv32_strerror(r));
            return r;
        }
    } else if (env && env[0]) {
        snprintf(t->token, sizeof(t->token), "%s", env);
    } else if (t->dir[0]) {
        char path[sizeof(t->dir) + 16];
        snprintf(path, sizeof(path), "%s/admin-token", t->dir);
        read_token_file(path, t->token, sizeof(t->token));
    }
    const char *hint = "give --router HOST:PORT and/or --etcd HOST:PORT --cluster NAME, or "
                       "--dir STATE of a local cluster (dsv32ctl cluster up --local)";
    if ((need & CTL_NEED_ROUTER) && !t->router[0]) {
        fprintf(stderr, "dsv32ctl: where is the router? %s\n", hint);
        return -EINVAL;
    }
    if ((need & CTL_NEED_ETCD) && !t->etcd[0]) {
        fprintf(stderr, "dsv32ctl: where is etcd? %s\n", hint);
        return -EINVAL;
    }
    if ((need & CTL_NEED_ANY) && !t->router[0] && !t->etcd[0]) {
        fprintf(stderr, "dsv32ctl: where is the cluster? %s\n", hint);
        return -EINVAL;
    }
    return 0;
}

int ctl_router_client(const struct ctl_target *t, bool admin, struct dsv32_rpc_client **ret)
{
    struct dsv32_rpc_client_config cc = {.target = t->router, .max_recv_bytes = 64u << 20,
                                         .bearer_token = admin && t->token[0] ? t->token : NULL};
    int r = dsv32_rpc_client_new(&cc, ret);
    if (r < 0)
        fprintf(stderr, "dsv32ctl: router %s: %s\n", t->router, dsv32_strerror(r));
    return r;
}

int ctl_etcd_client(const struct ctl_target *t, struct dsv32_etcd **ret)
{
    struct dsv32_etcd_config ec = {.endpoint = t->etcd, .timeout_ms = 5000};
    int r = dsv32_etcd_new(&ec, ret);
    if (r < 0)
        fprintf(stderr, "dsv32ctl: etcd %s: %s\n", t->etcd, dsv32_strerror(r));
    return r;
}

int ctl_call(struct dsv32_rpc_client *c, const struct ctl_target *t, const char *method,
             const ProtobufCMessage *req, const ProtobufCMessageDescriptor *resp_desc,
             int64_t timeout_ms, ProtobufCMessage **ret)
{
    struct dsv32_rpc_status st = {0};
    int r = dsv32_rpc_unary_msg(c, method, req, resp_desc, timeout_ms, DSV32_RPC_WAIT_FOR_READY,
                                ret, &st);
    if (r == 0)
        return 0;
    const char *m = strrchr(method, '/');
    fprintf(stderr, "dsv32ctl: %s: %s%s%s\n", m ? m + 1 : method, dsv32_rpc_code_name(st.code),
            st.message[0] ? ": " : "", st.message);
    if (st.code == DSV32_RPC_UNAUTHENTICATED)
        fprintf(stderr, "dsv32ctl: Admin calls need the router's token: --admin-token, "
                        "--admin-token-file, DSV32_ADMIN_TOKEN or --dir STATE of a local cluster\n");
    else if (st.code == DSV32_RPC_UNAVAILABLE || st.code == DSV32_RPC_DEADLINE_EXCEEDED)
        fprintf(stderr, "dsv32ctl: is the router at %s up?\n", t->router);
    return r < 0 ? r : -EIO;
}

void ctl_print_json(struct cJSON *j)
{
    char *s = cJSON_Print(j);
    if (s)
        printf("%s\n", s);
    free(s);
    cJSON_Delete(j);
}

const char *ctl_fmt_secs(int64_t s, char *buf, size_t cap)
{
    if (s < 0)
        snprintf(buf, cap, "-");
    else
        snprintf(buf, cap, "%llds", (long long)s);
    return buf;
}
