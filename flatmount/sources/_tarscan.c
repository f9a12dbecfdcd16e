/*
 * flatmount.sources._tarscan: decode one plain ustar/GNU tar header block in one call.
 *
 * Why: a layer of many small files spends a large part of its import decoding headers in Python
 * (eight octal fields through str and int(), two byte sums for the checksum, the name fields).  This
 * is the same decoding as flatmount.sources.tarreader._parse_plain, which stays the specification
 * and the fallback, for the common case only: where anything is unusual (a type other than the
 * plain ones, a checksum that is not the unsigned sum, a number with a sign, an underscore, a "0o"
 * prefix, a base-256 or non-ASCII byte) this returns None and the caller decodes the block with the
 * Python code, so every diagnostic and every odd case stays in one place.
 *
 * Only the 512 bytes handed in are read, every field at its fixed offset inside them; no Python
 * object is touched without the GIL (none is released: a header is a few hundred nanoseconds).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 512

/* Python's str.strip() of an ASCII string: the characters str.isspace() accepts. */
static int is_py_space(unsigned char c)
{
    return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

/* Length of a NUL-terminated field (the whole field when it has no NUL). */
static Py_ssize_t field_len(const unsigned char *p, Py_ssize_t n)
{
    const unsigned char *z = memchr(p, 0, (size_t)n);
    return z == NULL ? n : (Py_ssize_t)(z - p);
}

/*
 * The octal number field `p[0:n]` as tarreader._octal reads it, restricted to the plain form: up to
 * the first NUL, Python whitespace stripped at both ends, then only the digits 0-7 (none: 0).
 * Returns 0 and sets *out, or -1 for anything else (the caller falls back to Python).  n <= 12, so
 * at most 36 bits: no overflow.
 */
static int plain_octal(const unsigned char *p, Py_ssize_t n, int64_t *out)
{
    Py_ssize_t end = field_len(p, n), start = 0;
    while (start < end && is_py_space(p[start]))
        start++;
    while (end > start && is_py_space(p[end - 1]))
        end--;
    int64_t v = 0;
    for (Py_ssize_t i = start; i < end; i++) {
        unsigned char c = p[i];
        if (c < '0' || c > '7')
            return -1;
        v = v * 8 + (c - '0');
    }
    *out = v;
    return 0;
}

static const char FAST_TYPES[] = "0\0" "123456";

PyDoc_STRVAR(parse_plain_doc,
"parse_plain(block) -> (kind, name, link, mode, uid, gid, size, mtime, devmajor, devminor) or None\n\n"
"A plain tar header block (512 bytes) decoded exactly as tarreader._parse_plain does; None where\n"
"that function must decide (anything unusual).  ValueError if `block` is not 512 bytes.");

static PyObject *parse_plain(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len != BLOCK) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "a tar header block is %d bytes, not %zd", BLOCK, view.len);
        return NULL;
    }
    const unsigned char *b = view.buf;
    PyObject *result = NULL;
    unsigned char kind = b[156];
    if (memchr(FAST_TYPES, kind, sizeof FAST_TYPES - 1) == NULL)
        goto fallback;

    int64_t chksum, mode, uid, gid, size, mtime, devmajor, devminor;
    if (plain_octal(b + 148, 8, &chksum) < 0)
        goto fallback;
    uint64_t sum = 256;
    for (int i = 0; i < BLOCK; i++)
        sum += (i >= 148 && i < 156) ? 0 : b[i];
    if ((uint64_t)chksum != sum)
        goto fallback;
    if (plain_octal(b + 100, 8, &mode) < 0 || plain_octal(b + 108, 8, &uid) < 0 ||
        plain_octal(b + 116, 8, &gid) < 0 || plain_octal(b + 124, 12, &size) < 0 ||
        plain_octal(b + 136, 12, &mtime) < 0 || plain_octal(b + 329, 8, &devmajor) < 0 ||
        plain_octal(b + 337, 8, &devminor) < 0)
        goto fallback;

    /* the name: prefix "/" name, as ustar; a V7 directory is a regular file named with a slash */
    Py_ssize_t nlen = field_len(b, 100), plen = field_len(b + 345, 155);
    if (kind == '\0' && nlen > 0 && b[nlen - 1] == '/')
        kind = '5';
    if (kind == '5')
        while (nlen > 0 && b[nlen - 1] == '/')
            nlen--;
    char joined[155 + 1 + 100];
    const char *name = (const char *)b;
    Py_ssize_t len = nlen;
    if (plen > 0) {
        memcpy(joined, b + 345, (size_t)plen);
        joined[plen] = '/';
        memcpy(joined + plen + 1, b, (size_t)nlen);
        name = joined;
        len = plen + 1 + nlen;
        if (kind == '5')
            while (len > 0 && joined[len - 1] == '/')
                len--;
    }
    Py_ssize_t llen = (kind == '1' || kind == '2') ? field_len(b + 157, 100) : 0;
    /* Py_BuildValue "y#" copies; "L" is long long: int64_t fits */
    result = Py_BuildValue("y#y#y#LLLLLLL", (const char *)&kind, (Py_ssize_t)1, name, len,
                           (const char *)(b + 157), llen, (long long)mode, (long long)uid, (long long)gid,
                           (long long)size, (long long)mtime, (long long)devmajor, (long long)devminor);
    PyBuffer_Release(&view);
    return result;

fallback:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"parse_plain", parse_plain, METH_O, parse_plain_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "flatmount.sources._tarscan",
    "Plain tar header blocks decoded in one call (see flatmount.sources.tarreader).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tarscan(void)
{
    return PyModule_Create(&module_def);
}
