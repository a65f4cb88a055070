/* Daemons as child processes for integration tests: started with their port written to a file,
 * tied to the test (PR_SET_PDEATHSIG), stopped with SIGTERM (SIGKILL after a grace period) or
 * killed outright to inject a failure. An atexit hook stops whatever is left. */
#ifndef DSV32_TEST_PROCS_H
#define DSV32_TEST_PROCS_H

#include <stddef.h>
#include <sys/types.h>

struct proc {
    pid_t pid;
    int port;
    char name[64];
};

/* Runs argv (argv[0] a path) with `--port-file <dir>/<name>.port` appended and waits up to
 * timeout_ms for the port: 0 or a negative errno. */
int proc_start(struct proc *p, const char *name, const char *dir, char *const argv[], int timeout_ms);
/* SIGTERM, then SIGKILL after grace_ms; returns the exit status (or 128 + signal). */
int proc_stop(struct proc *p, int grace_ms);
/* SIGKILL now (a crash). */
void proc_kill(struct proc *p);

/* GET path from http://127.0.0.1:port: the HTTP status (or -1), the body in buf. */
int http_get(int port, const char *path, char *buf, size_t cap);
/* The value of an unlabelled sample `name` in Prometheus text, or -1 when absent. */
double metric_value(const char *text, const char *name);
/* The port number written in a file, or 0. */
int read_port_file(const char *path);

#endif
