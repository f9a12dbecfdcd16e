/*
 * flatmount.image._ctree: the tree cache decoder (flatmount.image.treecache) in one C pass, and the
 * layer merge of flatten (flatmount.flatten.merge; see its section below).
 *
 * Why: flattening a chain whose prefix is cached starts, in a new process, by decoding the prefix's
 * tree cache: 64k inodes, 60 ms in Python, most of it building the Inode objects through their
 * Python __init__ and the per-directory entry dicts.  Here the columns are read straight from the
 * bytes and each Inode's slots are filled in directly.
 *
 * The Python decoder (treecache._decode) is the specification: this one accepts exactly the files it
 * accepts and builds the same tree (tests/test_treecache.py runs both on the same inputs, hostile
 * ones included).  Every count, length and row number is checked against the bytes present before it
 * is used; a bad file raises ValueError (the caller turns it into FormatError), never a crash.  The
 * GIL is held throughout (every step builds Python objects).
 *
 * The Inode slots are written through their member descriptors' offsets, which the caller passes and
 * this module checks (object slots of that very type, writable, inside the instance): no __init__
 * runs, so the values set here must be what __init__ would set (an own empty xattrs dict, entries a
 * dict for directories and None otherwise).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define NSLOTS 12
/* slot order expected from the caller: Inode(mode, uid, gid, mtime_ns, size, rdev, xattrs, target,
 * content, digest, payload) plus entries */
enum { S_MODE, S_UID, S_GID, S_MTIME, S_SIZE, S_RDEV, S_XATTRS, S_TARGET, S_CONTENT, S_DIGEST,
       S_PAYLOAD, S_ENTRIES };

#define HAS_KIDS 1u
#define WIDE_MTIME 2u
#define NS 1000000000LL
#define IFMT 0170000u
#define IFDIR 0040000u

typedef struct {
    const unsigned char *data;
    uint64_t len;
    uint64_t pos;
} cursor;

static int fail(const char *msg)
{
    PyErr_SetString(PyExc_ValueError, msg);
    return -1;
}

/* `n` bytes at the cursor (advanced past them), or NULL with "truncated" set */
static const unsigned char *take(cursor *c, uint64_t n)
{
    if (n > c->len - c->pos) {
        fail("tree cache truncated");
        return NULL;
    }
    const unsigned char *p = c->data + c->pos;
    c->pos += n;
    return p;
}

/* an array of `n` items of `width` bytes */
static const unsigned char *take_array(cursor *c, uint64_t n, unsigned width)
{
    if (n > (c->len - c->pos) / width) {
        fail("tree cache truncated");
        return NULL;
    }
    return take(c, n * width);
}

static inline uint32_t rd32(const unsigned char *p, uint64_t i)
{
    uint32_t v;
    memcpy(&v, p + 4 * i, 4);
    return v;   /* (little-endian hosts only: checked at import) */
}

static inline uint64_t rd64(const unsigned char *p, uint64_t i)
{
    uint64_t v;
    memcpy(&v, p + 8 * i, 8);
    return v;
}

static int take_u32(cursor *c, uint32_t *out)
{
    const unsigned char *p = take(c, 4);
    if (p == NULL)
        return -1;
    *out = rd32(p, 0);
    return 0;
}

/* `k` strictly increasing row numbers below `limit` */
static const unsigned char *take_rows(cursor *c, uint32_t k, uint32_t limit)
{
    const unsigned char *rows = take_array(c, k, 4);
    if (rows == NULL)
        return NULL;
    if (k) {
        if (rd32(rows, k - 1) >= limit) {
            fail("tree cache: bad row numbers");
            return NULL;
        }
        for (uint32_t i = 1; i < k; i++)
            if (rd32(rows, i - 1) >= rd32(rows, i)) {
                fail("tree cache: bad row numbers");
                return NULL;
            }
    }
    return rows;
}

/* A NUL-separated column: its blob (length u32, bytes), which must split into exactly `k` values
 * (none at all when `k` is 0).  `*blob`, `*blen` describe it. */
static int take_sep(cursor *c, uint32_t k, const unsigned char **blob, uint32_t *blen)
{
    if (take_u32(c, blen) < 0)
        return -1;
    *blob = take(c, *blen);
    if (*blob == NULL)
        return -1;
    if (k == 0) {
        if (*blen)
            return fail("tree cache: values where none are listed");
        return 0;
    }
    uint64_t seps = 0;
    const unsigned char *p = *blob, *end = *blob + *blen;
    while (p < end && (p = memchr(p, 0, (size_t)(end - p))) != NULL) {
        seps++;
        p++;
    }
    if (seps != (uint64_t)k - 1)
        return fail("tree cache: value count does not match");
    return 0;
}

/* the next NUL-separated value from *p (`end`: the blob's end): its start and length */
static inline const unsigned char *next_sep(const unsigned char **p, const unsigned char *end, Py_ssize_t *n)
{
    const unsigned char *s = *p;
    const unsigned char *z = memchr(s, 0, (size_t)(end - s));
    if (z == NULL)
        z = end;
    *n = z - s;
    *p = z < end ? z + 1 : end;
    return s;
}

static Py_ssize_t slot_off[NSLOTS];

#define SLOT(obj, s) (*(PyObject **)((char *)(obj) + slot_off[s]))
/* store a new reference into a slot (the object owns it; any previous value is released) */
static inline void set_slot(PyObject *obj, int s, PyObject *v)
{
    PyObject *old = SLOT(obj, s);
    SLOT(obj, s) = v;
    Py_XDECREF(old);
}

/* The entries dict of directory `node` about to take `cnt` names: its own empty one, made big enough
 * at once for a big directory (no resizes on the way: a 64k-inode prefix has directories of
 * thousands of entries).  A dict that holds names already (a directory listed twice: refused later,
 * as by the Python decoder) stays as it is.  Borrowed; NULL on an error. */
static PyObject *entries_for(PyObject *node, uint32_t cnt)
{
    PyObject *ents = SLOT(node, S_ENTRIES);
#if PY_VERSION_HEX < 0x030D0000
    if (cnt > 8 && PyDict_CheckExact(ents) && PyDict_GET_SIZE(ents) == 0) {
        PyObject *d = _PyDict_NewPresized((Py_ssize_t)cnt);
        if (d == NULL)
            return NULL;
        set_slot(node, S_ENTRIES, d);
        ents = d;
    }
#else
    (void)cnt;
#endif
    return ents;
}

static int check_slots(PyTypeObject *type, PyObject *descrs)
{
    if (!PyTuple_Check(descrs) || PyTuple_GET_SIZE(descrs) != NSLOTS) {
        PyErr_SetString(PyExc_TypeError, "_ctree.decode: 12 slot descriptors expected");
        return -1;
    }
    if (type->tp_itemsize != 0 || !(type->tp_flags & Py_TPFLAGS_HEAPTYPE)) {
        PyErr_SetString(PyExc_TypeError, "_ctree.decode: not a slotted class");
        return -1;
    }
    for (int s = 0; s < NSLOTS; s++) {
        PyObject *d = PyTuple_GET_ITEM(descrs, s);
        if (!PyObject_TypeCheck(d, &PyMemberDescr_Type)) {
            PyErr_SetString(PyExc_TypeError, "_ctree.decode: not a member descriptor");
            return -1;
        }
        PyMemberDescrObject *m = (PyMemberDescrObject *)d;
        PyMemberDef *def = m->d_member;
        if (m->d_common.d_type != type || def->type != T_OBJECT_EX || (def->flags & READONLY)
                || def->offset < (Py_ssize_t)sizeof(PyObject)
                || def->offset + (Py_ssize_t)sizeof(PyObject *) > type->tp_basicsize) {
            PyErr_SetString(PyExc_TypeError, "_ctree.decode: not an object slot of that class");
            return -1;
        }
        for (int t = 0; t < s; t++)
            if (slot_off[t] == def->offset) {
                PyErr_SetString(PyExc_TypeError, "_ctree.decode: a slot given twice");
                return -1;
            }
        slot_off[s] = def->offset;
    }
    return 0;
}

/* a column of sparse values: `col[row]` = new reference or NULL */
typedef struct {
    const unsigned char *rows;
    uint32_t k;
} sparse;

/* Equal integers as one object: a small direct-mapped cache per decode (values repeat: the modes of
 * most files are the same few, and so are the mtimes of a layer's files, their owners and many sizes).
 * Integers are immutable, so which object a slot holds is not seen; tens of thousands of allocations
 * fewer (a 64k-inode prefix: ~2 MB of new memory less to fault in, ~10% of the decode). */
#define ICACHE 256
typedef struct {
    long long v;
    int sign;                        /* v was given as signed (mtime) or unsigned (the others) */
    PyObject *o;
} IntSlot;

static PyObject *cached_int(IntSlot *cache, long long v, int sign)
{
    if (sign ? (v >= -5 && v <= 256) : ((unsigned long long)v <= 256))   /* CPython's own small ints */
        return sign ? PyLong_FromLongLong(v) : PyLong_FromUnsignedLongLong((unsigned long long)v);
    IntSlot *s = &cache[((unsigned long long)v * 0x9E3779B97F4A7C15ULL) >> 56];
    if (s->o != NULL && s->v == v && s->sign == sign)
        return Py_NewRef(s->o);
    PyObject *o = sign ? PyLong_FromLongLong(v) : PyLong_FromUnsignedLongLong((unsigned long long)v);
    if (o == NULL)
        return NULL;
    Py_XSETREF(s->o, Py_NewRef(o));
    s->v = v;
    s->sign = sign;
    return o;
}

static PyObject *decode_impl(cursor *c, PyTypeObject *type)
{
    IntSlot ints[ICACHE];
    memset(ints, 0, sizeof(ints));
    PyObject *nodes = NULL, *result = NULL, *names = NULL;
    PyObject **target = NULL, **content = NULL, **digest = NULL, **payload = NULL, **xattrs = NULL;
    PyObject *nsobj = NULL;
    uint32_t *dirpos = NULL, *stack = NULL;
    unsigned char *seen = NULL;
    const unsigned char *cp;

    if ((cp = take(c, 16)) == NULL)
        return NULL;
    uint32_t n = rd32(cp, 0), ndirs = rd32(cp, 1), nents = rd32(cp, 2), flags = rd32(cp, 3);
    if (n == 0 || (flags & ~(HAS_KIDS | WIDE_MTIME)) || ndirs > n
            || (!(flags & HAS_KIDS) && nents != n - 1)) {
        fail("tree cache: bad counts");
        return NULL;
    }
    if (((uint64_t)n + ndirs + nents) * 4 > c->len) {
        fail("tree cache truncated");
        return NULL;
    }
    const unsigned char *modes, *uids, *gids, *mtimes, *sizes, *rdevs, *secs = NULL, *nsecs = NULL;
    if ((modes = take_array(c, n, 4)) == NULL || (uids = take_array(c, n, 4)) == NULL
            || (gids = take_array(c, n, 4)) == NULL || (mtimes = take_array(c, n, 8)) == NULL
            || (sizes = take_array(c, n, 8)) == NULL || (rdevs = take_array(c, n, 8)) == NULL)
        return NULL;
    if (flags & WIDE_MTIME) {
        if ((secs = take_array(c, n, 8)) == NULL || (nsecs = take_array(c, n, 4)) == NULL)
            return NULL;
        for (uint32_t i = 0; i < n; i++)
            if (rd32(nsecs, i) >= NS) {
                fail("tree cache: bad nanoseconds");
                return NULL;
            }
    }
    target = PyMem_Calloc(n, sizeof(PyObject *));
    content = PyMem_Calloc(n, sizeof(PyObject *));
    digest = PyMem_Calloc(n, sizeof(PyObject *));
    payload = PyMem_Calloc(n, sizeof(PyObject *));
    xattrs = PyMem_Calloc(n, sizeof(PyObject *));
    if (!target || !content || !digest || !payload || !xattrs) {
        PyErr_NoMemory();
        goto done;
    }
    /* the four sparse columns: target (sep), content (len), digest (fix32), payload (sep, text) */
    PyObject **cols[4] = {target, content, digest, payload};
    for (int a = 0; a < 4; a++) {
        uint32_t k;
        const unsigned char *rows;
        if (take_u32(c, &k) < 0 || (rows = take_rows(c, k, n)) == NULL)
            goto done;
        PyObject **col = cols[a];
        if (a == 2) {   /* fix32 */
            const unsigned char *blob = take_array(c, k, 32);
            if (blob == NULL)
                goto done;
            for (uint32_t i = 0; i < k; i++)
                if ((col[rd32(rows, i)] = PyBytes_FromStringAndSize((const char *)blob + 32 * (size_t)i, 32)) == NULL)
                    goto done;
        } else if (a == 1) {   /* len */
            const unsigned char *lens = take_array(c, k, 4);
            if (lens == NULL)
                goto done;
            uint64_t total = 0;
            for (uint32_t i = 0; i < k && total <= c->len; i++)   /* (stops before it could wrap) */
                total += rd32(lens, i);
            const unsigned char *blob = take(c, total);
            if (blob == NULL)
                goto done;
            for (uint32_t i = 0; i < k; i++) {
                uint32_t l = rd32(lens, i);
                if ((col[rd32(rows, i)] = PyBytes_FromStringAndSize((const char *)blob, l)) == NULL)
                    goto done;
                blob += l;
            }
        } else {   /* sep */
            const unsigned char *blob;
            uint32_t blen;
            if (take_sep(c, k, &blob, &blen) < 0)
                goto done;
            const unsigned char *p = blob, *end = blob + blen;
            for (uint32_t i = 0; i < k; i++) {
                Py_ssize_t l;
                const unsigned char *s = next_sep(&p, end, &l);
                PyObject *v = a == 3 ? PyUnicode_DecodeUTF8((const char *)s, l, "surrogateescape")
                                     : PyBytes_FromStringAndSize((const char *)s, l);
                if (v == NULL)
                    goto done;
                col[rd32(rows, i)] = v;
            }
        }
    }
    /* xattrs: rows, pair counts, name lengths, value lengths, then the bytes */
    {
        uint32_t k;
        const unsigned char *xrows, *xcounts, *klens, *vlens, *blob;
        if (take_u32(c, &k) < 0 || (xrows = take_rows(c, k, n)) == NULL
                || (xcounts = take_array(c, k, 4)) == NULL)
            goto done;
        uint64_t npairs = 0;
        for (uint32_t i = 0; i < k; i++)
            npairs += rd32(xcounts, i);
        if (npairs * 8 > c->len) {
            fail("tree cache truncated");
            goto done;
        }
        if ((klens = take_array(c, npairs, 4)) == NULL || (vlens = take_array(c, npairs, 4)) == NULL)
            goto done;
        uint64_t total = 0;
        for (uint64_t i = 0; i < npairs && total <= c->len; i++)   /* (stops before it could wrap) */
            total += (uint64_t)rd32(klens, i) + rd32(vlens, i);
        if ((blob = take(c, total)) == NULL)
            goto done;
        uint64_t pi = 0;
        for (uint32_t i = 0; i < k; i++) {
            uint32_t cnt = rd32(xcounts, i);
            if (cnt == 0) {
                fail("tree cache: an empty xattr set");
                goto done;
            }
            PyObject *d = PyDict_New();
            if (d == NULL)
                goto done;
            xattrs[rd32(xrows, i)] = d;
            for (uint32_t j = 0; j < cnt; j++, pi++) {
                uint32_t kl = rd32(klens, pi), vl = rd32(vlens, pi);
                PyObject *key = PyBytes_FromStringAndSize((const char *)blob, kl);
                PyObject *val = key ? PyBytes_FromStringAndSize((const char *)blob + kl, vl) : NULL;
                int r = val ? PyDict_SetItem(d, key, val) : -1;
                Py_XDECREF(key);
                Py_XDECREF(val);
                if (r < 0)
                    goto done;
                blob += (uint64_t)kl + vl;
            }
            if (PyDict_GET_SIZE(d) != (Py_ssize_t)cnt) {
                fail("tree cache: duplicate xattr names");
                goto done;
            }
        }
    }
    /* the inodes: what Inode(mode, uid, gid, mtime_ns, size, rdev, xattrs, target, content, digest,
     * payload) makes, slots filled in directly */
    if ((nodes = PyList_New(n)) == NULL)
        goto done;
    if (secs != NULL && (nsobj = PyLong_FromLongLong(NS)) == NULL)
        goto done;
    uint32_t dirrows = 0;
    for (uint32_t i = 0; i < n; i++) {
        PyObject *o = type->tp_alloc(type, 0);
        if (o == NULL)
            goto done;
        PyList_SET_ITEM(nodes, i, o);
        uint32_t mode = rd32(modes, i);
        PyObject *mt;
        if (secs != NULL) {
            PyObject *s = PyLong_FromLongLong((long long)rd64(secs, i));
            PyObject *prod = s ? PyNumber_Multiply(s, nsobj) : NULL;
            PyObject *ns = prod ? PyLong_FromUnsignedLong(rd32(nsecs, i)) : NULL;
            mt = ns ? PyNumber_Add(prod, ns) : NULL;
            Py_XDECREF(s);
            Py_XDECREF(prod);
            Py_XDECREF(ns);
        } else {
            mt = cached_int(ints, (long long)rd64(mtimes, i), 1);
        }
        PyObject *vals[6] = {cached_int(ints, mode, 0), cached_int(ints, rd32(uids, i), 0),
                             cached_int(ints, rd32(gids, i), 0), mt,
                             cached_int(ints, (long long)rd64(sizes, i), 0),
                             cached_int(ints, (long long)rd64(rdevs, i), 0)};
        int bad = 0;
        for (int s = 0; s < 6; s++) {
            if (vals[s] == NULL)
                bad = 1;
            set_slot(o, s, vals[s]);
        }
        if (bad)
            goto done;
        PyObject *x = xattrs[i];
        xattrs[i] = NULL;
        if (x == NULL && (x = PyDict_New()) == NULL)
            goto done;
        set_slot(o, S_XATTRS, x);
        PyObject *fields[4] = {target[i], content[i], digest[i], payload[i]};
        target[i] = content[i] = digest[i] = payload[i] = NULL;
        for (int s = 0; s < 4; s++) {
            PyObject *v = fields[s];
            if (v == NULL) {
                v = Py_None;
                Py_INCREF(v);
            }
            set_slot(o, S_TARGET + s, v);
        }
        PyObject *e;
        if ((mode & IFMT) == IFDIR) {
            dirrows++;
            if ((e = PyDict_New()) == NULL)
                goto done;
        } else {
            e = Py_None;
            Py_INCREF(e);
        }
        set_slot(o, S_ENTRIES, e);
    }
    const unsigned char *dirs, *counts;
    if ((dirs = take_rows(c, ndirs, n)) == NULL || (counts = take_array(c, ndirs, 4)) == NULL)
        goto done;
    uint64_t sum = 0;
    for (uint32_t i = 0; i < ndirs; i++)
        sum += rd32(counts, i);
    if (sum != nents) {
        fail("tree cache: entry counts do not add up");
        goto done;
    }
    const unsigned char *nblob;
    uint32_t nblen;
    if (take_sep(c, nents, &nblob, &nblen) < 0)
        goto done;
    if ((names = PyList_New(nents)) == NULL)
        goto done;
    {
        const unsigned char *p = nblob, *end = nblob + nblen;
        for (uint32_t i = 0; i < nents; i++) {
            Py_ssize_t l;
            const unsigned char *s = next_sep(&p, end, &l);
            if (l == 0 || memchr(s, '/', (size_t)l) != NULL || (l == 1 && s[0] == '.')
                    || (l == 2 && s[0] == '.' && s[1] == '.')) {
                fail("tree cache: bad entry name");
                goto done;
            }
            PyObject *v = PyBytes_FromStringAndSize((const char *)s, l);
            if (v == NULL)
                goto done;
            PyList_SET_ITEM(names, i, v);
        }
    }
    for (uint32_t i = 0; i < ndirs; i++)
        if ((rd32(modes, rd32(dirs, i)) & IFMT) != IFDIR) {
            fail("tree cache: directory rows do not match the directory list");
            goto done;
        }
    if (dirrows != ndirs) {
        fail("tree cache: directory rows do not match the directory list");
        goto done;
    }
    if (flags & HAS_KIDS) {
        const unsigned char *kids = take_array(c, nents, 4);
        if (kids == NULL)
            goto done;
        for (uint32_t i = 0; i < nents; i++) {
            uint32_t j = rd32(kids, i);
            if (j == 0 || j >= n) {
                fail("tree cache: bad entry row numbers");
                goto done;
            }
        }
        uint64_t p = 0;
        for (uint32_t i = 0; i < ndirs; i++) {
            uint32_t cnt = rd32(counts, i);
            PyObject *ents = entries_for(PyList_GET_ITEM(nodes, rd32(dirs, i)), cnt);
            if (ents == NULL)
                goto done;
            for (uint32_t j = 0; j < cnt; j++, p++)
                if (PyDict_SetItem(ents, PyList_GET_ITEM(names, p), PyList_GET_ITEM(nodes, rd32(kids, p))) < 0)
                    goto done;
            if (PyDict_GET_SIZE(ents) != (Py_ssize_t)cnt) {
                fail("tree cache: duplicate entry names");
                goto done;
            }
        }
        /* every directory reachable exactly once from the root (no cycles, no hardlinked dirs) */
        dirpos = PyMem_Malloc(sizeof(uint32_t) * (size_t)n);
        stack = PyMem_Malloc(sizeof(uint32_t) * ((size_t)ndirs + 1));
        seen = PyMem_Calloc(n, 1);
        if (!dirpos || !stack || !seen) {
            PyErr_NoMemory();
            goto done;
        }
        uint64_t start = 0;
        for (uint32_t i = 0; i < ndirs; i++)
            dirpos[rd32(dirs, i)] = i;   /* (only read for directory rows, all of which are listed) */
        uint64_t *first = PyMem_Malloc(sizeof(uint64_t) * ((size_t)ndirs + 1));
        if (first == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (uint32_t i = 0; i < ndirs; i++) {
            first[i] = start;
            start += rd32(counts, i);
        }
        uint32_t top = 0, reached = 0;
        int err = 0;
        if ((rd32(modes, 0) & IFMT) == IFDIR) {
            seen[0] = 1;
            reached = 1;
            stack[top++] = 0;
        }
        while (top && !err) {
            uint32_t d = dirpos[stack[--top]];
            for (uint64_t q = first[d]; q < first[d] + rd32(counts, d); q++) {
                uint32_t j = rd32(kids, q);
                if ((rd32(modes, j) & IFMT) != IFDIR)
                    continue;
                if (seen[j]) {
                    err = 1;
                    break;
                }
                seen[j] = 1;
                reached++;
                stack[top++] = j;   /* at most ndirs pushes: each directory row once */
            }
        }
        PyMem_Free(first);
        if (err) {
            fail("tree cache: a directory reachable twice");
            goto done;
        }
        if ((rd32(modes, 0) & IFMT) == IFDIR && reached != ndirs) {
            fail("tree cache: a directory unreachable from the root");
            goto done;
        }
    } else {
        uint32_t p = 1;
        for (uint32_t i = 0; i < ndirs; i++) {
            uint32_t d = rd32(dirs, i), cnt = rd32(counts, i);
            if (!(d < p)) {
                fail("tree cache: a directory before its parent");
                goto done;
            }
            PyObject *ents = entries_for(PyList_GET_ITEM(nodes, d), cnt);
            if (ents == NULL)
                goto done;
            for (uint32_t j = 0; j < cnt; j++)   /* p + cnt <= n: the counts add up to n - 1 */
                if (PyDict_SetItem(ents, PyList_GET_ITEM(names, p - 1 + j), PyList_GET_ITEM(nodes, p + j)) < 0)
                    goto done;
            if (PyDict_GET_SIZE(ents) != (Py_ssize_t)cnt) {
                fail("tree cache: duplicate entry names");
                goto done;
            }
            p += cnt;
        }
    }
    if (c->pos != c->len) {
        fail("tree cache: trailing bytes");
        goto done;
    }
    if ((rd32(modes, 0) & IFMT) != IFDIR) {
        fail("tree cache: the root is not a directory");
        goto done;
    }
    result = PyList_GET_ITEM(nodes, 0);
    Py_INCREF(result);
done:
    if (target) {
        for (uint32_t i = 0; i < n; i++) {
            Py_XDECREF(target[i]);
            Py_XDECREF(content[i]);
            Py_XDECREF(digest[i]);
            Py_XDECREF(payload[i]);
            Py_XDECREF(xattrs[i]);
        }
    }
    PyMem_Free(target);
    PyMem_Free(content);
    PyMem_Free(digest);
    PyMem_Free(payload);
    PyMem_Free(xattrs);
    PyMem_Free(dirpos);
    PyMem_Free(stack);
    PyMem_Free(seen);
    Py_XDECREF(nsobj);
    Py_XDECREF(names);
    Py_XDECREF(nodes);
    for (int k = 0; k < ICACHE; k++)
        Py_XDECREF(ints[k].o);
    return result;
}

PyDoc_STRVAR(decode_doc,
"decode(data, pos, inode_type, slots) -> root\n\n"
"The tree of a tree cache payload starting at `pos` of `data` (the header already checked);\n"
"`slots`: the member descriptors of inode_type's mode, uid, gid, mtime_ns, size, rdev, xattrs,\n"
"target, content, digest, payload and entries.  ValueError if the payload is not a valid one.");

static PyObject *decode(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos;
    PyObject *type, *descrs;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nO!O:decode", &view, &pos, &PyType_Type, &type, &descrs))
        return NULL;
    PyObject *out = NULL;
    if (check_slots((PyTypeObject *)type, descrs) == 0) {
        if (pos < 0 || pos > view.len) {
            fail("tree cache truncated");
        } else {
            cursor c = {(const unsigned char *)view.buf, (uint64_t)view.len, (uint64_t)pos};
            out = decode_impl(&c, (PyTypeObject *)type);
        }
    }
    PyBuffer_Release(&view);
    return out;
}

/* --- the layer merge: flatmount.flatten.merge._merge_deep in C ----------------------------------
 *
 * Why: flatten applies the new top layer to the cached prefix's tree in every new process; in Python
 * the per-directory work (a new Inode through __init__, the copies of two dicts, a call per level)
 * was 9-14 ms of the 64k-inode chain.  The Python code is the specification and the fallback: this
 * one takes only the common case, exact Inodes (the type given) whose mode is an int, exact dicts of
 * xattrs and entries, exact bytes names and opaque values, an int rdev, and returns None having
 * changed nothing (its new objects are dropped) on anything else, so that the Python code runs and
 * words any error.  No Python code runs here: every key is exact bytes, every value compared an
 * exact int or bytes.  Each new directory's dict operations come in the same order as in the Python
 * code, so the result equals its result dict for dict, order included (tests/test_flatten.py).
 */
enum { M_ERROR = -1, M_OTHER = 0, M_OK = 1 };

/* `o`'s mode, if `o` is an Inode of `type` with an int mode that fits */
static int inode_mode(PyObject *o, PyTypeObject *type, long long *mode)
{
    if (Py_TYPE(o) != type)
        return M_OTHER;
    PyObject *m = SLOT(o, S_MODE);
    if (m == NULL || !PyLong_CheckExact(m))
        return M_OTHER;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(m, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return M_OTHER;
    }
    *mode = v;
    return M_OK;
}

/* `_merged_shell(below, upper)` into *out (new reference): `upper`'s attributes without the opaque
 * marker over `below`'s entries (`below` NULL: none; an opaque `upper`: none either) */
static int merged_shell(PyTypeObject *type, PyObject *below, PyObject *upper, PyObject *opaque_name,
                        PyObject **out)
{
    PyObject *ux = SLOT(upper, S_XATTRS);
    if (ux == NULL || !PyDict_CheckExact(ux))
        return M_OTHER;
    for (int s = S_MODE; s <= S_MTIME; s++)
        if (SLOT(upper, s) == NULL)
            return M_OTHER;
    PyObject *ov = PyDict_GetItemWithError(ux, opaque_name);   /* borrowed */
    if (ov == NULL && PyErr_Occurred())
        return M_ERROR;
    if (ov != NULL && !PyBytes_CheckExact(ov))
        return M_OTHER;
    int opaque = ov != NULL && PyBytes_GET_SIZE(ov) == 1 && PyBytes_AS_STRING(ov)[0] == 'y';
    PyObject *be = NULL;
    if (!opaque && below != NULL) {
        be = SLOT(below, S_ENTRIES);
        if (be == NULL || !PyDict_CheckExact(be))
            return M_OTHER;
    }
    PyObject *x = PyDict_Copy(ux);
    if (x == NULL)
        return M_ERROR;
    if (ov != NULL && PyDict_DelItem(x, opaque_name) < 0) {
        Py_DECREF(x);
        return M_ERROR;
    }
    PyObject *e = be != NULL ? PyDict_Copy(be) : PyDict_New();
    if (e == NULL) {
        Py_DECREF(x);
        return M_ERROR;
    }
    PyObject *o = type->tp_alloc(type, 0);
    if (o == NULL) {
        Py_DECREF(x);
        Py_DECREF(e);
        return M_ERROR;
    }
    for (int s = S_MODE; s <= S_MTIME; s++)            /* the same objects, as Inode(upper.mode, ...) */
        set_slot(o, s, Py_NewRef(SLOT(upper, s)));
    PyObject *zero = PyLong_FromLong(0);               /* (a cached small int: never fails) */
    set_slot(o, S_SIZE, Py_NewRef(zero));
    set_slot(o, S_RDEV, zero);
    set_slot(o, S_XATTRS, x);
    for (int s = S_TARGET; s <= S_PAYLOAD; s++)
        set_slot(o, s, Py_NewRef(Py_None));
    set_slot(o, S_ENTRIES, e);
    *out = o;
    return M_OK;
}

typedef struct {
    PyObject *node;                                    /* a new directory (strong reference) ... */
    PyObject *upper;                                   /* ... and the layer's entries to merge into it */
} merge_item;

/* `_merge_deep(base, layer)` into *out, or M_OTHER / M_ERROR (then nothing is left of it) */
static int merge_impl(PyTypeObject *type, PyObject *base, PyObject *layer, PyObject *opaque_name,
                      PyObject **out)
{
    long long mode;
    int st = inode_mode(base, type, &mode);
    if (st != M_OK || (mode & IFMT) != IFDIR || (st = inode_mode(layer, type, &mode)) != M_OK
            || (mode & IFMT) != IFDIR)
        return M_OTHER;
    PyObject *le = SLOT(layer, S_ENTRIES);
    if (le == NULL || !PyDict_CheckExact(le))
        return M_OTHER;
    PyObject *root = NULL;
    if ((st = merged_shell(type, base, layer, opaque_name, &root)) != M_OK)
        return st;
    Py_ssize_t cap = 64, top = 0;
    merge_item *stack = PyMem_Malloc(cap * sizeof(merge_item));
    if (stack == NULL) {
        Py_DECREF(root);
        PyErr_NoMemory();
        return M_ERROR;
    }
    stack[top++] = (merge_item){Py_NewRef(root), le};
    st = M_OK;
    while (top > 0 && st == M_OK) {
        merge_item it = stack[--top];
        PyObject *entries = SLOT(it.node, S_ENTRIES);
        PyObject *name, *child;
        Py_ssize_t pos = 0;
        while (st == M_OK && PyDict_Next(it.upper, &pos, &name, &child)) {
            if (!PyBytes_CheckExact(name)) {
                st = M_OTHER;
                break;
            }
            if ((st = inode_mode(child, type, &mode)) != M_OK)
                break;
            long long fmt = mode & IFMT;
            if (fmt == IFDIR) {
                PyObject *ce = SLOT(child, S_ENTRIES);
                if (ce == NULL || !PyDict_CheckExact(ce)) {
                    st = M_OTHER;
                    break;
                }
                PyObject *old = PyDict_GetItemWithError(entries, name);   /* borrowed */
                long long om;
                if (old == NULL && PyErr_Occurred()) {
                    st = M_ERROR;
                    break;
                }
                if (old != NULL) {
                    if ((st = inode_mode(old, type, &om)) != M_OK)
                        break;
                    if ((om & IFMT) != IFDIR)
                        old = NULL;
                }
                PyObject *node;
                if ((st = merged_shell(type, old, child, opaque_name, &node)) != M_OK)
                    break;
                if (PyDict_SetItem(entries, name, node) < 0) {
                    Py_DECREF(node);
                    st = M_ERROR;
                    break;
                }
                if (PyDict_GET_SIZE(ce) == 0) {
                    Py_DECREF(node);
                    continue;
                }
                if (top == cap) {
                    merge_item *more = PyMem_Realloc(stack, 2 * cap * sizeof(merge_item));
                    if (more == NULL) {
                        Py_DECREF(node);
                        PyErr_NoMemory();
                        st = M_ERROR;
                        break;
                    }
                    stack = more;
                    cap *= 2;
                }
                stack[top++] = (merge_item){node, ce};     /* (the stack takes the reference) */
            } else if (fmt == 0020000) {                   /* a character device: a whiteout if 0:0 */
                PyObject *rdev = SLOT(child, S_RDEV);
                if (rdev == NULL || !PyLong_CheckExact(rdev)) {
                    st = M_OTHER;
                    break;
                }
                int zero = PyObject_Not(rdev);             /* (an exact int: no Python code) */
                if (zero < 0) {
                    st = M_ERROR;
                    break;
                }
                if (zero) {
                    if (PyDict_DelItem(entries, name) < 0) {
                        if (!PyErr_ExceptionMatches(PyExc_KeyError)) {
                            st = M_ERROR;
                            break;
                        }
                        PyErr_Clear();
                    }
                } else if (PyDict_SetItem(entries, name, child) < 0) {
                    st = M_ERROR;
                }
            } else if (PyDict_SetItem(entries, name, child) < 0) {
                st = M_ERROR;
            }
        }
        Py_DECREF(it.node);
    }
    while (top > 0)
        Py_DECREF(stack[--top].node);
    PyMem_Free(stack);
    if (st != M_OK) {
        Py_DECREF(root);
        return st;
    }
    *out = root;
    return M_OK;
}

PyDoc_STRVAR(merge_doc,
"merge(base, layer, inode_type, slots, opaque_name) -> root or None\n\n"
"flatmount.flatten.merge._merge_dir(base, layer): a new root directory, `layer` applied over `base`\n"
"(neither is changed; the result shares their untouched subtrees and leaves).  None where the trees\n"
"hold anything but the common case (see above): the caller then runs the Python code.  `slots`: as\n"
"for decode; `opaque_name`: the opaque marker's xattr name.");

static PyObject *merge(PyObject *self, PyObject *args)
{
    PyObject *base, *layer, *type, *descrs, *opaque_name;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOO!OO!:merge", &base, &layer, &PyType_Type, &type, &descrs,
                          &PyBytes_Type, &opaque_name))
        return NULL;
    if (check_slots((PyTypeObject *)type, descrs) < 0)
        return NULL;
    PyObject *root = NULL;
    int st = merge_impl((PyTypeObject *)type, base, layer, opaque_name, &root);
    if (st == M_ERROR)
        return NULL;
    if (st == M_OTHER) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return root;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, decode_doc},
    {"merge", merge, METH_VARARGS, merge_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "flatmount.image._ctree",
    "The tree cache decoder of flatmount.image.treecache and flatten's layer merge, compiled.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ctree(void)
{
    const uint16_t one = 1;
    if (*(const unsigned char *)&one != 1) {
        PyErr_SetString(PyExc_ImportError, "flatmount.image._ctree reads little-endian columns natively");
        return NULL;
    }
    return PyModule_Create(&module_def);
}
