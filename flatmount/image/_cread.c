/*
 * flatmount.image._cread: the compiled fast path of `Image.root()` (EROFS image -> Inode tree) and of
 * `write_dump` (Inode tree -> composefs dump text).
 *
 * Why: `flatmount dump` of a 64k-inode image spent ~0.45 s in two Python loops (one object per
 * inode, one format per line), 2.8x `composefs-info dump`; flatten, diff, gc and fsck read whole
 * trees the same way.  Here both loops run in C over the same rules.
 *
 * The pure-Python code (image/reader.py, image/dump.py) is the specification.  This module accepts
 * only what it fully understands: on ANY doubt (a bound that fails, a layout or xattr form it does not
 * take, whiteouts to convert, an object of an unexpected type in a tree) it gives up and returns None,
 * and the caller runs the Python path on the same input, so every diagnostic (CorruptImageError,
 * ValueError, TypeError) keeps one wording in one place.  Every offset and length read from an image
 * is checked against the image length before use; allocations are checked; the GIL is held throughout
 * (the work creates Python objects).
 *
 * `setup(Inode)` must be called once: the tree's class has __slots__, whose member offsets are read
 * from its descriptors so inodes are built and read without attribute lookups.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* EROFS layout (spec/EROFS.md; checked against flatmount.image.format by the module that loads us) */
#define SUPER_BLKSZ 4096            /* the writer's block size: dir_size's rule */
#define DIRENT_SIZE 12
#define DIR_INLINE_MAX 2048
#define SLOTBITS 5
#define COMPACT_SIZE 32
#define EXTENDED_SIZE 64
#define I_FORMAT_KNOWN 0xF
#define XHDR 12
#define NAME_LEN 255
#define PATH_MAX_ 4096
#define METACOPY_SIZE 36
#define NS 1000000000LL

#define S_IFMT_ 0170000
#define S_IFSOCK_ 0140000
#define S_IFLNK_ 0120000
#define S_IFREG_ 0100000
#define S_IFBLK_ 0060000
#define S_IFDIR_ 0040000
#define S_IFCHR_ 0020000
#define S_IFIFO_ 0010000

enum { L_PLAIN = 0, L_INLINE = 2, L_CHUNK = 4 };
enum { FT_REG = 1, FT_DIR = 2, FT_CHR = 3, FT_BLK = 4, FT_FIFO = 5, FT_SOCK = 6, FT_LNK = 7 };

/* Inode slots, in this order */
enum { F_MODE, F_UID, F_GID, F_MTIME, F_SIZE, F_RDEV, F_XATTRS, F_TARGET, F_CONTENT, F_DIGEST, F_PAYLOAD,
       F_ENTRIES, NFIELDS };
static const char *field_names[NFIELDS] = {"mode", "uid", "gid", "mtime_ns", "size", "rdev", "xattrs",
                                           "target", "content", "digest", "payload", "entries"};
static Py_ssize_t field_off[NFIELDS];
static PyTypeObject *inode_type;   /* strong reference, set by setup() */
static PyObject *hex_names[256];    /* b"00".."ff" */

#define SLOT(o, f) (*(PyObject **)((char *)(o) + field_off[f]))

static int ftype_of_mode(unsigned t)
{
    switch (t) {
    case S_IFREG_: return FT_REG;
    case S_IFDIR_: return FT_DIR;
    case S_IFCHR_: return FT_CHR;
    case S_IFBLK_: return FT_BLK;
    case S_IFIFO_: return FT_FIFO;
    case S_IFSOCK_: return FT_SOCK;
    case S_IFLNK_: return FT_LNK;
    default: return 0;
    }
}

static PyObject *setup(PyObject *self, PyObject *cls)
{
    (void)self;
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "setup() takes the Inode class");
        return NULL;
    }
    /* exactly the slots this module fills (a new field would be left unset by new_inode) */
    PyObject *declared = PyObject_GetAttrString(cls, "__slots__");
    if (declared == NULL)
        return NULL;
    int same = PyTuple_Check(declared) && PyTuple_GET_SIZE(declared) == NFIELDS;
    for (int i = 0; same && i < NFIELDS; i++) {
        PyObject *name = PyTuple_GET_ITEM(declared, i);
        same = PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, field_names[i]) == 0;
    }
    Py_DECREF(declared);
    if (!same) {
        PyErr_SetString(PyExc_TypeError, "Inode.__slots__ are not the fields _cread knows");
        return NULL;
    }
    Py_ssize_t offs[NFIELDS];
    for (int i = 0; i < NFIELDS; i++) {
        PyObject *d = PyObject_GetAttrString(cls, field_names[i]);
        if (d == NULL)
            return NULL;
        if (!Py_IS_TYPE(d, &PyMemberDescr_Type)
            || ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
            Py_DECREF(d);
            PyErr_Format(PyExc_TypeError, "Inode.%s is not a __slots__ member", field_names[i]);
            return NULL;
        }
        offs[i] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
    }
    memcpy(field_off, offs, sizeof offs);
    Py_INCREF(cls);
    Py_XSETREF(inode_type, (PyTypeObject *)cls);
    Py_RETURN_NONE;
}

/* A new inode with the defaults of Inode.__init__ (mode only); NULL on a Python error. */
static PyObject *new_inode(unsigned mode)
{
    PyObject *o = inode_type->tp_alloc(inode_type, 0);
    if (o == NULL)
        return NULL;
    PyObject *zero = PyLong_FromLong(0);
    PyObject *m = PyLong_FromUnsignedLong(mode);
    PyObject *x = PyDict_New();
    PyObject *e = (mode & S_IFMT_) == S_IFDIR_ ? PyDict_New() : Py_NewRef(Py_None);
    if (zero == NULL || m == NULL || x == NULL || e == NULL) {
        Py_XDECREF(zero);
        Py_XDECREF(m);
        Py_XDECREF(x);
        Py_XDECREF(e);
        /* the unset slots are NULL: dealloc copes */
        Py_DECREF(o);
        return NULL;
    }
    SLOT(o, F_MODE) = m;
    SLOT(o, F_UID) = Py_NewRef(zero);
    SLOT(o, F_GID) = Py_NewRef(zero);
    SLOT(o, F_MTIME) = Py_NewRef(zero);
    SLOT(o, F_SIZE) = Py_NewRef(zero);
    SLOT(o, F_RDEV) = zero;
    SLOT(o, F_XATTRS) = x;
    SLOT(o, F_TARGET) = Py_NewRef(Py_None);
    SLOT(o, F_CONTENT) = Py_NewRef(Py_None);
    SLOT(o, F_DIGEST) = Py_NewRef(Py_None);
    SLOT(o, F_PAYLOAD) = Py_NewRef(Py_None);
    SLOT(o, F_ENTRIES) = e;
    return o;
}

/* Replace slot f of o with the new reference v (NULL: a Python error, returns -1). */
static int set_slot(PyObject *o, int f, PyObject *v)
{
    if (v == NULL)
        return -1;
    Py_SETREF(SLOT(o, f), v);
    return 0;
}

/* ==================================== reader ==================================== */

static inline uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t le64(const unsigned char *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

enum { K_KEEP, K_ESCAPED, K_METACOPY, K_REDIRECT, K_DROP, K_WHITEOUT };

typedef struct {            /* one xattr name (index + suffix) as the Python reader names it */
    int idx;
    Py_ssize_t slen;
    char *suffix;
    PyObject *name;         /* full name */
    PyObject *stored;       /* the name in the tree (escaped overlay names unescaped) */
    uint32_t bit;           /* its name-filter bit */
    int kind;
} NameInfo;

#define MAX_NAMES 512
#define MAX_XATTRS 64       /* per inode; more: the Python path */

typedef struct {
    uint64_t nid, off, size, iu, xoff, xsize, data_off;
    unsigned mode, uid, gid, icount;
    int layout;
    int64_t mtime_ns;
} Rec;

typedef struct {
    uint64_t nid, parent;
    Rec rec;
    PyObject *node;         /* borrowed: owned by its parent's entries (the root: by the reader) */
    int is_root;
} DirJob;

typedef struct {
    const unsigned char *d;
    uint64_t n, meta, xbase, bs, nslots, max_dirents, dirents_seen;
    unsigned bits;
    int64_t epoch;
    int64_t build_nsec;
    int filter;
    PyObject *name_info;    /* callable (idx, suffix) -> (name, bit) */
    NameInfo names[MAX_NAMES];
    int nnames;
    PyObject **objs;        /* per nid: the non-directory inode built for it (strong refs) */
    unsigned char *seen;    /* per nid: 0, its file type (non-directory), or 0x80 (a directory) */
    DirJob *jobs;
    size_t njobs, capjobs;
    int giveup;             /* set (with no Python error) when the Python path must decide */
} Reader;

#define GIVEUP(r) do { (r)->giveup = 1; return -1; } while (0)

static int starts(PyObject *b, const char *p)
{
    size_t k = strlen(p);
    return (size_t)PyBytes_GET_SIZE(b) >= k && memcmp(PyBytes_AS_STRING(b), p, k) == 0;
}

static int equals(PyObject *b, const char *p)
{
    size_t k = strlen(p);
    return (size_t)PyBytes_GET_SIZE(b) == k && memcmp(PyBytes_AS_STRING(b), p, k) == 0;
}

/* The NameInfo of (idx, suffix); NULL: give up (r->giveup) or a Python error. */
static NameInfo *name_lookup(Reader *r, int idx, const unsigned char *suffix, Py_ssize_t slen)
{
    for (int i = 0; i < r->nnames; i++) {
        NameInfo *ni = &r->names[i];
        if (ni->idx == idx && ni->slen == slen && memcmp(ni->suffix, suffix, (size_t)slen) == 0)
            return ni;
    }
    if (r->nnames >= MAX_NAMES) {
        r->giveup = 1;
        return NULL;
    }
    PyObject *res = PyObject_CallFunction(r->name_info, "iy#", idx, (const char *)suffix, slen);
    if (res == NULL) {
        if (PyErr_ExceptionMatches(PyExc_Exception)) {   /* a bad name: the Python path says which */
            PyErr_Clear();
            r->giveup = 1;
        }
        return NULL;
    }
    PyObject *name;
    unsigned long bit;
    if (!PyTuple_Check(res) || PyTuple_GET_SIZE(res) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(res, 0))
        || !PyLong_Check(PyTuple_GET_ITEM(res, 1))) {
        Py_DECREF(res);
        PyErr_SetString(PyExc_TypeError, "name_info must return (bytes, int)");
        return NULL;
    }
    name = PyTuple_GET_ITEM(res, 0);
    bit = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(res, 1));
    if (PyErr_Occurred()) {
        Py_DECREF(res);
        return NULL;
    }
    NameInfo *ni = &r->names[r->nnames];
    ni->suffix = PyMem_Malloc(slen ? (size_t)slen : 1);
    if (ni->suffix == NULL) {
        Py_DECREF(res);
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(ni->suffix, suffix, (size_t)slen);
    ni->idx = idx;
    ni->slen = slen;
    ni->bit = (uint32_t)bit;
    ni->name = Py_NewRef(name);
    Py_DECREF(res);
    /* the writer's rewriting, undone as Image._make does */
    if (starts(name, "trusted.overlay.")) {
        if (starts(name, "trusted.overlay.overlay.")) {
            ni->stored = PyBytes_FromFormat("trusted.overlay.%s", PyBytes_AS_STRING(name) + 24);
            if (ni->stored == NULL) {
                Py_DECREF(ni->name);
                PyMem_Free(ni->suffix);
                return NULL;
            }
            if (PyBytes_GET_SIZE(ni->stored) != PyBytes_GET_SIZE(name) - 8) {   /* (a NUL: never here) */
                Py_DECREF(ni->stored);
                Py_DECREF(ni->name);
                PyMem_Free(ni->suffix);
                r->giveup = 1;
                return NULL;
            }
            ni->kind = equals(ni->stored, "trusted.overlay.whiteout") ? K_WHITEOUT : K_ESCAPED;
        } else if (equals(name, "trusted.overlay.metacopy")) {
            ni->stored = Py_NewRef(name);
            ni->kind = K_METACOPY;
        } else if (equals(name, "trusted.overlay.redirect")) {
            ni->stored = Py_NewRef(name);
            ni->kind = K_REDIRECT;
        } else {
            ni->stored = Py_NewRef(name);
            ni->kind = K_DROP;
        }
    } else {
        ni->stored = Py_NewRef(name);
        ni->kind = K_KEEP;
    }
    r->nnames++;
    return ni;
}

/* The on-disk inode `nid`, with the checks of Image._rec; -1: give up. */
static int read_rec(Reader *r, uint64_t nid, Rec *rec)
{
    const unsigned char *d = r->d;
    if (nid >= r->nslots)
        GIVEUP(r);
    uint64_t off = r->meta + (nid << SLOTBITS);
    if (off + COMPACT_SIZE > r->n)
        GIVEUP(r);
    const unsigned char *p = d + off;
    unsigned ifmt = le16(p);
    if (ifmt & ~I_FORMAT_KNOWN)
        GIVEUP(r);
    int layout = (int)(ifmt >> 1);
    uint64_t isize;
    rec->icount = le16(p + 2);
    rec->mode = le16(p + 4);
    if (ifmt & 1) {
        if (off + EXTENDED_SIZE > r->n)
            GIVEUP(r);
        rec->size = le64(p + 8);
        rec->iu = le32(p + 16);
        rec->uid = le32(p + 24);
        rec->gid = le32(p + 28);
        int64_t mtime = (int64_t)le64(p + 32);
        uint32_t nsec = le32(p + 40);
        if (nsec >= NS)
            GIVEUP(r);
        if (mtime > (INT64_MAX - NS) / NS || mtime < INT64_MIN / NS + 1)
            GIVEUP(r);   /* outside int64 nanoseconds: the Python path (big ints) */
        rec->mtime_ns = mtime * NS + nsec;
        isize = EXTENDED_SIZE;
    } else {
        rec->size = le32(p + 8);
        if (r->epoch > INT64_MAX / NS || r->epoch < INT64_MIN / NS)
            GIVEUP(r);
        int64_t secs = r->epoch + (int64_t)le32(p + 12);   /* (the epoch is signed: the oldest mtime) */
        if (secs > (INT64_MAX - NS) / NS || secs < INT64_MIN / NS + 1)
            GIVEUP(r);
        rec->mtime_ns = secs * NS + r->build_nsec;
        rec->iu = le32(p + 16);
        rec->uid = le16(p + 24);
        rec->gid = le16(p + 26);
        isize = COMPACT_SIZE;
    }
    unsigned t = rec->mode & S_IFMT_;
    if (!ftype_of_mode(t))
        GIVEUP(r);
    if (layout != L_PLAIN && layout != L_INLINE && layout != L_CHUNK)
        GIVEUP(r);
    if (layout == L_CHUNK && t != S_IFREG_)
        GIVEUP(r);
    rec->xsize = rec->icount ? XHDR + 4 * ((uint64_t)rec->icount - 1) : 0;
    rec->nid = nid;
    rec->off = off;
    rec->layout = layout;
    rec->xoff = off + isize;
    rec->data_off = rec->xoff + rec->xsize;
    if (rec->data_off > r->n)
        GIVEUP(r);
    return 0;
}

/* The data of a flat inode (Image._data) as new bytes; NULL: give up or a Python error. */
static PyObject *read_data(Reader *r, const Rec *rec)
{
    uint64_t size = rec->size, bs = r->bs, n = r->n;
    if (size == 0)
        return PyBytes_FromStringAndSize(NULL, 0);
    if (size > n) {
        r->giveup = 1;
        return NULL;
    }
    if (rec->layout == L_PLAIN) {
        uint64_t start = rec->iu * bs;
        if (start + size > n) {
            r->giveup = 1;
            return NULL;
        }
        return PyBytes_FromStringAndSize((const char *)r->d + start, (Py_ssize_t)size);
    }
    if (rec->layout != L_INLINE) {
        r->giveup = 1;
        return NULL;
    }
    uint64_t nb = (size + bs - 1) >> r->bits;
    uint64_t head = (nb - 1) * bs, tail = size - head, t0 = rec->data_off;
    if (t0 + tail > n || (t0 % bs) + tail > bs) {
        r->giveup = 1;
        return NULL;
    }
    if (!head)
        return PyBytes_FromStringAndSize((const char *)r->d + t0, (Py_ssize_t)tail);
    uint64_t start = rec->iu * bs;
    if (start + head > n) {
        r->giveup = 1;
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (out == NULL)
        return NULL;
    memcpy(PyBytes_AS_STRING(out), r->d + start, head);
    memcpy(PyBytes_AS_STRING(out) + head, r->d + t0, tail);
    return out;
}

typedef struct {
    NameInfo *ni;
    const unsigned char *value;
    uint16_t vlen;
} XEnt;

/* Read one xattr entry at p (bounded by end): -1 give up (or a Python error). */
static int xentry(Reader *r, uint64_t p, uint64_t end, XEnt *out, uint64_t *next)
{
    const unsigned char *d = r->d;
    if (p + 4 > end)
        GIVEUP(r);
    unsigned nlen = d[p], idx = d[p + 1], vlen = le16(d + p + 2);
    uint64_t q = p + 4 + nlen;
    if (q + vlen > end)
        GIVEUP(r);
    out->ni = name_lookup(r, (int)idx, d + p + 4, nlen);
    if (out->ni == NULL)
        return -1;
    out->value = d + q;
    out->vlen = (uint16_t)vlen;
    if (next)
        *next = (p + 4 + nlen + vlen + 3) & ~(uint64_t)3;
    return 0;
}

/* The Inode of record `rec` as Image._make builds it; NULL: give up or a Python error. */
static PyObject *make_inode(Reader *r, const Rec *rec)
{
    unsigned t = rec->mode & S_IFMT_;
    XEnt xs[MAX_XATTRS];
    int nx = 0;
    const unsigned char *d = r->d;
    if (rec->xsize) {
        uint64_t start = rec->xoff, end = start + rec->xsize, p;
        uint32_t filt = le32(d + start);
        unsigned shared = d[start + 4];
        p = start + XHDR;
        if (p + 4 * (uint64_t)shared > end) {
            r->giveup = 1;
            return NULL;
        }
        p += 4 * (uint64_t)shared;
        while (p < end) {
            if (nx == MAX_XATTRS) {
                r->giveup = 1;
                return NULL;
            }
            if (xentry(r, p, end, &xs[nx], &p) < 0)
                return NULL;
            nx++;
        }
        for (unsigned s = 0; s < shared; s++) {
            if (nx == MAX_XATTRS) {
                r->giveup = 1;
                return NULL;
            }
            uint64_t sp = r->xbase + 4 * (uint64_t)le32(d + start + XHDR + 4 * s);
            if (xentry(r, sp, r->n, &xs[nx], NULL) < 0)
                return NULL;
            nx++;
        }
        uint32_t bits = 0;
        for (int i = 0; i < nx; i++) {
            bits |= xs[i].ni->bit;
            for (int j = 0; j < i; j++) {
                PyObject *a = xs[i].ni->name, *b = xs[j].ni->name;
                if (a == b || (PyBytes_GET_SIZE(a) == PyBytes_GET_SIZE(b)
                               && memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), PyBytes_GET_SIZE(a)) == 0)) {
                    r->giveup = 1;   /* duplicate names */
                    return NULL;
                }
            }
        }
        if ((filt & bits) && r->filter) {
            r->giveup = 1;
            return NULL;
        }
    }
    PyObject *node = new_inode(rec->mode);
    if (node == NULL)
        return NULL;
    if (set_slot(node, F_UID, PyLong_FromUnsignedLong(rec->uid)) < 0
        || set_slot(node, F_GID, PyLong_FromUnsignedLong(rec->gid)) < 0
        || set_slot(node, F_MTIME, PyLong_FromLongLong(rec->mtime_ns)) < 0)
        goto error;
    const XEnt *metacopy = NULL, *redirect = NULL;
    PyObject *xattrs = SLOT(node, F_XATTRS);
    for (int i = 0; i < nx; i++) {
        NameInfo *ni = xs[i].ni;
        switch (ni->kind) {
        case K_METACOPY:
            if (t == S_IFREG_)
                metacopy = &xs[i];
            continue;
        case K_REDIRECT:
            if (t == S_IFREG_)
                redirect = &xs[i];
            continue;
        case K_DROP:
            continue;
        case K_WHITEOUT:
            if (t == S_IFREG_ && rec->layout != L_CHUNK) {
                r->giveup = 1;   /* a whiteout file, maybe: the Python path converts it */
                goto error;
            }
            break;
        default:
            break;
        }
        PyObject *v = PyBytes_FromStringAndSize((const char *)xs[i].value, xs[i].vlen);
        if (v == NULL)
            goto error;
        int rc = PyDict_SetItem(xattrs, ni->stored, v);
        Py_DECREF(v);
        if (rc < 0)
            goto error;
    }
    if (t == S_IFREG_) {
        if (rec->layout == L_CHUNK) {   /* Image._check_chunks */
            uint64_t cfmt = rec->iu & 0xFFFF;
            if (cfmt & ~(uint64_t)0x3F) {   /* 48-bit or unknown bits */
                r->giveup = 1;
                goto error;
            }
            unsigned cb = r->bits + (unsigned)(cfmt & 0x1F);
            uint64_t unit = (cfmt & 0x20) ? 8 : 4;
            uint64_t nchunks = (rec->size >> cb) + ((rec->size & (((uint64_t)1 << cb) - 1)) != 0);
            uint64_t start = (rec->data_off + unit - 1) / unit * unit;
            if (nchunks > r->n || start + nchunks * unit > r->n) {
                r->giveup = 1;
                goto error;
            }
            if (set_slot(node, F_SIZE, PyLong_FromUnsignedLongLong(rec->size)) < 0)
                goto error;
            if (metacopy && metacopy->vlen) {
                if (metacopy->vlen != METACOPY_SIZE || memcmp(metacopy->value, "\x00\x24\x00\x01", 4) != 0) {
                    r->giveup = 1;
                    goto error;
                }
                if (set_slot(node, F_DIGEST, PyBytes_FromStringAndSize((const char *)metacopy->value + 4, 32)) < 0)
                    goto error;
            }
            if (redirect) {
                if (redirect->vlen < 2 || redirect->value[0] != '/') {
                    r->giveup = 1;
                    goto error;
                }
                if (set_slot(node, F_PAYLOAD, PyUnicode_DecodeUTF8((const char *)redirect->value + 1,
                                                                   redirect->vlen - 1, "surrogateescape")) < 0)
                    goto error;
            }
        } else {
            PyObject *data = read_data(r, rec);
            if (data == NULL)
                goto error;
            Py_ssize_t len = PyBytes_GET_SIZE(data);
            if (set_slot(node, F_SIZE, PyLong_FromSsize_t(len)) < 0) {
                Py_DECREF(data);
                goto error;
            }
            if (len)
                Py_SETREF(SLOT(node, F_CONTENT), data);
            else
                Py_DECREF(data);
        }
    } else if (t == S_IFDIR_) {
        if (set_slot(node, F_SIZE, PyLong_FromUnsignedLongLong(rec->size)) < 0)
            goto error;
    } else if (t == S_IFLNK_) {
        if (!(rec->size > 0 && rec->size < PATH_MAX_)) {
            r->giveup = 1;
            goto error;
        }
        if (set_slot(node, F_TARGET, read_data(r, rec)) < 0
            || set_slot(node, F_SIZE, PyLong_FromUnsignedLongLong(rec->size)) < 0)
            goto error;
    } else if (t == S_IFCHR_ || t == S_IFBLK_) {
        if (set_slot(node, F_RDEV, PyLong_FromUnsignedLongLong(rec->iu)) < 0)
            goto error;
    }
    return node;
error:
    Py_DECREF(node);
    return NULL;
}

static int push_dir(Reader *r, uint64_t nid, uint64_t parent, const Rec *rec, PyObject *node, int is_root)
{
    if (r->njobs == r->capjobs) {
        size_t cap = r->capjobs ? 2 * r->capjobs : 256;
        DirJob *j = PyMem_Realloc(r->jobs, cap * sizeof(DirJob));
        if (j == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        r->jobs = j;
        r->capjobs = cap;
    }
    DirJob *j = &r->jobs[r->njobs++];
    j->nid = nid;
    j->parent = parent;
    j->rec = *rec;
    j->node = node;
    j->is_root = is_root;
    return 0;
}

static int is_hex_name(const unsigned char *s, size_t len)
{
    if (len != 2)
        return 0;
    for (int i = 0; i < 2; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

static int name_cmp(const unsigned char *a, size_t la, const unsigned char *b, size_t lb)
{
    int c = memcmp(a, b, la < lb ? la : lb);
    if (c)
        return c;
    return la < lb ? -1 : la > lb;
}

/* One entry (name, nid, file type) of directory `job`: -1 give up or a Python error. */
static int add_entry(Reader *r, DirJob *job, const unsigned char *name, size_t nlen, uint64_t cnid, unsigned ftype)
{
    PyObject *child;
    int skip = 0;
    if (cnid < r->nslots && r->seen[cnid]) {
        if (r->seen[cnid] == 0x80 || r->seen[cnid] != ftype)
            GIVEUP(r);   /* a directory linked again, or a type mismatch */
        child = r->objs[cnid];
    } else {
        Rec rec;
        if (read_rec(r, cnid, &rec) < 0)
            return -1;
        if ((unsigned)ftype_of_mode(rec.mode & S_IFMT_) != ftype)
            GIVEUP(r);
        child = make_inode(r, &rec);
        if (child == NULL)
            return -1;
        if (ftype == FT_DIR) {
            r->seen[cnid] = 0x80;
            if (push_dir(r, cnid, job->nid, &rec, child, 0) < 0) {
                Py_DECREF(child);
                return -1;
            }
            /* owned by the entries dict below */
            PyObject *key = PyBytes_FromStringAndSize((const char *)name, (Py_ssize_t)nlen);
            int rc = key ? PyDict_SetItem(SLOT(job->node, F_ENTRIES), key, child) : -1;
            Py_XDECREF(key);
            Py_DECREF(child);
            return rc;
        }
        r->seen[cnid] = (unsigned char)ftype;
        r->objs[cnid] = child;   /* the reference this function got */
    }
    if (job->is_root && ftype == FT_CHR && is_hex_name(name, nlen)) {
        PyObject *rdev = SLOT(child, F_RDEV);
        if (PyLong_CheckExact(rdev) && PyLong_AsLong(rdev) == 0)
            skip = 1;   /* the writer's own 00..ff root whiteouts */
    }
    if (skip)
        return 0;
    PyObject *key = PyBytes_FromStringAndSize((const char *)name, (Py_ssize_t)nlen);
    if (key == NULL)
        return -1;
    int rc = PyDict_SetItem(SLOT(job->node, F_ENTRIES), key, child);
    Py_DECREF(key);
    return rc;
}

/* Every block of directory `job` (Image._dirblock, _drop_dots and _fill's checks). */
static int read_dir(Reader *r, DirJob *job)
{
    const Rec *rec = &job->rec;
    uint64_t bs = r->bs, n = r->n, size = rec->size;
    if (size > n || size == 0)
        GIVEUP(r);
    uint64_t nb = (size + bs - 1) >> r->bits;
    const unsigned char *prev = (const unsigned char *)"";
    size_t prevlen = 0;
    int dots = 0;
    for (uint64_t b = 0; b < nb; b++) {
        uint64_t a, blen;
        if (rec->layout == L_INLINE && b == nb - 1) {
            a = rec->data_off;
            blen = size - b * bs;
            if (a + blen > n || (a % bs) + blen > bs)
                GIVEUP(r);
        } else if (rec->layout == L_PLAIN || rec->layout == L_INLINE) {
            a = (rec->iu + b) * bs;
            blen = size - b * bs < bs ? size - b * bs : bs;
            if (a + blen > n)
                GIVEUP(r);
        } else {
            GIVEUP(r);
        }
        if (blen < DIRENT_SIZE)
            GIVEUP(r);
        const unsigned char *blk = r->d + a;
        unsigned first = le16(blk + 8);
        if (first < DIRENT_SIZE || first % DIRENT_SIZE || first >= blen)
            GIVEUP(r);
        unsigned cnt = first / DIRENT_SIZE;
        r->dirents_seen += cnt;
        if (r->dirents_seen > r->max_dirents)
            GIVEUP(r);
        unsigned last = le16(blk + DIRENT_SIZE * (cnt - 1) + 8);
        if (last >= blen)
            GIVEUP(r);
        const unsigned char *z = memchr(blk + last, 0, blen - last);
        uint64_t end = z ? (uint64_t)(z - blk) : blen;
        if (last >= end || end <= first)
            GIVEUP(r);
        if (memchr(blk + first, '/', end - first) || memchr(blk + first, 0, end - first))
            GIVEUP(r);
        if (le16(blk + 8) != first)
            GIVEUP(r);
        for (unsigned k = 0; k < cnt; k++) {
            const unsigned char *de = blk + DIRENT_SIZE * k;
            unsigned o = le16(de + 8);
            uint64_t o2 = k + 1 < cnt ? le16(de + DIRENT_SIZE + 8) : end;
            if (o2 <= o || o2 - o > NAME_LEN)
                GIVEUP(r);
            unsigned ftype = de[10];
            if (ftype < FT_REG || ftype > FT_LNK)
                GIVEUP(r);
            const unsigned char *name = blk + o;
            size_t nlen = (size_t)(o2 - o);
            if (name_cmp(name, nlen, prev, prevlen) <= 0 && (k > 0 || b > 0))
                GIVEUP(r);   /* unsorted, in the block or across blocks */
            prev = name;
            prevlen = nlen;
            uint64_t cnid = le64(de);
            if (name[0] == '.' && (nlen == 1 || (nlen == 2 && name[1] == '.'))) {
                if (cnid != (nlen == 1 ? job->nid : job->parent) || ftype != FT_DIR)
                    GIVEUP(r);
                dots++;
                continue;
            }
            if (add_entry(r, job, name, nlen, cnid, ftype) < 0)
                return -1;
        }
    }
    if (dots != 2)
        GIVEUP(r);
    return 0;
}

static PyObject *read_tree(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer buf;
    unsigned long long meta, xbase, root_nid;
    long long epoch, build_nsec;
    unsigned bits;
    int filter;
    PyObject *name_info;
    if (inode_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_cread.setup() was not called");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y*KKILLKpO:read_tree", &buf, &meta, &xbase, &bits, &epoch, &build_nsec,
                          &root_nid, &filter, &name_info))
        return NULL;
    Reader *r = PyMem_Calloc(1, sizeof(Reader));
    if (r == NULL) {
        PyBuffer_Release(&buf);
        return PyErr_NoMemory();
    }
    PyObject *root = NULL;
    r->d = buf.buf;
    r->n = (uint64_t)buf.len;
    r->meta = meta;
    r->xbase = xbase;
    r->bits = bits;
    r->bs = (uint64_t)1 << bits;
    r->epoch = epoch;
    r->build_nsec = build_nsec;
    r->filter = filter;
    r->name_info = name_info;
    r->max_dirents = r->n / DIRENT_SIZE + 16;
    if (bits < 9 || bits > 12 || build_nsec < 0 || build_nsec >= NS || meta >= r->n) {
        r->giveup = 1;
        goto done;
    }
    r->nslots = ((r->n - meta) >> SLOTBITS) + 1;
    r->objs = PyMem_Calloc(r->nslots, sizeof(PyObject *));
    r->seen = PyMem_Calloc(r->nslots, 1);
    if (r->objs == NULL || r->seen == NULL) {   /* (a huge image): the Python reader, with its dicts */
        r->giveup = 1;
        goto done;
    }
    Rec rec;
    if (read_rec(r, root_nid, &rec) < 0)
        goto done;
    if ((rec.mode & S_IFMT_) != S_IFDIR_) {
        r->giveup = 1;
        goto done;
    }
    root = make_inode(r, &rec);
    if (root == NULL)
        goto done;
    r->seen[root_nid] = 0x80;
    if (push_dir(r, root_nid, root_nid, &rec, root, 1) < 0)
        goto done;
    while (r->njobs) {
        DirJob job = r->jobs[--r->njobs];
        if (read_dir(r, &job) < 0)
            goto done;
    }
done:
    if (r->objs) {
        for (uint64_t i = 0; i < r->nslots; i++)
            Py_XDECREF(r->objs[i]);
    }
    PyMem_Free(r->objs);
    PyMem_Free(r->seen);
    PyMem_Free(r->jobs);
    for (int i = 0; i < r->nnames; i++) {
        PyMem_Free(r->names[i].suffix);
        Py_DECREF(r->names[i].name);
        Py_DECREF(r->names[i].stored);
    }
    int giveup = r->giveup;
    PyMem_Free(r);
    PyBuffer_Release(&buf);
    if (PyErr_Occurred()) {
        Py_XDECREF(root);
        return NULL;
    }
    if (giveup) {
        Py_XDECREF(root);
        Py_RETURN_NONE;
    }
    return root;
}

/* ==================================== dump ==================================== */

typedef struct {
    char *p;
    size_t len, cap;
    PyObject *obj;   /* when set, `p` is this bytes object's buffer (the result, written in place) */
} Buf;

static int grow_slow(Buf *b, size_t extra);

static inline int grow(Buf *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    return grow_slow(b, extra);
}

static int grow_slow(Buf *b, size_t extra)
{
    size_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < b->len + extra) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    if (b->obj != NULL) {
        if (_PyBytes_Resize(&b->obj, (Py_ssize_t)cap) < 0) {   /* (frees it on failure) */
            b->p = NULL;
            return -1;
        }
        b->p = PyBytes_AS_STRING(b->obj);
        b->cap = cap;
        return 0;
    }
    char *p = PyMem_Realloc(b->p, cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int put(Buf *b, const char *s, size_t k)
{
    if (grow(b, k) < 0)
        return -1;
    memcpy(b->p + b->len, s, k);
    b->len += k;
    return 0;
}

static inline int putc_(Buf *b, char c)
{
    if (grow(b, 1) < 0)
        return -1;
    b->p[b->len++] = c;
    return 0;
}

static int put_u64(Buf *b, unsigned long long v)
{
    char tmp[24];
    int i = 24;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return put(b, tmp + i, (size_t)(24 - i));
}

static int put_oct(Buf *b, unsigned long long v)
{
    char tmp[24];
    int i = 24;
    do {
        tmp[--i] = (char)('0' + (v & 7));
        v >>= 3;
    } while (v);
    return put(b, tmp + i, (size_t)(24 - i));
}

static int put_i64(Buf *b, long long v)
{
    if (v < 0) {
        if (putc_(b, '-') < 0)
            return -1;
        return put_u64(b, (unsigned long long)0 - (unsigned long long)v);
    }
    return put_u64(b, (unsigned long long)v);
}

/* composefs-info's escaping (dump.py `escape`): bytes outside 0x21..0x7e as \xHH, except \\ \n \r \t;
 * `=` as \x3d when escape_equal. */
static int put_escaped(Buf *b, const unsigned char *s, size_t k, int escape_equal)
{
    /* per byte: 0 copied as is, 1 (`=`) escaped only in xattrs, 2 escaped */
    static unsigned char cls[256];
    static int ready;
    static const char hx[] = "0123456789abcdef";
    if (!ready) {
        for (int c = 0; c < 256; c++)
            cls[c] = (c >= 0x21 && c <= 0x7e && c != '\\') ? 0 : 2;
        cls['='] = 1;
        ready = 1;
    }
    if (grow(b, 4 * k) < 0)
        return -1;
    char *o = b->p + b->len;
    unsigned stop = escape_equal ? 1 : 2;   /* bytes of a class at or above this are escaped */
    size_t i = 0;
    while (i < k) {
        size_t j = i;
        while (j < k && cls[s[j]] < stop)
            j++;
        memcpy(o, s + i, j - i);
        o += j - i;
        if (j == k)
            break;
        unsigned c = s[j];
        *o++ = '\\';
        if (c == '\\')
            *o++ = '\\';
        else if (c == '\n')
            *o++ = 'n';
        else if (c == '\r')
            *o++ = 'r';
        else if (c == '\t')
            *o++ = 't';
        else {
            *o++ = 'x';
            *o++ = hx[c >> 4];
            *o++ = hx[c & 15];
        }
        i = j + 1;
    }
    b->len = (size_t)(o - b->p);
    return 0;
}

/* dump.py `escape_optional`: empty is `-`, a literal `-` is \x2d. */
static int put_optional(Buf *b, const unsigned char *s, size_t k)
{
    if (k == 0)
        return putc_(b, '-');
    if (k == 1 && s[0] == '-')
        return put(b, "\\x2d", 4);
    return put_escaped(b, s, k, 0);
}

static int put_hex(Buf *b, const unsigned char *s, size_t k)
{
    static const char hx[] = "0123456789abcdef";
    if (grow(b, 2 * k) < 0)
        return -1;
    char *o = b->p + b->len;
    for (size_t i = 0; i < k; i++) {
        *o++ = hx[s[i] >> 4];
        *o++ = hx[s[i] & 15];
    }
    b->len += 2 * k;
    return 0;
}

/* pointer -> (name count, where its first line's path is in the output) */
typedef struct {
    PyObject *key;
    Py_ssize_t count;
    size_t path_at, path_len;
    int written;
} Link;

typedef struct {
    Link *t;
    size_t cap, used;
} Links;

static inline size_t hash_ptr(PyObject *p) { return ((uintptr_t)p >> 4) * 0x9E3779B97F4A7C15ull; }

static Link *links_get(Links *l, PyObject *key, int add)
{
    if (add && 2 * (l->used + 1) > l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 1 << 12;
        Link *t = PyMem_Calloc(cap, sizeof(Link));
        if (t == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        for (size_t i = 0; i < l->cap; i++) {
            if (l->t[i].key) {
                size_t h = hash_ptr(l->t[i].key) & (cap - 1);
                while (t[h].key)
                    h = (h + 1) & (cap - 1);
                t[h] = l->t[i];
            }
        }
        PyMem_Free(l->t);
        l->t = t;
        l->cap = cap;
    }
    if (l->cap == 0)
        return NULL;
    size_t h = hash_ptr(key) & (l->cap - 1);
    while (l->t[h].key) {
        if (l->t[h].key == key)
            return &l->t[h];
        h = (h + 1) & (l->cap - 1);
    }
    if (!add)
        return NULL;
    l->t[h].key = key;
    l->used++;
    return &l->t[h];
}

typedef struct {
    Buf out;
    Links links;
    PyObject *root;
    int giveup;
    size_t dir_visits, names;
} Dumper;

#define DGIVEUP(dm) do { (dm)->giveup = 1; return -1; } while (0)

/* A slot of an inode, checked to be an exact int in int64 (else give up). */
static int get_int(Dumper *dm, PyObject *node, int f, long long *v)
{
    PyObject *o = SLOT(node, f);
    if (o == NULL || !PyLong_CheckExact(o))
        DGIVEUP(dm);
    int overflow;
    *v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (*v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        DGIVEUP(dm);
    }
    return 0;
}

/* The node's slots must all be set and its type exact (anything else: the Python path). */
static int check_node(Dumper *dm, PyObject *node)
{
    if (Py_TYPE(node) != inode_type)
        DGIVEUP(dm);
    for (int f = 0; f < NFIELDS; f++)
        if (SLOT(node, f) == NULL)
            DGIVEUP(dm);
    return 0;
}

/* _count_links: how many names each inode has (every directory entry counts). */
static int count_links(Dumper *dm)
{
    PyObject **stack = NULL;
    size_t sn = 0, scap = 0;
    int rc = -1;
#define SPUSH(x) do { if (sn == scap) { size_t c_ = scap ? 2 * scap : 1024; \
        PyObject **s_ = PyMem_Realloc(stack, c_ * sizeof(PyObject *)); \
        if (!s_) { PyErr_NoMemory(); goto out; } stack = s_; scap = c_; } stack[sn++] = (x); } while (0)
    SPUSH(dm->root);
    while (sn) {
        PyObject *node = stack[--sn];
        if (++dm->dir_visits > ((size_t)1 << 26)) {   /* a cycle: the Python path (which loops) decides */
            dm->giveup = 1;
            goto out;
        }
        PyObject *ents = SLOT(node, F_ENTRIES);
        if (!PyDict_CheckExact(ents)) {
            dm->giveup = 1;
            goto out;
        }
        dm->names += (size_t)PyDict_GET_SIZE(ents);
        Py_ssize_t pos = 0;
        PyObject *k, *child;
        while (PyDict_Next(ents, &pos, &k, &child)) {
            if (check_node(dm, child) < 0)
                goto out;
            Link *l = links_get(&dm->links, child, 1);
            if (l == NULL)
                goto out;
            l->count++;
            PyObject *ce = SLOT(child, F_ENTRIES);
            if (ce != Py_None) {
                if (!PyDict_CheckExact(ce)) {
                    dm->giveup = 1;
                    goto out;
                }
                if (PyDict_GET_SIZE(ce))
                    SPUSH(child);
            }
        }
    }
    rc = 0;
out:
    PyMem_Free(stack);
    return rc;
#undef SPUSH
}

typedef struct {
    const unsigned char *s;
    size_t len;
} Name;

static int cmp_name(const void *a, const void *b)
{
    const Name *x = a, *y = b;
    return name_cmp(x->s, x->len, y->s, y->len);
}

/* writer.dir_size: the EROFS i_size of a directory holding `names` (sorted), `.` and `..`, and for the
 * root the 00..ff whiteouts the writer adds: greedy packing of dirents into blocks. */
static int dir_size(Dumper *dm, PyObject *names, PyObject *ents, int is_root, long long *size)
{
    Py_ssize_t k = PyList_GET_SIZE(names);
    size_t total = (size_t)k + 2 + (is_root ? 256 : 0);
    Name *v = PyMem_Malloc(total * sizeof(Name));
    if (v == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t m = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *s = PyList_GET_ITEM(names, i);
        v[m].s = (const unsigned char *)PyBytes_AS_STRING(s);
        v[m++].len = (size_t)PyBytes_GET_SIZE(s);
    }
    if (is_root) {
        for (int h = 0; h < 256; h++) {
            int has = PyDict_Contains(ents, hex_names[h]);
            if (has < 0) {
                PyMem_Free(v);
                return -1;
            }
            if (!has) {
                v[m].s = (const unsigned char *)PyBytes_AS_STRING(hex_names[h]);
                v[m++].len = 2;
            }
        }
    }
    v[m].s = (const unsigned char *)".";
    v[m++].len = 1;
    v[m].s = (const unsigned char *)"..";
    v[m++].len = 2;
    qsort(v, m, sizeof(Name), cmp_name);
    /* run(e) = bytes of the first e entries; a block takes entries a..e-1 while run(e) - run(a) <= BLKSZ */
    size_t used = 0;
    for (size_t i = 0; i < m; i++)
        used += DIRENT_SIZE + v[i].len;
    long long nblocks = 0;
    if (used > SUPER_BLKSZ) {
        size_t a = 0, run_a = 0;
        for (;;) {
            size_t e = a, run_e = run_a;
            while (e < m && run_e + DIRENT_SIZE + v[e].len - run_a <= SUPER_BLKSZ) {
                run_e += DIRENT_SIZE + v[e].len;
                e++;
            }
            if (e == m) {
                used = run_e - run_a;
                break;
            }
            if (e == a) {   /* an entry larger than a block: the Python path decides */
                PyMem_Free(v);
                DGIVEUP(dm);
            }
            nblocks++;
            a = e;
            run_a = run_e;
        }
    }
    PyMem_Free(v);
    if (used > DIR_INLINE_MAX) {
        nblocks++;
        used = 0;
    }
    *size = nblocks * SUPER_BLKSZ + (long long)used;
    return 0;
}

static int put_mtime(Buf *b, long long ns)
{
    long long sec = ns / NS, nsec = ns % NS;
    if (nsec < 0) {   /* Python's divmod floors */
        nsec += NS;
        sec -= 1;
    }
    if (put_i64(b, sec) < 0 || putc_(b, '.') < 0)
        return -1;
    return put_i64(b, nsec);
}

static int cmp_item(const void *a, const void *b)
{
    PyObject *x = *(PyObject *const *)a, *y = *(PyObject *const *)b;
    PyObject *kx = PyTuple_GET_ITEM(x, 0), *ky = PyTuple_GET_ITEM(y, 0);
    int c = name_cmp((const unsigned char *)PyBytes_AS_STRING(kx), (size_t)PyBytes_GET_SIZE(kx),
                     (const unsigned char *)PyBytes_AS_STRING(ky), (size_t)PyBytes_GET_SIZE(ky));
    if (c)
        return c;
    PyObject *vx = PyTuple_GET_ITEM(x, 1), *vy = PyTuple_GET_ITEM(y, 1);
    return name_cmp((const unsigned char *)PyBytes_AS_STRING(vx), (size_t)PyBytes_GET_SIZE(vx),
                    (const unsigned char *)PyBytes_AS_STRING(vy), (size_t)PyBytes_GET_SIZE(vy));
}

static int put_xattrs(Dumper *dm, PyObject *xattrs)
{
    if (!PyDict_CheckExact(xattrs))
        DGIVEUP(dm);
    Py_ssize_t k = PyDict_GET_SIZE(xattrs);
    if (k == 0)
        return 0;
    PyObject *items = PyDict_Items(xattrs);
    if (items == NULL)
        return -1;
    int rc = -1;
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *it = PyList_GET_ITEM(items, i);
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(it, 0)) || !PyBytes_CheckExact(PyTuple_GET_ITEM(it, 1))) {
            dm->giveup = 1;
            goto out;
        }
    }
    qsort(((PyListObject *)items)->ob_item, (size_t)k, sizeof(PyObject *), cmp_item);
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *it = PyList_GET_ITEM(items, i);
        PyObject *key = PyTuple_GET_ITEM(it, 0), *val = PyTuple_GET_ITEM(it, 1);
        if (putc_(&dm->out, ' ') < 0
            || put_escaped(&dm->out, (const unsigned char *)PyBytes_AS_STRING(key), (size_t)PyBytes_GET_SIZE(key), 1) < 0
            || putc_(&dm->out, '=') < 0
            || put_escaped(&dm->out, (const unsigned char *)PyBytes_AS_STRING(val), (size_t)PyBytes_GET_SIZE(val), 1) < 0)
            goto out;
    }
    rc = 0;
out:
    Py_DECREF(items);
    return rc;
}

/* One line of `node` whose escaped path is `path` (dump.py `line`, and the `@`
 * form of a later name of a hardlinked inode).  `names`: a directory's sorted names. */
static int put_line(Dumper *dm, PyObject *node, const char *path, size_t path_len, PyObject *names,
                    int is_root)
{
    Buf *b = &dm->out;
    long long mode, uid, gid, rdev, mtime, size = 0, nlink;
    if (get_int(dm, node, F_MODE, &mode) < 0 || get_int(dm, node, F_UID, &uid) < 0
        || get_int(dm, node, F_GID, &gid) < 0 || get_int(dm, node, F_RDEV, &rdev) < 0
        || get_int(dm, node, F_MTIME, &mtime) < 0)
        return -1;
    if (mode < 0)
        DGIVEUP(dm);
    unsigned t = (unsigned)mode & S_IFMT_;
    PyObject *ents = SLOT(node, F_ENTRIES);
    if ((t == S_IFDIR_) != (ents != Py_None))
        DGIVEUP(dm);   /* a directory's mode without entries, or the reverse */
    const unsigned char *payload = NULL, *content = NULL;
    size_t plen = 0, clen = 0;
    PyObject *digest = NULL, *enc = NULL;
    Link *link = NULL;
    if (t == S_IFDIR_) {
        if (dir_size(dm, names, ents, is_root, &size) < 0)
            return -1;
        nlink = 2;
        Py_ssize_t pos = 0;
        PyObject *k, *c;
        while (PyDict_Next(ents, &pos, &k, &c))
            nlink += SLOT(c, F_ENTRIES) != Py_None;
    } else {
        link = links_get(&dm->links, node, 0);
        if (link == NULL)
            DGIVEUP(dm);
        nlink = link->count;
        if (t == S_IFREG_) {
            PyObject *c = SLOT(node, F_CONTENT), *pl = SLOT(node, F_PAYLOAD), *dg = SLOT(node, F_DIGEST);
            if (c != Py_None) {
                if (!PyBytes_CheckExact(c))
                    DGIVEUP(dm);
                content = (const unsigned char *)PyBytes_AS_STRING(c);
                clen = (size_t)PyBytes_GET_SIZE(c);
            }
            if (clen)
                size = (long long)clen;
            else if (get_int(dm, node, F_SIZE, &size) < 0)
                return -1;
            if (pl != Py_None) {
                if (!PyUnicode_CheckExact(pl))
                    DGIVEUP(dm);
                if (PyUnicode_READY(pl) < 0)
                    return -1;
                if (PyUnicode_IS_ASCII(pl)) {   /* its UTF-8 is its own bytes */
                    payload = (const unsigned char *)PyUnicode_DATA(pl);
                    plen = (size_t)PyUnicode_GET_LENGTH(pl);
                } else {
                    enc = PyUnicode_AsEncodedString(pl, "utf-8", "surrogateescape");
                    if (enc == NULL) {
                        if (!PyErr_ExceptionMatches(PyExc_Exception))
                            return -1;
                        PyErr_Clear();
                        DGIVEUP(dm);
                    }
                    payload = (const unsigned char *)PyBytes_AS_STRING(enc);
                    plen = (size_t)PyBytes_GET_SIZE(enc);
                }
            }
            if (dg != Py_None) {
                if (!PyBytes_CheckExact(dg)) {
                    Py_XDECREF(enc);
                    DGIVEUP(dm);
                }
                digest = dg;
            }
        } else if (t == S_IFLNK_) {
            PyObject *tg = SLOT(node, F_TARGET);
            if (tg == Py_None || !PyBytes_CheckExact(tg) || PyBytes_GET_SIZE(tg) == 0)
                DGIVEUP(dm);   /* dump.py raises ValueError for an empty target */
            payload = (const unsigned char *)PyBytes_AS_STRING(tg);
            plen = (size_t)PyBytes_GET_SIZE(tg);
            size = (long long)plen;
        } else if (get_int(dm, node, F_SIZE, &size) < 0) {
            return -1;
        }
    }
    int later = link != NULL && link->written;
    size_t line_at = b->len;
    int rc = -1;
    /* PATH SIZE MODE NLINK UID GID RDEV MTIME PAYLOAD CONTENT DIGEST [XATTRS] */
    if (put(b, path, path_len) < 0)
        goto out;
    if (putc_(b, ' ') < 0 || put_i64(b, size) < 0 || putc_(b, ' ') < 0 || (later && putc_(b, '@') < 0)
        || put_oct(b, (unsigned long long)mode) < 0 || putc_(b, ' ') < 0 || put_i64(b, nlink) < 0
        || putc_(b, ' ') < 0 || put_i64(b, uid) < 0 || putc_(b, ' ') < 0 || put_i64(b, gid) < 0
        || putc_(b, ' ') < 0 || put_i64(b, rdev) < 0 || putc_(b, ' ') < 0 || put_mtime(b, mtime) < 0
        || putc_(b, ' ') < 0)
        goto out;
    if (later) {
        if (grow(b, link->path_len) < 0)
            goto out;
        memcpy(b->p + b->len, b->p + link->path_at, link->path_len);
        b->len += link->path_len;
    } else if (payload == NULL && digest != NULL) {   /* the object path derived from the digest */
        Py_ssize_t dl = PyBytes_GET_SIZE(digest);
        const unsigned char *ds = (const unsigned char *)PyBytes_AS_STRING(digest);
        if (dl >= 1) {
            if (put_hex(b, ds, 1) < 0 || putc_(b, '/') < 0 || put_hex(b, ds + 1, (size_t)dl - 1) < 0)
                goto out;
        } else if (putc_(b, '/') < 0) {
            goto out;
        }
    } else if (put_optional(b, payload, plen) < 0) {
        goto out;
    }
    if (putc_(b, ' ') < 0 || put_optional(b, content, clen) < 0 || putc_(b, ' ') < 0)
        goto out;
    if (digest != NULL) {
        if (put_hex(b, (const unsigned char *)PyBytes_AS_STRING(digest), (size_t)PyBytes_GET_SIZE(digest)) < 0)
            goto out;
    } else if (putc_(b, '-') < 0) {
        goto out;
    }
    if (put_xattrs(dm, SLOT(node, F_XATTRS)) < 0 || putc_(b, '\n') < 0)
        goto out;
    if (link != NULL && !link->written) {
        link->written = 1;
        link->path_at = line_at;
        link->path_len = path_len;
    }
    rc = 0;
out:
    Py_XDECREF(enc);
    return rc;
}

/* Sorted names of a directory's entries (a new list); NULL: give up or an error. */
static PyObject *sorted_names(Dumper *dm, PyObject *ents)
{
    PyObject *names = PyDict_Keys(ents);
    if (names == NULL)
        return NULL;
    Py_ssize_t k = PyList_GET_SIZE(names);
    for (Py_ssize_t i = 0; i < k; i++) {
        if (!PyBytes_CheckExact(PyList_GET_ITEM(names, i))) {
            Py_DECREF(names);
            dm->giveup = 1;
            return NULL;
        }
    }
    if (PyList_Sort(names) < 0) {
        Py_DECREF(names);
        return NULL;
    }
    return names;
}

typedef struct {
    PyObject *names;   /* strong */
    PyObject *ents;    /* borrowed */
    Py_ssize_t next;
    size_t base_len;   /* this directory's escaped path in the path buffer */
} Frame;

static PyObject *dump(PyObject *self, PyObject *arg)
{
    (void)self;
    if (inode_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_cread.setup() was not called");
        return NULL;
    }
    Dumper dm;
    memset(&dm, 0, sizeof dm);
    dm.root = arg;
    Buf path = {NULL, 0, 0, NULL};
    Frame *frames = NULL;
    size_t nf = 0, capf = 0;
    PyObject *result = NULL;
    if (Py_TYPE(arg) != inode_type || check_node(&dm, arg) < 0 || SLOT(arg, F_ENTRIES) == Py_None) {
        dm.giveup = 1;
        goto done;
    }
    if (count_links(&dm) < 0)
        goto done;
    /* the text goes straight into the result, sized for the usual line (~140 bytes; pages never
     * written are never touched) */
    if (dm.names > (PY_SSIZE_T_MAX - 4096) / 256) {
        PyErr_NoMemory();
        goto done;
    }
    dm.out.cap = 192 * (dm.names + 1) + 4096;
    dm.out.obj = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)dm.out.cap);
    if (dm.out.obj == NULL)
        goto done;
    dm.out.p = PyBytes_AS_STRING(dm.out.obj);
    PyObject *names = sorted_names(&dm, SLOT(arg, F_ENTRIES));
    if (names == NULL)
        goto done;
    if (put_line(&dm, arg, "/", 1, names, 1) < 0) {
        Py_DECREF(names);
        goto done;
    }
    capf = 64;
    frames = PyMem_Malloc(capf * sizeof(Frame));
    if (frames == NULL) {
        Py_DECREF(names);
        PyErr_NoMemory();
        goto done;
    }
    frames[nf++] = (Frame){names, SLOT(arg, F_ENTRIES), 0, 0};
    while (nf) {
        Frame *f = &frames[nf - 1];
        if (f->next == PyList_GET_SIZE(f->names)) {
            Py_DECREF(f->names);
            nf--;
            continue;
        }
        PyObject *name = PyList_GET_ITEM(f->names, f->next++);
        PyObject *child = PyDict_GetItemWithError(f->ents, name);
        if (child == NULL) {
            if (!PyErr_Occurred())
                dm.giveup = 1;
            goto done;
        }
        /* the child's escaped path: its parent's, "/" and its escaped name (kept for its children) */
        path.len = f->base_len;
        if (putc_(&path, '/') < 0
            || put_escaped(&path, (const unsigned char *)PyBytes_AS_STRING(name), (size_t)PyBytes_GET_SIZE(name), 0) < 0)
            goto done;
        PyObject *cents = SLOT(child, F_ENTRIES);
        PyObject *cnames = NULL;
        if (cents != Py_None) {
            if (!PyDict_CheckExact(cents)) {
                dm.giveup = 1;
                goto done;
            }
            cnames = sorted_names(&dm, cents);
            if (cnames == NULL)
                goto done;
        }
        if (put_line(&dm, child, path.p, path.len, cnames, 0) < 0) {
            Py_XDECREF(cnames);
            goto done;
        }
        if (cnames != NULL) {
            if (PyList_GET_SIZE(cnames) == 0) {
                Py_DECREF(cnames);
                continue;
            }
            if (nf == capf) {
                Frame *nfr = PyMem_Realloc(frames, 2 * capf * sizeof(Frame));
                if (nfr == NULL) {
                    Py_DECREF(cnames);
                    PyErr_NoMemory();
                    goto done;
                }
                frames = nfr;
                capf *= 2;
            }
            frames[nf++] = (Frame){cnames, cents, 0, path.len};
        }
    }
    if (!dm.giveup && _PyBytes_Resize(&dm.out.obj, (Py_ssize_t)dm.out.len) == 0) {
        result = dm.out.obj;
        dm.out.obj = NULL;
    }
done:
    while (nf)
        Py_DECREF(frames[--nf].names);
    PyMem_Free(frames);
    PyMem_Free(path.p);
    Py_XDECREF(dm.out.obj);
    PyMem_Free(dm.links.t);
    if (PyErr_Occurred()) {
        Py_XDECREF(result);
        return NULL;
    }
    if (dm.giveup) {
        Py_XDECREF(result);
        Py_RETURN_NONE;
    }
    return result;
}

/* ---------------------------------------------------------------------------------------------- */
/* differing_chunks: flatmount/diff/changes.py `_differing_chunks`, for two diff index records' entry
 * hashes (16 bytes an entry): a walk of memcmp calls, not slices compared by halves in Python */

PyDoc_STRVAR(differing_chunks_doc,
"differing_chunks(a, b, size) -> list[int] | None\n\n"
"The indices, in order, of the `size`-byte chunks that differ between the bytes-like `a` and `b` of one\n"
"length, a multiple of `size`; None for anything else (the Python function, the specification, decides).");

static PyObject *differing_chunks(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer a, b;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "y*y*n:differing_chunks", &a, &b, &size))
        return NULL;
    PyObject *out;
    if (size <= 0 || a.len != b.len || a.len % size != 0) {
        out = Py_NewRef(Py_None);
    } else {
        out = PyList_New(0);
        const char *pa = a.buf, *pb = b.buf;
        for (Py_ssize_t i = 0, n = a.len / size; out != NULL && i < n; i++) {
            if (memcmp(pa + i * size, pb + i * size, (size_t)size) == 0)
                continue;
            PyObject *k = PyLong_FromSsize_t(i);
            if (k == NULL || PyList_Append(out, k) < 0)
                Py_CLEAR(out);
            Py_XDECREF(k);
        }
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return out;
}

static PyMethodDef methods[] = {
    {"setup", setup, METH_O, "setup(Inode): the tree class whose __slots__ the fast paths fill and read."},
    {"differing_chunks", differing_chunks, METH_VARARGS, differing_chunks_doc},
    {"read_tree", read_tree, METH_VARARGS,
     "read_tree(data, meta, xbase, blkbits, epoch, build_nsec, root_nid, filter, name_info) -> Inode | None\n"
     "The whole tree of a composefs image, or None: the Python reader must decide."},
    {"dump", dump, METH_O, "dump(root) -> bytes | None: the composefs dump text of a tree, or None: the "
                           "Python writer must decide."},
    {NULL, NULL, 0, NULL},
};

static int exec_module(PyObject *m)
{
    for (int h = 0; h < 256; h++) {
        if (hex_names[h] == NULL) {
            static const char hx[] = "0123456789abcdef";
            char two[2] = {hx[h >> 4], hx[h & 15]};
            hex_names[h] = PyBytes_FromStringAndSize(two, 2);
            if (hex_names[h] == NULL)
                return -1;
        }
    }
    if (PyModule_AddIntConstant(m, "BLKSZ", SUPER_BLKSZ) < 0
        || PyModule_AddIntConstant(m, "DIRENT_SIZE", DIRENT_SIZE) < 0
        || PyModule_AddIntConstant(m, "DIR_INLINE_MAX", DIR_INLINE_MAX) < 0
        || PyModule_AddIntConstant(m, "INODE_COMPACT_SIZE", COMPACT_SIZE) < 0
        || PyModule_AddIntConstant(m, "INODE_EXTENDED_SIZE", EXTENDED_SIZE) < 0
        || PyModule_AddIntConstant(m, "I_FORMAT_KNOWN", I_FORMAT_KNOWN) < 0
        || PyModule_AddIntConstant(m, "NAME_LEN", NAME_LEN) < 0
        || PyModule_AddIntConstant(m, "PATH_MAX", PATH_MAX_) < 0
        || PyModule_AddIntConstant(m, "METACOPY_SIZE", METACOPY_SIZE) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "flatmount.image._cread",
    "Compiled fast paths of the EROFS reader and the dump writer (see _cread.c).", 0, methods, slots,
    NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cread(void)
{
    return PyModuleDef_Init(&module_def);
}
