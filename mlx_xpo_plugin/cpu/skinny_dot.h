/* Dot-form kernels of skinny.c, included twice: once compiled for AVX2+FMA, once for the
 * architecture's baseline. SKINNY_SUFFIX names the copy.
 *
 * C[r, n] = alpha * sum_k A[r, k] * B[n, k] + beta * C[r, n]   for r < R, n in [n0, n1)
 *
 * Each of the NB weight rows B[n..n+NB) is read once for all R activation rows, 8 lanes at a
 * time, with one accumulator per (row, weight row); a column's sum does not depend on how the
 * columns were split between threads or grouped by NB (same lanes, same order), so results do
 * not depend on the thread count. beta == 0 does not read C (BLAS semantics: NaN there is
 * overwritten). */

#define SK_CAT_(a, b) a##_##b
#define SK_CAT(a, b) SK_CAT_(a, b)
#define SK_FN(name) SK_CAT(name, SKINNY_SUFFIX)

static inline float SK_FN(hsum)(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

#define DOT_KERNEL(R, NB)                                                                        \
    static void SK_FN(dot_##R##_##NB)(const float *A, int lda, const float *B, int ldb, float *C, \
                                      int ldc, int K, int n0, int n1, float alpha, float beta) { \
        const int kv = K - K % VL;                                                               \
        for (int n = n0; n + NB <= n1; n += NB) {                                                \
            vf acc[R][NB];                                                                       \
            for (int r = 0; r < R; r++)                                                          \
                for (int j = 0; j < NB; j++) acc[r][j] = (vf){0};                                \
            const float *w[NB];                                                                  \
            for (int j = 0; j < NB; j++) w[j] = B + (size_t)(n + j) * ldb;                       \
            for (int k = 0; k < kv; k += VL) {                                                   \
                vf wv[NB];                                                                       \
                for (int j = 0; j < NB; j++) {                                                   \
                    __builtin_prefetch(w[j] + k + AHEAD);                                        \
                    wv[j] = *(const vf *)(w[j] + k);                                             \
                }                                                                                \
                for (int r = 0; r < R; r++) {                                                    \
                    vf a = *(const vf *)(A + (size_t)r * lda + k);                               \
                    for (int j = 0; j < NB; j++) acc[r][j] += a * wv[j];                         \
                }                                                                                \
            }                                                                                    \
            for (int r = 0; r < R; r++)                                                          \
                for (int j = 0; j < NB; j++) {                                                   \
                    float s = SK_FN(hsum)(acc[r][j]);                                            \
                    for (int k = kv; k < K; k++) s += A[(size_t)r * lda + k] * w[j][k];          \
                    float *c = C + (size_t)r * ldc + n + j;                                      \
                    *c = beta == 0.0f ? alpha * s : alpha * s + beta * *c;                       \
                }                                                                                \
        }                                                                                        \
    }

DOT_KERNEL(1, 4)
DOT_KERNEL(2, 4)
DOT_KERNEL(3, 4)
DOT_KERNEL(4, 4)
DOT_KERNEL(1, 1)
DOT_KERNEL(2, 1)
DOT_KERNEL(3, 1)
DOT_KERNEL(4, 1)
DOT_KERNEL(5, 1)
DOT_KERNEL(6, 1)
DOT_KERNEL(7, 1)
DOT_KERNEL(8, 1)

typedef void (*dot_fn)(const float *, int, const float *, int, float *, int, int, int, int, float, float);

/* columns [n0, n1) of all M rows: groups of 4 columns where there is a 4-column kernel for M */
static void SK_FN(columns)(int M, const float *A, int lda, const float *B, int ldb, float *C, int ldc,
                           int K, int n0, int n1, float alpha, float beta) {
    static const dot_fn wide[5] = {0, SK_FN(dot_1_4), SK_FN(dot_2_4), SK_FN(dot_3_4), SK_FN(dot_4_4)};
    static const dot_fn narrow[9] = {0, SK_FN(dot_1_1), SK_FN(dot_2_1), SK_FN(dot_3_1), SK_FN(dot_4_1),
                                     SK_FN(dot_5_1), SK_FN(dot_6_1), SK_FN(dot_7_1), SK_FN(dot_8_1)};
    int n = n0;
    if (M <= 4) {
        int n4 = n0 + (n1 - n0) / 4 * 4;
        wide[M](A, lda, B, ldb, C, ldc, K, n0, n4, alpha, beta);
        n = n4;
    }
    narrow[M](A, lda, B, ldb, C, ldc, K, n, n1, alpha, beta);
}

#undef DOT_KERNEL
#undef SK_FN
#undef SK_CAT
#undef SK_CAT_
