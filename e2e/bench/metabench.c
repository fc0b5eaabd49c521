/* Metadata benchmark: create+write 4 KiB, stat, unlink N files in one directory, then N
 * getxattr calls of an absent name on it. Prints four rates (operations per second) as JSON.
 * A C program so the measurement is the filesystem's cost, not an interpreter's (fio's
 * file-create engines are slower than the filesystem at this count). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <errno.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: metabench DIR N\n"); return 2; }
    const char *dir = argv[1];
    int n = atoi(argv[2]);
    char path[4096], buf[4096];
    for (int i = 0; i < 4096; i++) buf[i] = (char)i;
    double t0 = now();
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%07d", dir, i);
        int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
        if (fd < 0 || write(fd, buf, sizeof buf) != (ssize_t)sizeof buf) { perror(path); return 1; }
        close(fd);
    }
    double t1 = now();
    struct stat st;
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%07d", dir, i);
        if (stat(path, &st) != 0) { perror(path); return 1; }
    }
    double t2 = now();
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%07d", dir, i);
        if (unlink(path) != 0) { perror(path); return 1; }
    }
    double t3 = now();
    /* The cheapest request the kernel always forwards (no xattr cache, nothing for the daemon to
     * do but one syscall): the cost of a round trip through the mount itself. */
    for (int i = 0; i < n; i++) {
        if (getxattr(dir, "user.metabench.absent", buf, sizeof buf) >= 0 || errno != ENODATA) {
            perror("getxattr");
            return 1;
        }
    }
    double t4 = now();
    printf("{\"create\": %.1f, \"stat\": %.1f, \"unlink\": %.1f, \"getxattr\": %.1f}\n",
           n / (t1 - t0), n / (t2 - t1), n / (t3 - t2), n / (t4 - t3));
    return 0;
}
