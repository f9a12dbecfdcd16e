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
 * scan_plain decodes the plain members lying whole in a buffer in one call (a chunk of the stream
 * holds a few hundred small files), checking each header's and payload's extent against it.
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

/*
 * The 512 bytes at `b` decoded as parse_plain does: its tuple, with `payload` appended when it is
 * >= 0 (scan_plain's payload offset); a new reference to None where Python must decide; NULL on a
 * Python error (memory).
 */
static PyObject *decode_block(const unsigned char *b, Py_ssize_t payload)
{
    unsigned char kind = b[156];
    if (memchr(FAST_TYPES, kind, sizeof FAST_TYPES - 1) == NULL)
        Py_RETURN_NONE;

    int64_t chksum, mode, uid, gid, size, mtime, devmajor, devminor;
    if (plain_octal(b + 148, 8, &chksum) < 0)
        Py_RETURN_NONE;
    uint64_t sum = 256;
    for (int i = 0; i < BLOCK; i++)
        sum += (i >= 148 && i < 156) ? 0 : b[i];
    if ((uint64_t)chksum != sum)
        Py_RETURN_NONE;
    if (plain_octal(b + 100, 8, &mode) < 0 || plain_octal(b + 108, 8, &uid) < 0 ||
        plain_octal(b + 116, 8, &gid) < 0 || plain_octal(b + 124, 12, &size) < 0 ||
        plain_octal(b + 136, 12, &mtime) < 0 || plain_octal(b + 329, 8, &devmajor) < 0 ||
        plain_octal(b + 337, 8, &devminor) < 0)
        Py_RETURN_NONE;

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
    if (payload >= 0)
        return Py_BuildValue("y#y#y#LLLLLLLn", (const char *)&kind, (Py_ssize_t)1, name, len,
                             (const char *)(b + 157), llen, (long long)mode, (long long)uid, (long long)gid,
                             (long long)size, (long long)mtime, (long long)devmajor, (long long)devminor,
                             payload);
    return Py_BuildValue("y#y#y#LLLLLLL", (const char *)&kind, (Py_ssize_t)1, name, len,
                         (const char *)(b + 157), llen, (long long)mode, (long long)uid, (long long)gid,
                         (long long)size, (long long)mtime, (long long)devmajor, (long long)devminor);
}

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
    PyObject *result = decode_block(view.buf, -1);
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(scan_plain_doc,
"scan_plain(buf, off, limit, max_size) -> (members, end)\n\n"
"The plain members that lie whole in buf[off:], one after the other, at most `limit`: each\n"
"parse_plain's tuple plus the offset of its payload in `buf`; `end` is the offset after the last\n"
"one's padding.  Stops before anything parse_plain leaves to Python, a regular file (header type\n"
"0 or NUL) of `max_size` bytes or more, and a member whose payload and padding are not all in\n"
"`buf`.  As tarreader._scan_plain_py, where parse_plain gives what _parse_plain_py gives.");

static PyObject *scan_plain(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer view;
    Py_ssize_t off, limit;
    long long max_size;
    if (!PyArg_ParseTuple(args, "y*nnL", &view, &off, &limit, &max_size))
        return NULL;
    PyObject *members = PyList_New(0);
    if (members == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const unsigned char *buf = view.buf;
    Py_ssize_t len = view.len;
    if (off < 0)
        off = len; /* nothing to scan */
    while (PyList_GET_SIZE(members) < limit && off <= len - BLOCK) {
        const unsigned char *b = buf + off;
        PyObject *t = decode_block(b, off + BLOCK);
        if (t == NULL)
            goto error;
        if (t == Py_None) {
            Py_DECREF(t);
            break;
        }
        /* size and the adjusted kind from the tuple: what decode_block decided */
        long long size = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 6));
        char kind = PyBytes_AS_STRING(PyTuple_GET_ITEM(t, 0))[0];
        int regular = kind == '0' || kind == '\0';
        if ((b[156] == '0' || b[156] == '\0') && size >= max_size) {
            Py_DECREF(t);
            break;
        }
        /* size < 8**12 (12 octal digits): no overflow in Py_ssize_t */
        Py_ssize_t padded = regular ? (Py_ssize_t)((size + BLOCK - 1) / BLOCK * BLOCK) : 0;
        if (padded > len - off - BLOCK) {
            Py_DECREF(t);
            break;
        }
        int r = PyList_Append(members, t);
        Py_DECREF(t);
        if (r < 0)
            goto error;
        off += BLOCK + padded;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("Nn", members, off);

error:
    Py_DECREF(members);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"parse_plain", parse_plain, METH_O, parse_plain_doc},
    {"scan_plain", scan_plain, METH_VARARGS, scan_plain_doc},
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
