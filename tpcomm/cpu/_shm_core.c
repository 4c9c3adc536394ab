/* The native core of the CPU shared-memory collectives (tpcomm/cpu/shm_collectives.py).
 *
 * One call runs one round of a collective: the meta words, the copy into this rank's slot, the
 * arrive flag, the bounded wait for the peers, the meta check, the reduction in rank order and
 * the copy out. It speaks exactly the protocol of the Python path (same signal-pad words, same
 * slots, same meta words, same reduction order and rounding), so a rank on this core and a rank
 * on the Python path interoperate and produce bitwise the same results.
 *
 * Signal pad words (int64; see shm_collectives.py for the drawing):
 *     0 pid, 8 state, 16 + 8*phase arrive[phase], 64 + 8*(seq % 2) meta[seq % 2] (NMETA words)
 *
 * Meta: word 0 is seq, words 1.. are the values the caller passes (op, algorithm, dtype, numel,
 * and up to META_EXTRA more). The check compares the first ``nmeta`` words of every peer's meta
 * with this rank's: a plain compare of a small fixed struct, so adding fields (total numel,
 * offset) is a change of ``nmeta`` and of the values passed, not of this file's logic.
 *
 * Memory ordering: data and meta are written with plain stores, then the arrive flag with a
 * release store; a peer reads the flag with an acquire load before the meta and the data. On
 * x86-64 (the only target the Communicator allows, see should_use_shm) both are plain moves
 * plus a compiler barrier.
 *
 * Waits are bounded: a wait gives up after ``slice_ns`` and returns RC_PENDING; the Python side
 * then checks the peers' liveness and its timeout and resumes the call at the stage it stopped
 * (``stage`` argument). A peer that aborted or closed ends the wait at once.
 *
 * Reductions, in rank order on every rank, so every rank's result is bitwise the same:
 *   float32        acc = s0 + s1, then acc += s2, ... (torch.add then add_, as the Python path)
 *   float16/bf16   float32 acc = f(s0) + f(s1) + ... in that order, rounded once to nearest
 *                  even at the end (torch's 16-bit add of two sources computes in float32 and
 *                  rounds once; with more the Python path accumulates in a float32 scratch)
 *
 * Built at first use by tpcomm/cpu/native.py with the system compiler, -O3 and no -march: the
 * wider kernels are chosen at run time (target_clones / __builtin_cpu_supports), so a cached
 * build is safe on any x86-64 machine.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <immintrin.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define W_PID 0
#define W_STATE 8
#define W_ARRIVE 16
#define W_META 64
#define STATE_RUNNING 0
#define STATE_CLOSED 1
#define STATE_ABORTED 2
#define MAX_WORLD 64
#define MAX_META 8

#define OP_ALL_REDUCE 1
#define OP_REDUCE_SCATTER 2
#define OP_ALL_GATHER 3
#define ALGO_ONE_SHOT 1
#define ALGO_TWO_SHOT 2
#define DT_F32 1
#define DT_F16 2
#define DT_BF16 3

/* return codes: 0 done; PENDING + phase: a wait ran out of its slice; the others carry the
 * peer in the low byte */
#define RC_DONE 0
#define RC_PENDING 0x10
#define RC_ABORTED 0x100
#define RC_CLOSED 0x200
#define RC_MISMATCH 0x300

#define SPINS_BEFORE_YIELD 2000
#define NS_BEFORE_SLEEP 10000000LL /* 10 ms */
#define SLEEP_NS 50000L            /* 50 us */
#define BLOCK 2048                 /* elements per block of the 16-bit reductions (8 KiB acc) */

typedef struct {
    int rank, world, nmeta;
    int64_t slot_nbytes;
    volatile int64_t *pads[MAX_WORLD];
    char *data[MAX_WORLD];
} Ctx;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int64_t load_acquire(volatile int64_t *p) {
    return __atomic_load_n((int64_t *)p, __ATOMIC_ACQUIRE);
}

static inline void store_release(volatile int64_t *p, int64_t v) {
    __atomic_store_n((int64_t *)p, v, __ATOMIC_RELEASE);
}

/* A peer that is not running any more: RC_ABORTED / RC_CLOSED | peer, else 0. */
static int peer_state_rc(Ctx *c, int p) {
    int64_t s = load_acquire(c->pads[p] + W_STATE);
    if (s == STATE_ABORTED) return RC_ABORTED | p;
    if (s == STATE_CLOSED) return RC_CLOSED | p;
    return 0;
}

/* Wait until every peer posted arrive[phase] >= seq, at most slice_ns. */
static int wait_phase(Ctx *c, int phase, int64_t seq, int64_t slice_ns) {
    int word = W_ARRIVE + 8 * phase;
    for (int p = 0; p < c->world; p++) {
        if (p == c->rank) continue;
        volatile int64_t *flag = c->pads[p] + word;
        if (load_acquire(flag) >= seq) continue;
        int64_t start = 0;
        long spins = 0;
        while (load_acquire(flag) < seq) {
            spins++;
            if (spins < SPINS_BEFORE_YIELD) {
                _mm_pause();
                continue;
            }
            int64_t t = now_ns();
            if (start == 0) start = t;
            int rc = peer_state_rc(c, p);
            if (rc) return rc;
            if (t - start > slice_ns) return RC_PENDING + phase;
            if (t - start > NS_BEFORE_SLEEP) {
                struct timespec ts = {0, SLEEP_NS};
                nanosleep(&ts, NULL);
            } else {
                sched_yield();
            }
        }
    }
    /* a peer that gave up on an op may still have posted this one: answer nothing from a
     * group that is broken anywhere (as the Python path) */
    for (int p = 0; p < c->world; p++) {
        if (p != c->rank && load_acquire(c->pads[p] + W_STATE) == STATE_ABORTED)
            return RC_ABORTED | p;
    }
    return RC_DONE;
}

static int check_meta(Ctx *c, int64_t seq) {
    int m = W_META + 8 * (int)(seq % 2);
    volatile int64_t *mine = c->pads[c->rank] + m;
    for (int p = 0; p < c->world; p++) {
        if (p == c->rank) continue;
        volatile int64_t *theirs = c->pads[p] + m;
        for (int i = 0; i < c->nmeta; i++)
            if (theirs[i] != mine[i]) return RC_MISMATCH | p;
    }
    return RC_DONE;
}

/* ------------------------------------------------------------------ reductions */
/* ``out`` may be one of the sources (an in-place call reduces from its own input, see run_op):
 * with two sources each element is read before it is written; with more, every block of the
 * sources is summed in a float32 scratch before it is stored, so a source is never read after
 * ``out`` overwrote it. Same additions in the same order either way. */
__attribute__((target_clones("avx512f", "avx2", "default")))
static void sum_f32(float *out, const float *const *srcs, int n_src, int64_t n) {
    if (n_src == 1) {
        if (out != srcs[0]) memmove(out, srcs[0], (size_t)n * 4);
        return;
    }
    const float *a = srcs[0], *b = srcs[1];
    if (n_src == 2) {
        for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
        return;
    }
    float acc[BLOCK];
    for (int64_t lo = 0; lo < n; lo += BLOCK) {
        int64_t len = n - lo < BLOCK ? n - lo : BLOCK;
        for (int64_t i = 0; i < len; i++) acc[i] = a[lo + i] + b[lo + i];
        for (int k = 2; k < n_src; k++) {
            const float *s = srcs[k] + lo;
            for (int64_t i = 0; i < len; i++) acc[i] += s[i];
        }
        memcpy(out + lo, acc, (size_t)len * 4);
    }
}

/* the bits of a float32 and back (memcpy: no aliasing question, a plain move once compiled) */
static inline float f32_of_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t bits_of_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* The 16-bit sum of ``n_src`` sources, in blocks: float32 acc = TO_F32(s0) + TO_F32(s1) + ...
 * in rank order, each element rounded once by FROM_F32 at the end (see the header). Defines
 * ``static void NAME(uint16_t *out, const uint16_t *const *srcs, int n_src, int64_t n)``; an
 * attribute written before the macro applies to that function. */
#define DEFINE_SUM16(NAME, TO_F32, FROM_F32)                                                  \
    static void NAME(uint16_t *out, const uint16_t *const *srcs, int n_src, int64_t n) {       \
        float acc[BLOCK];                                                                      \
        for (int64_t lo = 0; lo < n; lo += BLOCK) {                                            \
            int64_t len = n - lo < BLOCK ? n - lo : BLOCK;                                     \
            const uint16_t *s0 = srcs[0] + lo;                                                 \
            for (int64_t i = 0; i < len; i++) acc[i] = TO_F32(s0[i]);                          \
            for (int k = 1; k < n_src; k++) {                                                  \
                const uint16_t *s = srcs[k] + lo;                                              \
                for (int64_t i = 0; i < len; i++) acc[i] += TO_F32(s[i]);                      \
            }                                                                                  \
            for (int64_t i = 0; i < len; i++) out[lo + i] = FROM_F32(acc[i]);                  \
        }                                                                                      \
    }

static inline float bf16_to_f32(uint16_t h) {
    return f32_of_bits((uint32_t)h << 16);
}

static inline uint16_t f32_to_bf16(float f) {
    /* c10::BFloat16's round_to_nearest_even: NaN -> 0x7FC0 */
    uint32_t u = bits_of_f32(f);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + (((u >> 16) & 1) + 0x7FFF)) >> 16);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
DEFINE_SUM16(sum_bf16, bf16_to_f32, f32_to_bf16)

/* IEEE half <-> float, exact and round-to-nearest-even (what F16C's vcvtps2ph does with
 * rounding mode 0 and what c10::Half does), for machines without F16C. */
static inline float f16_to_f32_soft(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
    if (exp == 0x1F) {
        u = sign | 0x7F800000 | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalize */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    return f32_of_bits(u);
}

static inline uint16_t f32_to_f16_soft(float f) {
    uint32_t u = bits_of_f32(f);
    uint32_t sign = (u >> 16) & 0x8000, abs = u & 0x7FFFFFFF;
    if (abs > 0x7F800000) return (uint16_t)(sign | 0x7E00 | ((abs >> 13) & 0x3FF)); /* NaN */
    if (abs >= 0x477FF000) return (uint16_t)(sign | 0x7C00);   /* rounds to inf (or is inf) */
    if (abs < 0x38800000) {                                   /* subnormal half or zero */
        if (abs < 0x33000000) return (uint16_t)sign;          /* < half the smallest: 0 */
        uint32_t e = abs >> 23, man = (abs & 0x7FFFFF) | 0x800000;
        uint32_t shift = 126 - e;                             /* 14..24 */
        uint32_t res = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (res & 1))) res++;
        return (uint16_t)(sign | res);
    }
    uint32_t res = ((abs - 0x38000000) >> 13), rem = abs & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (res & 1))) res++;
    return (uint16_t)(sign | res);
}

DEFINE_SUM16(sum_f16_soft, f16_to_f32_soft, f32_to_f16_soft)

__attribute__((target("avx2,f16c")))
static void sum_f16_f16c(uint16_t *out, const uint16_t *const *srcs, int n_src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 acc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(srcs[0] + i)));
        for (int k = 1; k < n_src; k++)
            acc = _mm256_add_ps(acc, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(srcs[k] + i))));
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(acc, _MM_FROUND_TO_NEAREST_INT));
    }
    if (i < n) {
        const uint16_t *tails[MAX_WORLD];
        for (int k = 0; k < n_src; k++) tails[k] = srcs[k] + i;
        sum_f16_soft(out + i, tails, n_src, n - i);
    }
}

static int have_f16c = -1;

static void sum_dtype(int dtype, void *out, const void *const *srcs, int n_src, int64_t n) {
    if (dtype == DT_F32) {
        sum_f32((float *)out, (const float *const *)srcs, n_src, n);
    } else if (dtype == DT_BF16) {
        sum_bf16((uint16_t *)out, (const uint16_t *const *)srcs, n_src, n);
    } else {
        if (have_f16c < 0) {
            __builtin_cpu_init();
            have_f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx2");
        }
        if (have_f16c)
            sum_f16_f16c((uint16_t *)out, (const uint16_t *const *)srcs, n_src, n);
        else
            sum_f16_soft((uint16_t *)out, (const uint16_t *const *)srcs, n_src, n);
    }
}

/* ------------------------------------------------------------------ one round */
static inline char *slot_of(Ctx *c, int p, int64_t seq) {
    return c->data[p] + (seq % 2) * c->slot_nbytes;
}

/* Phase 0 of every op: meta words, copy-in, post. */
static void publish(Ctx *c, int64_t seq, const int64_t *meta, const char *src, int64_t nbytes) {
    volatile int64_t *mine = c->pads[c->rank];
    volatile int64_t *m = mine + W_META + 8 * (int)(seq % 2);
    for (int i = 1; i < c->nmeta; i++) m[i] = meta[i - 1];
    m[0] = seq;
    char *dst = slot_of(c, c->rank, seq);
    if (nbytes && dst != src) memcpy(dst, src, (size_t)nbytes);
    store_release(mine + W_ARRIVE, seq);
}

/* Two-shot slice bounds, as ShmCollectives._split: world slices, 16-element aligned starts. */
static void split(int64_t n, int world, int r, int64_t *lo, int64_t *hi) {
    int64_t per = (n + world - 1) / world;
    per = (per + 15) / 16 * 16;
    *lo = r * per < n ? r * per : n;
    *hi = r + 1 == world ? n : ((r + 1) * per < n ? (r + 1) * per : n);
}

/* stage 0: from the start; 1: resume after the phase-0 wait; 2: resume after the phase-1 wait */
static int run_op(Ctx *c, int stage, int64_t seq, const int64_t *meta, char *src, char *out,
                  int64_t slice_ns) {
    int op = (int)meta[0], algo = (int)meta[1], dtype = (int)meta[2];
    int64_t numel = meta[3];
    int64_t item = dtype == DT_F32 ? 4 : 2;
    int R = c->world, rc;
    const void *srcs[MAX_WORLD];
    if (stage == 0) {
        publish(c, seq, meta, src, numel * item);
        stage = 1;
    }
    if (stage == 1) {
        if ((rc = wait_phase(c, 0, seq, slice_ns))) return rc;
        if ((rc = check_meta(c, seq))) return rc;
        /* this rank's part is read from its input, not from its slot: the same values, but
         * the input is still in the caches from the copy-in while the slot's lines are being
         * read by the peers (at 1 MiB rounds, 2 ranks: 66 against 90 us per round for the
         * reduction, bare C on the 2-core machine, 2026-12-03) */
        if (op == OP_ALL_GATHER) { /* out is [R, numel], contiguous */
            int64_t row = numel * item;   /* this rank's row first (an input inside out, which
                                           * the Communicator refuses, still reads right) */
            if (out + c->rank * row != src) memmove(out + c->rank * row, src, (size_t)row);
            for (int p = 0; p < R; p++)
                if (p != c->rank) memcpy(out + p * row, slot_of(c, p, seq), (size_t)row);
            return RC_DONE;
        }
        if (op == OP_REDUCE_SCATTER) { /* inp [R, m], out [m]: row `rank` of every slot */
            int64_t m = numel / R;
            for (int p = 0; p < R; p++)
                srcs[p] = (p == c->rank ? src : slot_of(c, p, seq)) + c->rank * m * item;
            sum_dtype(dtype, out, srcs, R, m);
            return RC_DONE;
        }
        if (algo == ALGO_ONE_SHOT) {
            for (int p = 0; p < R; p++) srcs[p] = p == c->rank ? src : slot_of(c, p, seq);
            sum_dtype(dtype, out, srcs, R, numel);
            return RC_DONE;
        }
        /* two-shot: reduce my slice into out, put it in my slot for the peers, post phase 1 */
        int64_t lo, hi;
        split(numel, R, c->rank, &lo, &hi);
        for (int p = 0; p < R; p++) srcs[p] = (p == c->rank ? src : slot_of(c, p, seq)) + lo * item;
        sum_dtype(dtype, out + lo * item, srcs, R, hi - lo);
        if (hi > lo) memcpy(slot_of(c, c->rank, seq) + lo * item, out + lo * item, (size_t)((hi - lo) * item));
        store_release(c->pads[c->rank] + W_ARRIVE + 8, seq);
        stage = 2;
    }
    if ((rc = wait_phase(c, 1, seq, slice_ns))) return rc;
    for (int p = 0; p < R; p++) {
        if (p == c->rank) continue;
        int64_t lo, hi;
        split(numel, R, p, &lo, &hi);
        if (hi > lo) memcpy(out + lo * item, slot_of(c, p, seq) + lo * item, (size_t)((hi - lo) * item));
    }
    return RC_DONE;
}

/* ------------------------------------------------------------------ Python bindings */
static int as_i64(PyObject *o, int64_t *v) {
    *v = (int64_t)PyLong_AsLongLong(o);
    return !(*v == -1 && PyErr_Occurred());
}

/* create(rank, world, nmeta, slot_nbytes, pad_addrs, data_addrs) -> ctx address */
static PyObject *py_create(PyObject *self, PyObject *args) {
    int rank, world, nmeta;
    long long slot_nbytes;
    PyObject *pads, *data;
    if (!PyArg_ParseTuple(args, "iiiLOO", &rank, &world, &nmeta, &slot_nbytes, &pads, &data))
        return NULL;
    if (world < 1 || world > MAX_WORLD || rank < 0 || rank >= world || nmeta < 1 ||
        nmeta > MAX_META) {
        PyErr_Format(PyExc_ValueError, "bad context: rank %d world %d nmeta %d (world <= %d, "
                     "nmeta <= %d)", rank, world, nmeta, MAX_WORLD, MAX_META);
        return NULL;
    }
    if (!PySequence_Check(pads) || !PySequence_Check(data) || PySequence_Size(pads) != world ||
        PySequence_Size(data) != world) {
        PyErr_SetString(PyExc_ValueError, "pad_addrs and data_addrs need one address per rank");
        return NULL;
    }
    Ctx *c = PyMem_RawCalloc(1, sizeof(Ctx));
    if (!c) return PyErr_NoMemory();
    c->rank = rank;
    c->world = world;
    c->nmeta = nmeta;
    c->slot_nbytes = slot_nbytes;
    for (int p = 0; p < world; p++) {
        PyObject *a = PySequence_GetItem(pads, p), *d = PySequence_GetItem(data, p);
        int64_t pa = 0, da = 0;
        int ok = a && d && as_i64(a, &pa) && as_i64(d, &da);
        Py_XDECREF(a);
        Py_XDECREF(d);
        if (!ok) {
            PyMem_RawFree(c);
            return NULL;
        }
        c->pads[p] = (volatile int64_t *)(intptr_t)pa;
        c->data[p] = (char *)(intptr_t)da;
    }
    return PyLong_FromVoidPtr(c);
}

static PyObject *py_destroy(PyObject *self, PyObject *arg) {
    void *c = PyLong_AsVoidPtr(arg);
    if (!c && PyErr_Occurred()) return NULL;
    PyMem_RawFree(c);
    Py_RETURN_NONE;
}

/* run(ctx, stage, seq, src, out, slice_ns, op, algorithm, dtype, numel[, extra...]) -> rc
 *
 * The hot call: FASTCALL, ints only, the GIL released around the round. */
static PyObject *py_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 10 || nargs > 9 + MAX_META) {
        PyErr_SetString(PyExc_TypeError, "run(ctx, stage, seq, src, out, slice_ns, op, algorithm, "
                        "dtype, numel, *extra) takes 10 or more ints");
        return NULL;
    }
    int64_t v[9 + MAX_META];
    for (Py_ssize_t i = 0; i < nargs; i++)
        if (!as_i64(args[i], &v[i])) return NULL;
    Ctx *c = (Ctx *)(intptr_t)v[0];
    if (nargs - 5 != c->nmeta) {
        PyErr_Format(PyExc_TypeError, "run: this context has %d meta words (seq + %d values), got "
                     "%zd values", c->nmeta, c->nmeta - 1, nargs - 6);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_op(c, (int)v[1], v[2], v + 6, (char *)(intptr_t)v[3], (char *)(intptr_t)v[4], v[5]);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

/* reduce(dtype, out, [src addrs], numel): out = sum of the sources in order (for the tests) */
static PyObject *py_reduce(PyObject *self, PyObject *args) {
    int dtype;
    long long out, numel;
    PyObject *srcs;
    if (!PyArg_ParseTuple(args, "iLOL", &dtype, &out, &srcs, &numel)) return NULL;
    Py_ssize_t k = PySequence_Size(srcs);
    if (k < 1 || k > MAX_WORLD) {
        PyErr_SetString(PyExc_ValueError, "reduce takes 1 to 64 sources");
        return NULL;
    }
    const void *ptrs[MAX_WORLD];
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *o = PySequence_GetItem(srcs, i);
        int64_t a = 0;
        int ok = o && as_i64(o, &a);
        Py_XDECREF(o);
        if (!ok) return NULL;
        ptrs[i] = (const void *)(intptr_t)a;
    }
    sum_dtype(dtype, (void *)(intptr_t)out, ptrs, (int)k, numel);
    Py_RETURN_NONE;
}

/* use_f16c(flag): -1 detect, 0 the portable half conversions, 1 F16C (for the tests) */
static PyObject *py_use_f16c(PyObject *self, PyObject *arg) {
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred()) return NULL;
    have_f16c = (int)v;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"use_f16c", py_use_f16c, METH_O, "use_f16c(-1 | 0 | 1): how float16 is converted"},
    {"create", py_create, METH_VARARGS, "create(rank, world, nmeta, slot_nbytes, pads, data)"},
    {"destroy", py_destroy, METH_O, "destroy(ctx): free a context"},
    {"run", (PyCFunction)(void (*)(void))py_run, METH_FASTCALL, "one round of a collective"},
    {"reduce", py_reduce, METH_VARARGS, "reduce(dtype, out, srcs, numel)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_shm_core",
                                    "tpcomm's native CPU collective core", -1, methods};

PyMODINIT_FUNC PyInit__shm_core(void) {
    PyObject *m = PyModule_Create(&module);
    if (m) {
        PyModule_AddIntConstant(m, "RC_PENDING", RC_PENDING);
        PyModule_AddIntConstant(m, "RC_ABORTED", RC_ABORTED);
        PyModule_AddIntConstant(m, "RC_CLOSED", RC_CLOSED);
        PyModule_AddIntConstant(m, "RC_MISMATCH", RC_MISMATCH);
        PyModule_AddIntConstant(m, "MAX_WORLD", MAX_WORLD);
        PyModule_AddIntConstant(m, "MAX_META", MAX_META);
        PyModule_AddIntConstant(m, "ABI", 1);
    }
    return m;
}
