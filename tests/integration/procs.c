/* Child daemons for integration tests; see procs.h. */
#define _GNU_SOURCE 1
#include "procs.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PROCS 64
static struct proc *all[MAX_PROCS];
static int n_all, hooked;

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void stop_all(void)
{
    for (int i = 0; i < n_all; i++)
        if (all[i] && all[i]->pid > 0)
            proc_stop(all[i], 2000);
}

int proc_start(struct proc *p, const char *name, const char *dir, char *const argv[], int timeout_ms)
{
    char portfile[512];
    snprintf(portfile, sizeof(portfile), "%s/%s.port", dir, name);
    unlink(portfile);
    snprintf(p->name, sizeof(p->name), "%s", name);
    p->port = 0;
    int argc = 0;
    while (argv[argc])
        argc++;
    char **av = calloc((size_t)argc + 3, sizeof(char *));
    if (!av)
        return -ENOMEM;
    memcpy(av, argv, sizeof(char *) * (size_t)argc);
    av[argc] = "--port-file";
    av[argc + 1] = portfile;
    pid_t parent = getpid();
    p->pid = fork();
    if (p->pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        char log[600];
        snprintf(log, sizeof(log), "%s/%s.log", dir, name);
        FILE *f = freopen(log, "w", stderr);
        (void)f;
        execv(av[0], av);
        _exit(127);
    }
    free(av);
    if (p->pid < 0)
        return -errno;
    if (!hooked) {
        atexit(stop_all);
        hooked = 1;
    }
    if (n_all < MAX_PROCS)
        all[n_all++] = p;
    for (int waited = 0; waited < timeout_ms; waited += 50) {
        FILE *f = fopen(portfile, "r");
        if (f) {
            int port = 0;
            if (fscanf(f, "%d", &port) == 1 && port > 0)
                p->port = port;
            fclose(f);
        }
        if (p->port)
            return 0;
        int st;
        if (waitpid(p->pid, &st, WNOHANG) == p->pid) {
            p->pid = 0;
            return -ECHILD; /* it exited: see its log */
        }
        sleep_ms(50);
    }
    return -ETIMEDOUT;
}

int proc_stop(struct proc *p, int grace_ms)
{
    if (p->pid <= 0)
        return -ESRCH;
    kill(p->pid, SIGTERM);
    int st = 0;
    for (int waited = 0;; waited += 20) {
        if (waitpid(p->pid, &st, WNOHANG) == p->pid)
            break;
        if (waited >= grace_ms) {
            kill(p->pid, SIGKILL);
            waitpid(p->pid, &st, 0);
            break;
        }
        sleep_ms(20);
    }
    p->pid = 0;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

void proc_kill(struct proc *p)
{
    if (p->pid <= 0)
        return;
    kill(p->pid, SIGKILL);
    int st;
    waitpid(p->pid, &st, 0);
    p->pid = 0;
}

int read_port_file(const char *path)
{
    FILE *f = fopen(path, "r");
    int port = 0;
    if (f && fscanf(f, "%d", &port) != 1)
        port = 0;
    if (f)
        fclose(f);
    return port;
}

int http_get(int port, const char *path, char *buf, size_t cap)
{
    if (port <= 0 || cap < 2)
        return -1;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        close(fd);
        return -1;
    }
    char req[256];
    int n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", path);
    if (write(fd, req, (size_t)n) != n) {
        close(fd);
        return -1;
    }
    size_t len = 0;
    ssize_t r;
    while (len < cap - 1 && (r = read(fd, buf + len, cap - 1 - len)) > 0)
        len += (size_t)r;
    close(fd);
    buf[len] = 0;
    int code = 0;
    if (sscanf(buf, "HTTP/1.1 %d", &code) != 1)
        return -1;
    char *body = strstr(buf, "\r\n\r\n");
    if (body)
        memmove(buf, body + 4, strlen(body + 4) + 1);
    return code;
}

double metric_value(const char *text, const char *name)
{
    char key[160];
    snprintf(key, sizeof(key), "\n%s ", name);
    const char *p = strstr(text, key);
    return p ? strtod(p + strlen(key), NULL) : -1;
}
