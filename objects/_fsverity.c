/*
 * objects._fsverity: SHA-256 of every 4096-byte block of a buffer, in one call.
 *
 * Why: an fs-verity digest hashes a file block by block.  From Python each block costs a hashlib
 * object (about a fifth of the hashing itself) and a release and re-take of the GIL, which is what
 * limits importing big layers on a two-core machine.  Here the whole buffer is hashed with the GIL
 * released, two ways:
 *   - with the CPU's SHA extensions (x86 SHA-NI), two blocks at a time: a block's 65 SHA-256
 *     compressions (64 of data, one of padding) form one dependency chain, so two independent
 *     chains interleaved keep the SHA unit busier (about a quarter faster than one at a time);
 *   - otherwise with libcrypto's SHA256_Init/Update/Final (found with dlopen, the one hashlib uses,
 *     so building needs no OpenSSL headers).
 * The module checks what it uses against known digests on import.  Without it (no C compiler at
 * install time, neither path usable), objects.digest hashes block by block with hashlib.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_SHANI 1
#define SHANI __attribute__((target("sha,sse4.1,ssse3")))

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

static void hash_run_shani(const unsigned char *data, Py_ssize_t blocks, unsigned char *out)
{
    Py_ssize_t i = 0;
    for (; i + 1 < blocks; i += 2)
        shani_two(data + (size_t)i * BLOCK_SIZE, data + (size_t)(i + 1) * BLOCK_SIZE,
                  out + (size_t)i * HASH_SIZE, out + (size_t)(i + 1) * HASH_SIZE);
    if (i < blocks)
        shani_one(data + (size_t)i * BLOCK_SIZE, out + (size_t)i * HASH_SIZE);
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
#endif

/* --- module ------------------------------------------------------------------------------------ */

PyDoc_STRVAR(hash_blocks_doc,
"hash_blocks(data) -> bytes\n\n"
"The SHA-256 digests of each 4096-byte block of `data` (a contiguous buffer whose length is a\n"
"multiple of 4096), concatenated: the bottom level of an fs-verity Merkle tree.");

static PyObject *hash_blocks(PyObject *module, PyObject *arg)
{
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

static PyMethodDef methods[] = {
    {"hash_blocks", hash_blocks, METH_O, hash_blocks_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "objects._fsverity",
    "SHA-256 of each 4096-byte block of a buffer in one call (see objects.digest).", -1, methods,
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

/* hash_run over (zero, mod251, mod251): the two-at-a-time path with two different blocks, then one alone. */
static int self_test(void)
{
    static unsigned char data[3 * BLOCK_SIZE];
    unsigned char md[3 * HASH_SIZE];
    for (int i = 0; i < BLOCK_SIZE; i++)
        data[BLOCK_SIZE + i] = data[2 * BLOCK_SIZE + i] = (unsigned char)(i % 251);
    hash_run(data, 3, md);
    return memcmp(md, KAT_ZERO, HASH_SIZE) == 0 && memcmp(md + HASH_SIZE, KAT_MOD251, HASH_SIZE) == 0
        && memcmp(md + 2 * HASH_SIZE, KAT_MOD251, HASH_SIZE) == 0 ? 0 : -1;
}

PyMODINIT_FUNC PyInit__fsverity(void)
{
    const char *impl = NULL;
    const char *want = getenv("OBJECTS_FSVERITY_IMPL");  /* "libcrypto": skip SHA-NI (for tests) */
#ifdef HAVE_SHANI
    if ((want == NULL || strcmp(want, "libcrypto") != 0) && cpu_has_shani()) {
        hash_run = hash_run_shani;
        if (self_test() == 0)
            impl = "sha-ni";
    }
#endif
    if (impl == NULL && load_libcrypto() == 0) {
        hash_run = hash_run_libcrypto;
        if (self_test() == 0)
            impl = "libcrypto";
    }
    if (impl == NULL) {
        PyErr_SetString(PyExc_ImportError, "objects._fsverity: neither SHA-NI nor libcrypto SHA-256 usable");
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module != NULL && PyModule_AddStringConstant(module, "IMPLEMENTATION", impl) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
