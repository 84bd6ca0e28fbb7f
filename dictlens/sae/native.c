/* dictlens's compiled CPU kernels: the parts of a training step eager PyTorch cannot make fast.
 *
 * Built on first use by dictlens/sae/native.py (cc -O3 -march=native, cached per source and
 * machine), loaded through ctypes; every function has an eager PyTorch twin the tests compare
 * it with, and dictlens uses that twin wherever this library cannot be built.
 *
 * Conventions: matrices are dense, row-major and contiguous (the caller checks); indices are
 * int64 (torch.long); floats are IEEE single precision, bfloat16 is passed as uint16 bits.
 * Sparse patterns are CSR: row r's pairs are n in [crow[r], crow[r+1]), column idx[n]; crow[0] = 0.
 * Each function splits its rows over `threads` POSIX threads (the caller passes torch's
 * intra-op thread count) so that the work of each output row stays on one thread: results do
 * not depend on the thread count.
 *
 * Compiled with -ffp-contract=off (no multiply-add is fused behind the code's back: where
 * one is meant, fmaf says so, so the elementwise kernels round like the eager PyTorch operations
 * they replace) and -fno-math-errno
 * (sqrtf vectorises; nothing here reads errno).
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;

/* ---- a parallel for over [0, n), cut where a cumulative weight (CSR offsets) is even ---- */

typedef void (*range_fn)(void *arg, i64 lo, i64 hi);

#ifndef _OPENMP
typedef struct {
    range_fn fn;
    void *arg;
    i64 lo, hi;
} job_t;

static void *run_job(void *p) {
    job_t *j = (job_t *)p;
    if (j->hi > j->lo) j->fn(j->arg, j->lo, j->hi);
    return NULL;
}
#endif

/* The first row r with offsets[r] >= target (offsets non-decreasing, n + 1 of them). */
static i64 lower_row(const i64 *offsets, i64 n, i64 target) {
    i64 lo = 0, hi = n;
    while (lo < hi) {
        i64 mid = lo + (hi - lo) / 2;
        if (offsets[mid] < target) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Where the t-th of `threads` ranges over rows [0, n) starts: equal counts, or equal pairs
 * with `offsets` (CSR offsets, n + 1 of them). */
static i64 range_start(i64 n, int t, int threads, const i64 *offsets) {
    if (t >= threads) return n;
    if (!offsets) return n * t / threads;
    return lower_row(offsets, n, offsets[0] + (offsets[n] - offsets[0]) * t / threads);
}

/* Rows [0, n) in `threads` contiguous ranges, one per thread. With OpenMP (linked against the
 * libgomp torch has loaded, so that the kernels run on torch's own thread pool and do not
 * fight its spinning workers for the cores), else POSIX threads. */
static void parallel_rows(i64 n, int threads, const i64 *offsets, range_fn fn, void *arg) {
    if (threads > 64) threads = 64;
    if (threads <= 1 || n < 2) {
        fn(arg, 0, n);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), used = omp_get_num_threads();
        i64 lo = range_start(n, t, used, offsets), hi = range_start(n, t + 1, used, offsets);
        if (hi > lo) fn(arg, lo, hi);
    }
#else
    job_t jobs[64];
    pthread_t tid[64];
    for (int t = 0; t < threads; t++)
        jobs[t] = (job_t){fn, arg, range_start(n, t, threads, offsets), range_start(n, t + 1, threads, offsets)};
    int started[64] = {0};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&tid[t], NULL, run_job, &jobs[t]) == 0;
    run_job(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(tid[t], NULL);
        else run_job(&jobs[t]);  /* no thread to be had: do its share here */
    }
#endif
}

/* ---- vector helpers: GCC/Clang vector types, 16 floats (one AVX-512 register, or two or four
 * narrower ones where the machine has no 512-bit units); loads need not be aligned ---- */

#define LANES 16
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef float vf_unaligned __attribute__((vector_size(4 * LANES), aligned(4), may_alias));

static inline vf load_v(const float *p) { return *(const vf_unaligned *)p; }

static inline void store_v(float *p, vf v) { *(vf_unaligned *)p = v; }

/* a . b over d floats; `next` (or NULL): a row the next call will read, fetched meanwhile (the
 * rows are scattered, so the hardware prefetcher cannot guess them). */
static inline float dot(const float *a, const float *b, i64 d, const float *next) {
    vf acc0 = {0}, acc1 = {0};
    i64 i = 0;
    for (; i + 2 * LANES <= d; i += 2 * LANES) {
        if (next) {
            __builtin_prefetch(next + i, 0, 3);
            __builtin_prefetch(next + i + LANES, 0, 3);
        }
        acc0 += load_v(a + i) * load_v(b + i);
        acc1 += load_v(a + i + LANES) * load_v(b + i + LANES);
    }
    for (; i + LANES <= d; i += LANES) {
        if (next) __builtin_prefetch(next + i, 0, 3);
        acc0 += load_v(a + i) * load_v(b + i);
    }
    acc0 += acc1;
    float s = 0;
    for (int q = 0; q < LANES; q++) s += acc0[q];
    for (; i < d; i++) s += a[i] * b[i];
    return s;
}

/* Rows of bfloat16 (uint16 bits), widened to float32 exactly as they are loaded. */
typedef uint16_t vh_unaligned __attribute__((vector_size(2 * LANES), aligned(2), may_alias));
typedef uint32_t vu __attribute__((vector_size(4 * LANES)));

static inline vf load_h(const uint16_t *p) {
    vu u = __builtin_convertvector(*(const vh_unaligned *)p, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float f32_of_h(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* y += w x over d values, x a bfloat16 row. */
static inline void axpy_h(float *y, float w, const uint16_t *x, i64 d, const uint16_t *next) {
    i64 i = 0;
    for (; i + LANES <= d; i += LANES) {
        if (next && i % (2 * LANES) == 0) __builtin_prefetch(next + i, 0, 3);
        store_v(y + i, load_v(y + i) + w * load_h(x + i));
    }
    for (; i < d; i++) y[i] += w * f32_of_h(x[i]);
}

/* Both at once over one read of g: returns g . b (summed as dot sums) and does y += w g; G the
 * row's element type, LOAD its vector load, TO_F32 one element as a float. */
#define DOT_AXPY(NAME, G, LOAD, TO_F32)                                                           \
    static inline float NAME(const G *g, const float *b, float *y, float w, i64 d, const G *next) { \
        vf acc0 = {0}, acc1 = {0};                                                                \
        i64 i = 0;                                                                                \
        for (; i + 2 * LANES <= d; i += 2 * LANES) {                                              \
            if (next) {                                                                           \
                __builtin_prefetch(next + i, 0, 3);                                               \
                __builtin_prefetch(next + i + LANES, 0, 3);                                       \
            }                                                                                     \
            vf g0 = LOAD(g + i), g1 = LOAD(g + i + LANES);                                        \
            acc0 += g0 * load_v(b + i);                                                           \
            acc1 += g1 * load_v(b + i + LANES);                                                   \
            store_v(y + i, load_v(y + i) + w * g0);                                               \
            store_v(y + i + LANES, load_v(y + i + LANES) + w * g1);                               \
        }                                                                                         \
        for (; i + LANES <= d; i += LANES) {                                                      \
            if (next) __builtin_prefetch(next + i, 0, 3);                                         \
            vf g0 = LOAD(g + i);                                                                  \
            acc0 += g0 * load_v(b + i);                                                           \
            store_v(y + i, load_v(y + i) + w * g0);                                               \
        }                                                                                         \
        acc0 += acc1;                                                                             \
        float s = 0;                                                                              \
        for (int q = 0; q < LANES; q++) s += acc0[q];                                             \
        for (; i < d; i++) {                                                                      \
            float gi = TO_F32(g[i]);                                                              \
            s += gi * b[i];                                                                       \
            y[i] += w * gi;                                                                       \
        }                                                                                         \
        return s;                                                                                 \
    }
#define F32_ID(x) (x)
DOT_AXPY(dot_axpy, float, load_v, F32_ID)
DOT_AXPY(dot_axpy_h, uint16_t, load_h, f32_of_h)

/* y += w x over d floats (prefetching `next` like dot). */
static inline void axpy(float *y, float w, const float *x, i64 d, const float *next) {
    i64 i = 0;
    for (; i + LANES <= d; i += LANES) {
        if (next) __builtin_prefetch(next + i, 0, 3);
        store_v(y + i, load_v(y + i) + w * load_v(x + i));
    }
    for (; i < d; i++) y[i] += w * x[i];
}

/* ---- exact top-k of each row -------------------------------------------------------------
 * Values are compared as integers: a float's bits with the magnitude bits of negative numbers
 * flipped order exactly like the floats (-0 just below +0; a NaN above +inf when its sign bit is
 * clear, below -inf when set, so a positive NaN is ranked first, as torch.topk ranks NaN).
 * The row's columns are cut into G strided groups (column c = g * W + j sits in slot j of group
 * g) and each slot's maximum over the groups is taken, a vertical max the compiler vectorises.
 * The k largest slot maxima are k of the row's values, so the k-th largest of them, t (found by
 * bisection on the key, each step a vectorised count), is at most the row's k-th largest value:
 * every value of the row's top k is >= t and lies in a slot whose maximum is >= t. Only those
 * slots (about k of W) are read again, their values >= t collected in column order (every value
 * >= t is, ties at the k-th place included), and the k largest of the candidates kept in that
 * order, ties going to the highest columns: each row's columns come out ascending.
 */

/* A candidate: its key in the high half, its column in the low half, so that a larger rank is a
 * larger value or, among equal values, a higher column: ties go to the highest columns, the
 * same ones every time (torch.topk breaks ties as its algorithm happens to meet them). */
typedef int64_t cand_t;

static inline cand_t rank_of(int32_t key, i64 col) {
    return (cand_t)key * 4294967296LL + (cand_t)(uint32_t)col;
}

static inline i64 col_of(cand_t c) { return (i64)(uint32_t)(c & 0xFFFFFFFF); }

static inline int32_t key_f32(uint32_t u) {
    int32_t s = (int32_t)u;
    return s ^ ((s >> 31) & 0x7FFFFFFF);
}

static inline int32_t key_bf16(uint16_t u) {
    int32_t s = (int16_t)u;
    return s ^ ((s >> 15) & 0x7FFF);
}

/* Reorder c[0..m) so that c[0..k) hold the k largest (0 < k <= m). */
static void keep_largest(cand_t *c, i64 m, i64 k) {
    i64 lo = 0, hi = m - 1;
    while (lo < hi) {
        cand_t pivot = c[lo + (hi - lo) / 2];
        i64 i = lo, j = hi;
        while (i <= j) {
            while (c[i] > pivot) i++;
            while (c[j] < pivot) j--;
            if (i <= j) {
                cand_t t = c[i];
                c[i] = c[j];
                c[j] = t;
                i++;
                j--;
            }
        }
        if (k - 1 <= j) hi = j;
        else if (k - 1 >= i) lo = i;
        else break;
    }
}

/* The k-th largest of s[0..w) (0 < k <= w): the largest t with at least k values >= t, by
 * bisection between the least and the largest value (for bfloat16 keys at most 17 steps, each a
 * branch-free count the compiler vectorises). */
static int32_t kth_largest(const int32_t *s, i64 w, i64 k) {
    int32_t least = s[0], most = s[0];
    for (i64 j = 1; j < w; j++) {
        least = s[j] < least ? s[j] : least;
        most = s[j] > most ? s[j] : most;
    }
    int64_t lo = least, hi = most; /* at least k values >= lo; fewer than k > hi */
    while (lo < hi) {
        int32_t mid = (int32_t)(lo + (hi - lo + 1) / 2), count = 0;
        for (i64 j = 0; j < w; j++) count += s[j] >= mid;
        if (count >= k) lo = mid;
        else hi = (int64_t)mid - 1;
    }
    return (int32_t)lo;
}

typedef struct {
    const void *src;
    int bf16;
    i64 cols, ld, k, groups;
    i64 *idx;
    float *vals;
    int failed; /* set where a thread could not get its scratch memory */
} topk_args;

/* One row type at a time: T the element, KEY its key, TO_F32 its value as a float. Scratch:
 * slot_max [W], slots [W], c and c2 [cols] each. */
#define TOPK_ROW(NAME, T, KEY, TO_F32)                                                              \
    static void NAME(const T *row, const topk_args *a, int32_t *slot_max, i64 *slots, cand_t *c,    \
                     cand_t *c2, i64 *idx, float *vals) {                                           \
        i64 n = a->cols, k = a->k, G = a->groups, W = n / G, tail = W * G;                          \
        for (i64 j = 0; j < W; j++) slot_max[j] = KEY(row[j]);                                      \
        for (i64 g = 1; g < G; g++) {                                                               \
            const T *r = row + g * W;                                                               \
            for (i64 j = 0; j < W; j++) {                                                           \
                int32_t v = KEY(r[j]);                                                              \
                slot_max[j] = v > slot_max[j] ? v : slot_max[j];                                    \
            }                                                                                       \
        }                                                                                           \
        /* the k-th largest slot maximum, or none with fewer than k slots */                        \
        int32_t t = W >= k ? kth_largest(slot_max, W, k) : INT32_MIN;                               \
        i64 ns = 0, m = 0;                                                                          \
        for (i64 j = 0; j < W; j++) { /* the slots that can hold the top k, ascending */            \
            slots[ns] = j;                                                                          \
            ns += slot_max[j] >= t;                                                                 \
        }                                                                                           \
        for (i64 g = 0; g < G; g++) { /* column order; branch-free: write always, keep if >= t */   \
            const T *r = row + g * W;                                                               \
            for (i64 q = 0; q < ns; q++) {                                                          \
                int32_t v = KEY(r[slots[q]]);                                                       \
                c[m] = rank_of(v, g * W + slots[q]);                                                \
                m += v >= t;                                                                        \
            }                                                                                       \
        }                                                                                           \
        for (i64 j = tail; j < n; j++) {                                                            \
            int32_t v = KEY(row[j]);                                                                \
            if (v >= t) c[m++] = rank_of(v, j);                                                     \
        }                                                                                           \
        cand_t least = INT64_MIN; /* the k-th largest candidate: keep those >= it, in order */      \
        if (m > k) {                                                                                \
            memcpy(c2, c, sizeof(cand_t) * (size_t)m);                                              \
            keep_largest(c2, m, k);                                                                 \
            least = INT64_MAX;                                                                      \
            for (i64 q = 0; q < k; q++) least = c2[q] < least ? c2[q] : least;                      \
        }                                                                                           \
        for (i64 q = 0, out = 0; q < m; q++) { /* ranks are distinct: exactly k pass */             \
            if (c[q] < least) continue;                                                             \
            idx[out] = col_of(c[q]);                                                                \
            if (vals) vals[out] = TO_F32(row[idx[out]]);                                            \
            out++;                                                                                  \
        }                                                                                           \
    }

static inline float f32_of_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
#define KEY_F32(x) key_f32(x)
#define KEY_BF16(x) key_bf16(x)
#define F32_OF_F32(x) f32_of_bits(x)
#define F32_OF_BF16(x) f32_of_bits((uint32_t)(x) << 16)
TOPK_ROW(topk_row_f32, uint32_t, KEY_F32, F32_OF_F32)
TOPK_ROW(topk_row_bf16, uint16_t, KEY_BF16, F32_OF_BF16)

/* Scratch memory kept per thread between calls (freed when the thread exits): a fresh malloc
 * of a few hundred kB per call is an mmap and its page faults every time. */
typedef struct {
    void *mem;
    size_t size;
} scratch_t;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_ok; /* the key was created */

static void scratch_free(void *p) {
    scratch_t *s = (scratch_t *)p;
    free(s->mem);
    free(s);
}

static void scratch_init(void) {
    scratch_ok = pthread_key_create(&scratch_key, scratch_free) == 0;
}

static void *thread_scratch(size_t size) {
    pthread_once(&scratch_once, scratch_init);
    if (!scratch_ok) return NULL;
    scratch_t *s = (scratch_t *)pthread_getspecific(scratch_key);
    if (!s) {
        s = (scratch_t *)calloc(1, sizeof *s);
        if (!s) return NULL;
        if (pthread_setspecific(scratch_key, s)) {
            free(s);
            return NULL;
        }
    }
    if (s->size < size) {
        free(s->mem);
        s->mem = malloc(size);
        s->size = s->mem ? size : 0;
    }
    return s->mem;
}

static void topk_range(void *p, i64 lo, i64 hi) {
    topk_args *a = (topk_args *)p;
    /* two candidate lists (at most every column each), the slot maxima and the slots kept */
    size_t n = (size_t)a->cols;
    void *mem = thread_scratch(2 * sizeof(cand_t) * n + sizeof(int32_t) * n + sizeof(i64) * n);
    if (!mem) {
        a->failed = 1;
        return;
    }
    cand_t *c = (cand_t *)mem, *c2 = c + n;
    i64 *slots = (i64 *)(c2 + n);
    int32_t *slot_max = (int32_t *)(slots + n);
    for (i64 r = lo; r < hi; r++) {
        i64 *idx = a->idx + r * a->k;
        float *vals = a->vals ? a->vals + r * a->k : NULL;
        if (a->bf16) topk_row_bf16((const uint16_t *)a->src + r * a->ld, a, slot_max, slots, c, c2, idx, vals);
        else topk_row_f32((const uint32_t *)a->src + r * a->ld, a, slot_max, slots, c, c2, idx, vals);
    }
}

/* Each of `rows` rows (row stride `ld` elements, `cols` of them, float32 or bfloat16 bits): the
 * columns of its k largest values into idx [rows, k], ascending, and, if vals, their values as float32.
 * `groups` strided groups (0: a choice that suits k and cols). 0 < k <= cols < 2^31. Returns 0,
 * or 1 where memory ran out (the output is then incomplete: rank with torch). */
int dl_topk_rows(const void *src, int bf16, i64 rows, i64 cols, i64 ld, i64 k, i64 groups, i64 *idx, float *vals,
                  int threads) {
    if (groups <= 0) {
        groups = 64;  /* the most groups that leave 8k slots: a tight bound, few values read again */
        while (groups > 1 && cols / groups < 8 * k) groups /= 2;
    }
    if (groups > cols) groups = cols;
    topk_args a = {src, bf16, cols, ld, k, groups, idx, vals, 0};
    parallel_rows(rows, threads, NULL, topk_range, &a);
    return a.failed;
}

/* ---- sparse products on a CSR pattern -------------------------------------------------- */

/* How many pairs ahead a scattered row is fetched into cache. */
#ifndef PREFETCH
#define PREFETCH 2
#endif

typedef struct {
    i64 d;
    const i64 *crow, *idx, *perm;
    const float *w, *dense, *other, *bias;
    float *out, *out2;
    int dense_bf16; /* `dense` holds bfloat16 rows (uint16 bits), widened exactly as read */
} sparse_args;

/* out[n] = dense[r] . other[idx[n]] (+ bias[idx[n]]) for every pair n of row r. */
static void sddmm_range(void *p, i64 lo, i64 hi) {
    sparse_args *a = (sparse_args *)p;
    for (i64 r = lo; r < hi; r++) {
        const float *x = a->dense + r * a->d;
        for (i64 n = a->crow[r]; n < a->crow[r + 1]; n++) {
            i64 f = a->idx[n];
            const float *next = n + PREFETCH < a->crow[hi] ? a->other + a->idx[n + PREFETCH] * a->d : NULL;
            a->out[n] = dot(x, a->other + f * a->d, a->d, next) + (a->bias ? a->bias[f] : 0.0f);
        }
    }
}

void dl_sddmm(i64 rows, i64 d, const i64 *crow, const i64 *idx, const float *a, const float *b, const float *bias,
              float *out, int threads) {
    sparse_args s = {d, crow, idx, NULL, NULL, a, b, bias, out, NULL, 0};
    parallel_rows(rows, threads, crow, sddmm_range, &s);
}

/* out[r] = (bias, or zeros) + the sum over pairs n of row r of w[perm ? perm[n] : n] * dense[idx[n]];
 * with out2, out2[r] = the sum of those weights. Rows without pairs come out as the bias. */
static void spmm_range(void *p, i64 lo, i64 hi) {
    sparse_args *a = (sparse_args *)p;
    for (i64 r = lo; r < hi; r++) {
        float *y = a->out + r * a->d, total = 0;
        if (a->bias) memcpy(y, a->bias, sizeof(float) * (size_t)a->d);
        else memset(y, 0, sizeof(float) * (size_t)a->d);
        for (i64 n = a->crow[r]; n < a->crow[r + 1]; n++) {
            float w = a->w[a->perm ? a->perm[n] : n];
            i64 ahead = n + PREFETCH < a->crow[hi] ? a->idx[n + PREFETCH] : -1;
            if (a->dense_bf16) {
                const uint16_t *dense = (const uint16_t *)a->dense;
                axpy_h(y, w, dense + a->idx[n] * a->d, a->d, ahead >= 0 ? dense + ahead * a->d : NULL);
            } else {
                axpy(y, w, a->dense + a->idx[n] * a->d, a->d, ahead >= 0 ? a->dense + ahead * a->d : NULL);
            }
            total += w;
        }
        if (a->out2) a->out2[r] = total;
    }
}

void dl_spmm(i64 rows, i64 d, const i64 *crow, const i64 *idx, const i64 *perm, const float *w, const void *dense,
             int dense_bf16, const float *bias, float *out, float *sums, int threads) {
    sparse_args s = {d, crow, idx, perm, w, (const float *)dense, NULL, bias, out, sums, dense_bf16};
    parallel_rows(rows, threads, crow, spmm_range, &s);
}

/* The decoder's backward pass in one sweep over the transposed pattern (features as rows):
 * for each pair n of feature f (row idx[n], original position perm[n]),
 * gv[perm[n]] = g[idx[n]] . W[f] and gW[f] = sum of vals[perm[n]] * g[idx[n]]. */
static void decode_back_range(void *p, i64 lo, i64 hi) {
    sparse_args *a = (sparse_args *)p;
    for (i64 f = lo; f < hi; f++) {
        float *y = a->out2 + f * a->d;
        const float *wf = a->other + f * a->d;
        memset(y, 0, sizeof(float) * (size_t)a->d);
        for (i64 n = a->crow[f]; n < a->crow[f + 1]; n++) {
            i64 at = a->perm[n], row = a->idx[n], ahead = n + PREFETCH < a->crow[hi] ? a->idx[n + PREFETCH] : -1;
            if (a->dense_bf16) {
                const uint16_t *dense = (const uint16_t *)a->dense, *g = dense + row * a->d;
                const uint16_t *next = ahead >= 0 ? dense + ahead * a->d : NULL;
                if (a->out) a->out[at] = dot_axpy_h(g, wf, y, a->w[at], a->d, next);
                else axpy_h(y, a->w[at], g, a->d, next);
            } else {
                const float *g = a->dense + row * a->d, *next = ahead >= 0 ? a->dense + ahead * a->d : NULL;
                if (a->out) a->out[at] = dot_axpy(g, wf, y, a->w[at], a->d, next);
                else axpy(y, a->w[at], g, a->d, next);
            }
        }
    }
}

void dl_decode_backward(i64 n_features, i64 d, const i64 *crow_t, const i64 *rows_t, const i64 *perm,
                        const float *vals, const void *g, int g_bf16, const float *W, float *gv, float *gW,
                        int threads) {
    sparse_args s = {d, crow_t, rows_t, perm, vals, (const float *)g, W, NULL, gv, gW, g_bf16};
    parallel_rows(n_features, threads, crow_t, decode_back_range, &s);
}

/* The transposed pattern by a counting sort (stable: pairs of a feature keep their order):
 * crow_t [F + 1], perm [nnz] (the original position of each transposed pair), rows_t [nnz].
 * The rows are cut into PARTS parts of equal pairs (however many threads run them, so the
 * result never depends on the thread count): each part counts its columns, the counts give each
 * (feature, part) its place, and each part writes its pairs there. */
#define PARTS 8

typedef struct {
    i64 n_rows, n_features;
    const i64 *crow, *idx;
    i64 *counts; /* [PARTS, F]: counts, then where each part's next pair of a feature goes */
    i64 *perm, *rows_t;
    int place; /* 0: count each part's columns; 1: write each part's pairs at their places */
} transpose_args;

static void transpose_parts(void *p, i64 lo, i64 hi) {
    transpose_args *a = (transpose_args *)p;
    for (i64 part = lo; part < hi; part++) {
        i64 *count = a->counts + part * a->n_features;
        i64 r0 = range_start(a->n_rows, (int)part, PARTS, a->crow);
        i64 r1 = range_start(a->n_rows, (int)part + 1, PARTS, a->crow);
        if (!a->place) {
            memset(count, 0, sizeof(i64) * (size_t)a->n_features);
            for (i64 n = a->crow[r0]; n < a->crow[r1]; n++) count[a->idx[n]]++;
            continue;
        }
        for (i64 r = r0; r < r1; r++)
            for (i64 n = a->crow[r]; n < a->crow[r + 1]; n++) {
                i64 at = count[a->idx[n]]++;
                a->perm[at] = n;
                a->rows_t[at] = r;
            }
    }
}

int dl_transpose(i64 n_rows, i64 n_features, const i64 *crow, const i64 *idx, i64 *crow_t, i64 *perm,
                  i64 *rows_t, int threads) {
    i64 *counts = (i64 *)malloc(sizeof(i64) * PARTS * (size_t)(n_features > 0 ? n_features : 1));
    if (!counts) return 1;
    transpose_args a = {n_rows, n_features, crow, idx, counts, perm, rows_t, 0};
    parallel_rows(PARTS, threads, NULL, transpose_parts, &a);
    i64 at = 0; /* feature by feature, part by part: each count becomes that part's first place */
    for (i64 f = 0; f < n_features; f++) {
        crow_t[f] = at;
        for (int part = 0; part < PARTS; part++) {
            i64 c = counts[part * n_features + f];
            counts[part * n_features + f] = at;
            at += c;
        }
    }
    crow_t[n_features] = at;
    a.place = 1;
    parallel_rows(PARTS, threads, NULL, transpose_parts, &a);
    free(counts);
    return 0;
}

/* ---- the decoder's gradient, projected off its unit rows: g[f] -= (g[f] . W[f]) W[f] ---- */

typedef struct {
    i64 d;
    const float *W;
    float *g;
} project_args;

static inline void project_row(float *g, const float *w, i64 d) { axpy(g, -dot(g, w, d, NULL), w, d, NULL); }

static void project_range(void *p, i64 lo, i64 hi) {
    project_args *a = (project_args *)p;
    for (i64 f = lo; f < hi; f++) project_row(a->g + f * a->d, a->W + f * a->d, a->d);
}

void dl_project_rows(i64 rows, i64 d, const float *W, float *g, int threads) {
    project_args a = {d, W, g};
    parallel_rows(rows, threads, NULL, project_range, &a);
}

/* ---- each row divided by its norm (at least `least`), as W.div_(W.norm(dim=1).clamp_min(least)) ---- */

typedef struct {
    i64 d;
    float least;
    float *W;
} normalize_args;

static inline void normalize_row(float *w, i64 d, float least) {
    float norm = sqrtf(dot(w, w, d, NULL));
    norm = norm > least ? norm : least;
    for (i64 i = 0; i < d; i++) w[i] = w[i] / norm;
}

static void normalize_range(void *p, i64 lo, i64 hi) {
    normalize_args *a = (normalize_args *)p;
    for (i64 f = lo; f < hi; f++) normalize_row(a->W + f * a->d, a->d, a->least);
}

void dl_normalize_rows(i64 rows, i64 d, float *W, float least, int threads) {
    normalize_args a = {d, least, W};
    parallel_rows(rows, threads, NULL, normalize_range, &a);
}

/* ---- schedule-free AdamW in one pass ---------------------------------------------------
 * Per element, in this order (the eager ScheduleFreeAdam.step of dictlens/train/optim.py):
 *   v = beta2 v + (one_m g) g  (one_m = 1 - beta2 rounded once, as torch gets it);  u = g / (sqrt(v) + eps_bc);  u += wd * p  (if wd)
 *   p = p + c (z - p);  p = p + a u;  z = z - b u
 * with the multiply-adds fused where torch's vectorised CPU kernels fuse them (addcmul, add and
 * sub with alpha, lerp's two forms), so that both round alike. */

typedef struct {
    float *p, *z, *v;
    float *g;
    float beta2, one_m, eps_bc, wd, c, a, b;
    i64 d; /* > 0: rows of d kept at unit norm (see dl_sfadam) */
} sfadam_args;

static inline void sfadam_elements(const sfadam_args *s, i64 lo, i64 hi) {
    float beta2 = s->beta2, one_m = s->one_m, eps = s->eps_bc, wd = s->wd, c = s->c, a = s->a, b = s->b;
    float *p = s->p, *z = s->z, *v = s->v;
    const float *g = s->g;
    for (i64 i = lo; i < hi; i++) {
        float gi = g[i], vi = fmaf(one_m * gi, gi, v[i] * beta2);
        v[i] = vi;
        float u = gi / (sqrtf(vi) + eps);
        if (wd != 0.0f) u = fmaf(wd, p[i], u);
        float pi = p[i], zi = z[i];
        pi = c < 0.5f ? fmaf(c, zi - pi, pi) : fmaf(-(zi - pi), 1.0f - c, zi);
        p[i] = fmaf(a, u, pi);
        z[i] = fmaf(-b, u, zi);
    }
}

static void sfadam_range(void *q, i64 lo, i64 hi) { sfadam_elements((const sfadam_args *)q, lo, hi); }

/* Row by row, while the row is in cache: the gradient projected off the (unit) row, the update,
 * the row renormalised: dl_project_rows, the update and dl_normalize_rows in one pass. */
static void sfadam_rows_range(void *q, i64 lo, i64 hi) {
    sfadam_args *s = (sfadam_args *)q;
    for (i64 r = lo; r < hi; r++) {
        project_row(s->g + r * s->d, s->p + r * s->d, s->d);
        sfadam_elements(s, r * s->d, (r + 1) * s->d);
        normalize_row(s->p + r * s->d, s->d, 1e-12f);
    }
}

/* One schedule-free AdamW step of n weights. With d > 0 the weights are rows of d (n / d of them)
 * held at unit norm: each row's gradient is first projected off the row (in place) and the row
 * renormalised after its update, as the separate passes would. */
void dl_sfadam(i64 n, float *p, float *z, float *v, float *g, float beta2, float one_m, float eps_bc, float wd,
               float c, float a, float b, i64 d, int threads) {
    sfadam_args s = {p, z, v, g, beta2, one_m, eps_bc, wd, c, a, b, d};
    if (d > 0) {
        parallel_rows(n / d, threads, NULL, sfadam_rows_range, &s);
        return;
    }
    /* blocks of 64k elements keep each thread's share contiguous and large */
    parallel_rows(n, n < (1 << 16) ? 1 : threads, NULL, sfadam_range, &s);
}
