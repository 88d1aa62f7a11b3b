/*
 * Page tracer for scripts/orderfile.py, loaded with LD_PRELOAD into a meshgate
 * process. It makes the executable's code unreadable at start, and on each fault
 * records the page (its offset from the load address) to TRACE_DIR/trace-PID.bin,
 * in the order they first run, and makes the page executable again. So the file
 * lists every 4 KiB page of code the process ran, once each.
 *
 * Rust's runtime installs its own SIGSEGV handler (stack-overflow reports); the
 * tracer keeps that handler aside and forwards every fault outside the code to it.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static uintptr_t code_lo, code_hi, load_base;
static int out = -1;
static int installed;
static struct sigaction theirs;

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static void on_fault(int sig, siginfo_t *si, void *ctx) {
    uintptr_t a = (uintptr_t)si->si_addr;
    if (a >= code_lo && a < code_hi) {
        uintptr_t page = a & ~(uintptr_t)4095;
        mprotect((void *)page, 4096, PROT_READ | PROT_EXEC);
        uint64_t offset = page - load_base;
        if (write(out, &offset, sizeof offset) < 0) {
            /* nothing to do: the trace is short of one page */
        }
        return;
    }
    if (theirs.sa_flags & SA_SIGINFO) {
        theirs.sa_sigaction(sig, si, ctx);
    } else if (theirs.sa_handler != SIG_DFL && theirs.sa_handler != SIG_IGN) {
        theirs.sa_handler(sig);
    } else {
        signal(sig, SIG_DFL); /* the fault repeats and ends the process */
    }
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    static sigaction_fn real;
    if (!real) real = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (installed && sig == SIGSEGV) {
        if (old) *old = theirs;
        if (act) theirs = *act;
        return 0;
    }
    return real(sig, act, old);
}

__attribute__((constructor)) static void start_tracing(void) {
    const char *dir = getenv("TRACE_DIR");
    char self[4096], line[4096], path[4200];
    if (!dir) return;
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n < 0) return;
    self[n] = 0;
    FILE *maps = fopen("/proc/self/maps", "r");
    if (!maps) return;
    load_base = UINTPTR_MAX;
    while (fgets(line, sizeof line, maps)) {
        unsigned long lo, hi, off;
        char perm[8];
        if (!strstr(line, self) || sscanf(line, "%lx-%lx %7s %lx", &lo, &hi, perm, &off) != 4)
            continue;
        if (lo - off < load_base) load_base = lo - off;
        if (perm[2] == 'x') {
            code_lo = lo;
            code_hi = hi;
        }
    }
    fclose(maps);
    if (!code_lo) return;
    snprintf(path, sizeof path, "%s/trace-%d.bin", dir, (int)getpid());
    out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    if (out < 0) return;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, &theirs);
    installed = 1;
    mprotect((void *)code_lo, code_hi - code_lo, PROT_NONE);
}
