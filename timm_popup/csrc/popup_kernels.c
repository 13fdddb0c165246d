/* Fused CPU kernels for timm-popup: exact top-k selection, masked weights, the straight-through backward and
 * the counter-based weight generator of timm_popup/init.py.
 *
 * Plain C99 + OpenMP on raw pointers, compiled at first use by timm_popup/native.py with
 * -O3 -fno-fast-math -ffp-contract=off, loaded through ctypes. Every function takes the number of threads to
 * use (torch.get_num_threads() from the caller), so the kernels follow torch's own setting.
 *
 * Exactness contracts (tested in tests/test_native.py against the PyTorch reference):
 *  - selection: keep the `keep` largest |s|; of the entries equal to the threshold keep those with the lowest
 *    flat indices. Reported as (thr, cut): i is kept iff |s_i| > thr or (|s_i| == thr and i <= cut).
 *  - masked weight: w * (float)kept, the same product torch's `weight * mask` computes (so a dropped negative
 *    weight is -0.0 there as here).
 *  - backward: (g * w) * sign(s), sign(+-0) = +0, in that order.
 *  - generator: the same IEEE-exact float64 operations, in the same order, as init.py's numpy code, rounded
 *    once to float32. No libm transcendental is used (their last bit differs between libms).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define TEAM_ID omp_get_thread_num()
#define TEAM_SIZE omp_get_num_threads()
#else
#define TEAM_ID 0
#define TEAM_SIZE 1
#endif

/* The hinted pass is specialised per output kind by inlining it with a constant kind (gcc and clang). */
#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

/* Below this many elements a parallel region costs more than it saves. */
#define PAR_MIN 32768
#define MAX_THREADS 256

int popup_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* |x| as an order-preserving integer: for non-NaN floats with the sign bit cleared, the bit pattern is
 * monotonic in the value, and +0/-0 map to the same key (as fabsf does). Selection works on these keys. */
static inline uint32_t abs_key(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u & 0x7fffffffu;
}

static inline float key_value(uint32_t k) {
    float f;
    memcpy(&f, &k, sizeof f);
    return f;
}

static inline int clamp_threads(int nt, int64_t n) {
    if (nt < 1 || n < PAR_MIN) return 1;
    return nt > MAX_THREADS ? MAX_THREADS : nt;
}

/* Contiguous block [*b, *e) of thread t among `team`: static blocks keep every gather in flat-index order. Blocks
 * start at multiples of 64 elements, so that threads never share an output cache line and loops over packed sign
 * bits (FOR_SIGNS) start on a byte boundary. */
static inline void block_of(int64_t n, int t, int team, int64_t *b, int64_t *e) {
    const int64_t groups = (n + 63) / 64, q = groups / team, r = groups % team;
    const int64_t gb = q * t + (t < r ? t : r), ge = gb + q + (t < r);
    *b = gb * 64 < n ? gb * 64 : n;
    *e = ge * 64 < n ? ge * 64 : n;
}

/* Serial radix select: the k-th largest (1-based) of keys[0..m), keys < 2^31. Destroys keys (compacts the
 * candidates in place each round), so the caller passes a scratch copy. Worst case 3 passes per round over
 * a shrinking array: no quickselect pathologies on sorted, periodic or all-equal input. */
static uint32_t kth_largest_key(uint32_t *keys, int64_t m, int64_t k) {
    static const int shifts[3] = {20, 9, 0};
    static const uint32_t masks[3] = {0x7ff, 0x7ff, 0x1ff};
    int64_t hist[2048];
    for (int r = 0; r < 3; r++) {
        const int sh = shifts[r];
        const uint32_t mk = masks[r];
        memset(hist, 0, sizeof hist);
        for (int64_t i = 0; i < m; i++) hist[(keys[i] >> sh) & mk]++;
        int64_t acc = 0;
        uint32_t b = mk;
        for (;; b--) {
            if (acc + hist[b] >= k) break;
            acc += hist[b];
        }
        k -= acc;
        int64_t j = 0;
        for (int64_t i = 0; i < m; i++)
            if (((keys[i] >> sh) & mk) == b) keys[j++] = keys[i];
        m = j;
    }
    return keys[0];
}

/* Flat index of the `tie_need`-th entry (1-based, in index order) with key == tk. Only called when ties must be
 * cut, which is rare for trained float scores, so it is a separate pass rather than indices kept in the band. */
static int64_t find_cut(const float *s, int64_t n, uint32_t tk, int64_t tie_need, int nt) {
    int64_t counts[MAX_THREADS];
    int team = 1;
    nt = clamp_threads(nt, n);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = TEAM_ID;
        int64_t b, e, c = 0;
        if (t == 0) team = TEAM_SIZE;
        block_of(n, t, TEAM_SIZE, &b, &e);
        for (int64_t i = b; i < e; i++) c += abs_key(s[i]) == tk;
        counts[t] = c;
    }
    int64_t before = 0;
    for (int t = 0; t < team; t++) {
        if (before + counts[t] >= tie_need) {
            int64_t b, e;
            block_of(n, t, team, &b, &e);
            for (int64_t i = b; i < e; i++)
                if (abs_key(s[i]) == tk && ++before == tie_need) return i;
        }
        before += counts[t];
    }
    return n - 1; /* unreachable when tie_need <= number of ties */
}

/* Threshold key and cut from a band of keys that holds the keep-th largest: `above` entries lie above the band,
 * and need = keep - above of the band's m entries are kept. Returns 0, or -1 if memory ran out. */
static int select_in_band(const float *s, int64_t n, int64_t keep, int64_t above, const uint32_t *band,
                          int64_t m, int nt, uint32_t *tk_out, int64_t *cut_out) {
    uint32_t *scratch = (uint32_t *)malloc((size_t)(m > 0 ? m : 1) * sizeof(uint32_t));
    if (!scratch) return -1;
    memcpy(scratch, band, (size_t)m * sizeof(uint32_t));
    const uint32_t tk = kth_largest_key(scratch, m, keep - above);
    free(scratch);
    int64_t gt = above, eq = 0; /* every entry equal to the threshold lies in the band */
    for (int64_t i = 0; i < m; i++) {
        gt += band[i] > tk;
        eq += band[i] == tk;
    }
    const int64_t tie_need = keep - gt;
    *cut_out = tie_need < eq ? find_cut(s, n, tk, tie_need, nt) : n - 1;
    *tk_out = tk;
    return 0;
}

/* Histogram path, exact for any input: one parallel pass histograms the top 11 bits of |s|'s key, a second
 * gathers the one bucket holding the keep-th largest (exact sizes from the per-thread histograms, so no
 * overflow), and the bucket is selected serially. Returns 0, or -1 if memory ran out. The bucket's value
 * range and count are reported so the caller can size the next hint. */
static int select_by_histogram(const float *s, int64_t n, int64_t keep, int nt, float *thr_out,
                               int64_t *cut_out, double *bucket_lo, double *bucket_hi, int64_t *bucket_n) {
    nt = clamp_threads(nt, n);
    int64_t(*hist)[2048] = (int64_t(*)[2048])calloc((size_t)nt, sizeof *hist);
    if (!hist) return -1;
    int team = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = TEAM_ID;
        int64_t b, e;
        if (t == 0) team = TEAM_SIZE;
        block_of(n, t, TEAM_SIZE, &b, &e);
        /* four interleaved sub-histograms: neighbouring scores mostly share a bucket, and one counter would
         * make every increment wait for the previous store */
        int64_t sub[4][2048];
        memset(sub, 0, sizeof sub);
        int64_t i = b;
        for (; i + 4 <= e; i += 4) {
            sub[0][abs_key(s[i]) >> 20]++;
            sub[1][abs_key(s[i + 1]) >> 20]++;
            sub[2][abs_key(s[i + 2]) >> 20]++;
            sub[3][abs_key(s[i + 3]) >> 20]++;
        }
        for (; i < e; i++) sub[0][abs_key(s[i]) >> 20]++;
        int64_t *h = hist[t];
        for (int j = 0; j < 2048; j++) h[j] = sub[0][j] + sub[1][j] + sub[2][j] + sub[3][j];
    }
    int64_t acc = 0, m = 0;
    uint32_t bucket = 2047;
    for (;; bucket--) {
        int64_t c = 0;
        for (int t = 0; t < team; t++) c += hist[t][bucket];
        if (acc + c >= keep) {
            m = c;
            break;
        }
        acc += c;
    }
    int64_t offsets[MAX_THREADS];
    int64_t off = 0;
    for (int t = 0; t < team; t++) {
        offsets[t] = off;
        off += hist[t][bucket];
    }
    free(hist);
    uint32_t *band = (uint32_t *)malloc((size_t)m * sizeof(uint32_t));
    if (!band) return -1;
    /* the blocks must be the histogram's; a smaller team than asked for takes several */
#pragma omp parallel num_threads(team) if (team > 1)
    for (int t = TEAM_ID; t < team; t += TEAM_SIZE) {
        int64_t b, e;
        block_of(n, t, team, &b, &e);
        uint32_t *dst = band + offsets[t];
        for (int64_t i = b; i < e; i++) {
            uint32_t k = abs_key(s[i]);
            if ((k >> 20) == bucket) *dst++ = k; /* one bucket in 2048: rarely true, well predicted */
        }
    }
    uint32_t tk;
    const int status = select_in_band(s, n, keep, acc, band, m, nt, &tk, cut_out);
    free(band);
    if (status != 0) return -1;
    *thr_out = key_value(tk);
    *bucket_lo = key_value(bucket << 20);
    *bucket_hi = key_value((bucket << 20) | 0xfffffu);
    *bucket_n = m;
    return 0;
}

/* Keep flags as floats: loops split at the cut so each half is a plain vectorisable comparison. */
#define KEEP_LOOP(BODY)                                                                         \
    do {                                                                                        \
        const int ntc = clamp_threads(nt, n);                                                   \
        (void)ntc; /* unused in a serial (no OpenMP) build */                                  \
        _Pragma("omp parallel num_threads(ntc) if (ntc > 1)") {                                 \
            int64_t b, e;                                                                       \
            block_of(n, TEAM_ID, TEAM_SIZE, &b, &e);                                            \
            int64_t mid = cut + 1 < b ? b : (cut + 1 > e ? e : cut + 1);                        \
            for (int64_t i = b; i < mid; i++) {                                                 \
                const float kf = (float)(fabsf(s[i]) >= thr);                                   \
                BODY;                                                                           \
            }                                                                                   \
            for (int64_t i = mid; i < e; i++) {                                                 \
                const float kf = (float)(fabsf(s[i]) > thr);                                    \
                BODY;                                                                           \
            }                                                                                   \
        }                                                                                       \
    } while (0)

/* Signed-constant weights held as packed sign bits: element i is -+stdf by bit i%8 of byte i/8 (1 = negative),
 * exactly init.py's draw. -stdf is +stdf with the sign bit set (IEEE negation), so weights are built with bit
 * operations. */
static inline uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* The sign bit of lane `lane` of a byte, as a mask test (a fixed shift per lane would not vectorise on SSE2). */
static inline uint32_t neg_bit(uint32_t byte, int lane) {
    return (uint32_t) - (int32_t)((byte & (1u << lane)) != 0) & 0x80000000u;
}

static inline float sign_weight(const uint8_t *bits, int64_t i, float stdf) {
    return key_value(float_bits(stdf) ^ neg_bit(bits[i >> 3], (int)(i & 7)));
}

/* BODY for every i in [b, e) with `neg` = the sign bit of weight i. Extracting bit i%8 inside a loop does not
 * vectorise, so the signs of a run of SIGN_RUN elements (from a byte boundary) are expanded into a small array
 * first, and BODY runs in a plain contiguous loop (measured: 0.85 ns per element single-threaded, 2.0 with
 * per-element extraction, 0.75 reading fp32 weights). */
#define SIGN_RUN 32
#define FOR_SIGNS(bits, b, e, BODY)                                                             \
    do {                                                                                        \
        const int64_t b_ = (b), e_ = (e);                                                       \
        for (int64_t run_ = b_ & ~(int64_t)7; run_ < e_; run_ += SIGN_RUN) {                    \
            const int64_t lo_ = run_ > b_ ? run_ : b_;                                          \
            const int64_t hi_ = e_ - run_ < SIGN_RUN ? e_ : run_ + SIGN_RUN;                    \
            uint32_t negs_[SIGN_RUN];                                                           \
            for (int q_ = 0; q_ < (int)((hi_ - run_ + 7) >> 3); q_++) { /* bytes inside bits */ \
                const uint32_t byte_ = (bits)[(run_ >> 3) + q_];                                \
                for (int lane_ = 0; lane_ < 8; lane_++) negs_[8 * q_ + lane_] = neg_bit(byte_, lane_); \
            }                                                                                   \
            for (int64_t i = lo_; i < hi_; i++) {                                               \
                const uint32_t neg = negs_[i - run_];                                           \
                BODY;                                                                           \
            }                                                                                   \
        }                                                                                       \
    } while (0)

/* The masked signed constant: neg | (stdf or 0), which is w * (float)kept bit for bit (a dropped negative weight
 * is -0.0, as w * 0.0f is). */
static inline float signed_masked(uint32_t sb, uint32_t neg, int kept) {
    return key_value(neg | (sb & (uint32_t)-kept));
}

/* out[i] = w[i] * kept(i). */
void popup_masked_weight(const float *s, const float *w, int64_t n, float thr, int64_t cut, float *out, int nt) {
    KEEP_LOOP(out[i] = w[i] * kf);
}

/* The same for signed-constant weights held as packed sign bits (bit i%8 of byte i/8, 1 = negative):
 * w[i] = -+(float)std, exactly init.py's draw, without storing the fp32 weight. */
void popup_masked_weight_signs(const float *s, const uint8_t *bits, double std, int64_t n, float thr,
                               int64_t cut, float *out, int nt) {
    const uint32_t sb = float_bits((float)std);
    const int ntc = clamp_threads(nt, n);
    (void)ntc; /* unused in a serial (no OpenMP) build */
#pragma omp parallel num_threads(ntc) if (ntc > 1)
    {
        int64_t b, e;
        block_of(n, TEAM_ID, TEAM_SIZE, &b, &e);
        const int64_t mid = cut + 1 < b ? b : (cut + 1 > e ? e : cut + 1); /* KEEP_LOOP's split at the cut */
        FOR_SIGNS(bits, b, mid, out[i] = signed_masked(sb, neg, fabsf(s[i]) >= thr));
        FOR_SIGNS(bits, mid, e, out[i] = signed_masked(sb, neg, fabsf(s[i]) > thr));
    }
}


/* Where a selecting kernel writes the masked weight: nowhere (selection only), from an fp32 weight, or from a
 * signed constant held as packed sign bits. The hinted pass is specialised for each (always_inline with a
 * constant kind), so the selection-only kernel pays nothing for the others. */
enum { OUT_NONE = 0, OUT_WEIGHT = 1, OUT_SIGNS = 2 };

typedef struct {
    int kind;
    const float *w;       /* OUT_WEIGHT */
    const uint8_t *bits;  /* OUT_SIGNS */
    float stdf;           /* OUT_SIGNS */
    float *out;           /* OUT_WEIGHT, OUT_SIGNS: the masked weight, n entries */
} masked_out;

static inline float weight_of(const masked_out *o, int64_t i) {
    return o->kind == OUT_WEIGHT ? o->w[i] : sign_weight(o->bits, i, o->stdf);
}

/* The full masked-weight pass once (thr, cut) is known (the histogram route, and a trivial keep). */
static void write_masked(const masked_out *o, const float *s, int64_t n, float thr, int64_t cut, int nt) {
    if (o->kind == OUT_WEIGHT) popup_masked_weight(s, o->w, n, thr, cut, o->out, nt);
    else if (o->kind == OUT_SIGNS) popup_masked_weight_signs(s, o->bits, (double)o->stdf, n, thr, cut, o->out, nt);
}

/* Scores per chunk of the hinted pass: the chunk's loop has no branch (so it vectorises), and only a chunk that
 * holds a band entry (about 1 - (127/128)^CHUNK = 22% of them at the hint's target width) is scanned again. */
#define CHUNK 32

/* A thread's share of the band: keys and flat indices of the entries inside the bracket, in flat order. */
typedef struct {
    uint32_t *keys;
    int64_t *idx;
} band_buf;

/* The hinted pass over the block [b, e): counts the scores above the bracket, records the band (the entries inside
 * it; at most cap, counted beyond), and, when `kind` says so, writes the masked weight as if the threshold were
 * the bracket's top: final for every entry outside the band, patched later inside it. */
static ALWAYS_INLINE void band_pass(const float *s, int64_t b, int64_t e, uint32_t lk, uint32_t hk, int kind,
                                    const masked_out *o, band_buf dst, int64_t cap, int64_t *above_out,
                                    int64_t *count_out) {
    const uint32_t span = hk - lk;
    /* locals, so that stores to out cannot alias the descriptor's fields (they would stop vectorisation) */
    const float *restrict w = o->w;
    const uint8_t *restrict bits = o->bits;
    const uint32_t sb = float_bits(o->stdf);
    float *restrict out = o->out;
    int64_t above = 0, c = 0;
    for (int64_t from = b; from < e; from += CHUNK) {
        const int64_t stop = e - from < CHUNK ? e : from + CHUNK;
        uint32_t above_c = 0, any = 0;
/* |s| > hi as popup_masked_weight compares floats: a NaN score (key above infinity's) is dropped */
#define BAND_STEP(j, OUTPUT)                                                                    \
    do {                                                                                        \
        const uint32_t k = abs_key(s[j]);                                                       \
        const int kept = k > hk && k <= 0x7f800000u; /* int: SSE2 converts only signed to float */ \
        above_c += k > hk;                                                                      \
        any |= k - lk <= span; /* one unsigned range test for lk <= k <= hk */                  \
        OUTPUT;                                                                                 \
    } while (0)
        if (kind == OUT_SIGNS)
            FOR_SIGNS(bits, from, stop, BAND_STEP(i, out[i] = signed_masked(sb, neg, kept)));
        else if (kind == OUT_WEIGHT)
            for (int64_t j = from; j < stop; j++) BAND_STEP(j, out[j] = w[j] * (float)kept);
        else
            for (int64_t j = from; j < stop; j++) BAND_STEP(j, (void)kept);
#undef BAND_STEP
        above += above_c;
        if (!any) continue;
        if (c + CHUNK <= cap) /* room for the whole chunk: append without a branch (a band test mispredicts) */
            for (int64_t j = from; j < stop; j++) {
                const uint32_t k = abs_key(s[j]);
                dst.keys[c] = k;
                dst.idx[c] = j;
                c += k - lk <= span;
            }
        else
            for (int64_t j = from; j < stop; j++) {
                const uint32_t k = abs_key(s[j]);
                if (k - lk <= span) {
                    if (c < cap) {
                        dst.keys[c] = k;
                        dst.idx[c] = j;
                    }
                    c++;
                }
            }
    }
    *above_out = above;
    *count_out = c;
}

/* Band width to aim for: wide enough that a step's drift rarely leaves it, thin enough to select serially. */
static inline double hint_target(int64_t n) { return fmax(2048.0, (double)n / 128.0); }

static inline void set_hint(double *hint, float thr, double half) {
    if (!(half > 0.0)) half = fmax((double)thr * 1e-4, 1e-30);
    hint[0] = (double)thr - half;
    hint[1] = (double)thr + half;
}

enum { HINT_USED = 0, HINT_MISSED = 1, HINT_NONE = 2 };

/* Selection in one pass through the bracket hint[0..1] (see popup_topk_select), writing the masked weight in the
 * same pass (o->kind). Returns HINT_USED with every output written and the hint moved to the new threshold,
 * HINT_MISSED if the threshold drifted out of the bracket, HINT_NONE if there is no usable bracket or its band
 * overflowed the buffers (outputs then undefined: the caller takes the histogram route), or -1 if memory ran
 * out. */
static int select_hinted(const float *s, int64_t n, int64_t keep, double *hint, int nt, const masked_out *o,
                         float *thr_out, int64_t *cut_out) {
    const double lo = hint[0], hi = hint[1];
    if (!(lo == lo && hi == hi && lo <= hi && hi >= 0.0)) return HINT_NONE; /* NaN-free, ordered, reachable */
    nt = clamp_threads(nt, n);
    const uint32_t lk = lo <= 0.0 ? 0u : abs_key((float)lo);
    const uint32_t hk = hi >= (double)INFINITY ? 0x7f800000u : abs_key((float)hi);
    if (hk < lk) return HINT_NONE;
    /* Room for 1/16 of a block (and a floor for small tensors): a band wider than that means a poor hint. */
    const int64_t cap = n / (16 * (int64_t)nt) + 1024;
    const size_t slots = (size_t)nt * (size_t)cap;
    uint32_t *keys = (uint32_t *)malloc(slots * sizeof(uint32_t));
    int64_t *idx = (int64_t *)malloc(slots * sizeof(int64_t));
    uint32_t *scratch = NULL;
    int status = -1;
    if (!keys || !idx) goto done;
    int64_t above_t[MAX_THREADS], count_t[MAX_THREADS];
    int team = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int t = TEAM_ID;
        int64_t b, e;
        if (t == 0) team = TEAM_SIZE;
        block_of(n, t, TEAM_SIZE, &b, &e);
        const band_buf dst = {keys + (size_t)t * (size_t)cap, idx + (size_t)t * (size_t)cap};
        if (o->kind == OUT_WEIGHT) band_pass(s, b, e, lk, hk, OUT_WEIGHT, o, dst, cap, &above_t[t], &count_t[t]);
        else if (o->kind == OUT_SIGNS) band_pass(s, b, e, lk, hk, OUT_SIGNS, o, dst, cap, &above_t[t], &count_t[t]);
        else band_pass(s, b, e, lk, hk, OUT_NONE, o, dst, cap, &above_t[t], &count_t[t]);
    }
    int64_t above = 0, m = 0, overflow = 0;
    for (int t = 0; t < team; t++) {
        above += above_t[t];
        m += count_t[t];
        overflow |= count_t[t] > cap;
    }
    const int64_t need = keep - above;
    if (overflow || need < 1 || need > m) {
        status = overflow ? HINT_NONE : HINT_MISSED;
        goto done;
    }
    /* compact the per-thread buffers (in place: block t moves left only); the band is then in flat order */
    int64_t off = 0;
    for (int t = 0; t < team; t++) {
        memmove(keys + off, keys + (size_t)t * (size_t)cap, (size_t)count_t[t] * sizeof(uint32_t));
        memmove(idx + off, idx + (size_t)t * (size_t)cap, (size_t)count_t[t] * sizeof(int64_t));
        off += count_t[t];
    }
    scratch = (uint32_t *)malloc((size_t)m * sizeof(uint32_t));
    if (!scratch) goto done;
    memcpy(scratch, keys, (size_t)m * sizeof(uint32_t));
    const uint32_t tk = kth_largest_key(scratch, m, need);
    /* every entry equal to the threshold lies in the band, in flat order: the tie cut needs no further pass */
    int64_t gt = above, eq = 0;
    for (int64_t j = 0; j < m; j++) {
        gt += keys[j] > tk;
        eq += keys[j] == tk;
    }
    const int64_t tie_need = keep - gt;
    int64_t cut = n - 1;
    if (tie_need < eq)
        for (int64_t j = 0, seen = 0; j < m; j++)
            if (keys[j] == tk && ++seen == tie_need) {
                cut = idx[j];
                break;
            }
    const float thr = key_value(tk);
    if (o->kind != OUT_NONE) /* band keys are finite, so the key comparison is popup_masked_weight's */
        for (int64_t j = 0; j < m; j++) {
            const int64_t i = idx[j];
            o->out[i] = weight_of(o, i) * (float)(keys[j] > tk || (keys[j] == tk && i <= cut));
        }
    *thr_out = thr;
    *cut_out = cut;
    /* next bracket: keep the band near the target, halving or doubling at most */
    double scale = hint_target(n) / (double)m;
    scale = scale < 0.5 ? 0.5 : (scale > 2.0 ? 2.0 : scale);
    set_hint(hint, thr, 0.5 * (hi - lo) * scale);
    status = HINT_USED;
done:
    free(scratch);
    free(idx);
    free(keys);
    return status;
}

/* Exact threshold and tie cut of the `keep` largest |s| (see the file comment), and the masked weight if o asks.
 *
 * hint[0..1] is a value bracket [lo, hi] expected to hold the threshold (the previous step's, from the caller;
 * NaN or lo > hi = none). One parallel pass counts what lies above hi, gathers the thin band [lo, hi] into
 * per-thread buffers and writes the masked weight outside the band; the band is then selected and patched
 * serially. If the bracket misses (or its band overflows the buffers) the histogram path gives the exact result
 * instead, followed by a masked-weight pass. On return hint holds the bracket to use next time, sized from the
 * band's density so that it holds about hint_target(n) entries.
 *
 * Returns 0 if the hint was used, 1 if the histogram path was (no or missed hint), -1 if memory ran out
 * (outputs untouched: the caller falls back). */
static int select_core(const float *s, int64_t n, int64_t keep, double *hint, int nt, const masked_out *o,
                       float *thr_out, int64_t *cut_out) {
    if (keep >= n || keep <= 0) { /* everything kept (|s| > -inf holds for every non-NaN score), or nothing */
        *thr_out = keep >= n ? -INFINITY : INFINITY;
        *cut_out = keep >= n ? n - 1 : -1;
        write_masked(o, s, n, *thr_out, *cut_out, nt);
        return 0;
    }
    const double lo = hint[0], hi = hint[1];
    const int hinted = select_hinted(s, n, keep, hint, nt, o, thr_out, cut_out);
    if (hinted == HINT_USED || hinted < 0) return hinted;
    double blo, bhi;
    int64_t bn;
    if (select_by_histogram(s, n, keep, nt, thr_out, cut_out, &blo, &bhi, &bn) != 0) return -1;
    /* density of the selected bucket sets the bracket width; a drift miss at least doubles the old one */
    double half = bn > 0 ? 0.5 * hint_target(n) * (bhi - blo) / (double)bn : 0.5 * (bhi - blo);
    if (hinted == HINT_MISSED && half < hi - lo) half = hi - lo;
    set_hint(hint, *thr_out, half);
    write_masked(o, s, n, *thr_out, *cut_out, nt);
    return 1;
}

int popup_topk_select(const float *s, int64_t n, int64_t keep, double *hint, int nt, float *thr_out,
                      int64_t *cut_out) {
    const masked_out o = {OUT_NONE, NULL, NULL, 0.0f, NULL};
    return select_core(s, n, keep, hint, nt, &o, thr_out, cut_out);
}

/* Selection and out = w * kept in one pass over s and w when the hint holds (popup_topk_select's contract). */
int popup_select_masked_weight(const float *s, const float *w, int64_t n, int64_t keep, double *hint, int nt,
                               float *out, float *thr_out, int64_t *cut_out) {
    const masked_out o = {OUT_WEIGHT, w, NULL, 0.0f, out};
    return select_core(s, n, keep, hint, nt, &o, thr_out, cut_out);
}

/* The same for a signed-constant weight held as packed sign bits (popup_masked_weight_signs). */
int popup_select_masked_weight_signs(const float *s, const uint8_t *bits, double std, int64_t n, int64_t keep,
                                     double *hint, int nt, float *out, float *thr_out, int64_t *cut_out) {
    const masked_out o = {OUT_SIGNS, NULL, bits, (float)std, out};
    return select_core(s, n, keep, hint, nt, &o, thr_out, cut_out);
}

/* N:M: every group of m consecutive entries along dim 1 of a (outer, c, inner) tensor (stride `inner`) keeps its
 * n largest |s|, ties to the lower index: the order of native.nm_mask's keys (abs_key, then the index), NaN above
 * every number as there. out = w * kept, so a dropped negative weight is -0.0 as w * 0.0f is. One pass, m <= 32.
 * One row is the `inner` groups of one (output, group) pair; inlined with a constant m for 2:4-like structures so
 * that the rank loops unroll. */
static ALWAYS_INLINE void nm_row(const float *s, const float *w, float *out, int64_t inner, int n, int m) {
    for (int64_t r = 0; r < inner; r++) {
        uint32_t key[32];
        for (int j = 0; j < m; j++) key[j] = abs_key(s[j * inner + r]);
        for (int j = 0; j < m; j++) {
            const uint32_t kj = key[j];
            int ahead = 0;  /* entries of the group ranked before j */
            for (int q = 0; q < m; q++) ahead += (key[q] > kj) | ((key[q] == kj) & (q < j));
            out[j * inner + r] = w[j * inner + r] * (float)(ahead < n);
        }
    }
}

void popup_nm_masked_weight(const float *s, const float *w, int64_t outer, int64_t c, int64_t inner, int n, int m,
                            float *out, int nt) {
    const int64_t rows = outer * (c / m), len = m * inner;
    nt = clamp_threads(nt, rows * len);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t row = 0; row < rows; row++) {
        const int64_t b = row * len;
        if (m == 4)
            nm_row(s + b, w + b, out + b, inner, n, 4);
        else
            nm_row(s + b, w + b, out + b, inner, n, m);
    }
}

/* The boolean mask itself (torch.bool is one byte, 0 or 1). */
void popup_build_mask(const float *s, int64_t n, float thr, int64_t cut, uint8_t *out, int nt) {
    KEEP_LOOP(out[i] = (uint8_t)kf);
}

static inline float sign_of(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }

/* d(loss)/d(scores) = (g * w) * sign(s). */
void popup_ste_backward(const float *g, const float *w, const float *s, int64_t n, float *out, int nt) {
    nt = clamp_threads(nt, n);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = (g[i] * w[i]) * sign_of(s[i]);
}

void popup_ste_backward_signs(const float *g, const uint8_t *bits, double std, const float *s, int64_t n,
                              float *out, int nt) {
    const uint32_t sb = float_bits((float)std);
    nt = clamp_threads(nt, n);
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t b, e;
        block_of(n, TEAM_ID, TEAM_SIZE, &b, &e);
        FOR_SIGNS(bits, b, e, out[i] = (g[i] * key_value(sb ^ neg)) * sign_of(s[i]));
    }
}

/* ---- the generator of timm_popup/init.py ---------------------------------------------------------------- */

static const double ACK_A[6] = {-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
                                1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00};
static const double ACK_B[5] = {-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
                                6.680131188771972e01, -1.328068155288572e01};
static const double ACK_C[6] = {-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
                                -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00};
static const double ACK_D[4] = {7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00,
                                3.754408661907416e00};
#define P_LOW 0.02425
#define LN2 0.6931471805599453
#define SQRT_HALF 0.7071067811865476

/* SplitMix64 output number idx + 1 of the generator seeded with key (init._bits). */
static inline uint64_t mix64(uint64_t key, uint64_t idx) {
    uint64_t z = (idx + 1u) * 0x9E3779B97F4A7C15ull + key;
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z;
}

/* init._horner: out = c0; out = out * x + c, as two separately rounded operations (no FMA). */
static inline double horner(double x, const double *c, int len) {
    double out = c[0];
    for (int j = 1; j < len; j++) {
        out *= x;
        out += c[j];
    }
    return out;
}

/* init._log: frexp, then 2 atanh(s) by an 11-term odd series, plus e * ln 2. */
static double series_log(double x) {
    int e;
    double m = frexp(x, &e);
    if (m < SQRT_HALF) {
        m = m * 2.0;
        e = e - 1;
    }
    const double ef = (double)e;
    const double s = (m - 1.0) / (m + 1.0);
    const double s2 = s * s;
    double acc = 1.0 / 21.0;
    for (int j = 9; j >= 0; j--) {
        acc *= s2;
        acc += 1.0 / (double)(2 * j + 1);
    }
    return 2.0 * s * acc + ef * LN2;
}

/* init._half_normal's tail: -Phi^-1(p) for p < P_LOW. */
static double tail_normal(double p) {
    const double qt = sqrt(-2.0 * series_log(p));
    return -horner(qt, ACK_C, 6) / (horner(qt, ACK_D, 4) * qt + 1.0);
}

/* init._half_normal's central formula, valid for P_LOW <= p < 1/2; evaluated for every p (as numpy does) so
 * the loop below has no branch and vectorises, then the ~5% tail draws are overwritten. */
static inline double central_normal(double p) {
    const double q = p - 0.5;
    const double r = q * q;
    double out = horner(r, ACK_A, 6);
    out *= q;
    out /= horner(r, ACK_B, 5) * r + 1.0;
    return -out;
}

/* Negate v where bit 63 of z is set: IEEE negation is exactly a sign-bit flip, done without a branch on a
 * random bit. */
static inline double apply_sign(double v, uint64_t z) {
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    u ^= z & 0x8000000000000000ull;
    memcpy(&v, &u, sizeof v);
    return v;
}

#define GEN_BLOCK 512

/* Draws start .. start+n-1 of the normal family, one block of GEN_BLOCK at a time (stack temporaries). */
static void generate_normal(uint64_t key, int64_t start, int64_t n, double std, float *out) {
    uint64_t z[GEN_BLOCK];
    double p[GEN_BLOCK], v[GEN_BLOCK];
    for (int64_t b = 0; b < n; b += GEN_BLOCK) {
        const int len = (int)(n - b < GEN_BLOCK ? n - b : GEN_BLOCK);
        for (int j = 0; j < len; j++) {
            z[j] = mix64(key, (uint64_t)(start + b + j));
            p[j] = ((double)((z[j] >> 11) & ((1ull << 52) - 1u)) + 0.5) * 0x1p-53;
        }
        for (int j = 0; j < len; j++) v[j] = central_normal(p[j]);
        for (int j = 0; j < len; j++)
            if (p[j] < P_LOW) v[j] = tail_normal(p[j]);
        for (int j = 0; j < len; j++) out[b + j] = (float)apply_sign(v[j] * std, z[j]); /* one rounding */
    }
}

/* Values start .. start+n-1 of a tensor drawn by init._draw(family, std, key) into out[0..n).
 * family: 0 normal, 1 signed, 2 uniform. Returns -1 for an unknown family. */
int popup_generate(uint64_t key, int64_t start, int64_t n, int family, double std, float *out, int nt) {
    if (family < 0 || family > 2) return -1;
    nt = clamp_threads(nt, n);
    if (family == 0) {
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
            int64_t b, e;
            block_of(n, TEAM_ID, TEAM_SIZE, &b, &e);
            generate_normal(key, start + b, e - b, std, out + b);
        }
    } else if (family == 1) {
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
        for (int64_t i = 0; i < n; i++) out[i] = (float)apply_sign(std, mix64(key, (uint64_t)(start + i)));
    } else {
        const double ubound = sqrt(3.0) * std; /* numpy: (2u - 1) * (math.sqrt(3.0) * std) */
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const double u = ((double)(mix64(key, (uint64_t)(start + i)) >> 11) + 0.5) * 0x1p-53;
            out[i] = (float)((2.0 * u - 1.0) * ubound);
        }
    }
    return 0;
}

/* Packed sign bits (bit 63 of each draw; bit i%8 of byte i/8, 1 = negative) of elements 0..n-1. */
void popup_generate_sign_bits(uint64_t key, int64_t n, uint8_t *out, int nt) {
    const int64_t nbytes = (n + 7) / 8;
    nt = clamp_threads(nt, n);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t j = 0; j < nbytes; j++) {
        uint8_t byte = 0;
        for (int b = 0; b < 8; b++) {
            const int64_t i = 8 * j + b;
            if (i < n) byte |= (uint8_t)((mix64(key, (uint64_t)i) >> 63) << b);
        }
        out[j] = byte;
    }
}
