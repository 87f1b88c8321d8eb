/* Paged attention for a ragged batch of conversations, on the CPU, in float32, over a cache of float32
 * or float16 (`_f16` functions: half the bytes read per key and value, widened in registers).
 *
 * Why our own kernel: on the CPU the portable path copies every conversation's keys and values out of
 * the paged cache into a padded block (gather), builds an additive mask, and runs SDPA over it, so
 * each step reads the whole history three times; torch has no paged attention for the CPU, and the
 * libraries that do (vLLM's CPU build, Intel's extension) are not installable dependencies here.
 * This kernel reads each key and value block once, in place, through the block table.
 *
 * Layout (one layer): kv [2][kv_heads][slots][D], slot = block * block_size + offset. Values are
 * stored as rows ([block_size][D] per block and head); keys TRANSPOSED within their block
 * ([D][block_size]), so that the scores of a query against a block's keys are block_size-wide
 * vector FMAs instead of one horizontal sum per key. A cache written by this kernel is read only
 * by this kernel (the engine fixes one attention backend per cache).
 *
 * Built by processor/model/cpu_kernel.py with -O3 -march=native -ffast-math (vectorized expf from
 * glibc's libmvec), compiled and linked in two steps so that crtfastmath.o (flush-to-zero for the
 * whole process) is never linked in.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifdef __AVX512F__
#define LANES 16 /* one AVX-512 register of floats */
#else
/* One AVX2 register (two SSE ones). 16 here (two registers a vector) spills the 8-row tiles'
 * accumulators to memory. */
#define LANES 8
#endif
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Scores are floored at this far below their row's largest before exp: a key's weight is then at
 * least exp(-64) = 1.6e-28 of the largest, where its true weight may be smaller, a difference far
 * below float32's resolution of the weights' sum (at least 1). Without the floor, sharp attention is
 * slow: below -87 expf gives subnormals, for which glibc's vector expf leaves its fast path, and
 * subnormal weights times values are microcode assists on x86 (docs/benchmarks.md). */
#define WEIGHT_FLOOR (-64.0f)

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

#ifdef __AVX512F__
/* exp of 16 floats in [WEIGHT_FLOOR, 0], inlined: Cephes' expf (x = n ln2 + r, |r| <= ln2 / 2, a
 * degree-6 polynomial in r, then 2^n by vscalefps), within 2 ulp. glibc's vector expf is a call per
 * 16 floats that handles every input range, and the softmax's exponentials are a large share of the
 * kernel when conversations bring several new tokens. Intrinsics throughout:
 * -ffast-math may reassociate plain vector arithmetic, and the split of n ln2 in two must stay. */
static inline __m512 exp_lanes_nonpositive(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* s[j] = exp(max(s[j] - top, WEIGHT_FLOOR)) for j < count; returns their sum. */
static inline float exp_row(float *restrict s, int64_t count, float top) {
    const __m512 shift = _mm512_set1_ps(top), floor = _mm512_set1_ps(WEIGHT_FLOOR);
    __m512 sum = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= count; j += 16) {
        const __m512 e = exp_lanes_nonpositive(_mm512_max_ps(_mm512_sub_ps(_mm512_loadu_ps(s + j), shift), floor));
        _mm512_storeu_ps(s + j, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (j < count) {
        const __mmask16 tail = (__mmask16)((1u << (count - j)) - 1u);
        const __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), shift), floor);
        const __m512 e = exp_lanes_nonpositive(x);
        _mm512_mask_storeu_ps(s + j, tail, e);
        sum = _mm512_mask_add_ps(sum, tail, sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}
#else
static inline float exp_row(float *restrict s, int64_t count, float top) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < count; j++) {
        const float e = expf(fmaxf(s[j] - top, WEIGHT_FLOOR));
        s[j] = e;
        sum += e;
    }
    return sum;
}
#endif

/* GCC/Clang vector extension: LANES floats kept in one register; the unaligned twin loads and stores
 * at any float address. */
typedef float lanes_t __attribute__((vector_size(LANES * sizeof(float))));
typedef float lanes_unaligned_t __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float))));

static inline lanes_t load_lanes(const float *from) { return *(const lanes_unaligned_t *)from; }
static inline void store_lanes(float *to, lanes_t value) { *(lanes_unaligned_t *)to = value; }

static inline lanes_t max_lanes(lanes_t a, lanes_t b) {
#if defined(__AVX512F__)
    return (lanes_t)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__)
    return (lanes_t)_mm256_max_ps((__m256)a, (__m256)b);
#else
    for (int l = 0; l < LANES; l++) a[l] = a[l] > b[l] ? a[l] : b[l];
    return a;
#endif
}

/* The largest of s[0 .. count), count >= 1, with four running maxima (one alone waits on the last
 * max's latency every LANES scores). */
static inline float row_max(const float *restrict s, int64_t count) {
    lanes_t m0, m1, m2, m3;
    int64_t j = 0;
    float top = -FLT_MAX;
    if (count >= 4 * LANES) {
        m0 = load_lanes(s), m1 = load_lanes(s + LANES), m2 = load_lanes(s + 2 * LANES), m3 = load_lanes(s + 3 * LANES);
        for (j = 4 * LANES; j + 4 * LANES <= count; j += 4 * LANES) {
            const lanes_t a = load_lanes(s + j), b = load_lanes(s + j + LANES);
            const lanes_t c = load_lanes(s + j + 2 * LANES), d = load_lanes(s + j + 3 * LANES);
            m0 = max_lanes(a, m0), m1 = max_lanes(b, m1), m2 = max_lanes(c, m2), m3 = max_lanes(d, m3);
        }
        m0 = max_lanes(max_lanes(m0, m1), max_lanes(m2, m3));
        for (int l = 0; l < LANES; l++) top = m0[l] > top ? m0[l] : top;
    }
    for (; j < count; j++) top = s[j] > top ? s[j] : top;
    return top;
}

/* Cache elements: float, or (half = 1) IEEE float16, chosen per exported function. Every function
 * that reads the cache takes `half` as a constant and is always inlined, so each exported variant
 * compiles to its own loop with no branch on the element type. float16 needs the compiler's _Float16
 * (GCC 12+, Clang 15+ on x86-64 and arm64); without it the _f16 functions report unsupported. */
#ifdef __FLT16_MAX__
#define HALF_SUPPORTED 1
typedef _Float16 half_t;
typedef _Float16 half_lanes_unaligned_t __attribute__((vector_size(LANES * sizeof(_Float16)), aligned(2)));
#else
#define HALF_SUPPORTED 0
typedef uint16_t half_t; /* placeholder: the _f16 entry points return before reading anything */
#endif

ALWAYS_INLINE const void *kv_at(const void *base, int64_t index, const int half) {
    return (const char *)base + index * (half ? (int64_t)sizeof(half_t) : (int64_t)sizeof(float));
}

ALWAYS_INLINE lanes_t load_kv(const void *from, const int half) {
    if (!half) return load_lanes((const float *)from);
#if defined(__AVX512F__)
    return (lanes_t)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)from));
#elif defined(__F16C__) && defined(__AVX__)
    return (lanes_t)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)from)); /* LANES is 8 here */
#elif HALF_SUPPORTED
    return __builtin_convertvector(*(const half_lanes_unaligned_t *)from, lanes_t);
#else
    return load_lanes((const float *)from); /* unreachable: _f16 entry points refuse first */
#endif
}

ALWAYS_INLINE float kv_scalar(const void *base, int64_t index, const int half) {
    return half ? (float)((const half_t *)base)[index] : ((const float *)base)[index];
}

/* 1 when this build has the float16 cache functions. */
int paged_kv_half_supported(void) { return HALF_SUPPORTED; }

/* Bring a block (bytes) towards the cache ahead of use: blocks sit anywhere in a large cache, and
 * without this every block start waited on memory. */
static inline void prefetch_block(const void *block, int64_t bytes) {
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch((const char *)block + offset);
}

/* Store the step's new keys (transposed within their block) and values at their slots; key/value
 * [tokens][kv_heads][D]. */
ALWAYS_INLINE void kv_write(const float *restrict key, const float *restrict value, void *restrict kv, int64_t slots,
                            int64_t tokens, int64_t kv_heads, int64_t D, int64_t bs,
                            const int64_t *restrict slot_mapping, const int half) {
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t slot = slot_mapping[t], block = slot / bs, offset = slot % bs;
        for (int64_t h = 0; h < kv_heads; h++) {
            const float *k = key + (t * kv_heads + h) * D, *v = value + (t * kv_heads + h) * D;
            const int64_t key_block = h * slots * D + block * bs * D, value_row = (kv_heads + h) * slots * D + slot * D;
            for (int64_t d = 0; d < D; d++) {
                if (half) {
                    ((half_t *)kv)[key_block + d * bs + offset] = (half_t)k[d];
                    ((half_t *)kv)[value_row + d] = (half_t)v[d];
                } else {
                    ((float *)kv)[key_block + d * bs + offset] = k[d];
                    ((float *)kv)[value_row + d] = v[d];
                }
            }
        }
    }
}

void paged_kv_write_f32(const float *restrict key, const float *restrict value, float *restrict kv, int64_t slots,
                        int64_t tokens, int64_t kv_heads, int64_t D, int64_t bs, const int64_t *restrict slot_mapping) {
    kv_write(key, value, kv, slots, tokens, kv_heads, D, bs, slot_mapping, 0);
}

void paged_kv_write_f16(const float *restrict key, const float *restrict value, void *restrict kv, int64_t slots,
                        int64_t tokens, int64_t kv_heads, int64_t D, int64_t bs, const int64_t *restrict slot_mapping) {
    if (HALF_SUPPORTED) kv_write(key, value, kv, slots, tokens, kv_heads, D, bs, slot_mapping, 1);
}

/* scores[0 .. bs) of one query row against one transposed key block ([D][bs]). */
ALWAYS_INLINE void block_scores(const float *restrict q, const void *restrict key_block, int64_t D, int64_t bs,
                                float *restrict scores, const int half) {
    int64_t j1 = 0;
    for (; j1 + LANES <= bs; j1 += LANES) {
        lanes_t even = {0}, odd = {0}; /* two chains: an FMA's latency, not its throughput, bounds one */
        int64_t d = 0;
        for (; d + 1 < D; d += 2) {
            even += q[d] * load_kv(kv_at(key_block, d * bs + j1, half), half);
            odd += q[d + 1] * load_kv(kv_at(key_block, (d + 1) * bs + j1, half), half);
        }
        if (d < D) even += q[d] * load_kv(kv_at(key_block, d * bs + j1, half), half);
        store_lanes(scores + j1, even + odd);
    }
    for (; j1 < bs; j1++) { /* blocks narrower than LANES */
        float sum = 0.0f;
        for (int64_t d = 0; d < D; d++) sum += q[d] * kv_scalar(key_block, d * bs + j1, half);
        scores[j1] = sum;
    }
}

/* acc[0 .. D) += sum over the block's first `count` keys of p[jj] * value row jj ([bs][D]). */
ALWAYS_INLINE void block_values(const float *restrict p, const void *restrict value_block, int64_t count, int64_t D,
                                float *restrict acc, const int half) {
    int64_t d0 = 0;
    for (; d0 + LANES <= D; d0 += LANES) {
        lanes_t even = load_lanes(acc + d0), odd = {0};
        int64_t jj = 0;
        for (; jj + 1 < count; jj += 2) {
            even += p[jj] * load_kv(kv_at(value_block, jj * D + d0, half), half);
            odd += p[jj + 1] * load_kv(kv_at(value_block, (jj + 1) * D + d0, half), half);
        }
        if (jj < count) even += p[jj] * load_kv(kv_at(value_block, jj * D + d0, half), half);
        store_lanes(acc + d0, even + odd);
    }
    for (; d0 < D; d0++) /* head sizes that are not a multiple of LANES */
        for (int64_t jj = 0; jj < count; jj++) acc[d0] += p[jj] * kv_scalar(value_block, jj * D + d0, half);
}

/* Rows `tile` at a time (consecutive rows: queries D apart, scores `width` apart): each key or value
 * vector loaded feeds `tile` independent FMA chains. A row alone waits on its chain's FMA latency and
 * loads the block again for every row. Always inlined with a constant `tile`, so that the per-row
 * accumulators are registers. */
#define MAX_TILE 8

/* FMA chains kept in flight by the tiles below: an FMA waits ~4 cycles for its accumulator and two
 * can start a cycle, so a tile of `tile` rows splits each row's sum into 8 / tile partial sums (over
 * every chains-th head dimension or key) and adds them at the end. With one chain a row, a 2-row tile
 * (a streaming step's usual shape) would wait on FMA latency. */
#define FMA_CHAINS 8
#define MAX_CHAINS 4 /* partial sums a row: FMA_CHAINS / the smallest tile (2) */

/* Partial sums a row of a `tile`-row tile keeps (a constant once the tile is). */
ALWAYS_INLINE int chains_for(const int tile) { return tile >= FMA_CHAINS ? 1 : FMA_CHAINS / tile; }

/* block_scores for the `tile` rows at q (scores to s), against one transposed key block ([D][bs]). */
ALWAYS_INLINE void block_scores_tile(const int tile, const float *restrict q, const void *restrict key_block,
                                     int64_t D, int64_t bs, float *restrict s, int64_t width, const int half) {
    const int chains = chains_for(tile);
    int64_t j1 = 0;
    for (; j1 + LANES <= bs; j1 += LANES) {
        lanes_t a[MAX_TILE][MAX_CHAINS];
        for (int t = 0; t < tile; t++)
            for (int c = 0; c < chains; c++) a[t][c] = (lanes_t){0};
        int64_t d = 0;
        for (; d + chains <= D; d += chains)
            for (int c = 0; c < chains; c++) {
                const lanes_t k = load_kv(kv_at(key_block, (d + c) * bs + j1, half), half);
                for (int t = 0; t < tile; t++) a[t][c] += q[t * D + d + c] * k;
            }
        for (; d < D; d++) {
            const lanes_t k = load_kv(kv_at(key_block, d * bs + j1, half), half);
            for (int t = 0; t < tile; t++) a[t][0] += q[t * D + d] * k;
        }
        for (int t = 0; t < tile; t++) {
            for (int c = 1; c < chains; c++) a[t][0] += a[t][c];
            store_lanes(s + t * width + j1, a[t][0]);
        }
    }
    for (; j1 < bs; j1++) /* blocks narrower than LANES */
        for (int t = 0; t < tile; t++) {
            float sum = 0.0f;
            for (int64_t d = 0; d < D; d++) sum += q[t * D + d] * kv_scalar(key_block, d * bs + j1, half);
            s[t * width + j1] = sum;
        }
}

/* block_values for the `tile` rows whose weights are at p (`width` apart) and accumulators at acc (D
 * apart), over the block's first `count` keys (weights of keys a row does not see are 0). */
ALWAYS_INLINE void block_values_tile(const int tile, const float *restrict p, int64_t width,
                                     const void *restrict value_block, int64_t count, int64_t D,
                                     float *restrict acc, const int half) {
    const int chains = chains_for(tile);
    int64_t d0 = 0;
    for (; d0 + LANES <= D; d0 += LANES) {
        lanes_t a[MAX_TILE][MAX_CHAINS];
        for (int t = 0; t < tile; t++) {
            a[t][0] = load_lanes(acc + t * D + d0);
            for (int c = 1; c < chains; c++) a[t][c] = (lanes_t){0};
        }
        int64_t jj = 0;
        for (; jj + chains <= count; jj += chains)
            for (int c = 0; c < chains; c++) {
                const lanes_t v = load_kv(kv_at(value_block, (jj + c) * D + d0, half), half);
                for (int t = 0; t < tile; t++) a[t][c] += p[t * width + jj + c] * v;
            }
        for (; jj < count; jj++) {
            const lanes_t v = load_kv(kv_at(value_block, jj * D + d0, half), half);
            for (int t = 0; t < tile; t++) a[t][0] += p[t * width + jj] * v;
        }
        for (int t = 0; t < tile; t++) {
            for (int c = 1; c < chains; c++) a[t][0] += a[t][c];
            store_lanes(acc + t * D + d0, a[t][0]);
        }
    }
    for (; d0 < D; d0++) /* head sizes that are not a multiple of LANES */
        for (int t = 0; t < tile; t++)
            for (int64_t jj = 0; jj < count; jj++)
                acc[t * D + d0] += p[t * width + jj] * kv_scalar(value_block, jj * D + d0, half);
}

/* Size in floats of the scratch `paged_attention_f32` needs for its longest chunk. */
int64_t paged_attention_scratch_floats(int64_t heads, int64_t kv_heads, int64_t D, int64_t bs,
                                       int64_t max_length, int64_t max_context) {
    const int64_t rows = heads / kv_heads * max_length, width = (max_context + bs - 1) / bs * bs;
    return rows * width + 2 * rows * D + rows;
}

/* query/out [tokens][heads][D], the step's new tokens packed (their keys and values already written);
 * chunks [count][4]: first packed row, first position, length, offset of its block table in `tables`.
 * A chunk's token i (position start + i) attends to positions 0 .. start + i of its conversation.
 * Query head h reads KV head h / (heads / kv_heads). Only the chunks' own rows of `out` are written,
 * so disjoint sets of chunks may run on threads at once, each with its own scratch. */
ALWAYS_INLINE void attend(const float *restrict query, float *restrict out, const void *restrict kv, int64_t slots,
                          int64_t heads, int64_t kv_heads, int64_t D, int64_t bs, const int64_t *restrict chunks,
                          int64_t count, const int64_t *restrict tables, float scale, float *restrict scratch,
                          const int half) {
    const int64_t group = heads / kv_heads, block_bytes = bs * D * (half ? (int64_t)sizeof(half_t) : (int64_t)sizeof(float));
    for (int64_t c = 0; c < count; c++) {
        const int64_t first_row = chunks[4 * c], start = chunks[4 * c + 1], length = chunks[4 * c + 2];
        const int64_t *table = tables + chunks[4 * c + 3];
        const int64_t context = start + length, blocks = (context + bs - 1) / bs, width = blocks * bs;
        const int64_t rows = group * length; /* row r = i * group + g: token i, query head h * group + g */
        float *restrict scores = scratch;           /* [rows][width] */
        float *restrict queries = scores + rows * width; /* [rows][D], scaled */
        float *restrict acc = queries + rows * D;   /* [rows][D] */
        float *restrict inverse = acc + rows * D;   /* [rows]: 1 / each row's sum of weights */
        for (int64_t h = 0; h < kv_heads; h++) {
            const void *keys = kv_at(kv, h * slots * D, half), *values = kv_at(kv, (kv_heads + h) * slots * D, half);
            for (int64_t g = 0; g < group; g++)
                for (int64_t i = 0; i < length; i++) {
                    const float *q = query + ((first_row + i) * heads + h * group + g) * D;
                    float *row = queries + (i * group + g) * D;
                    for (int64_t d = 0; d < D; d++) row[d] = q[d] * scale;
                }
            /* Scores, block by block: each key block is read once and used by every row that sees it
             * (the rows of tokens first_i on: the last ones), 8, 4 or 2 rows at a time (2: one token's two
             * query heads of a KV head, the usual streaming step), then one by one. */
            for (int64_t b = 0; b < blocks; b++) {
                if (b + 2 < blocks) prefetch_block(kv_at(keys, table[b + 2] * bs * D, half), block_bytes);
                const void *key_block = kv_at(keys, table[b] * bs * D, half);
                const int64_t j0 = b * bs, first_i = j0 > start ? j0 - start : 0;
                int64_t r = first_i * group;
                for (; r + 8 <= rows; r += 8)
                    block_scores_tile(8, queries + r * D, key_block, D, bs, scores + r * width + j0, width, half);
                for (; r + 4 <= rows; r += 4)
                    block_scores_tile(4, queries + r * D, key_block, D, bs, scores + r * width + j0, width, half);
                for (; r + 2 <= rows; r += 2)
                    block_scores_tile(2, queries + r * D, key_block, D, bs, scores + r * width + j0, width, half);
                for (; r < rows; r++) block_scores(queries + r * D, key_block, D, bs, scores + r * width + j0, half);
            }
            /* Softmax over the keys each row sees, the rest weighing nothing; left unnormalized (each row's
             * output is scaled by 1 / its sum at the end: D multiplies instead of a pass over its keys). */
            for (int64_t r = 0; r < rows; r++) {
                const int64_t seen = start + r / group + 1;
                float *s = scores + r * width;
                const float top = row_max(s, seen);
                inverse[r] = 1.0f / exp_row(s, seen, top);
                for (int64_t j = seen; j < context; j++) s[j] = 0.0f; /* the chunk's later keys: a tile reads them */
                memset(acc + r * D, 0, D * sizeof(float));
            }
            /* Weighted values, block by block, like the scores. A tile takes the keys up to `context`
             * (weight 0 past a row's own position); slots past `context` were never written. */
            for (int64_t b = 0; b < blocks; b++) {
                if (b + 2 < blocks) prefetch_block(kv_at(values, table[b + 2] * bs * D, half), block_bytes);
                const void *value_block = kv_at(values, table[b] * bs * D, half);
                const int64_t j0 = b * bs, first_i = j0 > start ? j0 - start : 0, count = min64(bs, context - j0);
                int64_t r = first_i * group;
                for (; r + 8 <= rows; r += 8)
                    block_values_tile(8, scores + r * width + j0, width, value_block, count, D, acc + r * D, half);
                for (; r + 4 <= rows; r += 4)
                    block_values_tile(4, scores + r * width + j0, width, value_block, count, D, acc + r * D, half);
                for (; r + 2 <= rows; r += 2)
                    block_values_tile(2, scores + r * width + j0, width, value_block, count, D, acc + r * D, half);
                for (; r < rows; r++) {
                    const int64_t seen = start + r / group + 1;
                    block_values(scores + r * width + j0, value_block, min64(bs, seen - j0), D, acc + r * D, half);
                }
            }
            for (int64_t g = 0; g < group; g++)
                for (int64_t i = 0; i < length; i++) {
                    const int64_t r = i * group + g;
                    float *restrict o = out + ((first_row + i) * heads + h * group + g) * D;
                    for (int64_t d = 0; d < D; d++) o[d] = acc[r * D + d] * inverse[r];
                }
        }
    }
}

void paged_attention_f32(const float *restrict query, float *restrict out, const float *restrict kv, int64_t slots,
                         int64_t heads, int64_t kv_heads, int64_t D, int64_t bs, const int64_t *restrict chunks,
                         int64_t count, const int64_t *restrict tables, float scale, float *restrict scratch) {
    attend(query, out, kv, slots, heads, kv_heads, D, bs, chunks, count, tables, scale, scratch, 0);
}

/* The same over a float16 cache (written by paged_kv_write_f16). */
void paged_attention_f16(const float *restrict query, float *restrict out, const void *restrict kv, int64_t slots,
                         int64_t heads, int64_t kv_heads, int64_t D, int64_t bs, const int64_t *restrict chunks,
                         int64_t count, const int64_t *restrict tables, float scale, float *restrict scratch) {
    if (HALF_SUPPORTED) attend(query, out, kv, slots, heads, kv_heads, D, bs, chunks, count, tables, scale, scratch, 1);
}
