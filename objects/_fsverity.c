/*
 * objects._fsverity: SHA-256 of every 4096-byte block of a buffer, in one call.
 *
 * Why: an fs-verity digest hashes a file block by block.  From Python each block costs a hashlib
 * object (about a fifth of the hashing itself) and a release and re-take of the GIL, which is what
 * limits importing big layers on a two-core machine.  This loop calls libcrypto's SHA-256 functions
 * directly, with the GIL released for the whole buffer.  libcrypto (the one hashlib uses) is found
 * with dlopen, so building needs only a C compiler and Python's headers, no OpenSSL headers; the
 * module checks itself on import against a known digest.  Without it (no compiler at install time,
 * no libcrypto), objects.digest hashes block by block with hashlib: same results, slower.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <string.h>

#define BLOCK_SIZE 4096
#define HASH_SIZE 32
#define CTX_SIZE 512         /* SHA256_CTX is 112 bytes in OpenSSL 1.1 and 3.x: room to spare */
#define GIL_MIN_BLOCKS 8     /* below this, releasing the GIL costs more than it frees */

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

static void hash_run(const unsigned char *data, Py_ssize_t blocks, unsigned char *out)
{
    sha_ctx ctx;
    for (Py_ssize_t i = 0; i < blocks; i++) {
        sha_init(&ctx);
        sha_update(&ctx, data + (size_t)i * BLOCK_SIZE, BLOCK_SIZE);
        sha_final(out + (size_t)i * HASH_SIZE, &ctx);
    }
}

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

/* SHA-256 of 4096 zero bytes: what the loaded functions must give. */
static const unsigned char ZERO_BLOCK_SHA256[HASH_SIZE] = {
    0xad, 0x7f, 0xac, 0xb2, 0x58, 0x6f, 0xc6, 0xe9, 0x66, 0xc0, 0x04, 0xd7, 0xd1, 0xd1, 0x6b, 0x02,
    0x4f, 0x58, 0x05, 0xff, 0x7c, 0xb4, 0x7c, 0x7a, 0x85, 0xda, 0xbd, 0x8b, 0x48, 0x89, 0x2c, 0xa7,
};

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
        if (sha_init != NULL && sha_update != NULL && sha_final != NULL) {
            static const unsigned char zero[BLOCK_SIZE];
            unsigned char md[HASH_SIZE];
            hash_run(zero, 1, md);
            if (memcmp(md, ZERO_BLOCK_SHA256, HASH_SIZE) == 0)
                return 0;
        }
        dlclose(lib);
    }
    sha_init = NULL;
    sha_update = NULL;
    sha_final = NULL;
    return -1;
}

PyMODINIT_FUNC PyInit__fsverity(void)
{
    if (load_libcrypto() < 0) {
        PyErr_SetString(PyExc_ImportError, "objects._fsverity: no usable libcrypto SHA-256");
        return NULL;
    }
    return PyModule_Create(&module_def);
}
