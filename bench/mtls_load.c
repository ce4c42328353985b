/* mtls_load: a small HTTP/1.1-over-mTLS load generator (wrk and h2load cannot present client certificates).
 * Usage: mtls_load HOST PORT hs|ka PROCESSES SECONDS CERT KEY
 *   hs: every request on a new TLS connection (full handshake, one GET, close) -> handshakes/s
 *   ka: one kept-alive connection per process, requests back to back          -> requests/s
 * Prints one JSON object: {"mode": ..., "ok": N, "errors": N, "seconds": S, "rate": N/S}.
 * Built by bench/proxy.py with: gcc -O2 -o mtls_load mtls_load.c -lssl -lcrypto */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static int tcp_connect(const char *host, int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET; a.sin_port = htons(port); inet_pton(AF_INET, host, &a.sin_addr);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) { close(fd); return -1; }
    return fd;
}

/* Send one GET and read a Content-Length (or chunked, up to the terminating chunk) response. */
static int request(SSL *ssl) {
    static const char req[] = "GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: mtls_load\r\n\r\n";
    if (SSL_write(ssl, req, sizeof req - 1) <= 0) return -1;
    char buf[65536]; int have = 0;
    for (;;) {
        int n = SSL_read(ssl, buf + have, sizeof buf - 1 - have);
        if (n <= 0) return -1;
        have += n; buf[have] = 0;
        char *end = strstr(buf, "\r\n\r\n");
        if (!end) { if (have >= (int)sizeof buf - 1) return -1; continue; }
        int status = atoi(buf + 9);
        char *cl = strcasestr(buf, "\r\ncontent-length:");
        int head = (int)(end - buf) + 4;
        if (cl && cl < end) {
            int len = atoi(cl + 17);
            while (have - head < len) {
                n = SSL_read(ssl, buf, sizeof buf);  /* discard the body */
                if (n <= 0) return -1;
                have += n;
            }
            return status == 200 ? 0 : -1;
        }
        while (!strstr(buf + (have > 8 ? have - 8 : 0), "0\r\n\r\n")) {  /* chunked */
            n = SSL_read(ssl, buf, sizeof buf - 1);
            if (n <= 0) return -1;
            buf[n] = 0; have = n;
        }
        return status == 200 ? 0 : -1;
    }
}

int main(int argc, char **argv) {
    if (argc != 8) { fprintf(stderr, "usage: %s HOST PORT hs|ka PROCESSES SECONDS CERT KEY\n", argv[0]); return 2; }
    const char *host = argv[1]; int port = atoi(argv[2]); int ka = strcmp(argv[3], "ka") == 0;
    int procs = atoi(argv[4]); double seconds = atof(argv[5]);
    int fds[2]; if (pipe(fds) != 0) return 1;
    double start = now();
    for (int p = 0; p < procs; p++) {
        if (fork() == 0) {
            SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
            SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
            SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
            if (SSL_CTX_use_certificate_chain_file(ctx, argv[6]) != 1 || SSL_CTX_use_PrivateKey_file(ctx, argv[7], SSL_FILETYPE_PEM) != 1) {
                ERR_print_errors_fp(stderr); _exit(1);
            }
            long ok = 0, errors = 0; SSL *ssl = NULL; int fd = -1;
            double deadline = start + seconds;
            while (now() < deadline) {
                if (!ssl) {
                    fd = tcp_connect(host, port);
                    if (fd < 0) { errors++; usleep(1000); continue; }
                    ssl = SSL_new(ctx); SSL_set_fd(ssl, fd);
                    if (SSL_connect(ssl) != 1) { errors++; SSL_free(ssl); close(fd); ssl = NULL; continue; }
                }
                if (request(ssl) == 0) ok++; else { errors++; SSL_free(ssl); close(fd); ssl = NULL; continue; }
                if (!ka) { SSL_free(ssl); close(fd); ssl = NULL; }
            }
            long out[2] = {ok, errors};
            if (write(fds[1], out, sizeof out) != sizeof out) _exit(1);
            _exit(0);
        }
    }
    close(fds[1]);
    long ok = 0, errors = 0, got[2];
    while (read(fds[0], got, sizeof got) == sizeof got) { ok += got[0]; errors += got[1]; }
    while (wait(NULL) > 0) {}
    double elapsed = now() - start;
    printf("{\"mode\": \"%s\", \"ok\": %ld, \"errors\": %ld, \"seconds\": %.2f, \"rate\": %.1f}\n",
           ka ? "ka" : "hs", ok, errors, elapsed, ok / elapsed);
    return 0;
}
