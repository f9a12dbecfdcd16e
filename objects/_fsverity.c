/*
 * objects._fsverity: SHA-256 of every 4096-byte block of a buffer, in one call.
 *
 * Why: an fs-verity digest hashes a file block by block.  From Python each block costs a hashlib
 * object (about a fifth of the hashing itself) and a release and re-take of the GIL, which is what
 * limits importing big layers on a two-core machine.  Here the whole buffer is hashed with the GIL
 * released, the fastest way the CPU allows:
 *   - with AVX-512, sixteen blocks at once, one per 32-bit lane: fs-verity's blocks are independent
 *     messages of one size, the case multi-buffer hashing is made for (about 1.6 times SHA-NI two at
 *     a time on a Sapphire Rapids core; used only where it measures faster at import); the last
 *     blocks of a buffer (fewer than 16) go the next way;
 *   - with the CPU's SHA extensions (x86 SHA-NI), two blocks at a time: a block's 65 SHA-256
 *     compressions (64 of data, one of padding) form one dependency chain, so two independent
 *     chains interleaved keep the SHA unit busier (about a quarter faster than one at a time);
 *   - otherwise with libcrypto's SHA256_Init/Update/Final (found with dlopen, the one hashlib uses,
 *     so building needs no OpenSSL headers).
 * digest(data) computes a whole fs-verity digest (tree levels and descriptor) in one call: for a
 * small file hashed on its own, Python's calls around one block's hash cost more than the hash.
 * stream_update / stream_blocks (SHA-NI only, STREAM = 1): a SHA-256 stream whose state the caller
 * keeps (objects.digest.StreamSha256, an uncompressed layer's diff_id), and stream_blocks runs it
 * over whole 4096-byte blocks while hashing each block on its own beside it, the two chains
 * interleaved: one stream leaves the SHA unit half idle, so the block hashes cost almost nothing.
 * The module checks what it uses against known digests on import.  Without it (no C compiler at
 * install time, neither path usable), objects.digest hashes block by block with hashlib.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BLOCK_SIZE 4096
#define HASH_SIZE 32
#define GIL_MIN_BLOCKS 8     /* below this, releasing the GIL costs more than it frees */

typedef void (*hash_run_fn)(const unsigned char *data, Py_ssize_t blocks, unsigned char *out);
static hash_run_fn hash_run;

/* --- libcrypto -------------------------------------------------------------------------------- */

#define CTX_SIZE 512         /* SHA256_CTX is 112 bytes in OpenSSL 1.1 and 3.x: room to spare */

typedef int (*sha_init_fn)(void *ctx);
typedef int (*sha_update_fn)(void *ctx, const void *data, size_t len);
typedef int (*sha_final_fn)(unsigned char *md, void *ctx);

static sha_init_fn sha_init;
static sha_update_fn sha_update;
static sha_final_fn sha_final;

typedef union {
    unsigned char bytes[CTX_SIZE];
    long double align_ld;
    void *align_p;
    unsigned long long align_ll;
} sha_ctx;

static void hash_run_libcrypto(const unsigned char *data, Py_ssize_t blocks, unsigned char *out)
{
    sha_ctx ctx;
    for (Py_ssize_t i = 0; i < blocks; i++) {
        sha_init(&ctx);
        sha_update(&ctx, data + (size_t)i * BLOCK_SIZE, BLOCK_SIZE);
        sha_final(out + (size_t)i * HASH_SIZE, &ctx);
    }
}

static int load_libcrypto(void)
{
    static const char *names[] = {"libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so", NULL};
    for (const char **name = names; *name != NULL; name++) {
        void *lib = dlopen(*name, RTLD_NOW | RTLD_LOCAL);
        if (lib == NULL)
            continue;
        sha_init = (sha_init_fn)dlsym(lib, "SHA256_Init");
        sha_update = (sha_update_fn)dlsym(lib, "SHA256_Update");
        sha_final = (sha_final_fn)dlsym(lib, "SHA256_Final");
        if (sha_init != NULL && sha_update != NULL && sha_final != NULL)
            return 0;
        dlclose(lib);
    }
    return -1;
}

/* --- SHA-NI ------------------------------------------------------------------------------------ */

/* SHA-256 round constants and initial state (FIPS 180-4) */
static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};
static const uint32_t H256[8] = {
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_X86_SIMD 1
#define SHANI __attribute__((target("sha,sse4.1,ssse3")))

/* The last compression of a 4096-byte message: 0x80, zeros, the length in bits (32768) big-endian. */
static const unsigned char PAD4096[64] = {0x80, [62] = 0x80};

/*
 * One compression of the 64-byte block at p into the state (S0 = ABEF, S1 = CDGH), for lanes A and,
 * if TWO, B.  Round group g (rounds 4g..4g+3) uses message words W[g % 4]; the schedule computes the
 * words of group g+1 (msg2, groups 3..14) and starts those of group g+3 (msg1, groups 1..12).
 */
#define COMPRESS(TWO, A0, A1, WA, pa, B0, B1, WB, pb)                                              \
    do {                                                                                           \
        __m128i sa0 = A0, sa1 = A1, sb0 = B0, sb1 = B1, ma, mb = _mm_setzero_si128();              \
        _Pragma("GCC unroll 16")                                                                   \
        for (int g = 0; g < 16; g++) {                                                             \
            __m128i k = _mm_loadu_si128((const __m128i *)&K256[4 * g]);                            \
            if (g < 4) {                                                                           \
                WA[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)((pa) + 16 * g)), BSWAP32); \
                if (TWO)                                                                           \
                    WB[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)((pb) + 16 * g)), BSWAP32); \
            }                                                                                      \
            ma = _mm_add_epi32(WA[g & 3], k);                                                      \
            A1 = _mm_sha256rnds2_epu32(A1, A0, ma);                                                \
            if (TWO) {                                                                             \
                mb = _mm_add_epi32(WB[g & 3], k);                                                  \
                B1 = _mm_sha256rnds2_epu32(B1, B0, mb);                                            \
            }                                                                                      \
            if (g >= 3 && g <= 14) {                                                               \
                WA[(g + 1) & 3] = _mm_sha256msg2_epu32(                                            \
                    _mm_add_epi32(WA[(g + 1) & 3], _mm_alignr_epi8(WA[g & 3], WA[(g + 3) & 3], 4)), WA[g & 3]); \
                if (TWO)                                                                           \
                    WB[(g + 1) & 3] = _mm_sha256msg2_epu32(                                        \
                        _mm_add_epi32(WB[(g + 1) & 3], _mm_alignr_epi8(WB[g & 3], WB[(g + 3) & 3], 4)), WB[g & 3]); \
            }                                                                                      \
            A0 = _mm_sha256rnds2_epu32(A0, A1, _mm_shuffle_epi32(ma, 0x0E));                       \
            if (TWO)                                                                               \
                B0 = _mm_sha256rnds2_epu32(B0, B1, _mm_shuffle_epi32(mb, 0x0E));                   \
            if (g >= 1 && g <= 12) {                                                               \
                WA[(g + 3) & 3] = _mm_sha256msg1_epu32(WA[(g + 3) & 3], WA[g & 3]);                \
                if (TWO)                                                                           \
                    WB[(g + 3) & 3] = _mm_sha256msg1_epu32(WB[(g + 3) & 3], WB[g & 3]);            \
            }                                                                                      \
        }                                                                                          \
        A0 = _mm_add_epi32(A0, sa0);                                                               \
        A1 = _mm_add_epi32(A1, sa1);                                                               \
        if (TWO) {                                                                                 \
            B0 = _mm_add_epi32(B0, sb0);                                                           \
            B1 = _mm_add_epi32(B1, sb1);                                                           \
        }                                                                                          \
    } while (0)

SHANI static void shani_init(__m128i *s0, __m128i *s1)
{
    __m128i abcd = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&H256[0]), 0xB1);  /* CDAB */
    __m128i efgh = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&H256[4]), 0x1B);  /* EFGH */
    *s0 = _mm_alignr_epi8(abcd, efgh, 8);      /* ABEF */
    *s1 = _mm_blend_epi16(efgh, abcd, 0xF0);   /* CDGH */
}

SHANI static void shani_store(__m128i s0, __m128i s1, unsigned char *out)
{
    const __m128i bswap = _mm_set_epi8(12, 13, 14, 15, 8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3);
    __m128i feba = _mm_shuffle_epi32(s0, 0x1B);
    __m128i dchg = _mm_shuffle_epi32(s1, 0xB1);
    _mm_storeu_si128((__m128i *)out, _mm_shuffle_epi8(_mm_blend_epi16(feba, dchg, 0xF0), bswap));
    _mm_storeu_si128((__m128i *)(out + 16), _mm_shuffle_epi8(_mm_alignr_epi8(dchg, feba, 8), bswap));
}

SHANI static void shani_one(const unsigned char *p, unsigned char *out)
{
    const __m128i BSWAP32 = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i A0, A1, WA[4], B0 = _mm_setzero_si128(), B1 = B0, WB[4];
    shani_init(&A0, &A1);
    for (int i = 0; i < BLOCK_SIZE; i += 64)
        COMPRESS(0, A0, A1, WA, p + i, B0, B1, WB, p + i);
    COMPRESS(0, A0, A1, WA, PAD4096, B0, B1, WB, PAD4096);
    shani_store(A0, A1, out);
}

SHANI static void shani_two(const unsigned char *p, const unsigned char *q, unsigned char *out_p,
                            unsigned char *out_q)
{
    const __m128i BSWAP32 = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i A0, A1, B0, B1, WA[4], WB[4];
    shani_init(&A0, &A1);
    B0 = A0;
    B1 = A1;
    for (int i = 0; i < BLOCK_SIZE; i += 64)
        COMPRESS(1, A0, A1, WA, p + i, B0, B1, WB, q + i);
    COMPRESS(1, A0, A1, WA, PAD4096, B0, B1, WB, PAD4096);
    shani_store(A0, A1, out_p);
    shani_store(B0, B1, out_q);
}

/* SHA-256 of `chunks` 64-byte chunks at p, already padded (the fs-verity descriptor's five). */
SHANI static void shani_padded(const unsigned char *p, int chunks, unsigned char *out)
{
    const __m128i BSWAP32 = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i A0, A1, WA[4], B0 = _mm_setzero_si128(), B1 = B0, WB[4];
    shani_init(&A0, &A1);
    for (int i = 0; i < 64 * chunks; i += 64)
        COMPRESS(0, A0, A1, WA, p + i, B0, B1, WB, p + i);
    shani_store(A0, A1, out);
}

static void hash_run_shani(const unsigned char *data, Py_ssize_t blocks, unsigned char *out)
{
    Py_ssize_t i = 0;
    for (; i + 1 < blocks; i += 2)
        shani_two(data + (size_t)i * BLOCK_SIZE, data + (size_t)(i + 1) * BLOCK_SIZE,
                  out + (size_t)i * HASH_SIZE, out + (size_t)(i + 1) * HASH_SIZE);
    if (i < blocks)
        shani_one(data + (size_t)i * BLOCK_SIZE, out + (size_t)i * HASH_SIZE);
}

/*
 * A SHA-256 stream (e.g. an uncompressed layer's diff_id) whose chaining value lives in 32 bytes, in
 * the digest's byte order (H0..H7 big-endian): what a finished digest would be without padding.
 */
SHANI static void shani_load(const unsigned char *st, __m128i *s0, __m128i *s1)
{
    uint32_t h[8];
    for (int i = 0; i < 8; i++)
        h[i] = (uint32_t)st[4 * i] << 24 | (uint32_t)st[4 * i + 1] << 16 | (uint32_t)st[4 * i + 2] << 8 | st[4 * i + 3];
    __m128i abcd = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[0]), 0xB1);  /* CDAB */
    __m128i efgh = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)&h[4]), 0x1B);  /* EFGH */
    *s0 = _mm_alignr_epi8(abcd, efgh, 8);      /* ABEF */
    *s1 = _mm_blend_epi16(efgh, abcd, 0xF0);   /* CDGH */
}

/* The stream state `st` over `len` bytes at p (a multiple of 64), one compression after another. */
SHANI static void shani_stream(unsigned char *st, const unsigned char *p, size_t len)
{
    const __m128i BSWAP32 = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i A0, A1, WA[4], B0 = _mm_setzero_si128(), B1 = B0, WB[4];
    shani_load(st, &A0, &A1);
    for (size_t i = 0; i < len; i += 64)
        COMPRESS(0, A0, A1, WA, p + i, B0, B1, WB, p + i);
    shani_store(A0, A1, st);
}

/*
 * The stream state `st` over `blocks` 4096-byte blocks at p AND each block's own SHA-256 (fs-verity's
 * bottom level) into out, in one pass: lane A carries the stream, lane B hashes the same 64 bytes
 * from the initial value.  A single SHA-256 stream keeps the SHA unit half busy (each round waits for
 * the one before), so the block hashes come almost for free beside it, while the data is in L1.
 */
SHANI static void shani_stream_blocks(unsigned char *st, const unsigned char *p, size_t blocks, unsigned char *out)
{
    const __m128i BSWAP32 = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i A0, A1, B0, B1, I0, I1, WA[4], WB[4], Z0 = _mm_setzero_si128(), Z1 = Z0;
    shani_load(st, &A0, &A1);
    shani_init(&I0, &I1);
    for (size_t b = 0; b < blocks; b++) {
        const unsigned char *q = p + b * BLOCK_SIZE;
        B0 = I0;
        B1 = I1;
        for (int i = 0; i < BLOCK_SIZE; i += 64)
            COMPRESS(1, A0, A1, WA, q + i, B0, B1, WB, q + i);
        COMPRESS(0, B0, B1, WB, PAD4096, Z0, Z1, WA, PAD4096);
        shani_store(B0, B1, out + b * HASH_SIZE);
    }
    shani_store(A0, A1, st);
}

static int cpu_has_shani(void)
{
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_SSE4_1) || !(c & bit_SSSE3))
        return 0;
    if (__get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & bit_SHA) != 0;
}

/* --- AVX-512: sixteen blocks at once ----------------------------------------------------------- */

#define AVX512 __attribute__((target("avx512f,avx512bw")))
#define V_ROR(x, n) _mm512_ror_epi32(x, n)
#define V_ADD(x, y) _mm512_add_epi32(x, y)
#define V_XOR3(x, y, z) _mm512_ternarylogic_epi32(x, y, z, 0x96)
#define V_CH(x, y, z) _mm512_ternarylogic_epi32(x, y, z, 0xCA)   /* x ? y : z */
#define V_MAJ(x, y, z) _mm512_ternarylogic_epi32(x, y, z, 0xE8)  /* at least two of three */
#define V_SIG0(x) V_XOR3(V_ROR(x, 7), V_ROR(x, 18), _mm512_srli_epi32(x, 3))
#define V_SIG1(x) V_XOR3(V_ROR(x, 17), V_ROR(x, 19), _mm512_srli_epi32(x, 10))
/* One round; `kw` is the round's constant plus message word.  The caller rotates the names. */
#define V_ROUND(a, b, c, d, e, f, g, h, kw)                                                          \
    do {                                                                                           \
        __m512i t1 = V_ADD(V_ADD(h, kw), V_ADD(V_XOR3(V_ROR(e, 6), V_ROR(e, 11), V_ROR(e, 25)), V_CH(e, f, g))); \
        __m512i t2 = V_ADD(V_XOR3(V_ROR(a, 2), V_ROR(a, 13), V_ROR(a, 22)), V_MAJ(a, b, c));       \
        d = V_ADD(d, t1);                                                                          \
        h = V_ADD(t1, t2);                                                                         \
    } while (0)
#define V_ROUNDS8(i, KW)                                                                           \
    do {                                                                                           \
        V_ROUND(a, b, c, d, e, f, g, h, KW((i) + 0)); V_ROUND(h, a, b, c, d, e, f, g, KW((i) + 1)); \
        V_ROUND(g, h, a, b, c, d, e, f, KW((i) + 2)); V_ROUND(f, g, h, a, b, c, d, e, KW((i) + 3)); \
        V_ROUND(e, f, g, h, a, b, c, d, KW((i) + 4)); V_ROUND(d, e, f, g, h, a, b, c, KW((i) + 5)); \
        V_ROUND(c, d, e, f, g, h, a, b, KW((i) + 6)); V_ROUND(b, c, d, e, f, g, h, a, KW((i) + 7)); \
    } while (0)
/* Message words: the 16 loaded ones, then the schedule computed in place (a ring of 16). */
#define V_KW_LOADED(i) V_ADD(W[i], _mm512_set1_epi32((int)K256[i]))
#define V_KW_SCHEDULED(i)                                                                          \
    (W[(i) & 15] = V_ADD(V_ADD(V_SIG1(W[((i) - 2) & 15]), W[((i) - 7) & 15]),                      \
                         V_ADD(V_SIG0(W[((i) - 15) & 15]), W[(i) & 15])),                          \
     V_ADD(W[(i) & 15], _mm512_set1_epi32((int)K256[i])))
#define V_KW_PADDING(i) _mm512_set1_epi32((int)PAD_KW[i])

/* K + W of the padding compression: the same message for every 4096-byte block. */
static uint32_t PAD_KW[64];

static uint32_t ror32(uint32_t x, int n) { return x >> n | x << (32 - n); }

static void pad_kw_init(void)
{
    uint32_t w[64];
    for (int t = 0; t < 16; t++)
        w[t] = (uint32_t)PAD4096[4 * t] << 24 | (uint32_t)PAD4096[4 * t + 1] << 16
             | (uint32_t)PAD4096[4 * t + 2] << 8 | PAD4096[4 * t + 3];
    for (int t = 16; t < 64; t++)
        w[t] = (ror32(w[t - 2], 17) ^ ror32(w[t - 2], 19) ^ (w[t - 2] >> 10)) + w[t - 7]
             + (ror32(w[t - 15], 7) ^ ror32(w[t - 15], 18) ^ (w[t - 15] >> 3)) + w[t - 16];
    for (int t = 0; t < 64; t++)
        PAD_KW[t] = w[t] + K256[t];
}

/*
 * Words t of the 64-byte pieces at lane[0..15] + off, as W[t] with lane i in element i: sixteen
 * loads and a 16 x 16 transpose of 32-bit words (faster than sixteen gathers), then big-endian.
 */
AVX512 static void avx512_load_words(const unsigned char *const lane[16], size_t off, __m512i W[16])
{
    const __m512i bswap = _mm512_set4_epi32(0x0c0d0e0f, 0x08090a0b, 0x04050607, 0x00010203);
    __m512i r[16], t[16], u[16];
    for (int i = 0; i < 16; i++)
        r[i] = _mm512_loadu_si512((const void *)(lane[i] + off));
    for (int k = 0; k < 8; k++) {   /* pairs of rows, words interleaved */
        t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; k++) {   /* u[4k + m], 128-bit part j: word 4j + m of rows 4k..4k+3 */
        u[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
        u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
        u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
        u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
    }
    for (int m = 0; m < 4; m++) {   /* a 4 x 4 transpose of the 128-bit parts */
        __m512i x0 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x44);
        __m512i x1 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xEE);
        __m512i x2 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x44);
        __m512i x3 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xEE);
        W[m] = _mm512_shuffle_epi8(_mm512_shuffle_i32x4(x0, x2, 0x88), bswap);
        W[4 + m] = _mm512_shuffle_epi8(_mm512_shuffle_i32x4(x0, x2, 0xDD), bswap);
        W[8 + m] = _mm512_shuffle_epi8(_mm512_shuffle_i32x4(x1, x3, 0x88), bswap);
        W[12 + m] = _mm512_shuffle_epi8(_mm512_shuffle_i32x4(x1, x3, 0xDD), bswap);
    }
}

/* The SHA-256 of the 4096-byte blocks at lane[0..15], to out[0..15]. */
AVX512 static void avx512_sixteen(const unsigned char *const lane[16], unsigned char *const out[16])
{
    __m512i a = _mm512_set1_epi32((int)H256[0]), b = _mm512_set1_epi32((int)H256[1]);
    __m512i c = _mm512_set1_epi32((int)H256[2]), d = _mm512_set1_epi32((int)H256[3]);
    __m512i e = _mm512_set1_epi32((int)H256[4]), f = _mm512_set1_epi32((int)H256[5]);
    __m512i g = _mm512_set1_epi32((int)H256[6]), h = _mm512_set1_epi32((int)H256[7]);
    __m512i W[16];
    for (int piece = 0; piece <= BLOCK_SIZE / 64; piece++) {
        __m512i sa = a, sb = b, sc = c, sd = d, se = e, sf = f, sg = g, sh = h;
        if (piece < BLOCK_SIZE / 64) {
            avx512_load_words(lane, (size_t)piece * 64, W);
            V_ROUNDS8(0, V_KW_LOADED); V_ROUNDS8(8, V_KW_LOADED);
            V_ROUNDS8(16, V_KW_SCHEDULED); V_ROUNDS8(24, V_KW_SCHEDULED); V_ROUNDS8(32, V_KW_SCHEDULED);
            V_ROUNDS8(40, V_KW_SCHEDULED); V_ROUNDS8(48, V_KW_SCHEDULED); V_ROUNDS8(56, V_KW_SCHEDULED);
        } else {
            V_ROUNDS8(0, V_KW_PADDING); V_ROUNDS8(8, V_KW_PADDING); V_ROUNDS8(16, V_KW_PADDING);
            V_ROUNDS8(24, V_KW_PADDING); V_ROUNDS8(32, V_KW_PADDING); V_ROUNDS8(40, V_KW_PADDING);
            V_ROUNDS8(48, V_KW_PADDING); V_ROUNDS8(56, V_KW_PADDING);
        }
        a = V_ADD(a, sa); b = V_ADD(b, sb); c = V_ADD(c, sc); d = V_ADD(d, sd);
        e = V_ADD(e, se); f = V_ADD(f, sf); g = V_ADD(g, sg); h = V_ADD(h, sh);
    }
    const __m512i bswap = _mm512_set4_epi32(0x0c0d0e0f, 0x08090a0b, 0x04050607, 0x00010203);
    uint32_t words[8][16];
    __m512i state[8] = {a, b, c, d, e, f, g, h};
    for (int j = 0; j < 8; j++)
        _mm512_storeu_si512((void *)words[j], _mm512_shuffle_epi8(state[j], bswap));
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 8; j++)
            memcpy(out[i] + 4 * j, &words[j][i], 4);
}

static hash_run_fn hash_rest;  /* for the blocks after the last sixteen; NULL: sixteen, padded */

static void hash_run_avx512(const unsigned char *data, Py_ssize_t blocks, unsigned char *out)
{
    const unsigned char *lane[16];
    unsigned char *dest[16], spare[HASH_SIZE];
    Py_ssize_t i = 0;
    for (; i + 16 <= blocks; i += 16) {
        for (int k = 0; k < 16; k++) {
            lane[k] = data + (size_t)(i + k) * BLOCK_SIZE;
            dest[k] = out + (size_t)(i + k) * HASH_SIZE;
        }
        avx512_sixteen(lane, dest);
    }
    if (i == blocks)
        return;
    if (hash_rest != NULL) {
        hash_rest(data + (size_t)i * BLOCK_SIZE, blocks - i, out + (size_t)i * HASH_SIZE);
        return;
    }
    for (int k = 0; k < 16; k++) {  /* unused lanes hash the last block again, into `spare` */
        Py_ssize_t blk = i + k < blocks ? i + k : blocks - 1;
        lane[k] = data + (size_t)blk * BLOCK_SIZE;
        dest[k] = i + k < blocks ? out + (size_t)blk * HASH_SIZE : spare;
    }
    avx512_sixteen(lane, dest);
}

static int cpu_has_avx512(void)
{
    unsigned int a, b, c, d, xcr0_lo, xcr0_hi;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_OSXSAVE) || __get_cpuid_max(0, NULL) < 7)
        return 0;
    __cpuid_count(7, 0, a, b, c, d);
    if (!(b & bit_AVX512F) || !(b & bit_AVX512BW))
        return 0;
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    return (xcr0_lo & 0xE6) == 0xE6;  /* the OS saves SSE, AVX, opmask and all of ZMM state */
}
#endif

/* --- module ------------------------------------------------------------------------------------ */

/* --- whole fs-verity digests of small in-memory buffers --------------------------------------- */

#ifdef HAVE_X86_SIMD
static int desc_shani;  /* whether the descriptor is hashed with SHA-NI (else portable C) */
#endif

#define ROTR(x, n) ((x) >> (n) | (x) << (32 - (n)))

/* One SHA-256 compression of the 64-byte block p into st (portable; used only for the descriptor). */
static void compress_scalar(uint32_t st[8], const unsigned char *p)
{
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = st[0], b = st[1], c = st[2], d = st[3], e = st[4], f = st[5], g = st[6], h = st[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        uint32_t t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    st[0] += a; st[1] += b; st[2] += c; st[3] += d; st[4] += e; st[5] += f; st[6] += g; st[7] += h;
}

/* SHA-256 of fs-verity's 256-byte descriptor (version 1, SHA-256, 4096-byte blocks, no salt) for a
 * file of `size` bytes with Merkle root `root`: four data blocks and one of padding. */
static void descriptor_sha256(uint64_t size, const unsigned char root[HASH_SIZE], unsigned char out[HASH_SIZE])
{
    unsigned char desc[256 + 64];
    memset(desc, 0, sizeof desc);
    desc[0] = 1;   /* version */
    desc[1] = 1;   /* FS_VERITY_HASH_ALG_SHA256 */
    desc[2] = 12;  /* log2 of the block size */
    for (int i = 0; i < 8; i++)
        desc[8 + i] = (unsigned char)(size >> (8 * i));  /* data_size, little-endian */
    memcpy(desc + 16, root, HASH_SIZE);
    desc[256] = 0x80;
    desc[256 + 62] = 0x08;  /* message length 2048 bits, big-endian */
#ifdef HAVE_X86_SIMD
    if (desc_shani) {
        shani_padded(desc, (int)(sizeof desc / 64), out);
        return;
    }
#endif
    uint32_t st[8];
    memcpy(st, H256, sizeof st);
    for (int off = 0; off < (int)sizeof desc; off += 64)
        compress_scalar(st, desc + off);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char)(st[i] >> 24);
        out[4 * i + 1] = (unsigned char)(st[i] >> 16);
        out[4 * i + 2] = (unsigned char)(st[i] >> 8);
        out[4 * i + 3] = (unsigned char)st[i];
    }
}

/* The fs-verity digest of len bytes at data into out; -1 if memory ran out.  Touches no Python
 * object (the caller may release the GIL).  Each tree level hashes the level below in 4096-byte
 * blocks, the last one zero-padded, until one hash is left: the root (all zero for no data). */
static int verity_digest(const unsigned char *data, Py_ssize_t len, unsigned char out[HASH_SIZE])
{
    unsigned char root[HASH_SIZE] = {0};
    if (len > 0) {
        Py_ssize_t blocks = (len - 1) / BLOCK_SIZE + 1, full = len / BLOCK_SIZE;
        unsigned char last[BLOCK_SIZE];
        /* this level's hashes, zero-padded to whole blocks for the next level's hashing; a file of
         * up to 128 blocks (the common small one) needs one block of hashes: on the stack */
        unsigned char small[BLOCK_SIZE];
        size_t room = ((size_t)blocks * HASH_SIZE + BLOCK_SIZE - 1) / BLOCK_SIZE * BLOCK_SIZE;
        unsigned char *level = small;
        if (room > sizeof small) {
            level = calloc(1, room);
            if (level == NULL)
                return -1;
        } else {
            memset(small, 0, sizeof small);
        }
        if (full > 0)
            hash_run(data, full, level);
        if (full < blocks) {
            size_t tail = (size_t)(len - full * BLOCK_SIZE);
            memcpy(last, data + (size_t)full * BLOCK_SIZE, tail);
            memset(last + tail, 0, BLOCK_SIZE - tail);
            hash_run(last, 1, level + (size_t)full * HASH_SIZE);
        }
        while (blocks > 1) {
            /* the hashes of `blocks` blocks, padded with zeros to whole blocks: the next level up */
            Py_ssize_t up = ((size_t)blocks * HASH_SIZE + BLOCK_SIZE - 1) / BLOCK_SIZE;
            size_t up_room = ((size_t)up * HASH_SIZE + BLOCK_SIZE - 1) / BLOCK_SIZE * BLOCK_SIZE;
            unsigned char *next = calloc(1, up_room);
            if (next == NULL) {
                if (level != small)
                    free(level);
                return -1;
            }
            hash_run(level, up, next);
            if (level != small)
                free(level);
            level = next;
            blocks = up;
        }
        memcpy(root, level, HASH_SIZE);
        if (level != small)
            free(level);
    }
    descriptor_sha256((uint64_t)len, root, out);
    return 0;
}

PyDoc_STRVAR(digest_doc,
"digest(data) -> bytes\n\n"
"The fs-verity digest (SHA-256, 4096-byte blocks, no salt; 32 raw bytes) of a contiguous buffer:\n"
"what objects.digest.fsverity_digest computes in Python, in one call.");

static PyObject *digest(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    unsigned char md[HASH_SIZE];
    int rc;
    if (view.len / BLOCK_SIZE >= GIL_MIN_BLOCKS) {
        Py_BEGIN_ALLOW_THREADS
        rc = verity_digest(view.buf, view.len, md);
        Py_END_ALLOW_THREADS
    } else {
        rc = verity_digest(view.buf, view.len, md);
    }
    PyBuffer_Release(&view);
    if (rc < 0)
        return PyErr_NoMemory();
    return PyBytes_FromStringAndSize((const char *)md, HASH_SIZE);
}

/*
 * digests(buffers): the fs-verity digest of each buffer, for many small ones at once.
 *
 * Why: a layer of many small files hashes one to three blocks per file.  Hashed file by file, the
 * SHA-NI path can only pair the two blocks of a two-block file (a single SHA-256 stream keeps the
 * SHA unit half idle), and a file's tail block and its tree block go one at a time.  Here the data
 * blocks of a whole run of files (each tail zero-padded) are copied into one contiguous area and
 * hashed in one hash_run (paired, or sixteen at a time), then the tree blocks of the files with more
 * than one block likewise; then each file's descriptor.  Files of more than 128 blocks (more than
 * one tree level) go through verity_digest.  Same digests as `digest` on each buffer.
 */
#define RUN_BLOCKS 256  /* data blocks copied and hashed per run (1 MiB, in cache) */

struct digests_item {
    const unsigned char *data;
    Py_ssize_t len;
};

/* The digests of `n` buffers into out (HASH_SIZE each); -1 if memory ran out.  Touches no Python
 * object. */
static int digests_run(const struct digests_item *items, Py_ssize_t n, unsigned char *out)
{
    /* scratch sized to what a run needs, at most RUN_BLOCKS blocks: a dozen small files (a 64 KiB
     * chunk of a tar) then take ~100 KiB, below malloc's mmap threshold, so the memory is reused
     * from call to call instead of being mapped and faulted in again each time */
    Py_ssize_t need = 0;
    for (Py_ssize_t k = 0; k < n && need < RUN_BLOCKS; k++) {
        Py_ssize_t len = items[k].len, b = len > 0 ? (len - 1) / BLOCK_SIZE + 1 : 0;
        if (b <= BLOCK_SIZE / HASH_SIZE)
            need += b;
    }
    /* every run's blocks fit `need` (all there are, or RUN_BLOCKS); its files of more than one
     * block, each with a tree block, number at most half its blocks */
    need = need < RUN_BLOCKS ? need : RUN_BLOCKS;
    Py_ssize_t need_trees = need / 2;
    unsigned char *area = malloc((size_t)(need + 1) * BLOCK_SIZE);
    unsigned char *hashes = malloc((size_t)(need + 1) * HASH_SIZE);
    unsigned char *tree = malloc((size_t)(need_trees + 1) * BLOCK_SIZE);
    unsigned char *roots = malloc((size_t)(need_trees + 1) * HASH_SIZE);
    int rc = 0;
    if (area == NULL || hashes == NULL || tree == NULL || roots == NULL) {
        rc = -1;
        goto done;
    }
    Py_ssize_t i = 0;
    while (i < n) {
        /* one run: the files from i on whose blocks fit the area together (always at least one) */
        Py_ssize_t first = i, blocks = 0, trees = 0;
        for (; i < n; i++) {
            Py_ssize_t len = items[i].len, b = len > 0 ? (len - 1) / BLOCK_SIZE + 1 : 0;
            if (b > BLOCK_SIZE / HASH_SIZE) {
                if (i == first) {  /* more than one tree level: on its own */
                    if (verity_digest(items[i].data, len, out + (size_t)i * HASH_SIZE) < 0) {
                        rc = -1;
                        goto done;
                    }
                    first = i + 1;  /* (the loop's i++ moves i there too) */
                    continue;
                }
                break;
            }
            if (blocks + b > need)
                break;
            size_t at = (size_t)blocks * BLOCK_SIZE;
            memcpy(area + at, items[i].data, (size_t)len);
            memset(area + at + (size_t)len, 0, (size_t)b * BLOCK_SIZE - (size_t)len);
            blocks += b;
            trees += b > 1;
        }
        if (first == i)
            continue;
        if (blocks > 0)
            hash_run(area, blocks, hashes);
        /* the tree blocks: each file's block hashes, zero-padded to one block */
        Py_ssize_t at = 0, t = 0;
        for (Py_ssize_t k = first; k < i; k++) {
            Py_ssize_t len = items[k].len, b = len > 0 ? (len - 1) / BLOCK_SIZE + 1 : 0;
            if (b > 1) {
                unsigned char *blk = tree + (size_t)t * BLOCK_SIZE;
                memcpy(blk, hashes + (size_t)at * HASH_SIZE, (size_t)b * HASH_SIZE);
                memset(blk + (size_t)b * HASH_SIZE, 0, BLOCK_SIZE - (size_t)b * HASH_SIZE);
                t++;
            }
            at += b;
        }
        if (trees > 0)
            hash_run(tree, trees, roots);
        at = 0;
        t = 0;
        for (Py_ssize_t k = first; k < i; k++) {
            Py_ssize_t len = items[k].len, b = len > 0 ? (len - 1) / BLOCK_SIZE + 1 : 0;
            unsigned char root[HASH_SIZE] = {0};
            if (b == 1)
                memcpy(root, hashes + (size_t)at * HASH_SIZE, HASH_SIZE);
            else if (b > 1)
                memcpy(root, roots + (size_t)t++ * HASH_SIZE, HASH_SIZE);
            descriptor_sha256((uint64_t)len, root, out + (size_t)k * HASH_SIZE);
            at += b;
        }
    }
done:
    free(area);
    free(hashes);
    free(tree);
    free(roots);
    return rc;
}

PyDoc_STRVAR(digests_doc,
"digests(buffers) -> bytes\n\n"
"The fs-verity digests of a sequence of buffers, 32 bytes each, in order: `digest` of each, with\n"
"the blocks of many small buffers hashed together (see the source).");

static PyObject *digests(PyObject *module, PyObject *arg)
{
    (void)module;
    PyObject *seq = PySequence_Fast(arg, "digests() takes a sequence of buffers");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), got = 0, blocks = 0;
    PyObject **objs = PySequence_Fast_ITEMS(seq);
    Py_buffer *views = PyMem_Calloc((size_t)n + 1, sizeof *views);
    struct digests_item *items = PyMem_Calloc((size_t)n + 1, sizeof *items);
    PyObject *result = NULL;
    if (views == NULL || items == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < n; got++) {
        if (PyObject_GetBuffer(objs[got], &views[got], PyBUF_SIMPLE) < 0)
            goto done;
        items[got].data = views[got].buf;
        items[got].len = views[got].len;
        blocks += views[got].len / BLOCK_SIZE + 1;
    }
    result = PyBytes_FromStringAndSize(NULL, n * HASH_SIZE);
    if (result == NULL)
        goto done;
    int rc;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    if (blocks >= GIL_MIN_BLOCKS) {
        Py_BEGIN_ALLOW_THREADS
        rc = digests_run(items, n, out);
        Py_END_ALLOW_THREADS
    } else {
        rc = digests_run(items, n, out);
    }
    if (rc < 0) {
        Py_CLEAR(result);
        PyErr_NoMemory();
    }
done:
    for (Py_ssize_t k = 0; k < got; k++)
        PyBuffer_Release(&views[k]);
    PyMem_Free(views);
    PyMem_Free(items);
    Py_DECREF(seq);
    return result;
}

PyDoc_STRVAR(hash_blocks_doc,
"hash_blocks(data) -> bytes\n\n"
"The SHA-256 digests of each 4096-byte block of `data` (a contiguous buffer whose length is a\n"
"multiple of 4096), concatenated: the bottom level of an fs-verity Merkle tree.");

static PyObject *hash_blocks(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len % BLOCK_SIZE != 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "hash_blocks: length is not a multiple of 4096");
        return NULL;
    }
    Py_ssize_t blocks = view.len / BLOCK_SIZE;
    PyObject *out = PyBytes_FromStringAndSize(NULL, blocks * HASH_SIZE);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    unsigned char *md = (unsigned char *)PyBytes_AS_STRING(out);
    if (blocks >= GIL_MIN_BLOCKS) {
        Py_BEGIN_ALLOW_THREADS
        hash_run(view.buf, blocks, md);
        Py_END_ALLOW_THREADS
    } else {
        hash_run(view.buf, blocks, md);
    }
    PyBuffer_Release(&view);
    return out;
}

#ifdef HAVE_X86_SIMD
static int stream_shani;  /* whether stream_update / stream_blocks may run (SHA-NI, self-tested) */

/* The 32-byte writable state and the data of a stream call; -1 with an exception set if either is
 * unfit (the state not 32 bytes or read-only, the length not a multiple of `unit`). */
static int stream_args(PyObject *args, const char *name, Py_buffer *state, Py_buffer *data, Py_ssize_t unit)
{
    PyObject *st, *d;
    if (!stream_shani) {
        PyErr_Format(PyExc_RuntimeError, "%s: no SHA-NI on this CPU", name);
        return -1;
    }
    if (!PyArg_UnpackTuple(args, name, 2, 2, &st, &d))
        return -1;
    if (PyObject_GetBuffer(st, state, PyBUF_WRITABLE) < 0)
        return -1;
    if (state->len != HASH_SIZE) {
        PyBuffer_Release(state);
        PyErr_Format(PyExc_ValueError, "%s: the state is not 32 bytes", name);
        return -1;
    }
    if (PyObject_GetBuffer(d, data, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(state);
        return -1;
    }
    if (data->len % unit != 0) {
        PyBuffer_Release(state);
        PyBuffer_Release(data);
        PyErr_Format(PyExc_ValueError, "%s: length is not a multiple of %zd", name, unit);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(stream_update_doc,
"stream_update(state, data) -> None\n\n"
"Run a SHA-256 stream's chaining value `state` (a writable 32-byte buffer: H0..H7 big-endian, the\n"
"initial value or a previous call's) over `data`, whose length is a multiple of 64 (whole\n"
"compression blocks; padding is the caller's).  SHA-NI only.");

static PyObject *stream_update(PyObject *module, PyObject *args)
{
    (void)module;
    Py_buffer state, data;
    if (stream_args(args, "stream_update", &state, &data, 64) < 0)
        return NULL;
    unsigned char st[HASH_SIZE];
    memcpy(st, state.buf, HASH_SIZE);
    if (data.len >= GIL_MIN_BLOCKS * BLOCK_SIZE) {
        Py_BEGIN_ALLOW_THREADS
        shani_stream(st, data.buf, (size_t)data.len);
        Py_END_ALLOW_THREADS
    } else {
        shani_stream(st, data.buf, (size_t)data.len);
    }
    memcpy(state.buf, st, HASH_SIZE);
    PyBuffer_Release(&state);
    PyBuffer_Release(&data);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(stream_blocks_doc,
"stream_blocks(state, data) -> bytes\n\n"
"`stream_update(state, data)` and `hash_blocks(data)` in one pass over `data` (its length a multiple\n"
"of 4096): returns the SHA-256 of each 4096-byte block, concatenated.  SHA-NI only.");

static PyObject *stream_blocks(PyObject *module, PyObject *args)
{
    (void)module;
    Py_buffer state, data;
    if (stream_args(args, "stream_blocks", &state, &data, BLOCK_SIZE) < 0)
        return NULL;
    size_t blocks = (size_t)(data.len / BLOCK_SIZE);
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(blocks * HASH_SIZE));
    if (out == NULL) {
        PyBuffer_Release(&state);
        PyBuffer_Release(&data);
        return NULL;
    }
    unsigned char *md = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned char st[HASH_SIZE];
    memcpy(st, state.buf, HASH_SIZE);
    if (blocks >= GIL_MIN_BLOCKS) {
        Py_BEGIN_ALLOW_THREADS
        shani_stream_blocks(st, data.buf, blocks, md);
        Py_END_ALLOW_THREADS
    } else {
        shani_stream_blocks(st, data.buf, blocks, md);
    }
    memcpy(state.buf, st, HASH_SIZE);
    PyBuffer_Release(&state);
    PyBuffer_Release(&data);
    return out;
}

/* stream_blocks over the blocks i % 251 and (j(k+1)+k) % 251 against hash_run and the portable
 * compression: the stream lane and the block lane must both agree with them. */
static int stream_self_test(void)
{
    static unsigned char data[3 * BLOCK_SIZE];
    unsigned char md[3 * HASH_SIZE], want[3 * HASH_SIZE], st[HASH_SIZE];
    uint32_t ref[8];
    for (int k = 0; k < 3; k++)
        for (int j = 0; j < BLOCK_SIZE; j++)
            data[k * BLOCK_SIZE + j] = (unsigned char)((j * (k + 1) + k) % 251);
    for (int i = 0; i < 8; i++) {
        st[4 * i] = (unsigned char)(H256[i] >> 24);
        st[4 * i + 1] = (unsigned char)(H256[i] >> 16);
        st[4 * i + 2] = (unsigned char)(H256[i] >> 8);
        st[4 * i + 3] = (unsigned char)H256[i];
    }
    memcpy(ref, H256, sizeof ref);
    shani_stream_blocks(st, data, 2, md);
    shani_stream(st, data + 2 * BLOCK_SIZE, BLOCK_SIZE);
    for (int off = 0; off < 3 * BLOCK_SIZE; off += 64)
        compress_scalar(ref, data + off);
    for (int i = 0; i < 8; i++)
        if (((uint32_t)st[4 * i] << 24 | (uint32_t)st[4 * i + 1] << 16 | (uint32_t)st[4 * i + 2] << 8
             | st[4 * i + 3]) != ref[i])
            return -1;
    hash_run_shani(data, 2, want);
    return memcmp(md, want, 2 * HASH_SIZE) == 0 ? 0 : -1;
}
#endif

static PyMethodDef methods[] = {
    {"hash_blocks", hash_blocks, METH_O, hash_blocks_doc},
    {"digest", digest, METH_O, digest_doc},
    {"digests", digests, METH_O, digests_doc},
#ifdef HAVE_X86_SIMD
    {"stream_update", stream_update, METH_VARARGS, stream_update_doc},
    {"stream_blocks", stream_blocks, METH_VARARGS, stream_blocks_doc},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "objects._fsverity",
    "SHA-256 of each 4096-byte block of a buffer in one call (see objects.digest).", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* Known answers: SHA-256 of 4096 zero bytes, and of the 4096 bytes i % 251. */
static const unsigned char KAT_ZERO[HASH_SIZE] = {
    0xad, 0x7f, 0xac, 0xb2, 0x58, 0x6f, 0xc6, 0xe9, 0x66, 0xc0, 0x04, 0xd7, 0xd1, 0xd1, 0x6b, 0x02,
    0x4f, 0x58, 0x05, 0xff, 0x7c, 0xb4, 0x7c, 0x7a, 0x85, 0xda, 0xbd, 0x8b, 0x48, 0x89, 0x2c, 0xa7,
};
static const unsigned char KAT_MOD251[HASH_SIZE] = {
    0xd6, 0x7c, 0x65, 0x6e, 0x01, 0x75, 0x66, 0x50, 0xd7, 0x77, 0x17, 0xb0, 0x83, 0x99, 0x85, 0xa0,
    0x56, 0xec, 0x28, 0xff, 0xe1, 0x74, 0x60, 0x1d, 0x69, 0x0f, 0xc4, 0x07, 0xa2, 0xce, 0xff, 0xca,
};

/* hash_run over (zero, mod251, mod251): the two-at-a-time path with two different blocks, then one
 * alone; then over 19 blocks that all differ, against a checksum of their digests: sixteen lanes, the
 * rest after them. */
#define MIXED_BLOCKS 19
#define MIXED_FNV1A64 0xc0a34377803baa12ULL  /* FNV-1a of the digests of blocks k: byte j = (j(k+1) + k) % 251 */

static int self_test(void)
{
    static unsigned char data[MIXED_BLOCKS * BLOCK_SIZE];
    unsigned char md[MIXED_BLOCKS * HASH_SIZE];
    memset(data, 0, BLOCK_SIZE);
    for (int i = 0; i < BLOCK_SIZE; i++)
        data[BLOCK_SIZE + i] = data[2 * BLOCK_SIZE + i] = (unsigned char)(i % 251);
    hash_run(data, 3, md);
    if (memcmp(md, KAT_ZERO, HASH_SIZE) != 0 || memcmp(md + HASH_SIZE, KAT_MOD251, HASH_SIZE) != 0
        || memcmp(md + 2 * HASH_SIZE, KAT_MOD251, HASH_SIZE) != 0)
        return -1;
    for (int k = 0; k < MIXED_BLOCKS; k++)
        for (int j = 0; j < BLOCK_SIZE; j++)
            data[k * BLOCK_SIZE + j] = (unsigned char)((j * (k + 1) + k) % 251);
    hash_run(data, MIXED_BLOCKS, md);
    uint64_t fnv = 0xcbf29ce484222325ULL;
    for (int i = 0; i < MIXED_BLOCKS * HASH_SIZE; i++)
        fnv = (fnv ^ md[i]) * 0x100000001b3ULL;
    return fnv == MIXED_FNV1A64 ? 0 : -1;
}

#ifdef HAVE_X86_SIMD
/* The descriptor hash with SHA-NI against the portable one (a file of 5000 bytes i % 251: the known
 * answer of objects.digest's tests, 219c2df1...). */
static int desc_self_test(void)
{
    static const unsigned char want[4] = {0x21, 0x9c, 0x2d, 0xf1};
    unsigned char data[5000], md[HASH_SIZE];
    for (int i = 0; i < 5000; i++)
        data[i] = (unsigned char)(i % 251);
    desc_shani = 1;
    if (verity_digest(data, 5000, md) != 0 || memcmp(md, want, sizeof want) != 0)
        return -1;
    return 0;
}

/* Whether `a` hashes faster than `b` on this CPU: best of three runs each, interleaved, over 32
 * blocks (about 0.3 ms in all).  Which multi-buffer or SHA-extension path wins depends on the core
 * (AVX-512 is half as wide on some), so the module measures rather than guesses. */
static double run_seconds(hash_run_fn run, const unsigned char *data, unsigned char *md)
{
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    run(data, 32, md);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
}

static int faster(hash_run_fn a, hash_run_fn b)
{
    unsigned char *data = calloc(32, BLOCK_SIZE), md[32 * HASH_SIZE];
    if (data == NULL)
        return 1;
    double best_a = 1e9, best_b = 1e9;
    for (int i = 0; i < 3; i++) {
        double ta = run_seconds(a, data, md), tb = run_seconds(b, data, md);
        best_a = ta < best_a ? ta : best_a;
        best_b = tb < best_b ? tb : best_b;
    }
    free(data);
    return best_a <= best_b;
}
#endif

/* Whether OBJECTS_FSVERITY_IMPL (for tests: "avx512", "sha-ni" or "libcrypto") allows `name`. */
static int allowed(const char *name)
{
    const char *want = getenv("OBJECTS_FSVERITY_IMPL");
    return want == NULL || *want == '\0' || strcmp(want, name) == 0;
}

PyMODINIT_FUNC PyInit__fsverity(void)
{
    static char impl_name[32];
    const char *impl = NULL;
#ifdef HAVE_X86_SIMD
    if (allowed("sha-ni") && cpu_has_shani()) {
        hash_run = hash_run_shani;
        if (self_test() == 0)
            impl = "sha-ni";
        desc_shani = impl != NULL && desc_self_test() == 0;
    }
#endif
    if (impl == NULL && allowed("libcrypto") && load_libcrypto() == 0) {
        hash_run = hash_run_libcrypto;
        if (self_test() == 0)
            impl = "libcrypto";
    }
#ifdef HAVE_X86_SIMD
    /* sixteen blocks at a time, the rest of a buffer by the path above (padded lanes without one),
     * if that is faster than the path above alone */
    if (allowed("avx512") && cpu_has_avx512()) {
        hash_rest = impl != NULL ? hash_run : NULL;
        hash_run_fn before = hash_run;
        hash_run = hash_run_avx512;
        pad_kw_init();
        if (self_test() == 0 && (impl == NULL || faster(hash_run_avx512, before))) {
            snprintf(impl_name, sizeof impl_name, impl != NULL ? "avx512+%s" : "avx512", impl);
            impl = impl_name;
        } else {
            hash_run = before;
        }
    }
#endif
    if (impl == NULL) {
        PyErr_SetString(PyExc_ImportError, "objects._fsverity: no usable SHA-256 (AVX-512, SHA-NI or libcrypto)");
        return NULL;
    }
#ifdef HAVE_X86_SIMD
    /* the stream functions: SHA-NI (allowed or not for the block hashes), after their self test */
    stream_shani = cpu_has_shani() && stream_self_test() == 0;
#endif
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    int stream = 0;
#ifdef HAVE_X86_SIMD
    stream = stream_shani;
#endif
    if (PyModule_AddStringConstant(module, "IMPLEMENTATION", impl) < 0
        || PyModule_AddIntConstant(module, "STREAM", stream) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
