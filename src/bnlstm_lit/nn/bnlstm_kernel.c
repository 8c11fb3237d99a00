/* Per-step pointwise and batch-norm work of the BN-LSTM recurrence (bnlstm_lit.nn.kernel), on float32 CPU tensors.
 *
 * One step of the training recurrence is the recurrent matmul wh = W_h h_{t-1} (done by torch) and one call of
 * bnlstm_forward_step; its gradient is one call of bnlstm_backward_step and the matmul dh_{t-1} = dwh W_h (torch).
 * What these compute is exactly bnlstm_lit.nn.fused._forward_step / _backward_step:
 *
 *   BN_h(wh) = (wh - mean_h) * invstd_h * gamma_h      batch statistics over B rows, biased variance
 *   pre = BN_h(wh) + x_t;  i, f, o = sigmoid, g = tanh  gate order i, f, g, o
 *   with input_bn: x_t = BN_x(wx_t) + bias, the input term's batch norm too (wx_t = W_x x_t given)
 *   c = f * c_prev + i * g
 *   tc = tanh((c - mean_c) * invstd_c * gamma_c + beta_c);  h = o * tc
 *
 * and batch-norm backward with batch statistics (through the mean and the variance) as aten's
 * native_batch_norm_backward. Sums over the batch are accumulated in double, in row order (deterministic), as
 * torch's CPU batch norm does (its accumulate type for float is double).
 *
 * Tensors are row-major and contiguous: per step (B, 4H) for the recurrent term, the input term and the gates,
 * (B, H) for the cell and h. Sequence buffers are (K, B, .) and (K, .) for the K steps of a chunk (the caller points
 * them at the chunk's first step); step k's rows start at k * (B * width); c_before is the cell before step 0.
 * Every column (a cell j and its four gate columns j, H + j, 2H + j, 3H + j) is computed independently of the
 * others, so a step splits into blocks of columns with no reduction across blocks: with threads > 1 (and OpenMP) the
 * blocks run in parallel and the results are the same, bit for bit, as on one thread.
 * Plain C99 with <math.h> only; built by bnlstm_lit.nn.kernel with the system compiler, without -ffast-math.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The loops below are compiled three times on x86-64 Linux with glibc: for AVX-512, for AVX2 and for the baseline
 * (SSE2), chosen at load time (an ifunc). Without FMA contraction (-ffp-contract=off) all give bit-identical results:
 * no float sum is reordered, only the number of columns processed at once changes (tested, each variant built alone
 * with -DBNLSTM_KERNEL_NO_CLONES and -mavx512f / -mavx2 / nothing). */
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__has_attribute) && \
    !defined(BNLSTM_KERNEL_NO_CLONES)
#if __has_attribute(target_clones)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef VECTOR_CLONES
#define VECTOR_CLONES
#endif

typedef struct {
    int64_t B, H;
    int64_t threads;       /* > 1: the columns are split into that many blocks, one OpenMP thread each */
    int64_t keep;          /* 0 (no backward): act and tc are one step's scratch (1, B, .), wh is not written */
    int64_t input_bn;      /* 1: x is W_x x_t, normalized here with gamma_x, plus bias */
    double eps;
    double eps_x;
    const float *x;        /* (K, B, 4H): BN_t(W_x x_t) + b, or W_x x_t with input_bn */
    const float *gamma_x;  /* (4H), with input_bn */
    const float *bias;     /* (4H), with input_bn */
    float *mean_x;         /* (K, 4H) out, with input_bn */
    float *invstd_x;       /* (K, 4H) out, with input_bn */
    const float *c_before; /* (B, H) */
    const float *gamma_h;  /* (4H) */
    const float *gamma_c;  /* (H) */
    const float *beta_c;   /* (H) */
    float *h;              /* (K, B, H) out */
    float *c;              /* (K, B, H) out */
    float *wh;             /* (K, B, 4H) out: a copy of W_h h_{t-1} */
    float *act;            /* (K, B, 4H) out: sigmoid(i), sigmoid(f), tanh(g), sigmoid(o) */
    float *tc;             /* (K, B, H) out: tanh(BN(c)) */
    float *mean_h;         /* (K, 4H) out */
    float *invstd_h;       /* (K, 4H) out */
    float *mean_c;         /* (K, H) out */
    float *invstd_c;       /* (K, H) out */
    double *work;          /* 2 * 4H doubles */
    float *fwork;          /* 5 * 4H floats */
} bnlstm_forward_args;

typedef struct {
    int64_t B, H;
    int64_t threads;
    int64_t input_bn;      /* 1: dpre is replaced by the gradient of W_x x_t through BN_x */
    double eps;
    const float *x;        /* (K, B, 4H): W_x x_t, with input_bn */
    const float *mean_x, *invstd_x;  /* (K, 4H), with input_bn */
    const float *gamma_x;  /* (4H), with input_bn */
    double *dgamma_x;      /* (4H) accumulated, with input_bn */
    double *dbias;         /* (4H) accumulated, with input_bn */
    const float *dh_out;   /* (K, B, H): dL/dh_t from the outputs */
    const float *act;      /* (K, B, 4H) saved */
    const float *tc;       /* (K, B, H) saved */
    const float *wh;       /* (K, B, 4H) saved */
    const float *c;        /* (K, B, H) saved */
    const float *c_before; /* (B, H) */
    const float *mean_h, *invstd_h;  /* (K, 4H) */
    const float *mean_c, *invstd_c;  /* (K, H) */
    const float *gamma_h;  /* (4H) */
    const float *gamma_c;  /* (H) */
    float *dc;             /* (B, H) in: dL/dc_t from step t+1; out: dL/dc_{t-1} */
    float *dpre;           /* (K, B, 4H) out: dL/d pre_t (= dL/d x_t); with input_bn dL/d(W_x x_t) */
    float *dwh;            /* (K, B, 4H) out: dL/d(W_h h_{t-1}) */
    double *dgamma_h;      /* (4H) accumulated */
    double *dgamma_c;      /* (H) accumulated */
    double *dbeta_c;       /* (H) accumulated */
    double *work;          /* 4 * 4H doubles */
    float *fwork;          /* 6 * 4H floats */
    float *scratch;        /* (B, H) floats */
} bnlstm_backward_args;

typedef struct {
    int64_t B, H;
    int64_t threads;
    const float *x;        /* (T, B, 4H): W_x x_t */
    const float *scale_x;  /* (T, 4H): the input term is shift_x + x * scale_x */
    const float *shift_x;  /* (T, 4H): includes b and the recurrent term's shift */
    const float *scale_h;  /* (T, 4H) */
    const float *scale_c;  /* (T, H) */
    const float *shift_c;  /* (T, H) */
    float *h;              /* (T, B, H) out */
    float *c;              /* (B, H) in: c_{t-1}; out: c_t */
} bnlstm_population_args;

/* The struct sizes, checked against the ctypes declarations before first use. */
int64_t bnlstm_kernel_abi(int which) {
    switch (which) {
        case 0: return (int64_t)sizeof(bnlstm_forward_args);
        case 1: return (int64_t)sizeof(bnlstm_backward_args);
        case 2: return (int64_t)sizeof(bnlstm_population_args);
        default: return -1;
    }
}

/* exp, sigmoid and tanh in float, accurate to about one unit in the last place (as torch's vectorized CPU kernels
 * are), written without calls or branches so that the compiler vectorizes the loops that use them (libm's expf and
 * tanhf are scalar calls: several times slower than torch's SIMD ops). exp: Cody-Waite reduction by ln 2 and the
 * Cephes minimax polynomial; tanh: the Cephes odd polynomial for |v| < 0.625, else 1 - 2 / (exp(2|v|) + 1). */
static inline float exp_(float v) {
    v = v < -87.0f ? -87.0f : v;
    v = v > 88.0f ? 88.0f : v;
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer (round to nearest even) */
    float n = (v * 1.44269504088896341f + magic) - magic;
    float r = v - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    float y = p * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23; /* 2^n, n in [-126, 127] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

static inline float sigmoid_(float v) { return 1.0f / (1.0f + exp_(-v)); }

static inline float tanh_(float v) {
    float a = v < 0.0f ? -v : v;
    float z = v * v;
    float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) *
                       z -
                   3.33332819422e-1f) *
                      z * v +
                  v;
    float large = 1.0f - 2.0f / (exp_(2.0f * a) + 1.0f);
    large = v < 0.0f ? -large : large;
    return a < 0.625f ? small : large;
}

/* Batch mean and inverse standard deviation (biased variance) of n columns of x (B rows, row stride ld), two passes
 * in double; writes them as float into mean/invstd and the affine form of BN with weight gamma and bias beta (NULL: 0)
 * into alpha, shift: BN(v) = v * alpha + shift, as torch's CPU batch norm applies it. */
VECTOR_CLONES static void batch_stats(const float *x, int64_t B, int64_t ld, int64_t n, double eps,
                                      const float *gamma, const float *beta, double *s, double *q, float *mean,
                                      float *invstd, float *alpha, float *shift) {
    for (int64_t j = 0; j < n; ++j) s[j] = 0.0;
    for (int64_t b = 0; b < B; ++b) {
        const float *row = x + b * ld;
        for (int64_t j = 0; j < n; ++j) s[j] += (double)row[j];
    }
    for (int64_t j = 0; j < n; ++j) {
        s[j] /= (double)B;
        q[j] = 0.0;
    }
    for (int64_t b = 0; b < B; ++b) {
        const float *row = x + b * ld;
        for (int64_t j = 0; j < n; ++j) {
            double d = (double)row[j] - s[j];
            q[j] += d * d;
        }
    }
    for (int64_t j = 0; j < n; ++j) {
        float m = (float)s[j];
        float is = (float)(1.0 / sqrt(q[j] / (double)B + eps));
        mean[j] = m;
        invstd[j] = is;
        float a = is * gamma[j];
        alpha[j] = a;
        shift[j] = (beta ? beta[j] : 0.0f) - m * a;
    }
}

/* Row kernels: n cells of one sequence; restrict-qualified so that the compiler vectorizes them without alias checks.
 * Gate columns are H apart: [0, H) i, [H, 2H) f, [2H, 3H) g, [3H, 4H) o (the pointers are at the block's first). */
/* x_k = (x * ax + sx) + bias: the input term (ax = 1, sx = bias = 0 leave x as it is, exactly) */
#define INPUT_TERM(k) ((x[k] * ax[k] + sx[k]) + bias[k])

VECTOR_CLONES static void forward_gates_row(int64_t H, int64_t n, const float *restrict w, const float *restrict x,
                                            const float *restrict alpha, const float *restrict shift,
                                            const float *restrict ax, const float *restrict sx,
                                            const float *restrict bias, const float *restrict cp, float *restrict c,
                                            float *restrict ai, float *restrict af, float *restrict ag,
                                            float *restrict ao) {
    for (int64_t j = 0; j < n; ++j) {
        float i = sigmoid_((w[j] * alpha[j] + shift[j]) + INPUT_TERM(j));
        float f = sigmoid_((w[H + j] * alpha[H + j] + shift[H + j]) + INPUT_TERM(H + j));
        float g = tanh_((w[2 * H + j] * alpha[2 * H + j] + shift[2 * H + j]) + INPUT_TERM(2 * H + j));
        float o = sigmoid_((w[3 * H + j] * alpha[3 * H + j] + shift[3 * H + j]) + INPUT_TERM(3 * H + j));
        c[j] = f * cp[j] + i * g;
        ai[j] = i;
        af[j] = f;
        ag[j] = g;
        ao[j] = o;
    }
}

VECTOR_CLONES static void forward_output_row(int64_t n, const float *restrict c, const float *restrict o,
                                             const float *restrict alpha, const float *restrict shift,
                                             float *restrict tc, float *restrict h) {
    for (int64_t j = 0; j < n; ++j) {
        float v = tanh_(c[j] * alpha[j] + shift[j]);
        tc[j] = v;
        h[j] = o[j] * v;
    }
}

/* Columns [j0, j1) of the cells (and their four gate columns) of one forward step. */
static void forward_block(const bnlstm_forward_args *a, int64_t t, const float *wh, int64_t j0, int64_t j1) {
    const int64_t B = a->B, H = a->H, G = 4 * H, n = j1 - j0;
    if (n <= 0) return;
    const float *x = a->x + t * B * G;
    const float *c_prev = t > 0 ? a->c + (t - 1) * B * H : a->c_before;
    float *h = a->h + t * B * H, *c = a->c + t * B * H;
    float *act = a->act + (a->keep ? t * B * G : 0);
    float *tc = a->tc + (a->keep ? t * B * H : 0);
    float *mean_h = a->mean_h + t * G, *invstd_h = a->invstd_h + t * G;
    float *mean_c = a->mean_c + t * H, *invstd_c = a->invstd_c + t * H;
    double *s = a->work, *q = a->work + G;
    float *alpha = a->fwork, *shift = a->fwork + G, *ax = a->fwork + 2 * G, *sx = a->fwork + 3 * G;
    const float *bias = a->fwork + 4 * G;

    for (int64_t k = 0; k < 4; ++k) { /* the block's columns of each gate */
        const int64_t o = k * H + j0;
        if (a->keep) {
            float *saved = a->wh + t * B * G;
            for (int64_t b = 0; b < B; ++b) memcpy(saved + b * G + o, wh + b * G + o, (size_t)n * sizeof(float));
        }
        if (a->input_bn) {
            batch_stats(x + o, B, G, n, a->eps_x, a->gamma_x + o, NULL, s + o, q + o, a->mean_x + t * G + o,
                        a->invstd_x + t * G + o, ax + o, sx + o);
        } else {
            for (int64_t j = o; j < o + n; ++j) {
                ax[j] = 1.0f;
                sx[j] = 0.0f;
                a->fwork[4 * G + j] = 0.0f;
            }
        }
        batch_stats(wh + o, B, G, n, a->eps, a->gamma_h + o, NULL, s + o, q + o, mean_h + o, invstd_h + o, alpha + o,
                    shift + o);
    }
    if (a->input_bn) bias = a->bias;
    for (int64_t b = 0; b < B; ++b) {
        float *ar = act + b * G + j0;
        forward_gates_row(H, n, wh + b * G + j0, x + b * G + j0, alpha + j0, shift + j0, ax + j0, sx + j0, bias + j0,
                          c_prev + b * H + j0, c + b * H + j0, ar, ar + H, ar + 2 * H, ar + 3 * H);
    }
    /* the cell's statistics reuse the gate i columns of s, q, alpha, shift (done with) */
    batch_stats(c + j0, B, H, n, a->eps, a->gamma_c + j0, a->beta_c + j0, s + j0, q + j0, mean_c + j0, invstd_c + j0,
                alpha + j0, shift + j0);
    for (int64_t b = 0; b < B; ++b)
        forward_output_row(n, c + b * H + j0, act + b * G + 3 * H + j0, alpha + j0, shift + j0, tc + b * H + j0,
                           h + b * H + j0);
}

/* The block boundaries: k * H / blocks, rounded down to a multiple of 16 columns (whole vectors), the last at H. */
static int64_t block_start(int64_t H, int64_t blocks, int64_t k) {
    if (k >= blocks) return H;
    int64_t j = (H * k / blocks) & ~(int64_t)15;
    return j;
}

#define FOR_BLOCKS(threads, H, call)                                                    \
    do {                                                                                \
        int64_t blocks_ = (threads) > 1 ? (threads) : 1;                                \
        if (blocks_ > (H) / 16) blocks_ = (H) / 16 > 1 ? (H) / 16 : 1;                  \
        if (blocks_ == 1) {                                                             \
            int64_t j0 = 0, j1 = (H);                                                   \
            call;                                                                       \
        } else {                                                                        \
            _Pragma("omp parallel for num_threads(blocks_) schedule(static, 1)")        \
            for (int64_t k_ = 0; k_ < blocks_; ++k_) {                                  \
                int64_t j0 = block_start((H), blocks_, k_), j1 = block_start((H), blocks_, k_ + 1); \
                call;                                                                   \
            }                                                                           \
        }                                                                               \
    } while (0)

void bnlstm_forward_step(const bnlstm_forward_args *a, int64_t t, const float *wh) {
    FOR_BLOCKS(a->threads, a->H, forward_block(a, t, wh, j0, j1));
}

/* The input gradient of batch norm with batch statistics (aten native_batch_norm_backward, train): given the
 * per-column sums sum_b dy (s) and sum_b (x - mean) dy (q) in double, the per-column k and grad_mean as float into
 * kk, gm, so that dx = (dy - gm - (x - mean) * kk) * invstd * gamma. */
static void bn_backward_coefficients(int64_t B, int64_t n, const double *s, const double *q, const float *invstd,
                                     float *kk, float *gm) {
    for (int64_t j = 0; j < n; ++j) {
        double is = (double)invstd[j];
        kk[j] = (float)(q[j] * is * is / (double)B);
        gm[j] = (float)(s[j] / (double)B);
    }
}

/* d o (into do_) and d BN(c) (into d) of one row from dh = dh_out + dh_next; sums of d and (c - mean_c) d. */
VECTOR_CLONES static void backward_output_row(int64_t n, const float *restrict dh_out, const float *restrict dh_next,
                                              const float *restrict o_, const float *restrict tc,
                                              const float *restrict c, const float *restrict mean_c,
                                              float *restrict do_, float *restrict d, double *restrict s,
                                              double *restrict q) {
    for (int64_t j = 0; j < n; ++j) {
        float dh = dh_out[j] + dh_next[j];
        float o = o_[j], tv = tc[j];
        do_[j] = dh * tv * o * (1.0f - o);
        float v = dh * o * (1.0f - tv * tv);
        d[j] = v;
        s[j] += (double)v;
        q[j] += ((double)c[j] - (double)mean_c[j]) * (double)v;
    }
}

/* dc_t through BN(c) plus dc from step t+1 (dc, replaced by dc_{t-1} = dc_t f), and d i, d f, d g of one row. */
VECTOR_CLONES static void backward_gates_row(int64_t n, const float *restrict d, const float *restrict c,
                                             const float *restrict mean_c, const float *restrict kk,
                                             const float *restrict gm, const float *restrict scale,
                                             const float *restrict ai, const float *restrict af,
                                             const float *restrict ag, const float *restrict cp, float *restrict dc,
                                             float *restrict di, float *restrict df, float *restrict dg) {
    for (int64_t j = 0; j < n; ++j) {
        float dcv = (d[j] - gm[j] - (c[j] - mean_c[j]) * kk[j]) * scale[j] + dc[j];
        float i = ai[j], f = af[j], g = ag[j];
        di[j] = dcv * g * i * (1.0f - i);
        df[j] = dcv * cp[j] * f * (1.0f - f);
        dg[j] = dcv * i * (1.0f - g * g);
        dc[j] = dcv * f;
    }
}

VECTOR_CLONES static void column_sums_row(int64_t n, const float *restrict dy, const float *restrict x,
                                          const float *restrict mean, double *restrict s, double *restrict q) {
    for (int64_t j = 0; j < n; ++j) {
        double v = (double)dy[j];
        s[j] += v;
        q[j] += ((double)x[j] - (double)mean[j]) * v;
    }
}

VECTOR_CLONES static void column_sums2_row(int64_t n, const float *restrict dy, const float *restrict x,
                                           const float *restrict mean, const float *restrict x2,
                                           const float *restrict mean2, double *restrict s, double *restrict q,
                                           double *restrict s2, double *restrict q2) {
    for (int64_t j = 0; j < n; ++j) {
        double v = (double)dy[j];
        s[j] += v;
        q[j] += ((double)x[j] - (double)mean[j]) * v;
        s2[j] += v;
        q2[j] += ((double)x2[j] - (double)mean2[j]) * v;
    }
}

/* Both batch-norm input gradients of dy: into dx (BN_h) and, replacing dy, into dy (BN_x). */
VECTOR_CLONES static void bn_input_grad2_row(int64_t n, float *restrict dy, const float *restrict x,
                                             const float *restrict mean, const float *restrict kk,
                                             const float *restrict gm, const float *restrict scale,
                                             float *restrict dx, const float *restrict x2,
                                             const float *restrict mean2, const float *restrict kk2,
                                             const float *restrict gm2, const float *restrict scale2) {
    for (int64_t j = 0; j < n; ++j) {
        float d = dy[j];
        dx[j] = (d - gm[j] - (x[j] - mean[j]) * kk[j]) * scale[j];
        dy[j] = (d - gm2[j] - (x2[j] - mean2[j]) * kk2[j]) * scale2[j];
    }
}

VECTOR_CLONES static void bn_input_grad_row(int64_t n, const float *restrict dy, const float *restrict x,
                                            const float *restrict mean, const float *restrict kk,
                                            const float *restrict gm, const float *restrict scale,
                                            float *restrict dx) {
    for (int64_t j = 0; j < n; ++j) dx[j] = (dy[j] - gm[j] - (x[j] - mean[j]) * kk[j]) * scale[j];
}

/* Columns [j0, j1) of one backward step. */
static void backward_block(const bnlstm_backward_args *a, int64_t t, const float *dh_next, int64_t j0, int64_t j1) {
    const int64_t B = a->B, H = a->H, G = 4 * H, n = j1 - j0;
    if (n <= 0) return;
    const float *dh_out = a->dh_out + t * B * H;
    const float *act = a->act + t * B * G, *tc = a->tc + t * B * H, *wh = a->wh + t * B * G;
    const float *c = a->c + t * B * H;
    const float *c_prev = t > 0 ? a->c + (t - 1) * B * H : a->c_before;
    const float *mean_h = a->mean_h + t * G, *invstd_h = a->invstd_h + t * G;
    const float *mean_c = a->mean_c + t * H, *invstd_c = a->invstd_c + t * H;
    float *dpre = a->dpre + t * B * G, *dwh = a->dwh + t * B * G;
    float *dc = a->dc, *dco = a->scratch;
    double *s = a->work, *q = a->work + G, *s2 = a->work + 2 * G, *q2 = a->work + 3 * G;
    float *kk = a->fwork, *gm = a->fwork + G, *scale = a->fwork + 2 * G;
    float *kk2 = a->fwork + 3 * G, *gm2 = a->fwork + 4 * G, *scale2 = a->fwork + 5 * G;
    const float *x = a->input_bn ? a->x + t * B * G : NULL;
    const float *mean_x = a->input_bn ? a->mean_x + t * G : NULL, *invstd_x = a->input_bn ? a->invstd_x + t * G : NULL;

    /* d o, and d(tanh(BN(c))) -> d BN(c) -> dc; the cell's sums in the gate i columns of s, q */
    for (int64_t j = j0; j < j1; ++j) s[j] = q[j] = 0.0;
    for (int64_t b = 0; b < B; ++b)
        backward_output_row(n, dh_out + b * H + j0, dh_next + b * H + j0, act + b * G + 3 * H + j0, tc + b * H + j0,
                            c + b * H + j0, mean_c + j0, dpre + b * G + 3 * H + j0, dco + b * H + j0, s + j0, q + j0);
    for (int64_t j = j0; j < j1; ++j) {
        a->dgamma_c[j] += q[j] * (double)invstd_c[j];
        a->dbeta_c[j] += s[j];
        scale[j] = invstd_c[j] * a->gamma_c[j];
    }
    bn_backward_coefficients(B, n, s + j0, q + j0, invstd_c + j0, kk + j0, gm + j0);
    /* d i, d f, d g, dc_{t-1}; then the sums for BN_h's (and BN_x's) backward over the block's 4 gate columns */
    for (int64_t b = 0; b < B; ++b) {
        const float *ar = act + b * G + j0;
        float *dp = dpre + b * G + j0;
        backward_gates_row(n, dco + b * H + j0, c + b * H + j0, mean_c + j0, kk + j0, gm + j0, scale + j0, ar, ar + H,
                           ar + 2 * H, c_prev + b * H + j0, dc + b * H + j0, dp, dp + H, dp + 2 * H);
    }
    for (int64_t k = 0; k < 4; ++k) {
        const int64_t o = k * H + j0;
        for (int64_t j = o; j < o + n; ++j) s[j] = q[j] = s2[j] = q2[j] = 0.0;
        for (int64_t b = 0; b < B; ++b) {
            if (x)
                column_sums2_row(n, dpre + b * G + o, wh + b * G + o, mean_h + o, x + b * G + o, mean_x + o, s + o,
                                 q + o, s2 + o, q2 + o);
            else
                column_sums_row(n, dpre + b * G + o, wh + b * G + o, mean_h + o, s + o, q + o);
        }
        for (int64_t j = o; j < o + n; ++j) {
            a->dgamma_h[j] += q[j] * (double)invstd_h[j];
            scale[j] = invstd_h[j] * a->gamma_h[j];
        }
        bn_backward_coefficients(B, n, s + o, q + o, invstd_h + o, kk + o, gm + o);
        if (x) {
            for (int64_t j = o; j < o + n; ++j) {
                a->dgamma_x[j] += q2[j] * (double)invstd_x[j];
                a->dbias[j] += s2[j];
                scale2[j] = invstd_x[j] * a->gamma_x[j];
            }
            bn_backward_coefficients(B, n, s2 + o, q2 + o, invstd_x + o, kk2 + o, gm2 + o);
        }
        /* d(W_h h_{t-1}) through BN_h (and d(W_x x_t) through BN_x, replacing d pre) */
        for (int64_t b = 0; b < B; ++b) {
            float *dp = dpre + b * G + o;
            if (x)
                bn_input_grad2_row(n, dp, wh + b * G + o, mean_h + o, kk + o, gm + o, scale + o, dwh + b * G + o,
                                   x + b * G + o, mean_x + o, kk2 + o, gm2 + o, scale2 + o);
            else
                bn_input_grad_row(n, dp, wh + b * G + o, mean_h + o, kk + o, gm + o, scale + o, dwh + b * G + o);
        }
    }
}

/* dh_next: dL/dh_t through step t+1, (B, H) (zeros for the last step). */
void bnlstm_backward_step(const bnlstm_backward_args *a, int64_t t, const float *dh_next) {
    FOR_BLOCKS(a->threads, a->H, backward_block(a, t, dh_next, j0, j1));
}

/* the pre-activation of column k: (shift_x + x * scale_x) + wh * scale_h, as the eager path's two addcmul */
#define POPULATION_PRE(k) ((bx[k] + x[k] * ax[k]) + w[k] * sh[k])

VECTOR_CLONES static void population_row(int64_t H, int64_t n, const float *restrict w, const float *restrict x,
                                         const float *restrict ax, const float *restrict bx,
                                         const float *restrict sh, const float *restrict sc,
                                         const float *restrict bc, float *restrict c, float *restrict h) {
    for (int64_t j = 0; j < n; ++j) {
        float i = sigmoid_(POPULATION_PRE(j));
        float f = sigmoid_(POPULATION_PRE(H + j));
        float g = tanh_(POPULATION_PRE(2 * H + j));
        float o = sigmoid_(POPULATION_PRE(3 * H + j));
        float cv = f * c[j] + i * g;
        c[j] = cv;
        h[j] = o * tanh_(bc[j] + cv * sc[j]);
    }
}

static void population_block(const bnlstm_population_args *a, int64_t t, const float *wh, int64_t j0, int64_t j1) {
    const int64_t B = a->B, H = a->H, G = 4 * H;
    const float *x = a->x + t * B * G, *sh = a->scale_h + t * G;
    const float *ax = a->scale_x + t * G, *bx = a->shift_x + t * G;
    const float *sc = a->scale_c + t * H, *bc = a->shift_c + t * H;
    float *h = a->h + t * B * H;
    if (j1 <= j0) return;
    for (int64_t b = 0; b < B; ++b)
        population_row(H, j1 - j0, wh + b * G + j0, x + b * G + j0, ax + j0, bx + j0, sh + j0, sc + j0, bc + j0,
                       a->c + b * H + j0, h + b * H + j0);
}

void bnlstm_population_step(const bnlstm_population_args *a, int64_t t, const float *wh) {
    FOR_BLOCKS(a->threads, a->H, population_block(a, t, wh, j0, j1));
}
