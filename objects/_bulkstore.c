/*
 * objects._bulkstore: the loop of a bulk helper process (objects/bulkhelper.py) in C.
 *
 * Why: a helper stores the small objects its parent pipes to it, 50,000 per layer of small files,
 * each with four syscalls (open O_TMPFILE in the fan-out dir, write, link, close).  In Python the
 * per-record work around those syscalls (reading the record, unpacking it, the object name, the
 * calls) cost about a sixth of the helper's CPU, and linking through /proc/self/fd/N made the kernel
 * resolve a procfs path for every object.  Here a whole buffer of records is stored in one call,
 * with the GIL released (the loop touches no Python object), and the link uses AT_EMPTY_PATH where
 * the kernel allows it (else /proc/self/fd/N, as the Python code does).
 *
 * `store_records(dirfd, buf, path_link)` stores the complete records at the start of `buf` (each:
 * 32-byte digest, little-endian u32 size, the data, as objects.bulk sends them) until one needs the
 * caller, and returns (at, created, status, err, path_link): `created` the digests (32 bytes each)
 * of the objects it created, in order, `at` the offset in `buf` of the record `status` is about:
 *   0  MORE: no complete record starts at `at` (read more);
 *   1  EXISTS: the record's name was taken (EEXIST; the new copy was dropped): the caller checks
 *      the stored object (ObjectStore._existing_damaged) as ObjectStore._store_hashed_new does;
 *   2  GIVE_UP: the record was not stored (a missing fan-out dir, any error; nothing of it is left):
 *      the caller stores it with ObjectStore._store_hashed_new, which makes the dir or words the error;
 *   3  CLOSE_FAILED: the record was linked but close() failed with errno `err` (where
 *      _store_hashed_new raises; not in `created`, as there).
 * Objects are created exactly as _store_hashed_new creates them (mode 0644 under the helper's umask
 * 022, no temp name ever visible); nothing is synced here.  `path_link` true: link through
 * /proc/self/fd/N only; the returned one is true once the kernel refused AT_EMPTY_PATH and
 * /proc/self/fd/N worked instead (pass it on).
 * Every length is checked against the buffer before it is used.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DIGEST 32
#define HEAD (DIGEST + 4)
#define OBJECT_MODE 0644

enum { MORE = 0, EXISTS = 1, GIVE_UP = 2, CLOSE_FAILED = 3 };

static const char HEX[] = "0123456789abcdef";

/* Write all of `p[0:n]`; 0 or -1 with errno. */
static int write_all(int fd, const unsigned char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (w == 0) {
            errno = EIO;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int link_proc(int fd, int dirfd, const char *rel)
{
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    return linkat(AT_FDCWD, proc, dirfd, rel, AT_SYMLINK_FOLLOW);
}

/* linkat of the anonymous file `fd` to `rel` under `dirfd`: AT_EMPTY_PATH first (unless *path_only),
 * else /proc/self/fd/N.  Kernels before 6.10 refuse AT_EMPTY_PATH to a caller without
 * CAP_DAC_READ_SEARCH with ENOENT, which also means a vanished fan-out dir: where /proc/self/fd/N
 * then links, *path_only is set and AT_EMPTY_PATH not tried again. */
static int link_tmpfile(int fd, int dirfd, const char *rel, int *path_only)
{
    if (*path_only)
        return link_proc(fd, dirfd, rel);
    if (linkat(fd, "", dirfd, rel, AT_EMPTY_PATH) == 0)
        return 0;
    if (errno != ENOENT && errno != EPERM && errno != EINVAL && errno != ENOSYS)
        return -1;
    if (link_proc(fd, dirfd, rel) != 0)
        return -1;
    *path_only = 1;
    return 0;
}

static PyObject *store_records(PyObject *self, PyObject *args)
{
    (void)self;
    int dirfd, path_only;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "iy*p", &dirfd, &view, &path_only))
        return NULL;
    const unsigned char *buf = view.buf;
    size_t len = (size_t)view.len, pos = 0, ncreated = 0;
    /* at most one created object per complete header in the buffer */
    unsigned char *created = PyMem_RawMalloc(len / HEAD * DIGEST + 1);
    if (created == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    int status = MORE, err = 0;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        if (len - pos < HEAD)
            break;
        const unsigned char *d = buf + pos;
        uint32_t size = (uint32_t)d[DIGEST] | (uint32_t)d[DIGEST + 1] << 8 | (uint32_t)d[DIGEST + 2] << 16
            | (uint32_t)d[DIGEST + 3] << 24;
        if ((size_t)size > len - pos - HEAD)
            break; /* its data is not all here yet */
        char rel[2 + 1 + 2 * DIGEST - 2 + 1];
        rel[0] = HEX[d[0] >> 4];
        rel[1] = HEX[d[0] & 15];
        rel[2] = '\0';
        int fd = openat(dirfd, rel, O_WRONLY | O_TMPFILE | O_CLOEXEC, OBJECT_MODE);
        if (fd < 0) {
            status = GIVE_UP;
            break;
        }
        rel[2] = '/';
        for (int i = 1; i < DIGEST; i++) {
            rel[1 + 2 * i] = HEX[d[i] >> 4];
            rel[2 + 2 * i] = HEX[d[i] & 15];
        }
        rel[2 + 2 * DIGEST - 1] = '\0';
        if (write_all(fd, d + HEAD, size) != 0) {
            close(fd);
            status = GIVE_UP;
            break;
        }
        if (link_tmpfile(fd, dirfd, rel, &path_only) != 0) {
            status = errno == EEXIST ? EXISTS : GIVE_UP;
            close(fd);
            break;
        }
        if (close(fd) != 0 && errno != EINTR) {
            status = CLOSE_FAILED;
            err = errno;
            break;
        }
        memcpy(created + ncreated * DIGEST, d, DIGEST);
        ncreated++;
        pos += HEAD + size;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    PyObject *out = PyBytes_FromStringAndSize((const char *)created, (Py_ssize_t)(ncreated * DIGEST));
    PyMem_RawFree(created);
    if (out == NULL)
        return NULL;
    return Py_BuildValue("nNiiN", (Py_ssize_t)pos, out, status, err, PyBool_FromLong(path_only));
}

/* syncfs(fd) with the GIL released (the helper's background writeback: objects/bulkhelper.py), so
 * that a helper need not load ctypes for it; OSError on failure. */
static PyObject *py_syncfs(PyObject *self, PyObject *args)
{
    (void)self;
    int fd, rc;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = syncfs(fd);
    Py_END_ALLOW_THREADS
    if (rc != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"syncfs", py_syncfs, METH_VARARGS, "syncfs(fd): flush the file system holding fd (GIL released)"},
    {"store_records", store_records, METH_VARARGS,
     "store_records(dirfd, buf, path_link) -> (at, created, status, errno, path_link): store the "
     "complete bulk records at the start of buf until one needs the caller (see the module source)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "objects._bulkstore",
    "A bulk helper's store loop (objects/bulkhelper.py) in C; optional.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__bulkstore(void)
{
    return PyModule_Create(&module);
}
