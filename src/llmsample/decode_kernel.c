/* One decoding step of an int8-quantized Gemma 3 model on the CPU, in one call from Python.
 *
 * Why this exists: at batch 1 the default model's products take about 4 ms a token, but the eager torch step that
 * surrounds them ran about 2,000 small operations (norms, RoPE, attention, activation quantization), each a few
 * microseconds of dispatch, and the layers' products ran on one thread. Here the same arithmetic runs in plain
 * loops, and every product and the attention are shared among torch's own OpenMP threads (this library links the
 * libgomp torch loaded), as many as torch is set to use, in one parallel region per step (see "the threads").
 *
 * The arithmetic is the eager int8 path's (llmsample/quantize.py): each activation row enters a product as two
 * 7-bit parts (its values rounded to 63 steps of the row's largest magnitude, then the rounding error in 126 finer
 * steps), multiplied with the int8 weights as unsigned bytes offset by 64, the integer sums exact; per-row weight
 * scales; the head's input divided by its channel scales; the head's highest logits recomputed in float32 from the
 * embedding. Sums over floats (norms, attention) run in another order than torch's, so results agree to float
 * rounding, not bit for bit.
 *
 * With the logits it can write each row's statistics the sampler needs (largest logit and its first column, the
 * log-normaliser, the entropy, each chunk's largest logit, the highest logits in order:
 * llmsample/sampling/row_stats.py), while the row is still in the cache: the sampler would otherwise pass over the
 * 262,144 logits several times more, cold, after the step.
 *
 * Built by llmsample/decode_kernel.py with the system C compiler (-O3 -march=native -fopenmp) at first use and
 * kept in the cache; where no compiler is found, the eager path runs instead.
 */
#define _GNU_SOURCE
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define USE_VNNI 1
#endif

#define KERNEL_ABI 6 /* bumped whenever a struct below changes; Python checks it before any call */

typedef struct {
    const int8_t *weight;  /* [out, in], rows contiguous */
    const float *scale;    /* [out] */
    const int32_t *rowsum; /* [out]: the sum of each weight row (undoes the activations' offset of 64) */
    int32_t out, in;
} Product;

enum { Q, K, V, O, GATE, UP, DOWN, PRODUCTS_PER_LAYER };
enum { NORM_IN, NORM_POST_ATTN, NORM_PRE_FF, NORM_POST_FF, NORM_Q, NORM_K, NORMS_PER_LAYER };

typedef struct {
    int32_t hidden, intermediate, heads, kv_heads, head_dim, layers, window, vocab;
    float eps, attn_scale;
    const uint8_t *sliding;        /* [layers]: 1 where the layer attends within the window */
    const float *const *gains;     /* [layers * NORMS_PER_LAYER]: each norm's 1 + weight */
    const Product *products;       /* [layers * PRODUCTS_PER_LAYER] */
    const float *final_gain;       /* [hidden] */
    Product head;                  /* [vocab, hidden], its input divided by head_channel_scale */
    const float *head_channel_scale;
    const float *embedding;        /* [vocab, hidden] float32: the exact rows of the rescored logits */
    int32_t rescore_chunk, rescore_chunks;
} Model;

int kernel_abi(void) { return KERNEL_ABI; }


/* ---- the threads ----
 *
 * A step runs in ONE OpenMP parallel region (torch's own threads: this library links the libgomp torch loaded),
 * not one region per product. At the end of a region OpenMP waits for every thread of the team, and on a machine
 * whose cores are busy one of them is often descheduled: with a region per product, each of the ~90 regions of a
 * step waited up to a time slice (measured: two decoding processes at once, 46-60 ms a token at the median and
 * 760 ms at worst, against 11 ms alone). Inside the one region, thread 0 runs the step and hands each product to
 * the team as a job: every thread has a contiguous range of it (it streams its own part of the weights, which
 * the prefetcher likes), claimed in small chunks, and takes what is left of the others' once its own is done. A
 * thread that is descheduled takes nothing meanwhile: thread 0 waits only for chunks already claimed. (Threads of
 * the kernel's own instead of torch's were tried too: torch's idle OpenMP threads spin for a while after each of
 * the sampler's operations and took their cores: 55 against 78 tok/s.) */

typedef void (*ChunkFn)(const void *context, int64_t lo, int64_t hi);

#define MAX_THREADS 64
#define MAX_CHUNKS 65535 /* a range's next and end chunk are 16-bit fields of its word */

typedef struct {
    /* generation << 32 | next chunk << 16 | end chunk: whoever claims a chunk checks all three in one CAS */
    _Alignas(64) _Atomic uint64_t word;
    _Alignas(64) _Atomic int64_t done; /* chunks of this range finished */
} Range;

/* One team's jobs (a step's, or a projection's). */
typedef struct {
    _Alignas(64) _Atomic uint32_t generation; /* the current job's; the helpers poll it */
    _Atomic int finished;                     /* the step is over: the helpers leave the region */
    _Alignas(64) _Atomic(ChunkFn) fn;         /* (a line of their own: written at every job, not polled) */
    _Atomic(const void *) context;
    _Atomic int64_t total, chunk;
    int threads;
    Range ranges[MAX_THREADS];
} Team;

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claim and run the chunks left in range r of job `generation`. */
static void drain(Team *team, int r, uint32_t generation) {
    Range *range = &team->ranges[r];
    for (;;) {
        uint64_t word = atomic_load_explicit(&range->word, memory_order_acquire);
        uint32_t next = (uint32_t)(word >> 16) & 0xffffu, end = (uint32_t)word & 0xffffu;
        if ((uint32_t)(word >> 32) != generation || next >= end) return;
        ChunkFn fn = atomic_load_explicit(&team->fn, memory_order_relaxed);
        const void *context = atomic_load_explicit(&team->context, memory_order_relaxed);
        int64_t total = atomic_load_explicit(&team->total, memory_order_relaxed);
        int64_t chunk = atomic_load_explicit(&team->chunk, memory_order_relaxed);
        /* Success means this job was still current with this chunk unclaimed, so the fields read above were its
         * own: thread 0 writes another job's only once every chunk of this one is claimed and done. */
        if (!atomic_compare_exchange_weak_explicit(&range->word, &word, word + ((uint64_t)1 << 16),
                                                   memory_order_acq_rel, memory_order_relaxed))
            continue;
        int64_t lo = (int64_t)next * chunk, hi = lo + chunk < total ? lo + chunk : total;
        fn(context, lo, hi);
        atomic_fetch_add_explicit(&range->done, 1, memory_order_release);
    }
}

/* Thread `self` works on its own range, then on what is left of the others. */
static void take_part(Team *team, int self, uint32_t generation) {
    for (int k = 0; k < team->threads; k++) drain(team, (self + k) % team->threads, generation);
}

/* A helper thread (1, 2, …) of the region: every job until the step is finished. */
static void help(Team *team, int self) {
    uint32_t seen = 0;
    while (!atomic_load_explicit(&team->finished, memory_order_acquire)) {
        uint32_t generation = atomic_load_explicit(&team->generation, memory_order_acquire);
        if (generation != seen) {
            seen = generation;
            take_part(team, self, generation);
        }
        relax();
    }
}

/* The team of the running step (set by thread 0 inside the region; NULL outside: then everything runs serially). */
static _Thread_local Team *current_team;

/* fn(context, lo, hi) over [0, total) in chunks of `chunk` (made larger if there would be too many), shared by
 * the team of the running step. */
static void parallel(ChunkFn fn, const void *context, int64_t total, int64_t chunk) {
    Team *team = current_team;
    if (chunk < 1) chunk = 1;
    if ((total + chunk - 1) / chunk > MAX_CHUNKS) chunk = (total + MAX_CHUNKS - 1) / MAX_CHUNKS;
    int64_t chunks = (total + chunk - 1) / chunk;
    if (team == NULL || team->threads <= 1 || chunks <= 1) {
        if (total > 0) fn(context, 0, total);
        return;
    }
    atomic_store_explicit(&team->fn, fn, memory_order_relaxed);
    atomic_store_explicit(&team->context, context, memory_order_relaxed);
    atomic_store_explicit(&team->total, total, memory_order_relaxed);
    atomic_store_explicit(&team->chunk, chunk, memory_order_relaxed);
    uint32_t generation = atomic_load_explicit(&team->generation, memory_order_relaxed) + 1;
    for (int r = 0; r < team->threads; r++) {
        uint64_t start = (uint64_t)(chunks * r / team->threads), end = (uint64_t)(chunks * (r + 1) / team->threads);
        atomic_store_explicit(&team->ranges[r].done, 0, memory_order_relaxed);
        atomic_store_explicit(&team->ranges[r].word, (uint64_t)generation << 32 | start << 16 | end,
                              memory_order_release);
    }
    atomic_store_explicit(&team->generation, generation, memory_order_release);
    take_part(team, 0, generation);
    for (int polls = 0;; polls++) {
        int64_t done = 0;
        for (int r = 0; r < team->threads; r++)
            done += atomic_load_explicit(&team->ranges[r].done, memory_order_acquire);
        if (done >= chunks) break;
        relax();
        if (polls > 2000) sched_yield(); /* a claimed chunk's thread was descheduled: let it run */
    }
}

/* Run body(argument) on thread 0 of an OpenMP team of `threads`, the others helping with its jobs. */
static void in_team(int threads, void (*body)(void *), void *argument) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads == 1) {
        body(argument);
        return;
    }
    Team *team = aligned_alloc(64, (sizeof(Team) + 63) / 64 * 64);
    if (!team) {
        body(argument);
        return;
    }
    memset(team, 0, sizeof(Team));
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
        team->threads = omp_get_num_threads(); /* the runtime may give fewer; the single's barrier publishes it */
        if (omp_get_thread_num() == 0) {
            current_team = team;
            body(argument);
            current_team = NULL;
            atomic_store_explicit(&team->finished, 1, memory_order_release);
        } else {
            help(team, omp_get_thread_num());
        }
    }
    free(team);
}

/* ---- activations: two 7-bit parts per row ---- */

typedef struct {
    uint8_t *coarse, *fine; /* [rows, in] each, offset by 64 */
    float *step;            /* [rows] */
    int rows, in;
} Quantized;

static void quantize_rows(const float *x, int rows, int in, const float *divide_by, Quantized *q) {
    q->rows = rows;
    q->in = in;
    for (int r = 0; r < rows; r++) {
        const float *row = x + (size_t)r * in;
        float peak = 0.0f, nan_if_not_finite = 0.0f;
#pragma omp simd reduction(max : peak) reduction(+ : nan_if_not_finite)
        for (int j = 0; j < in; j++) {
            float v = divide_by ? row[j] / divide_by[j] : row[j];
            peak = fmaxf(peak, fabsf(v));
            nan_if_not_finite += v * 0.0f;
        }
        if (peak < 1e-30f) peak = 1e-30f; /* an all-zero row: any step gives zeros */
        float step = peak / 63.0f;
        uint8_t *c = q->coarse + (size_t)r * in, *f = q->fine + (size_t)r * in;
        if (nan_if_not_finite != 0.0f) { /* NaN or inf in the row: its outputs are NaN, as torch's would be */
            q->step[r] = NAN;
            memset(c, 64, (size_t)in);
            memset(f, 64, (size_t)in);
            continue;
        }
        q->step[r] = step;
        for (int j = 0; j < in; j++) {
            float v = divide_by ? row[j] / divide_by[j] : row[j];
            float scaled = v / step;
            float coarse = nearbyintf(scaled);
            c[j] = (uint8_t)(int)(coarse + 64.0f);
            f[j] = (uint8_t)(int)(nearbyintf((scaled - coarse) * 126.0f) + 64.0f);
        }
    }
}

/* Integer dot products of one weight row with a row's two parts. */
static inline void dot_two(const int8_t *w, const uint8_t *c, const uint8_t *f, int n, int32_t *dc, int32_t *df) {
#ifdef USE_VNNI
    __m512i ac = _mm512_setzero_si512(), af = _mm512_setzero_si512();
    int k = 0;
    for (; k + 64 <= n; k += 64) {
        __m512i wv = _mm512_loadu_si512((const void *)(w + k));
        ac = _mm512_dpbusd_epi32(ac, _mm512_loadu_si512((const void *)(c + k)), wv);
        af = _mm512_dpbusd_epi32(af, _mm512_loadu_si512((const void *)(f + k)), wv);
    }
    if (k < n) {
        __mmask64 m = (n - k == 64) ? ~(__mmask64)0 : (((__mmask64)1 << (n - k)) - 1);
        __m512i wv = _mm512_maskz_loadu_epi8(m, w + k);
        ac = _mm512_dpbusd_epi32(ac, _mm512_maskz_loadu_epi8(m, c + k), wv);
        af = _mm512_dpbusd_epi32(af, _mm512_maskz_loadu_epi8(m, f + k), wv);
    }
    *dc = _mm512_reduce_add_epi32(ac);
    *df = _mm512_reduce_add_epi32(af);
#else
    int32_t sc = 0, sf = 0;
    for (int k = 0; k < n; k++) {
        sc += (int32_t)c[k] * (int32_t)w[k];
        sf += (int32_t)f[k] * (int32_t)w[k];
    }
    *dc = sc;
    *df = sf;
#endif
}

static inline float output_of(int32_t dc, int32_t df, int32_t rowsum, float scale, float step) {
    float coarse = (float)(dc - 64 * rowsum) * scale, fine = (float)(df - 64 * rowsum) * scale;
    return (coarse + fine * (1.0f / 126.0f)) * step;
}

typedef struct {
    const Quantized *q;
    const Product *const *list;
    float *const *out;
    int count;
} ProductsJob;

static void products_rows(const void *context, int64_t lo, int64_t hi) {
    const ProductsJob *job = context;
    const Quantized *q = job->q;
    for (int64_t t = lo; t < hi; t++) {
        int p = 0;
        int64_t i = t;
        while (i >= job->list[p]->out) i -= job->list[p++]->out;
        const Product *pr = job->list[p];
        const int8_t *w = pr->weight + (size_t)i * pr->in;
        for (int r = 0; r < q->rows; r++) {
            int32_t dc, df;
            dot_two(w, q->coarse + (size_t)r * q->in, q->fine + (size_t)r * q->in, q->in, &dc, &df);
            job->out[p][(size_t)r * pr->out + i] = output_of(dc, df, pr->rowsum[i], pr->scale[i], q->step[r]);
        }
    }
}

/* y_p[r, i] = row r of the activations times row i of product p, for several products of the same input, the
 * rows of all of them shared among the threads in chunks of 64 KB of weights. */
static void products(const Quantized *q, const Product *const *list, float *const *out, int count) {
    int64_t total = 0;
    for (int p = 0; p < count; p++) total += list[p]->out;
    int64_t chunk = 65536 / (q->in > 0 ? q->in : 1);
    ProductsJob job = {q, list, out, count};
    parallel(products_rows, &job, total, chunk < 1 ? 1 : chunk);
}

static void product(const Quantized *q, const Product *pr, float *out) {
    products(q, &pr, &out, 1);
}

/* ---- the small operations ---- */

static void rms_norm(const float *x, const float *gain, float *out, int n, float eps) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) sum += x[j] * x[j];
    float inv = 1.0f / sqrtf(sum / (float)n + eps);
    for (int j = 0; j < n; j++) out[j] = x[j] * inv * gain[j];
}

/* A sublayer's output joins the residual stream after its own norm: x += rms_norm(out) (out is overwritten). */
static void add_normed(float *x, float *out, const float *gain, int n, float eps) {
    rms_norm(out, gain, out, n, eps);
    for (int j = 0; j < n; j++) x[j] += out[j];
}

/* RoPE as llmsample/gemma3.py applies it: x * cos + roll(x, half) * signed_sin. */
static void rotate(float *x, const float *cos_row, const float *signed_sin, int dim) {
    float tmp[dim];
    int half = dim / 2;
    for (int j = 0; j < dim; j++) tmp[j] = x[j] * cos_row[j] + x[(j + half) % dim] * signed_sin[j];
    memcpy(x, tmp, sizeof(float) * (size_t)dim);
}

static inline float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

/* ---- the step ---- */

typedef struct {
    const Model *m;
    int batch, new, start, capacity; /* rows of `new` positions each, from `start` on */
    float *const *keys, *const *values; /* per layer: [batch, kv_heads, capacity, head_dim] */
} Step;

/* Every query (batch row b, new position t, head h) against the keys its position sees: causal, and within the
 * window in a sliding layer. q and out are [batch * new, heads, head_dim].
 *
 * The query heads that share a key-value head are taken together, so each key and value is read once for all of
 * them (the cache is most of what a long context reads), and each row's keys are split into as many ranges as
 * there are threads: every range gives its heads' running maximum, sum and weighted values, merged after (as
 * flash-decoding does), so one key-value head still uses every thread. */
#define ATTEND_RANGE_KEYS 64

typedef struct {
    const Step *s;
    int layer, group, dim, ranges;
    const float *q;
    float *top, *sum, *weighted;
} AttendJob;

/* Work items lo..hi-1 of `attend`: item = (batch row, new position, key-value head) × key range. */
static void attend_ranges(const void *context, int64_t lo, int64_t hi) {
    const AttendJob *job = context;
    const Step *s = job->s;
    const Model *m = s->m;
    int layer = job->layer, group = job->group, dim = job->dim, ranges = job->ranges;
    const float *q = job->q;
    float *top = job->top, *sum = job->sum, *weighted = job->weighted;
    for (int64_t work = lo; work < hi; work++) {
        int task = work / ranges, range = work % ranges;
        int g = task % m->kv_heads, row = task / m->kv_heads, b = row / s->new, t = row % s->new;
        int position = s->start + t, first = 0;
        if (m->sliding[layer] && position - m->window + 1 > 0) first = position - m->window + 1;
        int seen = position + 1 - first;
        int lo = first + (int)((int64_t)seen * range / ranges), hi = first + (int)((int64_t)seen * (range + 1) / ranges);
        int n = hi - lo;
        size_t base = ((size_t)b * m->kv_heads + g) * s->capacity;
        const float *keys = s->keys[layer] + (base + lo) * dim, *values = s->values[layer] + (base + lo) * dim;
        const float *qg = q + ((size_t)row * m->heads + (size_t)g * group) * dim;
        float *my_top = top + (size_t)work * group, *my_sum = sum + (size_t)work * group;
        float *my_out = weighted + (size_t)work * group * dim;
        for (int i = 0; i < group; i++) my_top[i] = -INFINITY, my_sum[i] = 0.0f;
        memset(my_out, 0, sizeof(float) * (size_t)group * dim);
        if (n <= 0) continue;
        float *scores = malloc(sizeof(float) * (size_t)group * n);
        if (!scores) {
            for (int i = 0; i < group; i++) my_top[i] = NAN;
            continue;
        }
        for (int j = 0; j < n; j++) {
            const float *key = keys + (size_t)j * dim;
            for (int i = 0; i < group; i++) {
                const float *qh = qg + (size_t)i * dim;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int d = 0; d < dim; d++) dot += qh[d] * key[d];
                float score = dot * m->attn_scale;
                scores[(size_t)i * n + j] = score;
                my_top[i] = score > my_top[i] || isnan(score) || isnan(my_top[i]) ? score : my_top[i];
            }
        }
        for (int i = 0; i < group; i++) {
            float total = 0.0f, *row_scores = scores + (size_t)i * n;
            for (int j = 0; j < n; j++) total += row_scores[j] = expf(row_scores[j] - my_top[i]);
            my_sum[i] = total;
        }
        for (int j = 0; j < n; j++) {
            const float *value = values + (size_t)j * dim;
            for (int i = 0; i < group; i++) {
                float p = scores[(size_t)i * n + j], *o = my_out + (size_t)i * dim;
#pragma omp simd
                for (int d = 0; d < dim; d++) o[d] += p * value[d];
            }
        }
        free(scores);
    }
}

static void attend(const Step *s, int layer, const float *q, float *out) {
    const Model *m = s->m;
    int group = m->heads / m->kv_heads, dim = m->head_dim;
    /* Key ranges of ATTEND_RANGE_KEYS: fixed by the context, not by the thread count, so that the sums (and so
     * the text a seed gives) do not depend on how many threads ran them. */
    int reach = s->start + s->new;
    if (m->sliding[layer] && reach > m->window) reach = m->window;
    int tasks = s->batch * s->new * m->kv_heads, ranges = (reach + ATTEND_RANGE_KEYS - 1) / ATTEND_RANGE_KEYS;
    if (ranges < 1) ranges = 1;
    if (ranges > 64) ranges = 64;
    size_t partials = (size_t)tasks * ranges * group;
    float *top = malloc(sizeof(float) * partials), *sum = malloc(sizeof(float) * partials);
    float *weighted = malloc(sizeof(float) * partials * dim);
    if (!top || !sum || !weighted) { /* reported as NaN logits rather than a crash */
        for (size_t i = 0; i < (size_t)s->batch * s->new * m->heads * dim; i++) out[i] = NAN;
        free(top), free(sum), free(weighted);
        return;
    }
    AttendJob job = {s, layer, group, dim, ranges, q, top, sum, weighted};
    parallel(attend_ranges, &job, (int64_t)tasks * ranges, 1);
    for (int task = 0; task < tasks; task++) {
        int g = task % m->kv_heads, row = task / m->kv_heads;
        for (int i = 0; i < group; i++) {
            float peak = -INFINITY, total = 0.0f;
            int broken = 0; /* a NaN score anywhere: the head's output is NaN, as torch's would be */
            for (int r = 0; r < ranges; r++) {
                float t = top[((size_t)task * ranges + r) * group + i];
                broken |= isnan(t);
                peak = fmaxf(peak, t);
            }
            float *o = out + ((size_t)row * m->heads + (size_t)g * group + i) * dim;
            for (int d = 0; d < dim; d++) o[d] = broken ? NAN : 0.0f;
            if (broken) continue;
            for (int r = 0; r < ranges; r++) {
                size_t at = ((size_t)task * ranges + r) * group + i;
                if (!(top[at] > -INFINITY)) continue; /* an empty range */
                float scale = expf(top[at] - peak);
                total += sum[at] * scale;
                const float *w = weighted + at * dim;
                for (int d = 0; d < dim; d++) o[d] += w[d] * scale;
            }
            for (int d = 0; d < dim; d++) o[d] /= total;
        }
    }
    free(top), free(sum), free(weighted);
}

/* One layer over the rows x [batch * new, hidden], in place. work: floats for the intermediate results. */
static void layer_step(const Step *s, int layer, float *x, const float *cos_rows, const float *signed_sin_rows,
                       float *work, Quantized *act) {
    const Model *m = s->m;
    int R = s->batch * s->new, H = m->hidden, dim = m->head_dim, I = m->intermediate;
    int qw = m->heads * dim, kw = m->kv_heads * dim;
    const float *const *g = m->gains + (size_t)layer * NORMS_PER_LAYER;
    const Product *p = m->products + (size_t)layer * PRODUCTS_PER_LAYER;
    float *normed = work, *q = normed + (size_t)R * H, *k = q + (size_t)R * qw, *v = k + (size_t)R * kw;
    float *attn = v + (size_t)R * kw, *o = attn + (size_t)R * qw, *gate = o + (size_t)R * H;
    float *up = gate + (size_t)R * I;

    for (int r = 0; r < R; r++) rms_norm(x + (size_t)r * H, g[NORM_IN], normed + (size_t)r * H, H, m->eps);
    quantize_rows(normed, R, H, NULL, act);
    const Product *qkv[3] = {&p[Q], &p[K], &p[V]};
    float *qkv_out[3] = {q, k, v};
    products(act, qkv, qkv_out, 3);
    for (int r = 0; r < R; r++) {
        int b = r / s->new, t = r % s->new;
        const float *cos_row = cos_rows + (size_t)t * dim, *sin_row = signed_sin_rows + (size_t)t * dim;
        for (int h = 0; h < m->heads; h++) {
            float *row = q + ((size_t)r * m->heads + h) * dim;
            rms_norm(row, g[NORM_Q], row, dim, m->eps);
            rotate(row, cos_row, sin_row, dim);
        }
        for (int h = 0; h < m->kv_heads; h++) {
            float *row = k + ((size_t)r * m->kv_heads + h) * dim;
            rms_norm(row, g[NORM_K], row, dim, m->eps);
            rotate(row, cos_row, sin_row, dim);
            size_t at = (((size_t)b * m->kv_heads + h) * s->capacity + s->start + t) * dim;
            memcpy(s->keys[layer] + at, row, sizeof(float) * (size_t)dim);
            memcpy(s->values[layer] + at, v + ((size_t)r * m->kv_heads + h) * dim, sizeof(float) * (size_t)dim);
        }
    }
    attend(s, layer, q, attn);
    quantize_rows(attn, R, qw, NULL, act);
    product(act, &p[O], o);
    for (int r = 0; r < R; r++) {
        add_normed(x + (size_t)r * H, o + (size_t)r * H, g[NORM_POST_ATTN], H, m->eps);
        rms_norm(x + (size_t)r * H, g[NORM_PRE_FF], normed + (size_t)r * H, H, m->eps);
    }
    quantize_rows(normed, R, H, NULL, act);
    const Product *gate_up[2] = {&p[GATE], &p[UP]};
    float *gate_up_out[2] = {gate, up};
    products(act, gate_up, gate_up_out, 2);
    for (size_t j = 0; j < (size_t)R * I; j++) gate[j] = gelu_tanh(gate[j]) * up[j];
    quantize_rows(gate, R, I, NULL, act);
    product(act, &p[DOWN], o);
    for (int r = 0; r < R; r++) add_normed(x + (size_t)r * H, o + (size_t)r * H, g[NORM_POST_FF], H, m->eps);
}

typedef struct {
    const Model *m;
    const float *hidden;
    float *logits;
    const int *chosen;
    int n, chunks;
} RescoreJob;

/* Columns lo..hi-1 of the rescored ones: the chosen chunks' columns in order, then the ragged tail. */
static void rescore_columns(const void *context, int64_t lo, int64_t hi) {
    const RescoreJob *job = context;
    const Model *m = job->m;
    int C = m->rescore_chunk, H = m->hidden;
    for (int64_t t = lo; t < hi; t++) {
        int64_t i = t < (int64_t)job->n * C ? (int64_t)job->chosen[t / C] * C + t % C
                                            : (int64_t)job->chunks * C + (t - (int64_t)job->n * C);
        const float *e = m->embedding + (size_t)i * H;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int j = 0; j < H; j++) dot += e[j] * job->hidden[j];
        job->logits[i] = dot;
    }
}

/* The columns of a row's highest-maximum chunks get their logits from the float embedding. Every column when the
 * row has no more chunks than that (as llmsample/quantize.py's rescored_columns). */
static void rescore(const Model *m, const float *hidden, float *logits) {
    int V = m->vocab, C = m->rescore_chunk, want = m->rescore_chunks;
    int chunks = V / C, narrow = chunks <= want; /* a narrow row: every chunk (and the tail) is rescored */
    float *maxima = narrow ? NULL : malloc(sizeof(float) * (size_t)chunks);
    int *chosen = malloc(sizeof(int) * (size_t)(narrow ? chunks + 1 : want + 1));
    if ((!narrow && !maxima) || !chosen) { /* out of memory: the int8 logits stay as they are */
        free(maxima), free(chosen);
        return;
    }
    int n = 0;
    if (narrow) {
        for (; n < chunks; n++) chosen[n] = n;
    } else {
        for (int c = 0; c < chunks; c++) {
            float top = -INFINITY;
            for (int i = 0; i < C; i++) top = fmaxf(top, logits[(size_t)c * C + i]);
            maxima[c] = top;
        }
        /* the `want` largest maxima: insertion into a short sorted list */
        for (int c = 0; c < chunks; c++) {
            if (n == want && !(maxima[c] > maxima[chosen[n - 1]])) continue;
            int at = n < want ? n++ : want - 1;
            while (at > 0 && maxima[c] > maxima[chosen[at - 1]]) {
                chosen[at] = chosen[at - 1];
                at--;
            }
            chosen[at] = c;
        }
    }
    int tail = V - chunks * C;
    RescoreJob job = {m, hidden, logits, chosen, n, chunks};
    parallel(rescore_columns, &job, (int64_t)n * C + tail, C);
    free(maxima);
    free(chosen);
}

/* e^x for x <= 0 within about one float spacing (Cephes' expf polynomial after a two-part reduction by ln 2), and 0
 * below -87 (under 2^-125: nothing beside the row's largest term, which is 1). Plain arithmetic, so that the loops
 * calling it are vectorized. */
static inline float exp_nonpositive(float x) {
    float clamped = x < -87.0f ? -87.0f : x;
    float k = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* rounded to the nearest integer */
    float r = fmaf(k, -0.693359375f, clamped);
    r = fmaf(k, 2.12194440e-4f, r);
    float p = fmaf(1.9875691500e-4f, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p * r, r, r) + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

#define STATS_PIECE 8192 /* columns per work item of row_stats */
#define STATS_CHUNK 256  /* the chunks whose maxima row_stats writes (llmsample's fast_topk reads them for a small k) */
#define STATS_TOP 320    /* how many of each row's highest logits row_stats lists (fewer when the row is narrower;
                            llmsample/sampling/row_stats.py's TOP says why this many) */

int stats_chunk(void) { return STATS_CHUNK; }
int stats_top(void) { return STATS_TOP; }

/* Where row_stats writes, for logits [batch, vocab]; the sampler reads these buffers as they are (no conversion). */
typedef struct {
    float *values;   /* [batch, 3]: the largest logit, the logsumexp, the entropy in nats */
    int64_t *argmax; /* [batch]: the first column holding the largest logit */
    float *maxima;   /* [batch, vocab / STATS_CHUNK]: the largest logit of each whole chunk */
    float *top_values; /* [batch, min(STATS_TOP, vocab)]: the row's highest logits, highest first (ties: lower column
                          first); unspecified for a row whose largest logit is not finite */
    int64_t *top_columns; /* [batch, min(STATS_TOP, vocab)]: their columns */
} RowStatsOut;

typedef struct {
    float top;      /* the piece's largest logit (NaN when it holds one) */
    double total;   /* sum of e^(l - top) */
    double spread;  /* sum of e^(l - top) * (l - top) */
} Piece;

#define TOP_GROUP 64 /* the top list is found through the maxima of groups of this many columns */

typedef struct {
    const float *logits;
    int vocab, pieces;
    Piece *out;
    float *maxima; /* RowStatsOut's */
    float *groups; /* [batch, ceil(vocab / TOP_GROUP)]: each group's largest logit (the last group may be short) */
} StatsJob;

static void stats_pieces(const void *context, int64_t lo, int64_t hi) {
    const StatsJob *job = context;
    for (int64_t item = lo; item < hi; item++) {
        int64_t row = item / job->pieces, first = item % job->pieces * STATS_PIECE;
        int64_t n = job->vocab - first < STATS_PIECE ? job->vocab - first : STATS_PIECE;
        const float *l = job->logits + row * job->vocab + first;
        float top = -INFINITY;
        int broken = 0, chunks = job->vocab / STATS_CHUNK, groups = (job->vocab + TOP_GROUP - 1) / TOP_GROUP;
        float *group_max = job->groups + row * groups + first / TOP_GROUP;
        for (int64_t chunk = 0; chunk < n; chunk += STATS_CHUNK) { /* a piece starts at a chunk's start */
            int64_t end = chunk + STATS_CHUNK < n ? chunk + STATS_CHUNK : n;
            float largest = -INFINITY;
            for (int64_t group = chunk; group < end; group += TOP_GROUP) {
                int64_t stop = group + TOP_GROUP < end ? group + TOP_GROUP : end;
                float m = -INFINITY;
#pragma omp simd reduction(max : m) reduction(| : broken)
                for (int64_t i = group; i < stop; i++) {
                    m = l[i] > m ? l[i] : m;
                    broken |= l[i] != l[i];
                }
                group_max[group / TOP_GROUP] = m;
                largest = m > largest ? m : largest;
            }
            int64_t index = (first + chunk) / STATS_CHUNK;
            if (index < chunks) job->maxima[row * chunks + index] = largest;
            top = largest > top ? largest : top;
        }
        Piece *piece = job->out + item;
        piece->top = broken ? NAN : top;
        double total = 0.0, spread = 0.0;
        if (!broken && isfinite(top)) /* float sums of 128 terms, added in double (a double sum per term runs
                                         ten times slower: the vector lanes halve and the exponentials stay) */
            for (int64_t block = 0; block < n; block += 128) {
                int64_t end = block + 128 < n ? block + 128 : n;
                float part = 0.0f, part_spread = 0.0f;
#pragma omp simd reduction(+ : part, part_spread)
                for (int64_t i = block; i < end; i++) {
                    float d = l[i] - top, w = exp_nonpositive(d);
                    part += w;
                    part_spread += w * (d < -87.0f ? 0.0f : d);
                }
                total += part, spread += part_spread;
            }
        piece->total = total, piece->spread = spread;
    }
}

/* A sort key: a higher logit gives a larger key; of equal logits, the lower column does (so that a descending
 * sort of the keys orders them as a stable descending sort of the row). */
static inline uint64_t top_key(float value, int64_t column) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    bits = bits & 0x80000000u ? ~bits : bits | 0x80000000u;
    return (uint64_t)bits << 32 | (uint32_t)~(uint32_t)column;
}

/* Hoare's partition of v[0..n-1] around its middle key, larger keys first: afterwards v[0..*j] >= pivot, v[*i..n-1]
 * <= pivot, and whatever lies between equals it. */
static void partition(uint64_t *v, int64_t n, int64_t *i_out, int64_t *j_out) {
    uint64_t pivot = v[n / 2];
    int64_t i = 0, j = n - 1;
    while (i <= j) {
        while (v[i] > pivot) i++;
        while (v[j] < pivot) j--;
        if (i <= j) {
            uint64_t t = v[i];
            v[i++] = v[j], v[j--] = t;
        }
    }
    *i_out = i, *j_out = j;
}

static void sort_descending(uint64_t *v, int64_t n) {
    while (n > 16) {
        int64_t i, j;
        partition(v, n, &i, &j);
        if (j + 1 < n - i) { /* the shorter side by recursion, the longer by the loop */
            sort_descending(v, j + 1);
            v += i, n -= i;
        } else {
            sort_descending(v + i, n - i);
            n = j + 1;
        }
    }
    for (int64_t a = 1; a < n; a++) {
        uint64_t key = v[a];
        int64_t b = a;
        for (; b > 0 && v[b - 1] < key; b--) v[b] = v[b - 1];
        v[b] = key;
    }
}

/* The k-th largest of n distinct keys (1 <= k <= n), reordering them. */
static uint64_t kth_largest(uint64_t *v, int64_t n, int64_t k) {
    int64_t want = k - 1;
    while (n > 1) {
        int64_t i, j;
        partition(v, n, &i, &j);
        if (want <= j) n = j + 1;
        else if (want >= i) v += i, want -= i, n -= i;
        else break;
    }
    return v[want];
}

/* The logit a top_key holds. */
static inline float key_value(uint64_t key) {
    uint32_t bits = (uint32_t)(key >> 32);
    bits = bits & 0x80000000u ? bits & 0x7fffffffu : ~bits;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

typedef struct {
    const float *logits;
    int vocab;
    const float *row_values; /* RowStatsOut's values: [batch, 3], the row's largest logit first (NaN: broken) */
    const float *groups; /* StatsJob's */
    float *values;
    int64_t *columns;
    atomic_int failed;
} TopJob;

/* Each row's STATS_TOP highest logits, through its groups' maxima: t is the STATS_TOP-th largest group maximum, so
 * the highest logits are all >= t, lie in the groups whose maximum reaches t, and those hold at least STATS_TOP
 * such values (on the default model's rows, 400-600 of the row's 262,144); only those are sorted. */
static void top_rows(const void *context, int64_t lo, int64_t hi) {
    TopJob *job = (TopJob *)context;
    int V = job->vocab, k = V < STATS_TOP ? V : STATS_TOP, groups = (V + TOP_GROUP - 1) / TOP_GROUP;
    uint64_t *scratch = malloc(sizeof(uint64_t) * (size_t)groups);
    if (!scratch) {
        atomic_store(&job->failed, 1);
        return;
    }
    for (int64_t row = lo; row < hi; row++) {
        const float *l = job->logits + row * V, *group_max = job->groups + row * groups;
        float *values = job->values + row * k;
        int64_t *columns = job->columns + row * k;
        if (!isfinite(job->row_values[row * 3])) { /* NaN, +inf or nothing finite: the sampler refuses it first */
            for (int i = 0; i < k; i++) values[i] = NAN, columns[i] = i;
            continue;
        }
        for (int g = 0; g < groups; g++) scratch[g] = top_key(group_max[g], g);
        float t = groups > k ? key_value(kth_largest(scratch, groups, k)) : -INFINITY;
        int64_t reached = 0;
        for (int g = 0; g < groups; g++) reached += group_max[g] >= t;
        uint64_t *found = malloc(sizeof(uint64_t) * (size_t)reached * TOP_GROUP);
        if (!found) {
            atomic_store(&job->failed, 1);
            break;
        }
        int64_t at = 0;
        for (int g = 0; g < groups; g++) {
            if (!(group_max[g] >= t)) continue;
            int end = (g + 1) * TOP_GROUP < V ? (g + 1) * TOP_GROUP : V;
            for (int i = g * TOP_GROUP; i < end; i++)
                if (l[i] >= t) found[at++] = top_key(l[i], i);
        }
        sort_descending(found, at);
        for (int i = 0; i < k; i++) { /* (at >= k: at least k groups reach t, each with a value >= t) */
            int64_t column = i < at ? (uint32_t)~(uint32_t)found[i] : 0;
            columns[i] = column, values[i] = i < at ? l[column] : NAN;
        }
        free(found);
    }
    free(scratch);
}

/* Per row of logits [batch, vocab], into out (see RowStatsOut): the sums in double over float sums of 128 terms.
 * A row with NaN gets NaN as its largest logit and sums; one whose largest logit is infinite gets it as its
 * largest, the sums NaN (the sampler reports such a row before it uses anything else). Returns how many rows'
 * largest logit is not finite (0: the sampler need not look), or -1 when memory ran out. */
static int row_stats(int batch, int vocab, const float *logits, const RowStatsOut *out) {
    int pieces = (vocab + STATS_PIECE - 1) / STATS_PIECE, unusable = 0;
    Piece *part = malloc(sizeof(Piece) * (size_t)batch * pieces);
    if (!part) return -1;
    int groups = (vocab + TOP_GROUP - 1) / TOP_GROUP;
    float *group_max = malloc(sizeof(float) * (size_t)batch * groups);
    if (!group_max) {
        free(part);
        return -1;
    }
    StatsJob job = {logits, vocab, pieces, part, out->maxima, group_max};
    parallel(stats_pieces, &job, (int64_t)batch * pieces, 1);
    for (int b = 0; b < batch; b++) {
        const Piece *p = part + (size_t)b * pieces;
        float *values = out->values + (size_t)b * 3;
        float top = -INFINITY;
        int first = 0, broken = 0;
        for (int i = 0; i < pieces; i++) {
            broken |= isnan(p[i].top);
            if (p[i].top > top) top = p[i].top, first = i;
        }
        /* the first column holding the largest logit lies in the first piece that holds it */
        int64_t at = (int64_t)first * STATS_PIECE;
        const float *row = logits + (size_t)b * vocab;
        while (at < vocab - 1 && !(row[at] == top)) at++;
        values[0] = broken ? NAN : top, out->argmax[b] = at;
        if (broken || !isfinite(top)) {
            values[1] = values[2] = NAN;
            unusable++;
            continue;
        }
        double total = 0.0, spread = 0.0;
        for (int i = 0; i < pieces; i++) { /* each piece's sums moved from its own largest logit to the row's */
            if (!isfinite(p[i].top)) continue; /* every logit of the piece removed (-inf): it adds nothing */
            double shift = (double)p[i].top - top, factor = exp(shift);
            total += factor * p[i].total;
            spread += factor * (p[i].spread + shift * p[i].total);
        }
        values[1] = (float)(top + log(total));
        values[2] = (float)(log(total) - spread / total);
    }
    free(part);
    TopJob top_job = {logits, vocab, out->values, group_max, out->top_values, out->top_columns, 0};
    parallel(top_rows, &top_job, batch, 1); /* after the rows' largest logits: it lists only usable rows */
    free(group_max);
    return top_job.failed ? -1 : unusable;
}

typedef struct {
    int batch, vocab;
    const float *logits;
    const RowStatsOut *out;
    int status;
} StatsCall;

static void run_stats(void *argument) {
    StatsCall *c = argument;
    c->status = row_stats(c->batch, c->vocab, c->logits, c->out);
}

/* row_stats of logits [batch, vocab] the caller has, on `threads` threads, as a step computes them (and returns). */
int logits_stats(int threads, int batch, int vocab, const float *logits, const RowStatsOut *out) {
    StatsCall c = {batch, vocab, logits, out, 0};
    in_team(threads, run_stats, &c);
    return c.status;
}

static int head_logits(const Model *m, int batch, const float *x, float *normed, Quantized *act, float *logits,
                       const RowStatsOut *stats) {
    for (int b = 0; b < batch; b++)
        rms_norm(x + (size_t)b * m->hidden, m->final_gain, normed + (size_t)b * m->hidden, m->hidden, m->eps);
    quantize_rows(normed, batch, m->hidden, m->head_channel_scale, act);
    product(act, &m->head, logits);
    if (m->embedding)
        for (int b = 0; b < batch; b++)
            rescore(m, normed + (size_t)b * m->hidden, logits + (size_t)b * m->vocab);
    return stats ? row_stats(batch, m->vocab, logits, stats) : 0;
}

/* One step, its jobs shared by the running team if any. x: [batch, new, hidden] embedded inputs at positions
 * start..start+new-1 (the same in every row), overwritten;
 * keys/values: each layer's cache, written at those positions; rope_*: the RoPE rows (cos, signed sin) of those
 * positions, [new, head_dim] each, for sliding and full layers; logits: [batch, vocab], of each row's last
 * position; stats: see row_stats (NULL: none). Returns -1 when memory ran out, else what row_stats returns (0
 * without stats). */
static int step_alone(const Model *m, int batch, int new, int start, int capacity, float *x, float *const *keys,
                      float *const *values, const float *cos_sliding, const float *sin_sliding,
                      const float *cos_full, const float *sin_full, float *logits, const RowStatsOut *stats) {
    Step s = {m, batch, new, start, capacity, keys, values};
    size_t R = (size_t)batch * new;
    int widest = m->intermediate;
    if (m->heads * m->head_dim > widest) widest = m->heads * m->head_dim;
    if (m->hidden > widest) widest = m->hidden;
    size_t floats = R * (2 * (size_t)m->hidden + 2 * (size_t)m->heads * m->head_dim +
                         2 * (size_t)m->kv_heads * m->head_dim + 2 * (size_t)m->intermediate);
    float *work = malloc(sizeof(float) * floats);
    uint8_t *bytes = malloc(2 * R * (size_t)widest);
    float *steps = malloc(sizeof(float) * R);
    float *last = malloc(sizeof(float) * (size_t)batch * m->hidden);
    float *normed = malloc(sizeof(float) * (size_t)batch * m->hidden);
    if (!work || !bytes || !steps || !last || !normed) {
        free(work), free(bytes), free(steps), free(last), free(normed);
        return -1;
    }
    Quantized act = {bytes, bytes + R * (size_t)widest, steps, 0, 0};
    for (int layer = 0; layer < m->layers; layer++) {
        int sl = m->sliding[layer];
        layer_step(&s, layer, x, sl ? cos_sliding : cos_full, sl ? sin_sliding : sin_full, work, &act);
    }
    for (int b = 0; b < batch; b++)
        memcpy(last + (size_t)b * m->hidden, x + ((size_t)b * new + new - 1) * m->hidden,
               sizeof(float) * (size_t)m->hidden);
    int status = head_logits(m, batch, last, normed, &act, logits, stats);
    free(work), free(bytes), free(steps), free(last), free(normed);
    return status;
}

typedef struct {
    const Model *m;
    int batch, new, start, capacity;
    float *x;
    float *const *keys, *const *values;
    const float *cos_sliding, *sin_sliding, *cos_full, *sin_full;
    float *logits;
    const RowStatsOut *stats;
    int status;
} StepCall;

static void run_step(void *argument) {
    StepCall *c = argument;
    c->status = step_alone(c->m, c->batch, c->new, c->start, c->capacity, c->x, c->keys, c->values, c->cos_sliding,
                           c->sin_sliding, c->cos_full, c->sin_full, c->logits, c->stats);
}

/* The step on `threads` threads (see step_alone for the rest). */
int decode_step(const Model *m, int threads, int batch, int new, int start, int capacity, float *x,
                float *const *keys, float *const *values, const float *cos_sliding, const float *sin_sliding,
                const float *cos_full, const float *sin_full, float *logits, const RowStatsOut *stats) {
    StepCall c = {m, batch, new, start, capacity, x, keys, values, cos_sliding, sin_sliding, cos_full, sin_full,
                  logits, stats, 0};
    in_team(threads, run_step, &c);
    return c.status;
}

static int project_alone(const Model *m, int batch, const float *x, float *logits);

typedef struct {
    const Model *m;
    int batch;
    const float *x;
    float *logits;
    int status;
} ProjectCall;

static void run_project(void *argument) {
    ProjectCall *c = argument;
    c->status = project_alone(c->m, c->batch, c->x, c->logits);
}

/* The final norm and the output projection alone, for the hidden states x [batch, hidden], on `threads` threads:
 * the logits [batch, vocab] as decode_step gives them. Returns 0, or -1 when memory ran out. */
int project(const Model *m, int threads, int batch, const float *x, float *logits) {
    ProjectCall c = {m, batch, x, logits, 0};
    in_team(threads, run_project, &c);
    return c.status;
}

static int project_alone(const Model *m, int batch, const float *x, float *logits) {
    float *normed = malloc(sizeof(float) * (size_t)batch * m->hidden);
    uint8_t *bytes = malloc((size_t)2 * batch * m->hidden);
    float *steps = malloc(sizeof(float) * (size_t)batch);
    if (!normed || !bytes || !steps) {
        free(normed), free(bytes), free(steps);
        return -1;
    }
    Quantized act = {bytes, bytes + (size_t)batch * m->hidden, steps, 0, 0};
    int status = head_logits(m, batch, x, normed, &act, logits, NULL);
    free(normed), free(bytes), free(steps);
    return status;
}
