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
 * `push(reserve)` with a size also maps that much memory at once and hands it out to the new arenas
 * in order, while a thread of this module's own populates it ahead of them: the pages' cost (~0.37 us
 * each here, 18 MB of arenas for a 64k-inode chain: ~7 ms) leaves the flattening thread for a second
 * CPU.  An arena the populater has not reached yet is populated at once, as without a reserve.  While
 * it runs, no part of the reserve is unmapped (a freed arena waits in a list for the next allocation),
 * so it never touches memory that is not the reserve's; the last pop() stops it and unmaps what no
 * arena holds (arenas still held are unmapped when Python frees them, as any other).
 *
 * `populate(buffer)` does the same for the buffer flatten writes the image into, on another thread
 * while the writer lays the image out (the GIL released: it touches no Python object).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdatomic.h>
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

/* the reserve (push with a size): [rbase, rbase + rsize), handed out from rnext up (the GIL held) */
static char *rbase;
static size_t rsize, rnext;
static atomic_size_t rhanded;          /* rnext, for the populater */
static atomic_size_t rpopulated;       /* the populater is done below this offset */
static atomic_int rstop;
static pthread_t rthread;
static int rthread_on;
static void **rfree;                   /* freed arenas of the reserve (rfree_size bytes each), for reuse */
static size_t nfree, free_cap, rfree_size;
#define POPULATE_STEP ((size_t)128 << 10)

static void *populater(void *arg)
{
    (void)arg;
    for (size_t off = 0; off < rsize && !atomic_load(&rstop); off += POPULATE_STEP) {
        size_t end = rsize - off < POPULATE_STEP ? rsize : off + POPULATE_STEP;
        size_t from = atomic_load(&rhanded);   /* (what was handed out is its arena's to fault in) */
        if (from < end) {
            if (from < off)
                from = off;
            from = (from + (size_t)page - 1) & ~((size_t)page - 1);
            /* each page faulted in by an atomic "or 0" into its first word: a write that changes no
             * byte, even of a page an arena holds meanwhile; a fault at a time, not the address
             * space's lock held over a range as madvise(MADV_POPULATE_WRITE) holds it */
            for (size_t o = from; o < end; o += (size_t)page)
                __atomic_fetch_or((unsigned long *)(rbase + o), 0UL, __ATOMIC_RELAXED);
        }
        atomic_store(&rpopulated, end);
    }
    return NULL;
}

static void stop_populater(void)
{
    if (rthread_on) {
        atomic_store(&rstop, 1);
        pthread_join(rthread, NULL);
        rthread_on = 0;
    }
}

/* after fork() the child has no populater thread (and must not join one) */
static void forget_populater(void)
{
    rthread_on = 0;
}

static void drop_reserve(void)
{
    stop_populater();
    for (size_t i = 0; i < nfree; i++)
        munmap(rfree[i], rfree_size);
    if (rbase != NULL && rsize > rnext)
        munmap(rbase + rnext, rsize - rnext);
    PyMem_RawFree(rfree);
    rfree = NULL;
    nfree = free_cap = 0;
    rbase = NULL;
    rsize = rnext = 0;
}

static void *from_reserve(size_t size)
{
    if (nfree && rfree_size == size)
        return rfree[--nfree];
    if (rsize - rnext < size || ((uintptr_t)(rbase + rnext) & ((uintptr_t)page - 1)))
        return NULL;
    char *p = rbase + rnext;
    rnext += size;
    atomic_store(&rhanded, rnext);
    if (atomic_load(&rpopulated) < rnext && !refused && madvise(p, size & ~((size_t)page - 1), MADV_POPULATE_WRITE) != 0)
        refused = 1;
    return p;
}

static void *populated_alloc(void *ctx, size_t size)
{
    (void)ctx;
    if (rbase != NULL) {
        void *r = from_reserve(size);
        if (r != NULL)
            return r;
    }
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
    if (rbase != NULL && (char *)ptr >= rbase && (char *)ptr < rbase + rsize) {
        if (nfree == 0)
            rfree_size = size;
        if (rfree_size == size && nfree < free_cap) {
            rfree[nfree++] = ptr;   /* (kept mapped while the populater may run: see the top) */
            return;
        }
        stop_populater();           /* (not expected: every arena of the reserve fits the list) */
    }
    saved.free(saved.ctx, ptr, size);
}

PyDoc_STRVAR(push_doc,
"push(reserve=0) -> None\n\n"
"From now until the matching pop(), new small-object arenas have their pages allocated at once;\n"
"the outermost push with `reserve` > 0 also maps that many bytes for them, populated ahead by a\n"
"thread (see the top of flatmount/flatten/_carena.c).  Nestable; call with the GIL held (the\n"
"allocator is process-wide).");

static PyObject *push(PyObject *self, PyObject *args)
{
    (void)self;
    Py_ssize_t reserve = 0;
    if (!PyArg_ParseTuple(args, "|n:push", &reserve))
        return NULL;
    if (depth++ == 0) {
        PyObjectArenaAllocator ours;
        PyObject_GetArenaAllocator(&saved);
        ours.ctx = NULL;
        ours.alloc = populated_alloc;
        ours.free = populated_free;
        PyObject_SetArenaAllocator(&ours);
        size_t want = reserve > 0 ? ((size_t)reserve + (size_t)page - 1) & ~((size_t)page - 1) : 0;
        void *m = want ? mmap(NULL, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
                                   : MAP_FAILED;
        size_t cap = want / ((size_t)256 << 10) + 1;   /* arenas are 256 KiB at least (1 MiB since 3.10) */
        void **list = m != MAP_FAILED ? PyMem_RawMalloc(cap * sizeof(void *)) : NULL;
        if (list == NULL) {
            if (m != MAP_FAILED)
                munmap(m, want);
        } else {
            rbase = m;
            rsize = want;
            rnext = 0;
            rfree = list;
            free_cap = cap;
            nfree = 0;
            atomic_store(&rhanded, 0);
            atomic_store(&rpopulated, 0);
            atomic_store(&rstop, 0);
            rthread_on = pthread_create(&rthread, NULL, populater, NULL) == 0;
        }
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
    if (--depth == 0) {
        PyObject_SetArenaAllocator(&saved);
        drop_reserve();
    }
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
    {"push", push, METH_VARARGS, push_doc},
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
    pthread_atfork(NULL, NULL, forget_populater);
    return PyModule_Create(&module_def);
}
