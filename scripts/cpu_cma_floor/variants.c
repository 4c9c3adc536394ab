#define _GNU_SOURCE
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <sys/types.h>
#include <time.h>
#include <errno.h>
#include <sched.h>
#include <immintrin.h>

#define CHUNK (1 << 20)
enum { F_ARRIVE, F_READY, F_REDUCED, F_GATHERED, F_PROGRESS, NF };
static int rank; static pid_t peer_pid;
static volatile int64_t *flags[2]; /* per rank, NF words each 64 B apart */
static char *slots[2];              /* per rank 2 x CHUNK */
static float *scratch;              /* 2 x blk */
static int64_t seq;

static int64_t now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }
static inline void post(int f, int64_t v) { __atomic_store_n((int64_t *)(flags[rank] + 8 * f), v, __ATOMIC_RELEASE); }
static inline void wait_peer(int f, int64_t v) {
    volatile int64_t *p = flags[1 - rank] + 8 * f;
    long spins = 0;
    while (__atomic_load_n((int64_t *)p, __ATOMIC_ACQUIRE) < v) {
        if (++spins < 2000) _mm_pause(); else sched_yield();
    }
}
static void sum2(float *out, const float *a, const float *b, int64_t n) { for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i]; }
/* rank order: s0 is rank 0's term */
static void sum_ro(float *out, const float *mine, const float *peer, int64_t n) {
    if (rank == 0) sum2(out, mine, peer, n); else sum2(out, peer, mine, n);
}
static int readv_all(void *dst, uint64_t src, int64_t len) {
    while (len > 0) {
        struct iovec l = {dst, (size_t)len}, r = {(void *)src, (size_t)len};
        ssize_t got = process_vm_readv(peer_pid, &l, 1, &r, 1, 0);
        if (got <= 0) return -errno;
        dst = (char *)dst + got; src += got; len -= got;
    }
    return 0;
}

int init(int r, int64_t ctrl, int64_t slot_base, int64_t scr, int ppid) {
    rank = r; peer_pid = ppid;
    for (int p = 0; p < 2; p++) { flags[p] = (volatile int64_t *)(ctrl + p * 4096); slots[p] = (char *)slot_base + p * 2 * CHUNK; }
    scratch = (float *)scr; seq = 0;
    return 0;
}

/* V0: the current core: rounds of 1 MiB, copy-in, sum own input + peer slot */
static int v_copyin(float *buf, uint64_t peer, int64_t n) {
    for (int64_t lo = 0; lo < n; lo += CHUNK / 4) {
        int64_t len = n - lo < CHUNK / 4 ? n - lo : CHUNK / 4;
        seq++;
        char *mine = slots[rank] + (seq % 2) * CHUNK, *theirs = slots[1 - rank] + (seq % 2) * CHUNK;
        memcpy(mine, buf + lo, len * 4);
        post(F_ARRIVE, seq);
        wait_peer(F_ARRIVE, seq);
        sum_ro(buf + lo, buf + lo, (float *)theirs, len);
    }
    return 0;
}

static void split(int64_t n, int r, int64_t *lo, int64_t *hi) {
    int64_t per = (n + 1) / 2; per = (per + 15) / 16 * 16;
    *lo = r * per < n ? r * per : n;
    *hi = r == 1 ? n : (per < n ? per : n);
}

/* V1: reduce-scatter + all-gather, both halves read from the peer by CMA, no copy-in */
static int v_rsag(float *buf, uint64_t peer, int64_t n, int64_t blk) {
    int rc; seq++;
    post(F_READY, seq); wait_peer(F_READY, seq);
    int64_t lo, hi, plo, phi;
    split(n, rank, &lo, &hi); split(n, 1 - rank, &plo, &phi);
    for (int64_t a = lo; a < hi; a += blk) {
        int64_t len = hi - a < blk ? hi - a : blk;
        if ((rc = readv_all(scratch, peer + a * 4, len * 4))) return rc;
        sum_ro(buf + a, buf + a, scratch, len);
    }
    post(F_REDUCED, seq); wait_peer(F_REDUCED, seq);
    if ((rc = readv_all(buf + plo, peer + plo * 4, (phi - plo) * 4))) return rc;
    post(F_GATHERED, seq); wait_peer(F_GATHERED, seq);
    return 0;
}

/* V2: one-shot, the peer's whole input read by CMA in blocks (two scratch blocks), out += own */
static int v_oneshot(float *buf, uint64_t peer, int64_t n, int64_t blk) {
    int rc; seq++;
    post(F_READY, seq); wait_peer(F_READY, seq);
    int64_t K = (n + blk - 1) / blk, base = seq << 32;
    if ((rc = readv_all(scratch, peer, (n < blk ? n : blk) * 4))) return rc;
    post(F_PROGRESS, base + 1);
    for (int64_t k = 0; k < K; k++) {
        if (k + 1 < K) {
            int64_t a = (k + 1) * blk, len = n - a < blk ? n - a : blk;
            if ((rc = readv_all(scratch + ((k + 1) % 2) * blk, peer + a * 4, len * 4))) return rc;
            post(F_PROGRESS, base + k + 2);
        }
        wait_peer(F_PROGRESS, base + k + 1);
        int64_t a = k * blk, len = n - a < blk ? n - a : blk;
        sum_ro(buf + a, buf + a, scratch + (k % 2) * blk, len);
    }
    return 0;
}

/* V3: rsag, but the reduce-scatter half is pipelined: phase 2 of block b may start once the
 * peer reduced it (progress counters), no full barrier between phases */
static int v_rsag_pipe(float *buf, uint64_t peer, int64_t n, int64_t blk) {
    int rc; seq++;
    post(F_READY, seq); wait_peer(F_READY, seq);
    int64_t lo, hi, plo, phi, base = seq << 32;
    split(n, rank, &lo, &hi); split(n, 1 - rank, &plo, &phi);
    int64_t k = 0;
    for (int64_t a = lo; a < hi; a += blk, k++) {
        int64_t len = hi - a < blk ? hi - a : blk;
        if ((rc = readv_all(scratch, peer + a * 4, len * 4))) return rc;
        sum_ro(buf + a, buf + a, scratch, len);
        post(F_PROGRESS, base + k + 1);
    }
    /* the peer's reduced blocks: block j of its half is ready at its progress j+1; my half
     * [plo, phi) of buf was read by the peer in its phase 1: it has read my block j when it
     * posted progress j+1 (it reads then reduces) */
    k = 0;
    for (int64_t a = plo; a < phi; a += blk, k++) {
        int64_t len = phi - a < blk ? phi - a : blk;
        wait_peer(F_PROGRESS, base + k + 1);
        if ((rc = readv_all(buf + a, peer + a * 4, len * 4))) return rc;
    }
    post(F_GATHERED, seq); wait_peer(F_GATHERED, seq);
    return 0;
}

/* V4: CMA only: read the peer's whole buffer in blocks into scratch, no sum (cost of the path) */
static int v_cmaonly(float *buf, uint64_t peer, int64_t n, int64_t blk) {
    int rc; seq++;
    post(F_READY, seq); wait_peer(F_READY, seq);
    for (int64_t a = 0; a < n; a += blk) {
        int64_t len = n - a < blk ? n - a : blk;
        if ((rc = readv_all(scratch, peer + a * 4, len * 4))) return rc;
    }
    post(F_GATHERED, seq); wait_peer(F_GATHERED, seq);
    return 0;
}
/* V5: local memcpy of the own buffer in blocks into scratch (the same bytes, no kernel) */
static int v_memcpyonly(float *buf, uint64_t peer, int64_t n, int64_t blk) {
    seq++;
    post(F_READY, seq); wait_peer(F_READY, seq);
    for (int64_t a = 0; a < n; a += blk) {
        int64_t len = n - a < blk ? n - a : blk;
        memcpy(scratch, buf + a, len * 4);
        __asm__ volatile("" ::: "memory");
    }
    post(F_GATHERED, seq); wait_peer(F_GATHERED, seq);
    return 0;
}

int64_t run(int variant, int64_t *bufs, int64_t *peers, int nbuf, int64_t nbytes, int iters, int64_t blk_bytes, int *err) {
    int64_t n = nbytes / 4, blk = blk_bytes / 4;
    int64_t t0 = now_ns();
    for (int i = 0; i < iters; i++) {
        float *b = (float *)bufs[i % nbuf]; uint64_t p = peers[i % nbuf];
        int rc = variant == 0 ? v_copyin(b, p, n) : variant == 1 ? v_rsag(b, p, n, blk)
               : variant == 2 ? v_oneshot(b, p, n, blk) : variant == 3 ? v_rsag_pipe(b, p, n, blk) : variant == 4 ? v_cmaonly(b, p, n, blk) : v_memcpyonly(b, p, n, blk);
        if (rc) { *err = rc; return -1; }
    }
    return now_ns() - t0;
}
