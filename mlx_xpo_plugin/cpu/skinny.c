/* Few-row matrix products for decoding: C = alpha * A @ B.T + beta * C with A of 1-8 rows.
 *
 * While a model decodes, every layer multiplies a few activation rows (one per completion) by a
 * weight matrix stored as nn.Linear keeps it, [N, K] row by row, so MLX asks BLAS for
 * sgemm(RowMajor, NoTrans, Trans, M <= 8, N, K). Such a product costs reading the weights once,
 * but OpenBLAS packs them for a general product first and streams them at a fraction of the
 * memory's speed. Here each weight row is read once, straight from where it lies, and dotted
 * with all M activation rows (skinny_dot.h), the columns split between a small pool of threads.
 *
 * xpo_cblas_sgemm has cblas_sgemm's signature and takes its place for MLX (mlx_xpo_plugin/host/
 * skinny.py binds it through blas_shim.py); every other product, and these below
 * min_elements = N * K, are forwarded to the BLAS's own sgemm. The thread count is the BLAS's
 * (openblas_get_num_threads, read at every call, so the per-phase counts fast_blas.py sets apply
 * here too), further cut so that each thread has at least per_thread_elements weights. Idle pool
 * threads spin spin_iterations pauses, then sleep on a condition variable.
 *
 * Standard C11 and GCC builtins only (x86-64 and AArch64). */

#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

typedef float vf __attribute__((vector_size(32), aligned(4))); /* 8 floats, any alignment */
#define VL 8
#define AHEAD 128 /* floats ahead of the current read to prefetch, in each weight row */

#define SKINNY_SUFFIX base
#include "skinny_dot.h"
#undef SKINNY_SUFFIX

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SKINNY_SUFFIX avx2
#include "skinny_dot.h"
#undef SKINNY_SUFFIX
#pragma GCC pop_options
#endif

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, MAX_ROWS = 8, MAX_THREADS = 64 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef int (*threads_fn)(void);
typedef void (*columns_fn)(int, const float *, int, const float *, int, float *, int, int, int, int, float,
                           float);

static sgemm_fn forward_sgemm;
static threads_fn blas_threads;
static columns_fn columns = columns_base;
static const char *isa = "generic";
static long min_elements = 1L << 15, per_thread_elements = 1L << 18, spin_iterations = 20000;
static atomic_long counts[2]; /* products computed here, products forwarded */

static inline void relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* ---- the thread pool: one job at a time (one_job), published by a word that holds its sequence
 * number and thread count, so a worker not taking part never reads the job's fields */
static struct {
    int M, K, N, lda, ldb, ldc, threads;
    const float *A, *B;
    float *C;
    float alpha, beta;
} job;
static atomic_ulong published; /* (sequence << 8) | threads */
static atomic_int finished;
static pthread_mutex_t one_job = PTHREAD_MUTEX_INITIALIZER, sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static int workers; /* started so far (grows under one_job) */
static unsigned long started_at[MAX_THREADS]; /* `published` when each worker was started */

static void run_part(int part) {
    /* thread `part` of job.threads takes a range of columns, whole groups of 4 */
    int groups = (job.N + 3) / 4;
    int g0 = (int)((long)groups * part / job.threads), g1 = (int)((long)groups * (part + 1) / job.threads);
    int n0 = g0 * 4, n1 = g1 * 4 < job.N ? g1 * 4 : job.N;
    if (n0 < n1) columns(job.M, job.A, job.lda, job.B, job.ldb, job.C, job.ldc, job.K, n0, n1, job.alpha, job.beta);
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg; /* 1..: the caller is part 0 */
    unsigned long seen = started_at[id]; /* not a load here: the first job may already be out */
    for (;;) {
        unsigned long now;
        long spins = 0;
        while ((now = atomic_load_explicit(&published, memory_order_acquire)) == seen) {
            if (++spins < spin_iterations) {
                relax();
                continue;
            }
            pthread_mutex_lock(&sleep_lock);
            while (atomic_load(&published) == seen) pthread_cond_wait(&wake, &sleep_lock);
            pthread_mutex_unlock(&sleep_lock);
        }
        seen = now;
        if (id < (int)(now & 0xff)) {
            run_part(id);
            atomic_fetch_add_explicit(&finished, 1, memory_order_release);
        }
    }
    return NULL;
}

static int grow_pool(int threads) { /* under one_job: start workers 1..threads-1; returns the count usable */
    while (workers + 1 < threads) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        started_at[workers + 1] = atomic_load(&published);
        int failed = pthread_create(&t, &attr, worker, (void *)(intptr_t)(workers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        workers++;
    }
    return workers + 1 < threads ? workers + 1 : threads;
}

static int threads_for(long elements) {
    int t = blas_threads ? blas_threads() : 1;
    long most = elements / (per_thread_elements > 0 ? per_thread_elements : 1);
    if (t > most) t = (int)most;
    if (t > MAX_THREADS) t = MAX_THREADS;
    return t < 1 ? 1 : t;
}

/* the threads a product of `elements` weights runs on; above one, the caller holds the pool
 * (one_job) and releases it when the product is done. One while another caller has the pool. */
static int take_pool(long elements) {
    int threads = threads_for(elements);
    if (threads == 1 || pthread_mutex_trylock(&one_job) != 0) return 1;
    threads = grow_pool(threads);
    if (threads == 1) pthread_mutex_unlock(&one_job);
    return threads;
}

static void multiply(int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                     float beta, float *C, int ldc) {
    int threads = take_pool((long)N * K);
    if (threads == 1) {
        columns(M, A, lda, B, ldb, C, ldc, K, 0, N, alpha, beta);
        return;
    }
    job.M = M, job.N = N, job.K = K, job.A = A, job.lda = lda, job.B = B, job.ldb = ldb, job.C = C;
    job.ldc = ldc, job.alpha = alpha, job.beta = beta, job.threads = threads;
    atomic_store_explicit(&finished, 0, memory_order_relaxed);
    unsigned long sequence = (atomic_load(&published) >> 8) + 1;
    atomic_store_explicit(&published, (sequence << 8) | (unsigned long)threads, memory_order_release);
    pthread_mutex_lock(&sleep_lock); /* wakes the workers that went to sleep; spinning ones saw it */
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&sleep_lock);
    run_part(0);
    for (long spins = 0; atomic_load_explicit(&finished, memory_order_acquire) < threads - 1; spins++)
        if (spins < 4096) relax();
        else sched_yield();
    pthread_mutex_unlock(&one_job);
}

/* a child process of fork() has none of the workers: it starts its own when it needs them */
static void forget_workers(void) {
    workers = 0;
    pthread_mutex_init(&one_job, NULL);
    pthread_mutex_init(&sleep_lock, NULL);
    pthread_cond_init(&wake, NULL);
}

static void at_fork(void) { pthread_atfork(NULL, NULL, forget_workers); }

/* ---- exported */

void xpo_cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha, const float *A,
                     int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == TRANS && M >= 1 && M <= MAX_ROWS && K > 0 &&
        (long)N * K >= min_elements) {
        atomic_fetch_add_explicit(&counts[0], 1, memory_order_relaxed);
        multiply(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    atomic_fetch_add_explicit(&counts[1], 1, memory_order_relaxed);
    forward_sgemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* the BLAS's own sgemm (every product this does not take) and its thread count (NULL: one) */
int xpo_skinny_init(sgemm_fn sgemm, threads_fn get_threads) {
    if (!sgemm) return -1;
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    forward_sgemm = sgemm;
    blas_threads = get_threads;
    pthread_once(&once, at_fork);
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        columns = columns_avx2;
        isa = "avx2+fma";
    }
#endif
    return 0;
}

const char *xpo_skinny_isa(void) { return isa; }

void xpo_skinny_counts(long out[2]) {
    out[0] = atomic_load(&counts[0]);
    out[1] = atomic_load(&counts[1]);
}

/* a negative value leaves a setting as it is */
void xpo_skinny_tune(long min, long per_thread, long spins) {
    if (min >= 0) min_elements = min;
    if (per_thread >= 0) per_thread_elements = per_thread;
    if (spins >= 0) spin_iterations = spins;
}
