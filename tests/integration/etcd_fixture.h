/* A throwaway etcd for integration tests: Debian's etcd (or $DSV32_ETCD) on 127.0.0.1 with free
 * ports and a temporary data directory, started, killed, restarted (same ports and data) and
 * removed by the test. The child dies with the test process (PR_SET_PDEATHSIG) and an atexit
 * hook stops what is still running, so a failing test leaves neither process nor directory. */
#ifndef DSV32_ETCD_FIXTURE_H
#define DSV32_ETCD_FIXTURE_H

#include <limits.h>
#include <sys/types.h>

struct etcd_fixture {
    pid_t pid; /* 0 while not running */
    int client_port, peer_port;
    char dir[PATH_MAX];  /* data/ and etcd.log inside */
    char endpoint[64];   /* "127.0.0.1:<client_port>" for dsv32_etcd_config.endpoint */
    int janitor_fd;      /* write end of the janitor's pipe (-1: none) */
    pid_t janitor_pid;
};

/* The etcd binary ($DSV32_ETCD or /usr/bin/etcd), NULL when there is none: skip with 77. */
const char *etcd_fixture_binary(void);
/* Starts a fresh etcd and waits until it is healthy: 0, -ENOENT without an etcd binary, or
 * another negative errno. Call from the thread that will stop it (PDEATHSIG follows threads). */
int etcd_fixture_start(struct etcd_fixture *f);
/* SIGKILL, data kept. */
int etcd_fixture_kill(struct etcd_fixture *f);
/* Starts it again on the same ports with the same data and waits until it is healthy. */
int etcd_fixture_restart(struct etcd_fixture *f);
/* Starts it again on the same ports with its data gone (a new cluster: revisions restart, leases
 * are unknown), as after a disaster or a botched restore. */
int etcd_fixture_restart_empty(struct etcd_fixture *f);
/* Kills it and removes its directory; safe to call twice or on a fixture never started. */
void etcd_fixture_stop(struct etcd_fixture *f);

#endif
