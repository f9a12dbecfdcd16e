/* The raw kernel calls of flatmount.kernel.kmount without ctypes.
 *
 * Why: `import ctypes` and loading libc through it cost about 1.5 ms of every `flatmount mount` and
 * `umount`, a tenth of what the CLI may spend over the interpreter's own start-up (issue 17).  The
 * ctypes code in kmount stays the specification and the fallback (FLATMOUNT_PURE=1, no compiler);
 * tests/test_ksys.py runs both on the same calls.
 *
 *   syscall(nr, *args)                      up to 6 arguments: int -> long, None -> NULL, a bytes-like
 *                                           object -> a pointer to its bytes (a bytearray may be
 *                                           written by the kernel); returns the result, or raises
 *                                           OSError(errno, strerror)
 *   mount(source, target, fstype, flags, data)   mount(2); source, fstype, data may be None
 *   umount2(target, flags)                  umount2(2)
 *   statx(dirfd, path, flags, mask)         statx(2) into a fresh 256-byte struct statx, as bytes;
 *                                           OSError(errno, strerror, path) on failure
 *
 * The GIL is released around each call (a mount may wait on I/O): only C memory is touched then, and
 * every Python buffer stays exported (so alive and unmoved) until the call returns.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_ARGS 6
#define STATX_BUF_BYTES 256

/* One argument as a long; `view` is filled (and must be released) when it was a buffer. */
static int arg_value(PyObject *obj, long *out, Py_buffer *view, int *has_view) {
    *has_view = 0;
    if (obj == Py_None) {
        *out = 0;
        return 0;
    }
    if (PyLong_Check(obj)) {
        int overflow = 0;
        long v = PyLong_AsLongAndOverflow(obj, &overflow);
        if (overflow > 0) {   /* a flag word above LONG_MAX: pass its bits, as ctypes' c_long would refuse */
            unsigned long u = PyLong_AsUnsignedLong(obj);
            if (u == (unsigned long)-1 && PyErr_Occurred())
                return -1;
            v = (long)u;
        } else if (overflow < 0) {
            PyErr_SetString(PyExc_OverflowError, "syscall argument below LONG_MIN");
            return -1;
        } else if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        *out = v;
        return 0;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) != 0) {
        PyErr_Clear();
        if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) != 0)
            return -1;
    }
    *has_view = 1;
    *out = (long)view->buf;
    return 0;
}

static PyObject *ksys_syscall(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs < 1 || nargs > MAX_ARGS + 1) {
        PyErr_Format(PyExc_TypeError, "syscall() takes 1 to %d arguments (%zd given)", MAX_ARGS + 1, nargs);
        return NULL;
    }
    long nr = PyLong_AsLong(args[0]);
    if (nr == -1 && PyErr_Occurred())
        return NULL;
    long a[MAX_ARGS] = {0};
    Py_buffer views[MAX_ARGS];
    int has_view[MAX_ARGS] = {0};
    int ok = 1;
    for (Py_ssize_t i = 1; i < nargs; i++) {
        if (arg_value(args[i], &a[i - 1], &views[i - 1], &has_view[i - 1]) != 0) {
            ok = 0;
            break;
        }
    }
    long r = 0;
    int err = 0;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        errno = 0;
        r = syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]);
        err = errno;
        Py_END_ALLOW_THREADS
    }
    for (int i = 0; i < MAX_ARGS; i++)
        if (has_view[i])
            PyBuffer_Release(&views[i]);
    if (!ok)
        return NULL;
    if (r < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(r);
}

/* A bytes argument that may be None (NULL). */
static int opt_bytes(PyObject *obj, const char **out, const char *what) {
    if (obj == Py_None) {
        *out = NULL;
        return 0;
    }
    if (!PyBytes_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes or None", what);
        return -1;
    }
    if ((Py_ssize_t)strlen(PyBytes_AS_STRING(obj)) != PyBytes_GET_SIZE(obj)) {
        PyErr_Format(PyExc_ValueError, "%s contains a NUL byte", what);
        return -1;
    }
    *out = PyBytes_AS_STRING(obj);
    return 0;
}

/* A bytes argument that must be given. */
static int req_bytes(PyObject *obj, const char **out, const char *what) {
    if (opt_bytes(obj, out, what))
        return -1;
    if (*out == NULL) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes", what);
        return -1;
    }
    return 0;
}

/* None after a call that succeeded, else OSError(err, strerror). */
static PyObject *none_or_oserror(int failed, int err) {
    if (failed) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *ksys_mount(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *source_o, *target_o, *fstype_o, *data_o;
    unsigned long flags;
    if (!PyArg_ParseTuple(args, "OOOkO:mount", &source_o, &target_o, &fstype_o, &flags, &data_o))
        return NULL;
    const char *source, *target, *fstype, *data;
    if (opt_bytes(source_o, &source, "source") || req_bytes(target_o, &target, "target") ||
        opt_bytes(fstype_o, &fstype, "fstype") || opt_bytes(data_o, &data, "data"))
        return NULL;
    int r, err;
    Py_BEGIN_ALLOW_THREADS
    r = mount(source, target, fstype, flags, data);
    err = errno;
    Py_END_ALLOW_THREADS
    return none_or_oserror(r != 0, err);
}

static PyObject *ksys_umount2(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *target_o;
    int flags;
    if (!PyArg_ParseTuple(args, "Oi:umount2", &target_o, &flags))
        return NULL;
    const char *target;
    if (req_bytes(target_o, &target, "target"))
        return NULL;
    int r, err;
    Py_BEGIN_ALLOW_THREADS
    r = umount2(target, flags);
    err = errno;
    Py_END_ALLOW_THREADS
    return none_or_oserror(r != 0, err);
}

static PyObject *ksys_statx(PyObject *self, PyObject *args) {
    (void)self;
    int dirfd, flags;
    unsigned int mask;
    PyObject *path_o;
    if (!PyArg_ParseTuple(args, "iOiI:statx", &dirfd, &path_o, &flags, &mask))
        return NULL;
    const char *path;
    if (req_bytes(path_o, &path, "path"))
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, STATX_BUF_BYTES);
    if (out == NULL)
        return NULL;
    char *buf = PyBytes_AS_STRING(out);
    memset(buf, 0, STATX_BUF_BYTES);
    long r;
    int err;
    Py_BEGIN_ALLOW_THREADS
    r = syscall(SYS_statx, dirfd, path, flags, mask, buf);
    err = errno;
    Py_END_ALLOW_THREADS
    if (r != 0) {
        Py_DECREF(out);
        errno = err;
        PyObject *name = PyUnicode_DecodeFSDefault(path);
        if (name == NULL)
            return NULL;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        Py_DECREF(name);
        return NULL;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"syscall", (PyCFunction)(void (*)(void))ksys_syscall, METH_FASTCALL,
     "syscall(nr, *args): the raw system call; OSError(errno) when it fails"},
    {"mount", ksys_mount, METH_VARARGS, "mount(source, target, fstype, flags, data): mount(2)"},
    {"umount2", ksys_umount2, METH_VARARGS, "umount2(target, flags): umount2(2)"},
    {"statx", ksys_statx, METH_VARARGS, "statx(dirfd, path, flags, mask) -> the 256-byte struct statx"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ksys", "flatmount's raw kernel calls without ctypes (see _ksys.c)", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ksys(void) { return PyModule_Create(&module); }
