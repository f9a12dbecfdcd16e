/*
 * flatmount.flatten._carena: Python's small-object arenas with their pages allocated at once.
 *
 * Why: flattening a big chain in a new process builds a few hundred thousand small objects (the
 * cached prefix's tree, the writer's columns) in fresh memory.  Each fresh page is a page fault on
 * first touch, and on the development VM a fault costs ~2.7 us (a host fault behind it): for a 64k-
 * inode chain ~17,000 faults, a third of the flatten.  Asking the kernel for all pages of a new
 * 256 KiB..1 MiB arena in one call (madvise MADV_POPULATE_WRITE, Linux 5.14+) costs about half.
 *
 * How: while `push()`ed (flatmount.flatten.imagecache), pymalloc's arena allocator is the one it had
 * before (whatever it is: the allocation and the freeing stay its own), plus that one madvise over
 * each new arena.  A kernel without MADV_POPULATE_WRITE refuses it and nothing else changes: the
 * pages then fault in as before.  Nothing here touches a Python object or changes what any
 * allocation returns; without this module (or with FLATMOUNT_PURE=1) flatten runs the same, slower.
 *
 * `populate(buffer)` does the same for the buffer flatten writes the image into, on another thread
 * while the writer lays the image out (the GIL released: it touches no Python object).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sys/mman.h>
#include <stdint.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

static PyObjectArenaAllocator saved;   /* the allocator while pushed: restored by the last pop */
static int depth;
static int refused;                    /* the kernel refused MADV_POPULATE_WRITE once: stop asking */
static long page;

static void *populated_alloc(void *ctx, size_t size)
{
    (void)ctx;
    void *p = saved.alloc(saved.ctx, size);
    if (p != NULL && !refused) {
        uintptr_t a = ((uintptr_t)p + (uintptr_t)page - 1) & ~((uintptr_t)page - 1);
        uintptr_t e = ((uintptr_t)p + size) & ~((uintptr_t)page - 1);
        if (e > a && madvise((void *)a, e - a, MADV_POPULATE_WRITE) != 0)
            refused = 1;   /* (EINVAL: an older kernel; ENOMEM and the like: the pages fault in later) */
    }
    return p;
}

static void populated_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    saved.free(saved.ctx, ptr, size);
}

PyDoc_STRVAR(push_doc,
"push() -> None\n\n"
"From now until the matching pop(), new small-object arenas have their pages allocated at once.\n"
"Nestable; call with the GIL held (the allocator is process-wide).");

static PyObject *push(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    if (depth++ == 0) {
        PyObjectArenaAllocator ours;
        PyObject_GetArenaAllocator(&saved);
        ours.ctx = NULL;
        ours.alloc = populated_alloc;
        ours.free = populated_free;
        PyObject_SetArenaAllocator(&ours);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(pop_doc,
"pop() -> None\n\n"
"Undo one push(); the last one puts the previous arena allocator back (arenas allocated meanwhile\n"
"are its own: it frees them as any other).");

static PyObject *pop(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    if (depth <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "_carena.pop() without push()");
        return NULL;
    }
    if (--depth == 0)
        PyObject_SetArenaAllocator(&saved);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(populate_doc,
"populate(buffer) -> bool\n\n"
"Allocate the pages of the writable `buffer` (e.g. an anonymous mmap) at once, with the GIL released\n"
"(another thread fills it meanwhile: the call never changes a byte).  False where the kernel refuses\n"
"(no MADV_POPULATE_WRITE): its pages then fault in as they are written.");

static PyObject *populate(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    uintptr_t a = ((uintptr_t)view.buf + (uintptr_t)page - 1) & ~((uintptr_t)page - 1);
    uintptr_t e = ((uintptr_t)view.buf + (uintptr_t)view.len) & ~((uintptr_t)page - 1);
    int ok = 1;
    if (e > a) {
        Py_BEGIN_ALLOW_THREADS
        ok = madvise((void *)a, e - a, MADV_POPULATE_WRITE) == 0;
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    return PyBool_FromLong(ok);
}

static PyMethodDef methods[] = {
    {"push", push, METH_NOARGS, push_doc},
    {"pop", pop, METH_NOARGS, pop_doc},
    {"populate", populate, METH_O, populate_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "flatmount.flatten._carena",
    "Small-object arenas with their pages allocated at once (see flatmount.flatten.imagecache).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__carena(void)
{
    page = sysconf(_SC_PAGESIZE);
    if (page <= 0 || (page & (page - 1)) != 0)
        page = 4096;
    return PyModule_Create(&module_def);
}
