/*
 * flatmount.image._cwrite: compiled fast paths of `mkimage --from-dump` (issue 17).
 *
 * Why: parsing a 64k-line composefs dump into the Inode tree and the writer's per-inode passes are
 * tight loops over small objects; in Python they cost several times what mkcomposefs takes for the
 * whole image.
 *
 * The rule of this module: it handles the valid, common case only.  On ANY problem (a syntax error,
 * an unsupported field, a value out of range, an allocation failure of its own scratch memory) a
 * function gives up by returning None, and the caller runs the pure-Python code (flatmount/image/dump.py,
 * flatmount/image/writer.py) on the same input.  The Python code is the specification and the one
 * place that words every diagnostic; this file never raises an error of its own about the input
 * (only MemoryError and errors of the Python objects it is handed propagate).
 *
 * Written from the dump format of spec/STORES.md section 4 and the Python reference; no code of
 * composefs or erofs-utils is used.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define MAX_LINE 65535
#define MAX_CONTENT 5000
#define NSEC 1000000000LL

#define S_IFMT_ 0170000
#define S_IFDIR_ 0040000
#define S_IFREG_ 0100000
#define S_IFLNK_ 0120000

/* An exact int as a C long long without a call for the common small ones (one or two digits, read
 * directly); anything bigger goes through PyLong_AsLongLongAndOverflow.  1: read; 0: out of the
 * long long range; -1: an exception.  Every column read of the writer passes comes through here. */
static inline __attribute__((always_inline)) int long_ll(PyObject *v, long long *out)
{
#if PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30
    Py_ssize_t sz = Py_SIZE(v);
    const digit *d = ((PyLongObject *)v)->ob_digit;
    switch (sz) {
    case 0: *out = 0; return 1;
    case 1: *out = (long long)d[0]; return 1;
    case -1: *out = -(long long)d[0]; return 1;
    case 2: *out = (long long)d[0] | ((long long)d[1] << 30); return 1;
    case -2: *out = -((long long)d[0] | ((long long)d[1] << 30)); return 1;
    default: break;
    }
#elif PY_VERSION_HEX >= 0x030C0000
    if (PyUnstable_Long_IsCompact((PyLongObject *)v)) {
        *out = (long long)PyUnstable_Long_CompactValue((PyLongObject *)v);
        return 1;
    }
#endif
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (overflow)
        return 0;
    *out = x;
    return 1;
}

/* ---------------------------------------------------------------------------------------------- */
/* Inode slots: the offsets of the `__slots__` members of flatmount.image.tree.Inode, read from its
 * member descriptors, so new inodes are filled without running __init__ (a Python call per inode). */

enum { F_MODE, F_UID, F_GID, F_MTIME, F_SIZE, F_RDEV, F_XATTRS, F_TARGET, F_CONTENT, F_DIGEST,
       F_PAYLOAD, F_ENTRIES, NFIELDS };
static const char *const field_names[NFIELDS] = {
    "mode", "uid", "gid", "mtime_ns", "size", "rdev", "xattrs", "target", "content", "digest",
    "payload", "entries"};

typedef struct {
    PyTypeObject *type;
    Py_ssize_t off[NFIELDS];
} InodeInfo;

/* 0 and the offsets filled in, or -1 (no exception set) when `cls` is not the slotted class expected */
static int inode_info(PyObject *cls, InodeInfo *info)
{
    if (!PyType_Check(cls))
        return -1;
    info->type = (PyTypeObject *)cls;
    if (info->type->tp_dictoffset != 0 || info->type->tp_alloc == NULL)
        return -1;
    PyObject *dict = info->type->tp_dict;
    for (int i = 0; i < NFIELDS; i++) {
        PyObject *d = PyDict_GetItemString(dict, field_names[i]);   /* borrowed */
        if (d == NULL || !Py_IS_TYPE(d, &PyMemberDescr_Type))
            return -1;
        PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
        if (m->type != T_OBJECT_EX || (m->flags & READONLY))
            return -1;
        info->off[i] = m->offset;
    }
    return 0;
}

#define SLOT(obj, info, f) (*(PyObject **)((char *)(obj) + (info)->off[f]))

/* Prefetching.  The writer's passes are bound by memory latency, not work: every inode, and the int,
 * bytes and dict objects its slots point to, lie scattered over the heap, and each pass meets them in
 * queue order.  A pass asks for the inode PF_AHEAD places ahead, and for the objects of the one
 * PF_AHEAD / 2 ahead (whose own line was asked for earlier); hints only, no side effect. */
#define PF_AHEAD 16

static inline void prefetch_item(PyObject *list, Py_ssize_t i)
{
    if (i < PyList_GET_SIZE(list))
        __builtin_prefetch(PyList_GET_ITEM(list, i));
}

/* the objects of the inode at `i` of `nodes` that the passes read (only for the class `info` describes:
 * slot offsets mean nothing in another object) */
static inline void prefetch_slots(PyObject *nodes, Py_ssize_t i, const InodeInfo *info, int f1, int f2, int f3,
                                  int f4)
{
    if (i >= PyList_GET_SIZE(nodes))
        return;
    PyObject *node = PyList_GET_ITEM(nodes, i);
    if (Py_TYPE(node) != info->type)
        return;
    __builtin_prefetch(SLOT(node, info, f1));
    __builtin_prefetch(SLOT(node, info, f2));
    __builtin_prefetch(SLOT(node, info, f3));
    __builtin_prefetch(SLOT(node, info, f4));
}

/* set slot `f` of a new inode, stealing `v` (NULL: the slot keeps None) */
static inline void set_slot(PyObject *obj, const InodeInfo *info, int f, PyObject *v)
{
    PyObject **p = &SLOT(obj, info, f);
    PyObject *old = *p;
    *p = v;
    Py_XDECREF(old);
}

/* a new inode of `mode` (`mode_obj`: that int, or NULL) with every other field at its __init__
 * default; NULL on error (set) */
static PyObject *new_inode(const InodeInfo *info, long mode, PyObject *mode_obj)
{
    PyObject *obj = info->type->tp_alloc(info->type, 0);
    if (obj == NULL)
        return NULL;
    PyObject *m = mode_obj ? Py_NewRef(mode_obj) : PyLong_FromLong(mode);
    PyObject *zero = PyLong_FromLong(0);
    PyObject *x = PyDict_New();
    PyObject *e = (mode & S_IFMT_) == S_IFDIR_ ? PyDict_New() : Py_NewRef(Py_None);
    if (m == NULL || zero == NULL || x == NULL || e == NULL) {
        Py_XDECREF(m); Py_XDECREF(zero); Py_XDECREF(x); Py_XDECREF(e);
        Py_DECREF(obj);
        return NULL;
    }
    set_slot(obj, info, F_MODE, m);
    set_slot(obj, info, F_UID, Py_NewRef(zero));
    set_slot(obj, info, F_GID, Py_NewRef(zero));
    set_slot(obj, info, F_MTIME, Py_NewRef(zero));
    set_slot(obj, info, F_SIZE, Py_NewRef(zero));
    set_slot(obj, info, F_RDEV, zero);
    set_slot(obj, info, F_XATTRS, x);
    set_slot(obj, info, F_TARGET, Py_NewRef(Py_None));
    set_slot(obj, info, F_CONTENT, Py_NewRef(Py_None));
    set_slot(obj, info, F_DIGEST, Py_NewRef(Py_None));
    set_slot(obj, info, F_PAYLOAD, Py_NewRef(Py_None));
    set_slot(obj, info, F_ENTRIES, e);
    return obj;
}

/* ---------------------------------------------------------------------------------------------- */
/* dump fields */

typedef struct {
    const char *p;
    Py_ssize_t n;
} Span;

static inline int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* undo the dump escapes of `in` into `out` (room for in.n bytes); the new length, or -1 when an
 * escape is malformed (the Python parser words that error) */
static Py_ssize_t unescape(Span in, char *out)
{
    Py_ssize_t o = 0;
    for (Py_ssize_t i = 0; i < in.n; i++) {
        unsigned char c = (unsigned char)in.p[i];
        if (c != '\\') {
            out[o++] = (char)c;
            continue;
        }
        if (i + 1 >= in.n)
            return -1;
        unsigned char e = (unsigned char)in.p[++i];
        if (e == '\\')
            out[o++] = '\\';
        else if (e == 'n')
            out[o++] = '\n';
        else if (e == 'r')
            out[o++] = '\r';
        else if (e == 't')
            out[o++] = '\t';
        else if (e == 'x') {
            if (i + 2 >= in.n)
                return -1;
            int h = hexval((unsigned char)in.p[i + 1]), l = hexval((unsigned char)in.p[i + 2]);
            if (h < 0 || l < 0)
                return -1;
            out[o++] = (char)(h << 4 | l);
            i += 2;
        } else
            return -1;
    }
    return o;
}

/* a field, unescaped into the scratch buffer when it holds a backslash; 0, or -1 (malformed) */
static int field_value(Span in, char **scratch, Span *out)
{
    if (memchr(in.p, '\\', (size_t)in.n) == NULL) {
        *out = in;
        return 0;
    }
    Py_ssize_t n = unescape(in, *scratch);
    if (n < 0)
        return -1;
    out->p = *scratch;
    out->n = n;
    *scratch += n;
    return 0;
}

static inline int is_dash(Span s)
{
    return s.n == 1 && s.p[0] == '-';
}

/* a decimal field of at most 18 digits (Python's `isdigit` then `int`); -1 when not (or too long
 * for this fast path) */
static long long decimal(Span s)
{
    if (s.n < 1 || s.n > 18)
        return -1;
    long long v = 0;
    for (Py_ssize_t i = 0; i < s.n; i++) {
        unsigned char c = (unsigned char)s.p[i];
        if (c < '0' || c > '9')
            return -1;
        v = v * 10 + (c - '0');
    }
    return v;
}

/* the MODE field: octal st_mode of a known file type, or -1 */
static long parse_mode(Span s)
{
    if (s.n < 1 || s.n > 12)
        return -1;
    long v = 0;
    for (Py_ssize_t i = 0; i < s.n; i++) {
        unsigned char c = (unsigned char)s.p[i];
        if (c < '0' || c > '7')
            return -1;
        v = v * 8 + (c - '0');
    }
    if (v > 0177777)
        return -1;
    switch (v & S_IFMT_) {
    case 0010000: case 0020000: case 0040000: case 0060000: case 0100000: case 0120000: case 0140000:
        return v;
    default:
        return -1;
    }
}

/* the MTIME field `[-]SEC.NSEC` (NSEC < 10^9) as ns in *out; 0, or -1 */
static int parse_mtime(Span s, long long *out)
{
    const char *dot = memchr(s.p, '.', (size_t)s.n);
    if (dot == NULL)
        return -1;
    Span sec = {s.p, dot - s.p}, ns = {dot + 1, s.n - (dot - s.p) - 1};
    int neg = 0;
    if (sec.n > 0 && sec.p[0] == '-') {
        neg = 1;
        sec.p++;
        sec.n--;
    }
    long long sv = decimal(sec);
    if (sv < 0 || sv > 9000000000LL)        /* larger seconds: the Python path (big ints) */
        return -1;
    if (ns.n < 1)
        return -1;
    long long nv = 0;
    for (Py_ssize_t i = 0; i < ns.n; i++) {
        unsigned char c = (unsigned char)ns.p[i];
        if (c < '0' || c > '9')
            return -1;
        nv = nv * 10 + (c - '0');
        if (nv >= NSEC)
            return -1;
    }
    *out = (neg ? -sv : sv) * NSEC + nv;
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* parse_dump */

typedef struct {
    InodeInfo info;
    PyObject *dirs;          /* unescaped dir path -> directory inode; b"" is the root */
    PyObject *root;          /* borrowed from dirs */
    PyObject *fixups;        /* list of _Fixup */
    PyObject *fixup_cls;
    PyObject *last_ents;     /* borrowed: entries of the last parent */
    char *last_parent;       /* its path (malloc'd, capacity MAX_LINE + 1) */
    Py_ssize_t last_parent_n;
    int have_last;
    char *scratch;           /* unescaped fields of the current line */
    PyObject *modes[16];     /* memo: one int object per recent MODE value (as the Python parser keeps) */
} Parser;

/* the int object of `mode`, shared by the inodes of that mode; NULL on error (set) */
static PyObject *mode_object(Parser *ps, long mode)
{
    PyObject **slot = &ps->modes[((unsigned long)mode * 2654435761UL >> 7) & 15];
    if (*slot != NULL && PyLong_AsLong(*slot) == mode)
        return *slot;
    PyObject *m = PyLong_FromLong(mode);
    if (m == NULL)
        return NULL;
    Py_XSETREF(*slot, m);
    return m;
}

enum { OK = 0, GIVE_UP = 1, FAIL = -1 };

/* What a pass returns once cleaned up: NULL after an error (set), None where it gave up (the
 * Python pass runs on the same input and words any error), else its result. */
static PyObject *pass_outcome(int r, PyObject *result)
{
    if (r == FAIL)
        return NULL;
    if (r == GIVE_UP)
        Py_RETURN_NONE;
    return result;
}

/* the entries dict of the parent directory of `path` (not "/"), and its name; GIVE_UP when the
 * parent is not a known directory or the name is empty, `.` or `..` */
static int parent_of(Parser *ps, Span path, PyObject **ents, Span *name)
{
    if (path.n < 2 || path.p[0] != '/')
        return GIVE_UP;
    const char *slash = path.p + path.n - 1;
    while (*slash != '/')
        slash--;
    Span parent = {path.p, slash - path.p};
    name->p = slash + 1;
    name->n = path.n - parent.n - 1;
    if (name->n == 0 || (name->n == 1 && name->p[0] == '.')
            || (name->n == 2 && name->p[0] == '.' && name->p[1] == '.'))
        return GIVE_UP;
    if (ps->have_last && parent.n == ps->last_parent_n && memcmp(parent.p, ps->last_parent, (size_t)parent.n) == 0) {
        *ents = ps->last_ents;
        return OK;
    }
    PyObject *key = PyBytes_FromStringAndSize(parent.p, parent.n);
    if (key == NULL)
        return FAIL;
    PyObject *dir = PyDict_GetItemWithError(ps->dirs, key);   /* borrowed */
    Py_DECREF(key);
    if (dir == NULL)
        return PyErr_Occurred() ? FAIL : GIVE_UP;
    PyObject *e = SLOT(dir, &ps->info, F_ENTRIES);
    if (e == NULL || !PyDict_CheckExact(e))
        return GIVE_UP;
    memcpy(ps->last_parent, parent.p, (size_t)parent.n);
    ps->last_parent_n = parent.n;
    ps->last_ents = e;
    ps->have_last = 1;
    *ents = e;
    return OK;
}

/* add `node` under `name` to `ents`; GIVE_UP on a duplicate name */
static int add_entry(PyObject *ents, Span name, PyObject *node)
{
    PyObject *key = PyBytes_FromStringAndSize(name.p, name.n);
    if (key == NULL)
        return FAIL;
    PyObject *got = PyDict_SetDefault(ents, key, node);   /* borrowed */
    Py_DECREF(key);
    if (got == NULL)
        return FAIL;
    return got == node ? OK : GIVE_UP;
}

/* `PATH SIZE @MODE NLINK UID GID RDEV MTIME PAYLOAD ...`: a placeholder inode and a fixup
 * (resolved by the Python `_resolve_hardlinks`, which words its errors) */
static int hardlink_line(Parser *ps, Py_ssize_t lineno, Span *f)
{
    Span mode_f = {f[2].p + 1, f[2].n - 1};
    long mode = parse_mode(mode_f);
    if (mode < 0 || (mode & S_IFMT_) == S_IFDIR_)
        return GIVE_UP;
    char *scratch = ps->scratch;
    Span path, target;
    if (field_value(f[0], &scratch, &path) < 0 || is_dash(f[8]) || field_value(f[8], &scratch, &target) < 0)
        return GIVE_UP;
    if (memchr(path.p, 0, (size_t)path.n) || memchr(target.p, 0, (size_t)target.n))
        return GIVE_UP;
    /* `target.strip(b"/") == path.strip(b"/")`: a hardlink to itself, worded by Python */
    Span a = path, b = target;
    while (a.n && a.p[0] == '/') { a.p++; a.n--; }
    while (a.n && a.p[a.n - 1] == '/') a.n--;
    while (b.n && b.p[0] == '/') { b.p++; b.n--; }
    while (b.n && b.p[b.n - 1] == '/') b.n--;
    if (a.n == b.n && memcmp(a.p, b.p, (size_t)a.n) == 0)
        return GIVE_UP;
    PyObject *ents;
    Span name;
    int r = parent_of(ps, path, &ents, &name);
    if (r != OK)
        return r;
    PyObject *node = new_inode(&ps->info, mode, NULL);
    if (node == NULL)
        return FAIL;
    r = add_entry(ents, name, node);
    if (r != OK) {
        Py_DECREF(node);
        return r;
    }
    PyObject *fix = PyObject_CallFunction(ps->fixup_cls, "nOy#y#O", lineno, ents, name.p, name.n,
                                          target.p, target.n, node);
    Py_DECREF(node);
    if (fix == NULL)
        return FAIL;
    r = PyList_Append(ps->fixups, fix);
    Py_DECREF(fix);
    return r < 0 ? FAIL : OK;
}

static PyObject *bytes_of(Span s)
{
    return PyBytes_FromStringAndSize(s.p, s.n);
}

/* one line of 11 or more fields (`nf` counts them; xattr items start at f[11]) */
static int inode_line(Parser *ps, Span *f, Py_ssize_t nf)
{
    long mode = parse_mode(f[2]);
    if (mode < 0)
        return GIVE_UP;
    long long uid = decimal(f[4]), gid = decimal(f[5]), rdev = decimal(f[6]), mtime;
    if (decimal(f[3]) < 0 || uid < 0 || gid < 0 || rdev < 0 || parse_mtime(f[7], &mtime) < 0)
        return GIVE_UP;
    long long size = decimal(f[1]);
    if (size < 0)
        return GIVE_UP;

    char *scratch = ps->scratch;
    Span path, payload = {NULL, 0}, content = {NULL, 0}, digest = {NULL, 0};
    int has_payload = !is_dash(f[8]), has_content = !is_dash(f[9]), has_digest = !is_dash(f[10]);
    if (field_value(f[0], &scratch, &path) < 0
            || (has_payload && field_value(f[8], &scratch, &payload) < 0)
            || (has_content && field_value(f[9], &scratch, &content) < 0)
            || (has_digest && field_value(f[10], &scratch, &digest) < 0))
        return GIVE_UP;
    if (memchr(path.p, 0, (size_t)path.n) || (has_payload && memchr(payload.p, 0, (size_t)payload.n)))
        return GIVE_UP;

    long ftype = mode & S_IFMT_;
    long long sz = 0;
    if (ftype == S_IFREG_) {
        sz = size;
        if (has_content && (has_payload || has_digest || content.n != sz || sz > MAX_CONTENT))
            return GIVE_UP;
        if (has_digest && digest.n != 64)
            return GIVE_UP;
    } else if (ftype == S_IFDIR_) {
        if (has_payload || has_content || has_digest)
            return GIVE_UP;
    } else if (ftype == S_IFLNK_) {
        if (!has_payload || has_content || has_digest)
            return GIVE_UP;
        sz = payload.n;
    } else {
        sz = size;
        if (has_payload || has_content || has_digest)
            return GIVE_UP;
    }

    int is_root = path.n == 1 && path.p[0] == '/';
    PyObject *ents = NULL;
    Span name;
    if (is_root) {
        if (ftype != S_IFDIR_ || ps->root != NULL)
            return GIVE_UP;
    } else {
        int r = parent_of(ps, path, &ents, &name);
        if (r != OK)
            return r;
    }

    PyObject *mode_obj = mode_object(ps, mode);
    PyObject *node = mode_obj ? new_inode(&ps->info, mode, mode_obj) : NULL;
    if (node == NULL)
        return FAIL;
    int r = FAIL;
    /* xattrs: KEY=VALUE items (a single trailing empty item, from a trailing space, is tolerated) */
    Py_ssize_t nx = nf - 11;
    if (nx > 0 && f[nf - 1].n == 0)
        nx--;
    if (nx > 0) {
        PyObject *xd = SLOT(node, &ps->info, F_XATTRS);
        for (Py_ssize_t k = 0; k < nx; k++) {
            Span it = f[11 + k];
            const char *eq = memchr(it.p, '=', (size_t)it.n);
            if (eq == NULL || eq == it.p) {
                r = GIVE_UP;
                goto out;
            }
            Span rk = {it.p, eq - it.p}, rv = {eq + 1, it.n - (eq - it.p) - 1}, key, value;
            if (field_value(rk, &scratch, &key) < 0 || field_value(rv, &scratch, &value) < 0
                    || memchr(key.p, 0, (size_t)key.n)) {
                r = GIVE_UP;
                goto out;
            }
            PyObject *kb = bytes_of(key), *vb = kb ? bytes_of(value) : NULL;
            if (vb == NULL) {
                Py_XDECREF(kb);
                goto out;
            }
            int dup = PyDict_Contains(xd, kb);
            int e = dup == 0 ? PyDict_SetItem(xd, kb, vb) : 0;
            Py_DECREF(kb);
            Py_DECREF(vb);
            if (dup < 0 || e < 0)
                goto out;
            if (dup) {
                r = GIVE_UP;
                goto out;
            }
        }
    }
    if (ftype == S_IFREG_) {
        if (has_content) {
            PyObject *c = bytes_of(content);
            if (c == NULL)
                goto out;
            set_slot(node, &ps->info, F_CONTENT, c);
        }
        if (has_payload) {
            PyObject *s = PyUnicode_DecodeUTF8(payload.p, payload.n, "surrogateescape");
            if (s == NULL)
                goto out;
            set_slot(node, &ps->info, F_PAYLOAD, s);
        }
        if (has_digest) {
            unsigned char d[32];
            for (int k = 0; k < 32; k++) {
                int h = hexval((unsigned char)digest.p[2 * k]), l = hexval((unsigned char)digest.p[2 * k + 1]);
                if (h < 0 || l < 0) {
                    r = GIVE_UP;
                    goto out;
                }
                d[k] = (unsigned char)(h << 4 | l);
            }
            PyObject *db = PyBytes_FromStringAndSize((const char *)d, 32);
            if (db == NULL)
                goto out;
            set_slot(node, &ps->info, F_DIGEST, db);
        }
    } else if (ftype == S_IFLNK_) {
        PyObject *t = bytes_of(payload);
        if (t == NULL)
            goto out;
        set_slot(node, &ps->info, F_TARGET, t);
    }
    {
        const long long vals[] = {uid, gid, mtime, sz, rdev};
        const int slots[] = {F_UID, F_GID, F_MTIME, F_SIZE, F_RDEV};
        for (size_t k = 0; k < sizeof(vals) / sizeof(vals[0]); k++) {
            PyObject *v = PyLong_FromLongLong(vals[k]);
            if (v == NULL)
                goto out;
            set_slot(node, &ps->info, slots[k], v);
        }
    }
    if (is_root) {
        PyObject *key = PyBytes_FromStringAndSize("", 0);
        if (key == NULL)
            goto out;
        int e = PyDict_SetItem(ps->dirs, key, node);
        Py_DECREF(key);
        if (e < 0)
            goto out;
        ps->root = node;
        r = OK;
        goto out;
    }
    r = add_entry(ents, name, node);
    if (r == OK && ftype == S_IFDIR_) {
        PyObject *key = bytes_of(path);
        if (key == NULL || PyDict_SetItem(ps->dirs, key, node) < 0)
            r = FAIL;
        Py_XDECREF(key);
    }
out:
    Py_DECREF(node);
    return r;
}

#define MAX_FIELDS (MAX_LINE / 2 + 2)

PyDoc_STRVAR(parse_dump_doc,
"parse_dump(data, inode_cls, fixup_cls) -> (root, fixups) or None\n\n"
"The tree of a composefs dump (bytes, not gzipped), built as flatmount.image.dump._parse_lines builds\n"
"it, with the `@` hardlink lines as fixups for its _resolve_hardlinks.  None when the input is anything\n"
"but valid and common (the caller then runs the Python parser, which words the error).");

static PyObject *parse_dump(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer buf;
    PyObject *inode_cls, *fixup_cls;
    if (!PyArg_ParseTuple(args, "y*OO:parse_dump", &buf, &inode_cls, &fixup_cls))
        return NULL;
    Parser ps;
    memset(&ps, 0, sizeof ps);
    PyObject *result = NULL;
    Span *f = NULL;
    int r = GIVE_UP;
    if (inode_info(inode_cls, &ps.info) < 0)
        goto done;
    const char *data = buf.buf;
    Py_ssize_t n = buf.len;
    if (n == 0 || memchr(data, 0, (size_t)n) != NULL)
        goto done;
    ps.fixup_cls = fixup_cls;
    ps.dirs = PyDict_New();
    ps.fixups = PyList_New(0);
    ps.last_parent = PyMem_Malloc(MAX_LINE + 1);
    ps.scratch = PyMem_Malloc(MAX_LINE + 1);
    f = PyMem_Malloc(sizeof(Span) * MAX_FIELDS);
    if (ps.dirs == NULL || ps.fixups == NULL || ps.last_parent == NULL || ps.scratch == NULL || f == NULL) {
        r = FAIL;
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t pos = 0, lineno = 0;
    r = OK;
    while (pos < n && r == OK) {
        const char *start = data + pos;
        const char *nl = memchr(start, '\n', (size_t)(n - pos));
        Py_ssize_t len = nl ? nl - start : n - pos;
        pos += len + 1;
        lineno++;
        if (len == 0 || len > MAX_LINE) {
            r = GIVE_UP;
            break;
        }
        Py_ssize_t nf = 0;
        const char *p = start, *end = start + len;
        for (;;) {
            const char *sp = memchr(p, ' ', (size_t)(end - p));
            f[nf].p = p;
            f[nf].n = (sp ? sp : end) - p;
            nf++;
            if (sp == NULL)
                break;
            p = sp + 1;
        }
        if (nf >= 3 && f[2].n > 0 && f[2].p[0] == '@') {
            if (nf < 9)
                r = GIVE_UP;
            else
                r = hardlink_line(&ps, lineno, f);
        } else if (nf < 11)
            r = GIVE_UP;
        else
            r = inode_line(&ps, f, nf);
    }
    if (r == OK && ps.root == NULL)
        r = GIVE_UP;
    if (r == OK)
        result = PyTuple_Pack(2, ps.root, ps.fixups);
done:
    for (int k = 0; k < 16; k++)
        Py_XDECREF(ps.modes[k]);
    PyMem_Free(f);
    PyMem_Free(ps.scratch);
    PyMem_Free(ps.last_parent);
    Py_XDECREF(ps.fixups);
    Py_XDECREF(ps.dirs);
    PyBuffer_Release(&buf);
    return pass_outcome(r, result);
}

/* ---------------------------------------------------------------------------------------------- */
/* emit_inodes: flatmount/image/writer.py `_emit_inodes` (pass 6) for the inodes the layout placed */

#define BLKSZ 4096
#define SLOTBITS 5
#define COMPACT 32
#define EXTENDED 64
#define XHDR 12
#define XID 4
#define XENT 4
#define DIRENT 12
#define MAX_SHARED 128
#define LAYOUT_CHUNK (4 << 1)       /* DataLayout.CHUNK_BASED << I_DATALAYOUT_BIT */
#define CHUNK_FORMAT_MASK 0xFFFFLL
#define CHUNK_ENTRY_SIZE 4

static const unsigned char metacopy_header[4] = {0x00, 0x24, 0x00, 0x01};

static inline void put16(unsigned char *p, unsigned long long v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static inline void put32(unsigned char *p, unsigned long long v) { for (int k = 0; k < 4; k++) p[k] = (unsigned char)(v >> (8 * k)); }
static inline void put64(unsigned char *p, unsigned long long v) { for (int k = 0; k < 8; k++) p[k] = (unsigned char)(v >> (8 * k)); }

typedef struct {
    unsigned char *buf;
    Py_ssize_t len;
} Out;

/* room for `n` bytes at `off`? */
static inline int fits(const Out *o, long long off, long long n)
{
    return off >= 0 && n >= 0 && off <= o->len && n <= o->len - off;
}

/* a list item as a C integer; GIVE_UP when it is not an int in [lo, hi] (FAIL: an exception) */
static inline __attribute__((always_inline)) int item_ll(PyObject *list, Py_ssize_t i, long long lo, long long hi, long long *out)
{
    PyObject *v = PyList_GET_ITEM(list, i);
    if (!PyLong_CheckExact(v))
        return GIVE_UP;
    long long x;
    int got = long_ll(v, &x);
    if (got < 0)
        return FAIL;
    if (!got || x < lo || x > hi)
        return GIVE_UP;
    *out = x;
    return OK;
}

/* the facts `_keyinfo` keeps of an xattr name: (index, suffix, filter bit, suffix length) */
typedef struct {
    long index;
    const char *suffix;
    Py_ssize_t nlen;
    unsigned long long bit;
} KeyInfo;

static int key_info(PyObject *keyinfo, PyObject *name, KeyInfo *ki)
{
    PyObject *t = PyDict_GetItemWithError(keyinfo, name);
    if (t == NULL)
        return PyErr_Occurred() ? FAIL : GIVE_UP;
    if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 4 || !PyBytes_CheckExact(PyTuple_GET_ITEM(t, 1)))
        return GIVE_UP;
    ki->index = PyLong_AsLong(PyTuple_GET_ITEM(t, 0));
    ki->bit = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 2));
    if (PyErr_Occurred())
        return FAIL;
    ki->suffix = PyBytes_AS_STRING(PyTuple_GET_ITEM(t, 1));
    ki->nlen = PyBytes_GET_SIZE(PyTuple_GET_ITEM(t, 1));
    if (ki->index < 0 || ki->index > 255 || ki->nlen > 255 || ki->bit > 0xFFFFFFFFULL)
        return GIVE_UP;
    return OK;
}

/* one inline xattr entry at `p` (head, suffix, value; the padding is already zero); its padded size */
static long long put_entry(unsigned char *p, const KeyInfo *ki, const char *v, Py_ssize_t vlen)
{
    p[0] = (unsigned char)ki->nlen;
    p[1] = (unsigned char)ki->index;
    put16(p + 2, (unsigned long long)vlen);
    memcpy(p + XENT, ki->suffix, (size_t)ki->nlen);
    memcpy(p + XENT + ki->nlen, v, (size_t)vlen);
    return (XENT + ki->nlen + vlen + 3) & ~3LL;
}

/* `_xattr_body(items, shared_ids, xsize, keyinfo)` written at `p` (xsize bytes, zeroed) */
static int xattr_body(const Out *o, long long p, long long xsize, PyObject *items, PyObject *shared_ids,
                      PyObject *keyinfo)
{
    if (!PyTuple_CheckExact(items) && !PyList_CheckExact(items))
        return GIVE_UP;
    if (!fits(o, p, xsize) || xsize < XHDR)
        return GIVE_UP;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(items);
    PyObject **it = PySequence_Fast_ITEMS(items);
    unsigned long long used = 0;
    long long nids = 0, ninline = 0;
    /* first the sizes (nothing is written unless the body is exactly `xsize` bytes) */
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = it[k];
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(item, 1)))
            return GIVE_UP;
        KeyInfo ki;
        int r = key_info(keyinfo, PyTuple_GET_ITEM(item, 0), &ki);
        if (r != OK)
            return r;
        used |= ki.bit;
        PyObject *sid = PyDict_GetItemWithError(shared_ids, item);
        if (sid == NULL && PyErr_Occurred())
            return FAIL;
        Py_ssize_t vlen = PyBytes_GET_SIZE(PyTuple_GET_ITEM(item, 1));
        if (sid != NULL && nids < MAX_SHARED) {
            long long id = PyLong_AsLongLong(sid);
            if (id == -1 && PyErr_Occurred())
                return FAIL;
            if (id < 0 || id > 0xFFFFFFFFLL)
                return GIVE_UP;
            nids++;
        } else {
            if (vlen > 0xFFFF)
                return GIVE_UP;
            ninline += (XENT + ki.nlen + vlen + 3) & ~3LL;
        }
    }
    if (XHDR + XID * nids + ninline != xsize)
        return GIVE_UP;
    put32(o->buf + p, 0xFFFFFFFFULL & ~used);
    o->buf[p + 4] = (unsigned char)nids;
    long long q = p + XHDR + XID * nids;
    long long seen = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = it[k];
        PyObject *sid = PyDict_GetItemWithError(shared_ids, item);
        if (sid == NULL && PyErr_Occurred())
            return FAIL;
        if (sid != NULL && seen < MAX_SHARED) {
            put32(o->buf + p + XHDR + XID * seen, (unsigned long long)PyLong_AsLongLong(sid));
            seen++;
            continue;
        }
        KeyInfo ki;
        int r = key_info(keyinfo, PyTuple_GET_ITEM(item, 0), &ki);
        if (r != OK)
            return r;
        PyObject *v = PyTuple_GET_ITEM(item, 1);
        q += put_entry(o->buf + q, &ki, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
    }
    return OK;
}

/* the xattr body of an external file known by its digest alone: metacopy and redirect inline */
static int digest_body(const Out *o, long long p, long long xsize, PyObject *dg, const KeyInfo *mc,
                       const KeyInfo *rd)
{
    static const char hex[] = "0123456789abcdef";
    if (!PyBytes_CheckExact(dg) || PyBytes_GET_SIZE(dg) != 32)
        return GIVE_UP;
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(dg);
    char mv[36], rv[66];
    memcpy(mv, metacopy_header, 4);
    memcpy(mv + 4, d, 32);
    rv[0] = '/';
    rv[1] = hex[d[0] >> 4];
    rv[2] = hex[d[0] & 15];
    rv[3] = '/';
    for (int k = 1; k < 32; k++) {
        rv[2 + 2 * k] = hex[d[k] >> 4];
        rv[3 + 2 * k] = hex[d[k] & 15];
    }
    long long need = XHDR + ((XENT + mc->nlen + 36 + 3) & ~3LL) + ((XENT + rd->nlen + 66 + 3) & ~3LL);
    if (need != xsize || !fits(o, p, xsize))
        return GIVE_UP;
    put32(o->buf + p, 0xFFFFFFFFULL & ~(mc->bit | rd->bit));
    long long q = p + XHDR;
    q += put_entry(o->buf + q, mc, mv, 36);
    put_entry(o->buf + q, rd, rv, 66);
    return OK;
}

/* one directory block at `off`: the dirents of names[a:e] (kids the inode indexes), then the names */
static int dir_block(const Out *o, long long off, PyObject *names, PyObject *kids, Py_ssize_t a, Py_ssize_t e,
                     PyObject *nids, PyObject *ftypes)
{
    Py_ssize_t cnt = e - a;
    long long nameoff = DIRENT * (long long)cnt;
    long long total = nameoff;
    for (Py_ssize_t k = a; k < e; k++) {
        PyObject *nm = PyList_GET_ITEM(names, k);
        if (!PyBytes_CheckExact(nm))
            return GIVE_UP;
        total += PyBytes_GET_SIZE(nm);
    }
    if (total > BLKSZ || !fits(o, off, total))
        return GIVE_UP;
    Py_ssize_t n = PyList_GET_SIZE(nids);
    for (Py_ssize_t k = a; k < e; k++) {
        long long kid, nid, ft;
        int r = item_ll(kids, k, 0, n - 1, &kid);
        if (r == OK)
            r = item_ll(nids, (Py_ssize_t)kid, 0, 0x7FFFFFFFFFFFFFFFLL, &nid);
        if (r == OK)
            r = item_ll(ftypes, (Py_ssize_t)kid, 0, 255, &ft);
        if (r != OK)
            return r;
        unsigned char *d = o->buf + off + DIRENT * (k - a);
        put64(d, (unsigned long long)nid);
        put16(d + 8, (unsigned long long)nameoff);
        d[10] = (unsigned char)ft;
        PyObject *nm = PyList_GET_ITEM(names, k);
        memcpy(o->buf + off + nameoff, PyBytes_AS_STRING(nm), (size_t)PyBytes_GET_SIZE(nm));
        nameoff += PyBytes_GET_SIZE(nm);
    }
    return OK;
}

/* write `n` bytes of `src` (bytes) at `off`, the last `n` when `from_end` */
static int put_bytes(const Out *o, long long off, PyObject *src, long long n, int from_end)
{
    if (!PyBytes_CheckExact(src) || n > PyBytes_GET_SIZE(src) || !fits(o, off, n))
        return GIVE_UP;
    const char *s = PyBytes_AS_STRING(src);
    if (from_end)
        s += PyBytes_GET_SIZE(src) - n;
    memcpy(o->buf + off, s, (size_t)n);
    return OK;
}

static int put_null_chunks(const Out *o, long long off, long long n)
{
    if (!fits(o, off, n))
        return GIVE_UP;
    memset(o->buf + off, 0xFF, (size_t)n);
    return OK;
}

/* attribute `name` (slot `f`) of an inode, a new reference: read from the slot when the inode is of the
 * class `info` describes (NULL: not known), else by the attribute lookup */
static PyObject *node_attr(PyObject *node, const InodeInfo *info, int f, const char *name)
{
    if (info != NULL && Py_TYPE(node) == info->type) {
        PyObject *v = SLOT(node, info, f);
        if (v != NULL) {
            Py_INCREF(v);
            return v;
        }
    }
    return PyObject_GetAttrString(node, name);
}

/* divmod(node.mtime_ns, 10**9) as C integers (seconds of a signed 64-bit field) */
static int mtime_of(PyObject *node, const InodeInfo *info, long long *sec, long long *nsec)
{
    PyObject *mt = node_attr(node, info, F_MTIME, "mtime_ns");
    if (mt == NULL)
        return FAIL;
    if (!PyLong_Check(mt)) {
        Py_DECREF(mt);
        return GIVE_UP;
    }
    int overflow;
    long long m = PyLong_AsLongLongAndOverflow(mt, &overflow);
    if (m == -1 && PyErr_Occurred()) {
        Py_DECREF(mt);
        return FAIL;
    }
    if (!overflow) {
        Py_DECREF(mt);
        *sec = m / NSEC;
        *nsec = m % NSEC;
        if (*nsec < 0) {
            *nsec += NSEC;
            *sec -= 1;
        }
        return OK;
    }
    /* beyond 64-bit nanoseconds (about the year 2262): Python's floor division */
    PyObject *ns = PyLong_FromLongLong(NSEC);
    PyObject *qr = ns ? PyNumber_Divmod(mt, ns) : NULL;
    Py_XDECREF(ns);
    Py_DECREF(mt);
    if (qr == NULL)
        return FAIL;
    long long q = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(qr, 0), &overflow);
    int r = (q == -1 && PyErr_Occurred()) ? FAIL : overflow ? GIVE_UP : OK;
    if (r == OK) {
        *sec = q;
        *nsec = PyLong_AsLongLong(PyTuple_GET_ITEM(qr, 1));
    }
    Py_DECREF(qr);
    return r;
}

enum { C_NODES, C_MODES, C_NIDS, C_NBLK, C_IU, C_LAYOUTS, C_XSIZES, C_SIZES, C_NLINK, C_ISZ, C_FORMS,
       C_XITEMS, C_UIDS, C_GIDS, C_FAST, C_TAILS, C_FTYPES, NCOLS };

static int emit_one(const Out *o, PyObject **col, Py_ssize_t i, long long *cur_blk, PyObject *dnames,
                    PyObject *dkids, PyObject *dstarts, PyObject *shared_ids, PyObject *keyinfo,
                    const KeyInfo *mc, const KeyInfo *rd, int have_digest_keys, const InodeInfo *info)
{
    long long mode, nid, nb, u, layout, xsize, size, nl, isize, uid, gid, tail;
    int r;
    if ((r = item_ll(col[C_MODES], i, 0, 0xFFFF, &mode)) != OK
            || (r = item_ll(col[C_NIDS], i, 0, 1LL << 57, &nid)) != OK
            || (r = item_ll(col[C_NBLK], i, 0, 0xFFFFFFFFLL, &nb)) != OK
            || (r = item_ll(col[C_IU], i, 0, 0xFFFFFFFFLL, &u)) != OK
            || (r = item_ll(col[C_LAYOUTS], i, 0, 0xFFFF, &layout)) != OK
            || (r = item_ll(col[C_XSIZES], i, 0, XHDR + XID * 0xFFFELL, &xsize)) != OK
            || (r = item_ll(col[C_NLINK], i, 0, 0xFFFFFFFFLL, &nl)) != OK
            || (r = item_ll(col[C_ISZ], i, COMPACT, EXTENDED, &isize)) != OK
            || (r = item_ll(col[C_UIDS], i, 0, 0xFFFFFFFFLL, &uid)) != OK
            || (r = item_ll(col[C_GIDS], i, 0, 0xFFFFFFFFLL, &gid)) != OK
            || (r = item_ll(col[C_TAILS], i, 0, 1LL << 40, &tail)) != OK
            || (r = item_ll(col[C_SIZES], i, 0, 0x7FFFFFFFFFFFFFFFLL, &size)) != OK)
        return r;
    if (isize != COMPACT && isize != EXTENDED)
        return GIVE_UP;
    long long pos = nid << SLOTBITS;
    long long t = mode & S_IFMT_;
    PyObject *node = PyList_GET_ITEM(col[C_NODES], i);
    if (nb)
        u = layout == LAYOUT_CHUNK ? ((*cur_blk & ~CHUNK_FORMAT_MASK) | u) : *cur_blk;
    long long icount = xsize ? (xsize - XHDR) / XID + 1 : 0;
    if (!fits(o, pos, isize))
        return GIVE_UP;
    unsigned char *b = o->buf + pos;
    if (isize == COMPACT) {
        if (nl > 0xFFFF || size > 0xFFFFFFFFLL || uid > 0xFFFF || gid > 0xFFFF || u > 0xFFFFFFFFLL || i > 0xFFFFFFFFLL)
            return GIVE_UP;
        put16(b, (unsigned long long)layout);
        put16(b + 2, (unsigned long long)icount);
        put16(b + 4, (unsigned long long)mode);
        put16(b + 6, (unsigned long long)nl);
        put32(b + 8, (unsigned long long)size);
        put32(b + 16, (unsigned long long)u);
        put32(b + 20, (unsigned long long)i);
        put16(b + 24, (unsigned long long)uid);
        put16(b + 26, (unsigned long long)gid);
    } else {
        long long sec, nsec;
        if ((r = mtime_of(node, info, &sec, &nsec)) != OK)
            return r;
        if (u > 0xFFFFFFFFLL || i > 0xFFFFFFFFLL)
            return GIVE_UP;
        put16(b, (unsigned long long)(layout | 1));
        put16(b + 2, (unsigned long long)icount);
        put16(b + 4, (unsigned long long)mode);
        put64(b + 8, (unsigned long long)size);
        put32(b + 16, (unsigned long long)u);
        put32(b + 20, (unsigned long long)i);
        put32(b + 24, (unsigned long long)uid);
        put32(b + 28, (unsigned long long)gid);
        put64(b + 32, (unsigned long long)sec);
        put32(b + 40, (unsigned long long)nsec);
        put32(b + 44, (unsigned long long)nl);
    }
    long long p = pos + isize;
    if (xsize) {
        PyObject *items = PyList_GET_ITEM(col[C_XITEMS], i);
        PyObject *fst = PyList_GET_ITEM(col[C_FAST], i);
        if (PyBytes_CheckExact(fst) && (PyTuple_CheckExact(items) && PyTuple_GET_SIZE(items) == 0)) {
            if (!have_digest_keys)
                return GIVE_UP;
            r = digest_body(o, p, xsize, fst, mc, rd);
        } else
            r = xattr_body(o, p, xsize, items, shared_ids, keyinfo);
        if (r != OK)
            return r;
        p += xsize;
    }
    if (t == S_IFDIR_) {
        PyObject *key = PyLong_FromSsize_t(i);
        if (key == NULL)
            return FAIL;
        PyObject *names = PyDict_GetItemWithError(dnames, key);
        PyObject *kids = names ? PyDict_GetItemWithError(dkids, key) : NULL;
        PyObject *starts = kids ? PyDict_GetItemWithError(dstarts, key) : NULL;
        Py_DECREF(key);
        if (starts == NULL)
            return PyErr_Occurred() ? FAIL : GIVE_UP;
        if (!PyList_CheckExact(names) || !PyList_CheckExact(kids) || !PyList_CheckExact(starts)
                || PyList_GET_SIZE(names) != PyList_GET_SIZE(kids) || PyList_GET_SIZE(starts) < 1)
            return GIVE_UP;
        Py_ssize_t nblocks = PyList_GET_SIZE(starts), nn = PyList_GET_SIZE(names);
        long long q = *cur_blk * BLKSZ;
        for (Py_ssize_t k = 0; k < nblocks; k++) {
            long long a, e = nn;
            if ((r = item_ll(starts, k, 0, nn, &a)) != OK)
                return r;
            if (k + 1 < nblocks && (r = item_ll(starts, k + 1, a, nn, &e)) != OK)
                return r;
            if (e < a)
                return GIVE_UP;
            r = dir_block(o, k < nb ? q : p, names, kids, (Py_ssize_t)a, (Py_ssize_t)e, col[C_NIDS], col[C_FTYPES]);
            if (r != OK)
                return r;
            q += BLKSZ;
        }
        *cur_blk += nb;
        return OK;
    }
    if (tail) {
        if (layout == LAYOUT_CHUNK)
            r = put_null_chunks(o, p, tail);
        else if (t == S_IFLNK_) {
            PyObject *tg = node_attr(node, info, F_TARGET, "target");
            if (tg == NULL)
                return FAIL;
            r = PyBytes_CheckExact(tg) && PyBytes_GET_SIZE(tg) == tail ? put_bytes(o, p, tg, tail, 0) : GIVE_UP;
            Py_DECREF(tg);
        } else {
            PyObject *c = node_attr(node, info, F_CONTENT, "content");
            if (c == NULL)
                return FAIL;
            r = put_bytes(o, p, c, tail, 1);
            Py_DECREF(c);
        }
        if (r != OK)
            return r;
    }
    if (nb) {
        long long q = *cur_blk * BLKSZ;
        if (layout == LAYOUT_CHUNK)
            r = put_null_chunks(o, q, BLKSZ);
        else {
            PyObject *data = t == S_IFLNK_ ? node_attr(node, info, F_TARGET, "target")
                                            : node_attr(node, info, F_CONTENT, "content");
            if (data == NULL)
                return FAIL;
            if (!PyBytes_CheckExact(data))
                r = GIVE_UP;
            else {
                long long ln = PyBytes_GET_SIZE(data);
                if (ln > nb * BLKSZ)
                    ln = nb * BLKSZ;
                r = put_bytes(o, q, data, ln, 0);
            }
            Py_DECREF(data);
        }
        if (r != OK)
            return r;
    }
    *cur_blk += nb;
    return OK;
}

PyDoc_STRVAR(emit_inodes_doc,
"emit_inodes(buf, lo, hi, cur_blk, columns, dnames, dkids, dstarts, shared_ids, keyinfo, mc, rd) -> bool\n\n"
"Inodes [lo, hi) of a laid-out image written into the zeroed writable `buf`, as\n"
"flatmount.image.writer._emit_inodes writes them (`columns`: the layout's per-inode lists).  False\n"
"when anything is out of the common case (the caller then runs the Python pass, which rewrites the\n"
"same bytes and words any error).");

static PyObject *emit_inodes(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer view;
    Py_ssize_t lo, hi;
    long long cur_blk;
    PyObject *columns, *dnames, *dkids, *dstarts, *shared_ids, *keyinfo, *mc_name, *rd_name;
    if (!PyArg_ParseTuple(args, "w*nnLO!O!O!O!O!O!OO:emit_inodes", &view, &lo, &hi, &cur_blk,
                          &PyTuple_Type, &columns, &PyDict_Type, &dnames, &PyDict_Type, &dkids,
                          &PyDict_Type, &dstarts, &PyDict_Type, &shared_ids, &PyDict_Type, &keyinfo,
                          &mc_name, &rd_name))
        return NULL;
    int r = GIVE_UP;
    Out o = {view.buf, view.len};
    PyObject *col[NCOLS];
    if (PyTuple_GET_SIZE(columns) != NCOLS)
        goto done;
    Py_ssize_t n = -1;
    for (int c = 0; c < NCOLS; c++) {
        col[c] = PyTuple_GET_ITEM(columns, c);
        if (!PyList_CheckExact(col[c]) || (n >= 0 && PyList_GET_SIZE(col[c]) != n))
            goto done;
        n = PyList_GET_SIZE(col[c]);
    }
    if (lo < 0 || hi > n || lo > hi)
        goto done;
    KeyInfo mc = {0}, rd = {0};
    int have_digest_keys = 0;
    r = key_info(keyinfo, mc_name, &mc);
    if (r == OK)
        r = key_info(keyinfo, rd_name, &rd);
    if (r == FAIL)
        goto done;
    have_digest_keys = r == OK;
    r = OK;
    /* the inodes' class (that of the first one), for reading their fields from its slots */
    InodeInfo info;
    const InodeInfo *pinfo = n > 0 && inode_info((PyObject *)Py_TYPE(PyList_GET_ITEM(col[C_NODES], 0)), &info) == 0
                             ? &info : NULL;
    for (Py_ssize_t i = lo; i < hi && r == OK; i++) {
        prefetch_item(col[C_NODES], i + PF_AHEAD);
        prefetch_item(col[C_MODES], i + PF_AHEAD);
        prefetch_item(col[C_SIZES], i + PF_AHEAD);
        prefetch_item(col[C_NIDS], i + PF_AHEAD);
        prefetch_item(col[C_FAST], i + PF_AHEAD);
        if (pinfo != NULL)
            prefetch_slots(col[C_NODES], i + PF_AHEAD / 2, pinfo, F_MTIME, F_MTIME, F_MTIME, F_MTIME);
        r = emit_one(&o, col, i, &cur_blk, dnames, dkids, dstarts, shared_ids, keyinfo, &mc, &rd,
                     have_digest_keys, pinfo);
    }
done:
    PyBuffer_Release(&view);
    if (r == FAIL)
        return NULL;
    return PyBool_FromLong(r == OK);
}

/* ---------------------------------------------------------------------------------------------- */
/* inode_fields: the common inodes of flatmount/image/writer.py `_inode_fields` (pass 2) */

#define DIR_INLINE_MAX (BLKSZ / 2)
#define PATH_MAX_ 4096
#define MAX_CHUNK_BITS (0x1F + 12)
#define MAX_NONINLINE_CHUNKS 1024
#define LAYOUT_PLAIN (0 << 1)
#define LAYOUT_INLINE (2 << 1)
#define FT_REG 1
#define FT_DIR 2
#define FT_CHR 3
#define FT_BLK 4
#define FT_FIFO 5
#define FT_SOCK 6
#define FT_LNK 7

/* list[i] = C integer v */
static int set_ll(PyObject *list, Py_ssize_t i, long long v)
{
    PyObject *o = PyLong_FromLongLong(v);
    if (o == NULL)
        return FAIL;
    PyList_SetItem(list, i, o);   /* steals; i is in range (checked by the caller) */
    return OK;
}

/* a slot of an inode as a C integer in [lo, hi]; GIVE_UP when it is anything else */
static int slot_ll(PyObject *node, const InodeInfo *info, int f, long long lo, long long hi, long long *out)
{
    PyObject *v = SLOT(node, info, f);
    if (v == NULL || !PyLong_CheckExact(v))
        return GIVE_UP;
    long long x;
    int got = long_ll(v, &x);
    if (got < 0)
        return FAIL;
    if (!got || x < lo || x > hi)
        return GIVE_UP;
    *out = x;
    return OK;
}

static inline int bit_length(unsigned long long v)
{
    return v ? 64 - __builtin_clzll(v) : 0;
}

enum { F2_MODES, F2_SIZES, F2_LAYOUTS, F2_IU, F2_TAILS, F2_NBLK, F2_XITEMS, F2_FAST, F2_FTYPES, NCOLS2 };

typedef struct {
    InodeInfo info;
    PyObject **col;
    PyObject *dgs, *allitems, *rditems, *dnames, *dstarts, *wparents, *mc_name, *rd_name, *mc0;
} Fields;

/* the redirect value of an object path: b"/" + path.encode("utf-8", "surrogateescape") */
static PyObject *redirect_of(PyObject *path)
{
    PyObject *enc;
    if (PyUnicode_IS_ASCII(path))
        enc = NULL;
    else if ((enc = PyUnicode_AsEncodedString(path, "utf-8", "surrogateescape")) == NULL)
        return NULL;
    const char *s = enc ? PyBytes_AS_STRING(enc) : (const char *)PyUnicode_DATA(path);
    Py_ssize_t n = enc ? PyBytes_GET_SIZE(enc) : PyUnicode_GET_LENGTH(path);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n + 1);
    if (out != NULL) {
        PyBytes_AS_STRING(out)[0] = '/';
        memcpy(PyBytes_AS_STRING(out) + 1, s, (size_t)n);
    }
    Py_XDECREF(enc);
    return out;
}

/* a regular file without xattrs */
static int fields_reg(Fields *fs, PyObject *node, Py_ssize_t i)
{
    PyObject **col = fs->col;
    PyObject *content = SLOT(node, &fs->info, F_CONTENT);
    long long size = 0;
    int r;
    if (content == NULL)
        return GIVE_UP;
    if (content != Py_None) {
        if (!PyBytes_CheckExact(content))
            return GIVE_UP;
        size = PyBytes_GET_SIZE(content);
        if (size) {
            long long nb = size / BLKSZ, tail = size % BLKSZ;
            if (tail > DIR_INLINE_MAX) {
                nb++;
                tail = 0;
            }
            if (set_ll(col[F2_NBLK], i, nb) || set_ll(col[F2_TAILS], i, tail)
                    || set_ll(col[F2_LAYOUTS], i, tail ? LAYOUT_INLINE : LAYOUT_PLAIN))
                return FAIL;
        }
    } else {
        if ((r = slot_ll(node, &fs->info, F_SIZE, 0, 0x7FFFFFFFFFFFFFFFLL, &size)) != OK)
            return r;
        if (size > 0) {
            PyObject *dg = SLOT(node, &fs->info, F_DIGEST), *path = SLOT(node, &fs->info, F_PAYLOAD);
            if (dg == NULL || path == NULL || (dg != Py_None && (!PyBytes_CheckExact(dg) || PyBytes_GET_SIZE(dg) != 32))
                    || (path != Py_None && !PyUnicode_CheckExact(path)))
                return GIVE_UP;
            long long tails, iu;
            int cb = bit_length((unsigned long long)(size - 1));
            if (cb <= MAX_CHUNK_BITS) {
                tails = CHUNK_ENTRY_SIZE;
                iu = cb > 12 ? cb - 12 : 0;
            } else {
                long long nch = (size + (1LL << MAX_CHUNK_BITS) - 1) >> MAX_CHUNK_BITS;
                if (nch > MAX_NONINLINE_CHUNKS)
                    return GIVE_UP;
                tails = CHUNK_ENTRY_SIZE * nch;
                iu = MAX_CHUNK_BITS - 12;
            }
            if (path == Py_None && dg != Py_None) {
                /* known by its digest alone: metacopy and redirect are made from it later */
                PyList_SetItem(col[F2_FAST], i, Py_NewRef(dg));
                if (PyList_Append(fs->dgs, dg) < 0)
                    return FAIL;
            } else {
                PyObject *mv, *items;
                if (dg == Py_None)
                    mv = PyBytes_FromStringAndSize("", 0);
                else if ((mv = PyBytes_FromStringAndSize(NULL, 36)) != NULL) {
                    memcpy(PyBytes_AS_STRING(mv), metacopy_header, 4);
                    memcpy(PyBytes_AS_STRING(mv) + 4, PyBytes_AS_STRING(dg), 32);
                }
                if (mv == NULL)
                    return FAIL;
                if (path != Py_None && PyUnicode_GET_LENGTH(path) > 0) {
                    PyObject *rv = redirect_of(path);
                    PyObject *it_r = rv ? PyTuple_Pack(2, fs->rd_name, rv) : NULL;
                    Py_XDECREF(rv);
                    PyObject *it_m = dg == Py_None ? Py_NewRef(fs->mc0) : PyTuple_Pack(2, fs->mc_name, mv);
                    items = it_r && it_m ? PyTuple_Pack(2, it_m, it_r) : NULL;
                    if (items != NULL) {
                        if (dg == Py_None)
                            r = PyList_Append(fs->rditems, it_r);
                        else
                            r = PyList_Append(fs->allitems, it_m) < 0 ? -1 : PyList_Append(fs->allitems, it_r);
                        if (r < 0)
                            Py_CLEAR(items);
                    }
                    Py_XDECREF(it_r);
                    Py_XDECREF(it_m);
                    if (items != NULL)
                        PyList_SetItem(col[F2_FAST], i, Py_NewRef(Py_True));
                } else {
                    PyObject *it_m = PyTuple_Pack(2, fs->mc_name, mv);
                    items = it_m ? PyTuple_Pack(1, it_m) : NULL;
                    if (items != NULL && PyList_Append(fs->allitems, it_m) < 0)
                        Py_CLEAR(items);
                    Py_XDECREF(it_m);
                }
                Py_DECREF(mv);
                if (items == NULL)
                    return FAIL;
                PyList_SetItem(col[F2_XITEMS], i, items);
            }
            if (set_ll(col[F2_TAILS], i, tails) || set_ll(col[F2_IU], i, iu)
                    || set_ll(col[F2_LAYOUTS], i, LAYOUT_CHUNK))
                return FAIL;
        }
    }
    if (set_ll(col[F2_FTYPES], i, FT_REG))
        return FAIL;
    PyList_SetItem(col[F2_MODES], i, Py_NewRef(SLOT(node, &fs->info, F_MODE)));
    if (content == Py_None)          /* the inode's own size object, as the Python loop stores it */
        PyList_SetItem(col[F2_SIZES], i, Py_NewRef(SLOT(node, &fs->info, F_SIZE)));
    else if (set_ll(col[F2_SIZES], i, size))
        return FAIL;
    return OK;
}

static int fields_one(Fields *fs, PyObject *node, Py_ssize_t i)
{
    PyObject **col = fs->col;
    long long mode;
    int r;
    if (Py_TYPE(node) != fs->info.type)
        return GIVE_UP;
    if ((r = slot_ll(node, &fs->info, F_MODE, 0, 0xFFFF, &mode)) != OK)
        return r;
    PyObject *xs = SLOT(node, &fs->info, F_XATTRS);
    if (xs == NULL || (xs != Py_None && !(PyDict_CheckExact(xs) && PyDict_GET_SIZE(xs) == 0)))
        return GIVE_UP;                  /* xattrs: the composefs rewriting stays in Python */
    long long t = mode & S_IFMT_, size = 0;
    switch (t) {
    case S_IFREG_:
        return fields_reg(fs, node, i);
    case S_IFDIR_: {
        if (i == 0)
            return GIVE_UP;             /* the root: marked opaque */
        PyObject *key = PyLong_FromSsize_t(i);
        if (key == NULL)
            return FAIL;
        int wp = PySet_Contains(fs->wparents, key);
        PyObject *names = wp == 0 ? PyDict_GetItemWithError(fs->dnames, key) : NULL;
        if (names == NULL) {
            Py_DECREF(key);
            return wp < 0 || PyErr_Occurred() ? FAIL : GIVE_UP;
        }
        if (!PyList_CheckExact(names)) {
            Py_DECREF(key);
            return GIVE_UP;
        }
        long long used = DIRENT * (long long)PyList_GET_SIZE(names);
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(names); k++) {
            PyObject *nm = PyList_GET_ITEM(names, k);
            if (!PyBytes_CheckExact(nm)) {
                Py_DECREF(key);
                return GIVE_UP;
            }
            used += PyBytes_GET_SIZE(nm);
        }
        if (used > BLKSZ) {              /* several blocks: the greedy packing stays in Python */
            Py_DECREF(key);
            return GIVE_UP;
        }
        long long nb = 0, tail = used;
        if (used > DIR_INLINE_MAX) {
            nb = 1;
            tail = 0;
        }
        PyObject *starts = Py_BuildValue("[i]", 0);
        r = starts ? PyDict_SetItem(fs->dstarts, key, starts) : -1;
        Py_XDECREF(starts);
        Py_DECREF(key);
        if (r < 0 || set_ll(col[F2_NBLK], i, nb) || set_ll(col[F2_TAILS], i, tail)
                || set_ll(col[F2_LAYOUTS], i, tail ? LAYOUT_INLINE : LAYOUT_PLAIN) || set_ll(col[F2_FTYPES], i, FT_DIR))
            return FAIL;
        size = nb * BLKSZ + tail;
        break;
    }
    case S_IFLNK_: {
        PyObject *target = SLOT(node, &fs->info, F_TARGET);
        if (target == NULL || !PyBytes_CheckExact(target) || PyBytes_GET_SIZE(target) == 0
                || PyBytes_GET_SIZE(target) >= PATH_MAX_)
            return GIVE_UP;
        size = PyBytes_GET_SIZE(target);
        if (set_ll(col[F2_TAILS], i, size) || set_ll(col[F2_LAYOUTS], i, LAYOUT_INLINE) || set_ll(col[F2_FTYPES], i, FT_LNK))
            return FAIL;
        break;
    }
    case 0020000: case 0060000: {
        long long rdev;
        if ((r = slot_ll(node, &fs->info, F_RDEV, 1, 0xFFFFFFFFLL, &rdev)) != OK)
            return r;                    /* 0: a whiteout (or the writer's own), in Python */
        if (set_ll(col[F2_IU], i, rdev) || set_ll(col[F2_FTYPES], i, t == 0020000 ? FT_CHR : FT_BLK))
            return FAIL;
        break;
    }
    case 0010000:
        if (set_ll(col[F2_FTYPES], i, FT_FIFO))
            return FAIL;
        break;
    case 0140000:
        if (set_ll(col[F2_FTYPES], i, FT_SOCK))
            return FAIL;
        break;
    default:
        return GIVE_UP;
    }
    PyList_SetItem(col[F2_MODES], i, Py_NewRef(SLOT(node, &fs->info, F_MODE)));
    if (set_ll(col[F2_SIZES], i, size))
        return FAIL;
    return OK;
}

PyDoc_STRVAR(inode_fields_doc,
"inode_fields(inode_cls, nodes, columns, dgs, allitems, rditems, dnames, dstarts, wparents, mc, rd, mc0, nlink)\n"
"-> (todo, min_mtime, rare, isz, uids, gids) or None\n\n"
"Pass 2 of flatmount.image.writer (`_inode_fields`) for the common inodes (no xattrs, one-block\n"
"directories, external files, symlinks, devices): their columns filled in as the Python loop fills them.\n"
"`todo` lists the indexes of the inodes it left (the Python loop runs those: the composefs rewriting of\n"
"xattrs, whiteouts, the root, and every error); also the smallest mtime, the inode sizes (compact where\n"
"the mtime is the smallest), the uid and gid columns, and `rare`: True when an inode it filled in, or\n"
"any uid, gid or nlink, may need an extended inode or be out of range (the Python check then runs).\n"
"None, having changed nothing, when an inode is not an Inode or its mtime, uid or gid is not an int\n"
"of 64 bits (the Python pass words that).");

#define INODE_COMPACT 32
#define INODE_EXTENDED 64

/* an exact int slot as a C long long; GIVE_UP when it is anything else */
static int slot_any_ll(PyObject *node, const InodeInfo *info, int f, long long *out)
{
    return slot_ll(node, info, f, LLONG_MIN, LLONG_MAX, out);
}

/* the mtimes (into `mt`), uid and gid columns and their range flag, before anything is changed */
static int scan_ids(const InodeInfo *info, PyObject *nodes, PyObject *nlink, long long *mt,
                    PyObject *uids, PyObject *gids, int *rare)
{
    Py_ssize_t n = PyList_GET_SIZE(nodes);
    int r;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *node = PyList_GET_ITEM(nodes, i);
        long long uid, gid, nl;
        prefetch_item(nodes, i + PF_AHEAD);
        prefetch_slots(nodes, i + PF_AHEAD / 2, info, F_MTIME, F_UID, F_GID, F_MTIME);
        if (Py_TYPE(node) != info->type)
            return GIVE_UP;
        if ((r = slot_any_ll(node, info, F_MTIME, &mt[i])) != OK || (r = slot_any_ll(node, info, F_UID, &uid)) != OK
                || (r = slot_any_ll(node, info, F_GID, &gid)) != OK)
            return r;
        if (uid < 0 || uid > 0xFFFF || gid < 0 || gid > 0xFFFF)
            *rare = 1;
        r = item_ll(nlink, i, 0, 0xFFFF, &nl);
        if (r == FAIL)
            return FAIL;
        if (r != OK)
            *rare = 1;
        PyList_SET_ITEM(uids, i, Py_NewRef(SLOT(node, info, F_UID)));
        PyList_SET_ITEM(gids, i, Py_NewRef(SLOT(node, info, F_GID)));
    }
    return OK;
}

static PyObject *inode_fields(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *inode_cls, *nodes, *columns, *nlink;
    Fields fs;
    if (!PyArg_ParseTuple(args, "OO!O!O!O!O!O!O!O!SSO!O!:inode_fields", &inode_cls, &PyList_Type, &nodes,
                          &PyTuple_Type, &columns, &PyList_Type, &fs.dgs, &PyList_Type, &fs.allitems,
                          &PyList_Type, &fs.rditems, &PyDict_Type, &fs.dnames, &PyDict_Type, &fs.dstarts,
                          &PySet_Type, &fs.wparents, &fs.mc_name, &fs.rd_name, &PyTuple_Type, &fs.mc0,
                          &PyList_Type, &nlink))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(nodes);
    if (n == 0 || PyList_GET_SIZE(nlink) != n || inode_info(inode_cls, &fs.info) < 0
            || PyTuple_GET_SIZE(columns) != NCOLS2)
        Py_RETURN_NONE;
    PyObject *col[NCOLS2];
    for (int c = 0; c < NCOLS2; c++) {
        col[c] = PyTuple_GET_ITEM(columns, c);
        if (!PyList_CheckExact(col[c]) || PyList_GET_SIZE(col[c]) != n)
            Py_RETURN_NONE;
    }
    fs.col = col;
    long long *mt = PyMem_Malloc((size_t)n * sizeof(long long));
    PyObject *uids = PyList_New(n), *gids = PyList_New(n), *isz = PyList_New(n), *todo = PyList_New(0);
    PyObject *out = NULL;
    int rare = 0, r;
    if (mt == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (uids == NULL || gids == NULL || isz == NULL || todo == NULL)
        goto done;
    r = scan_ids(&fs.info, nodes, nlink, mt, uids, gids, &rare);
    if (r != OK) {   /* nothing changed yet: the Python pass runs (and words the error) */
        if (r == GIVE_UP)
            out = Py_NewRef(Py_None);
        goto done;
    }
    long long min_mt = mt[0];
    for (Py_ssize_t i = 1; i < n; i++)
        if (mt[i] < min_mt)
            min_mt = mt[i];
    for (Py_ssize_t i = 0; i < n; i++)
        PyList_SET_ITEM(isz, i, PyLong_FromLong(mt[i] == min_mt ? INODE_COMPACT : INODE_EXTENDED));  /* small ints */
    for (Py_ssize_t i = 0; i < n; i++) {
        prefetch_item(nodes, i + PF_AHEAD);
        prefetch_slots(nodes, i + PF_AHEAD / 2, &fs.info, F_XATTRS, F_MODE, F_SIZE, F_DIGEST);
        r = fields_one(&fs, PyList_GET_ITEM(nodes, i), i);
        if (r == FAIL)
            goto done;
        if (r == GIVE_UP) {
            PyObject *k = PyLong_FromSsize_t(i);
            if (k == NULL || PyList_Append(todo, k) < 0) {
                Py_XDECREF(k);
                goto done;
            }
            Py_DECREF(k);
        } else if (!rare) {   /* an inode size beyond 32 bits needs an extended inode */
            long long size;
            if ((r = item_ll(col[F2_SIZES], i, 0, 0xFFFFFFFFLL, &size)) == FAIL)
                goto done;
            if (r != OK)
                rare = 1;
        }
    }
    out = Py_BuildValue("(OLOOOO)", todo, min_mt, rare ? Py_True : Py_False, isz, uids, gids);
done:
    PyMem_Free(mt);
    Py_XDECREF(uids);
    Py_XDECREF(gids);
    Py_XDECREF(isz);
    Py_XDECREF(todo);
    return out;
}

/* ---------------------------------------------------------------------------------------------- */
/* collect: flatmount/image/writer.py `_collect` (pass 1) without `primary` */

/* a map of object addresses to queue indexes (open addressing; the inodes already queued) */
typedef struct {
    PyObject **slot;
    Py_ssize_t *val;
    size_t mask, used;
} PtrSet;

static int ptrset_init(PtrSet *ps, size_t want)
{
    size_t cap = 1024;
    while (cap < 2 * want)
        cap <<= 1;
    ps->slot = PyMem_Calloc(cap, sizeof(PyObject *));
    ps->val = PyMem_Malloc(cap * sizeof(Py_ssize_t));
    ps->mask = cap - 1;
    ps->used = 0;
    if (ps->slot == NULL || ps->val == NULL) {
        PyMem_Free(ps->slot);
        PyMem_Free(ps->val);
        ps->slot = NULL;
        ps->val = NULL;
        return -1;
    }
    return 0;
}

static inline size_t ptr_hash(const void *p)
{
    return (size_t)(((uintptr_t)p >> 4) * 0x9E3779B97F4A7C15ULL);
}

/* 1: added with index `v`, 0: already there (its index in *old), -1: out of memory */
static int ptrset_add(PtrSet *ps, PyObject *p, Py_ssize_t v, Py_ssize_t *old)
{
    if (2 * (ps->used + 1) > ps->mask + 1) {
        PtrSet bigger;
        if (ptrset_init(&bigger, ps->used + 1) < 0)
            return -1;
        for (size_t k = 0; k <= ps->mask; k++)
            if (ps->slot[k] != NULL) {
                size_t h = ptr_hash(ps->slot[k]) & bigger.mask;
                while (bigger.slot[h] != NULL)
                    h = (h + 1) & bigger.mask;
                bigger.slot[h] = ps->slot[k];
                bigger.val[h] = ps->val[k];
            }
        bigger.used = ps->used;
        PyMem_Free(ps->slot);
        PyMem_Free(ps->val);
        *ps = bigger;
    }
    size_t h = ptr_hash(p) & ps->mask;
    while (ps->slot[h] != NULL) {
        if (ps->slot[h] == p) {
            *old = ps->val[h];
            return 0;
        }
        h = (h + 1) & ps->mask;
    }
    ps->slot[h] = p;
    ps->val[h] = v;
    ps->used++;
    return 1;
}

/* bytes order of two names (as `sorted` orders them) */
static int name_cmp(PyObject *a, const char *b, Py_ssize_t nb)
{
    Py_ssize_t na = PyBytes_GET_SIZE(a);
    int c = memcmp(PyBytes_AS_STRING(a), b, (size_t)(na < nb ? na : nb));
    return c ? c : (na > nb) - (na < nb);
}

static PyObject *dot_names[2];      /* b"." and b"..", made once (every directory lists them) */

/* a directory entry as collect meets it: name and inode, borrowed from the directory's dict (which
 * nothing changes while collect runs: it calls no Python code) */
typedef struct {
    PyObject *name, *child;
} Entry;

static int entry_cmp(const void *a, const void *b)
{
    PyObject *x = ((const Entry *)a)->name, *y = ((const Entry *)b)->name;
    return name_cmp(x, PyBytes_AS_STRING(y), PyBytes_GET_SIZE(y));
}

typedef struct {
    InodeInfo info;
    PyObject *nodes, *nlink, *nparent, *dparent, *dnames, *dkids, *wparents, *raw, *dups;
    long version;
    PtrSet seen;
    Py_ssize_t *dirq;
    Py_ssize_t ndirq, capdirq;
    Entry *ents;                     /* scratch: the entries of the directory at hand */
    Py_ssize_t capents;
} Collect;

static int append_ll(PyObject *list, long long v)
{
    PyObject *o = PyLong_FromLongLong(v);
    if (o == NULL)
        return -1;
    int r = PyList_Append(list, o);
    Py_DECREF(o);
    return r;
}

static int dict_set_ll(PyObject *dict, long long k, PyObject *v)
{
    PyObject *key = PyLong_FromLongLong(k);
    if (key == NULL)
        return -1;
    int r = PyDict_SetItem(dict, key, v);
    Py_DECREF(key);
    return r;
}

/* is `child` (a character device) a whiteout of the tree (rdev 0, not one of the writer's own)?
 * 1 or 0; GIVE_UP when rdev is not an int; FAIL on an error */
static int is_whiteout(Collect *c, PyObject *child)
{
    PyObject *rdev = SLOT(child, &c->info, F_RDEV);
    if (rdev == NULL || !PyLong_CheckExact(rdev))
        return GIVE_UP;
    int overflow;
    long long rv = PyLong_AsLongLongAndOverflow(rdev, &overflow);
    if (rv == -1 && PyErr_Occurred())
        return FAIL;
    if (rv != 0 || overflow)
        return 0;
    PyObject *cid = PyLong_FromVoidPtr(child);
    int is_raw = cid ? PySet_Contains(c->raw, cid) : -1;
    Py_XDECREF(cid);
    return is_raw < 0 ? FAIL : !is_raw;
}

/* mark directory `i` as holding a whiteout */
static int mark_wparent(Collect *c, Py_ssize_t i)
{
    PyObject *pi = PyLong_FromSsize_t(i);
    int r = pi == NULL ? -1 : PySet_Add(c->wparents, pi);
    Py_XDECREF(pi);
    return r < 0 ? FAIL : OK;
}

/* one directory (queue index i, entries `ents`): its children queued, its sorted names and kids */
static int collect_dir(Collect *c, Py_ssize_t i, PyObject *ents)
{
    if (!PyDict_CheckExact(ents))
        return GIVE_UP;
    Py_ssize_t n = PyDict_GET_SIZE(ents);
    if (n > c->capents) {
        Py_ssize_t cap = n > 2 * c->capents ? n : 2 * c->capents;
        Entry *e = PyMem_Realloc(c->ents, (size_t)cap * sizeof(Entry));
        if (e == NULL) {
            PyErr_NoMemory();
            return FAIL;
        }
        c->ents = e;
        c->capents = cap;
    }
    Entry *es = c->ents;
    Py_ssize_t pos = 0, k = 0;
    PyObject *key, *value;
    int sorted = 1;
    while (k < n && PyDict_Next(ents, &pos, &key, &value)) {
        if (!PyBytes_CheckExact(key))
            return GIVE_UP;
        Py_ssize_t ln = PyBytes_GET_SIZE(key);
        const char *s = PyBytes_AS_STRING(key);
        if (ln == 0 || ln > 255 || memchr(s, '/', (size_t)ln) || memchr(s, 0, (size_t)ln)
                || (s[0] == '.' && (ln == 1 || (ln == 2 && s[1] == '.'))))
            return GIVE_UP;              /* an invalid name: Python words the error */
        if (sorted && k && name_cmp(es[k - 1].name, s, ln) > 0)
            sorted = 0;
        es[k].name = key;
        es[k].child = value;
        k++;
    }
    if (k != n)
        return GIVE_UP;
    if (!sorted)                         /* (names are distinct: any sort gives `sorted(ents)`) */
        qsort(es, (size_t)n, sizeof(Entry), entry_cmp);
    /* where bisect_left puts b"." and then b".." (b"." sorts before b"..") among the names */
    Py_ssize_t p1 = 0, p2;
    while (p1 < n && name_cmp(es[p1].name, ".", 1) < 0)
        p1++;
    p2 = p1;
    while (p2 < n && name_cmp(es[p2].name, "..", 2) < 0)
        p2++;
    PyObject *names = PyList_New(n + 2);
    PyObject *kids = names ? PyList_New(n + 2) : NULL;
    PyObject *me = kids ? PyLong_FromSsize_t(i) : NULL;   /* the parent index of every child: one object */
    if (me == NULL) {
        Py_XDECREF(names);
        Py_XDECREF(kids);
        return FAIL;
    }
    /* the list slot of entry k: after b"." once k >= p1, after b".." too once k >= p2 */
#define AT(k) ((k) + ((k) >= p1) + ((k) >= p2))
    for (Py_ssize_t q = 0; q < n; q++)
        PyList_SET_ITEM(names, AT(q), Py_NewRef(es[q].name));
    PyList_SET_ITEM(names, p1, Py_NewRef(dot_names[0]));
    PyList_SET_ITEM(names, p2 + 1, Py_NewRef(dot_names[1]));
    int r = OK;
    long long nsub = 0;
    for (Py_ssize_t k = 0; k < n && r == OK; k++) {
        PyObject *child = es[k].child;
        long long mode;
        if (k + PF_AHEAD < n) {          /* (hints: see PF_AHEAD) */
            PyObject *ahead = es[k + PF_AHEAD].child;
            __builtin_prefetch(ahead);
            __builtin_prefetch(&c->seen.slot[ptr_hash(ahead) & c->seen.mask]);
        }
        if (k + PF_AHEAD / 2 < n && Py_TYPE(es[k + PF_AHEAD / 2].child) == c->info.type)
            __builtin_prefetch(SLOT(es[k + PF_AHEAD / 2].child, &c->info, F_MODE));
        if (Py_TYPE(child) != c->info.type) {
            r = GIVE_UP;
            break;
        }
        if ((r = slot_ll(child, &c->info, F_MODE, 0, 0xFFFF, &mode)) != OK)
            break;
        PyObject *ce = SLOT(child, &c->info, F_ENTRIES);
        long long cm = mode & S_IFMT_;
        if (ce == NULL || (cm == S_IFDIR_) != (ce != Py_None)) {
            r = GIVE_UP;
            break;
        }
        Py_ssize_t j = PyList_GET_SIZE(c->nodes);
        int added = ptrset_add(&c->seen, child, j, &j);
        if (added < 0) {
            PyErr_NoMemory();
            r = FAIL;
            break;
        }
        if (added == 0) {                /* a second name: a hardlink (a directory: Python words it) */
            long long nl;
            PyObject *dup;
            if (cm == S_IFDIR_ || j >= PyList_GET_SIZE(c->nlink)) {
                r = GIVE_UP;
                break;
            }
            if ((r = item_ll(c->nlink, j, 0, LLONG_MAX - 1, &nl)) != OK || (r = set_ll(c->nlink, j, nl + 1)) != OK)
                break;
            dup = Py_BuildValue("(nOn)", i, es[k].name, j);
            if (dup == NULL || PyList_Append(c->dups, dup) < 0) {
                Py_XDECREF(dup);
                r = FAIL;
                break;
            }
            Py_DECREF(dup);
            if (cm == 0020000) {         /* a hardlinked whiteout: every parent is marked */
                int w = is_whiteout(c, child);
                if (w == 1)
                    w = mark_wparent(c, i);
                if (w != 0) {
                    r = w;
                    break;
                }
            }
        } else {
            if (PyList_Append(c->nodes, child) < 0 || append_ll(c->nlink, 1) < 0 || PyList_Append(c->nparent, me) < 0) {
                r = FAIL;
                break;
            }
            if (cm == S_IFDIR_) {
                nsub++;
                if (dict_set_ll(c->dparent, j, me) < 0) {
                    r = FAIL;
                    break;
                }
                if (c->ndirq == c->capdirq) {
                    Py_ssize_t cap = c->capdirq * 2;
                    Py_ssize_t *q = PyMem_Realloc(c->dirq, (size_t)cap * sizeof(Py_ssize_t));
                    if (q == NULL) {
                        PyErr_NoMemory();
                        r = FAIL;
                        break;
                    }
                    c->dirq = q;
                    c->capdirq = cap;
                }
                c->dirq[c->ndirq++] = j;
            } else if (cm == 0020000) {
                int w = is_whiteout(c, child);
                if (w == 1) {            /* a whiteout: its directory is marked */
                    w = mark_wparent(c, i);
                    c->version = 1;
                }
                if (w != 0) {
                    r = w;
                    break;
                }
            }
        }
        PyObject *kid = PyLong_FromSsize_t(j);
        if (kid == NULL)
            r = FAIL;
        PyList_SET_ITEM(kids, AT(k), kid);
    }
#undef AT
    if (r == OK) {
        PyObject *nl = PyLong_FromLongLong(2 + nsub);
        PyObject *upo = PyDict_GetItemWithError(c->dparent, me);   /* borrowed */
        if (nl == NULL || upo == NULL)
            r = FAIL;
        else {
            PyList_SetItem(c->nlink, i, nl);
            nl = NULL;
            PyList_SET_ITEM(kids, p1, Py_NewRef(me));
            PyList_SET_ITEM(kids, p2 + 1, Py_NewRef(upo));
            if (PyDict_SetItem(c->dnames, me, names) < 0 || PyDict_SetItem(c->dkids, me, kids) < 0)
                r = FAIL;
        }
        Py_XDECREF(nl);
        if (r == FAIL && !PyErr_Occurred())
            PyErr_SetString(PyExc_SystemError, "collect: directory without a parent");
    }
    Py_DECREF(me);
    Py_DECREF(names);
    Py_DECREF(kids);
    return r;
}

PyDoc_STRVAR(collect_doc,
"collect(inode_cls, root, root_entries, raw) -> the tuple of writer._collect, or None\n\n"
"Pass 1 of flatmount.image.writer (`_collect` without `primary`): the breadth-first queue of a tree\n"
"(hardlinks too: every later name in `dups`, as the Python walk lists them).  `root_entries` are the root's\n"
"entries with the writer's own whiteouts (ids in `raw`).  None on anything invalid (the Python walk\n"
"words the error).");

static PyObject *collect(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *inode_cls, *root, *root_ents, *raw;
    if (!PyArg_ParseTuple(args, "OOO!O!:collect", &inode_cls, &root, &PyDict_Type, &root_ents, &PySet_Type, &raw))
        return NULL;
    Collect c;
    memset(&c, 0, sizeof c);
    PyObject *result = NULL;
    int r = GIVE_UP;
    if (inode_info(inode_cls, &c.info) < 0 || Py_TYPE(root) != c.info.type)
        Py_RETURN_NONE;
    c.raw = raw;
    c.nodes = Py_BuildValue("[O]", root);
    c.nlink = Py_BuildValue("[i]", 0);
    c.nparent = Py_BuildValue("[i]", 0);
    c.dparent = Py_BuildValue("{i:i}", 0, 0);
    c.dnames = PyDict_New();
    c.dkids = PyDict_New();
    c.wparents = PySet_New(NULL);
    c.dups = PyList_New(0);
    c.capdirq = 1024;
    c.dirq = PyMem_Malloc((size_t)c.capdirq * sizeof(Py_ssize_t));
    if (!c.nodes || !c.nlink || !c.nparent || !c.dparent || !c.dnames || !c.dkids || !c.wparents
            || !c.dups || !c.dirq || ptrset_init(&c.seen, 4096) < 0 || ptrset_add(&c.seen, root, 0, &c.ndirq) < 0) {   /* (new: ndirq not written) */
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        r = FAIL;
        goto done;
    }
    c.dirq[c.ndirq++] = 0;
    r = OK;
    for (Py_ssize_t q = 0; q < c.ndirq && r == OK; q++) {
        Py_ssize_t i = c.dirq[q];
        PyObject *ents = i == 0 ? root_ents : SLOT(PyList_GET_ITEM(c.nodes, i), &c.info, F_ENTRIES);
        r = ents == NULL ? GIVE_UP : collect_dir(&c, i, ents);
    }
    if (r == OK)
        result = Py_BuildValue("(OOOOOOlOOO)", c.nodes, c.dnames, c.dkids, c.nlink, c.wparents, raw, c.version,
                               c.dups, c.nparent, c.dparent);
done:
    PyMem_Free(c.dirq);
    PyMem_Free(c.ents);
    PyMem_Free(c.seen.slot);
    PyMem_Free(c.seen.val);
    Py_XDECREF(c.dups);
    Py_XDECREF(c.nodes);
    Py_XDECREF(c.nlink);
    Py_XDECREF(c.nparent);
    Py_XDECREF(c.dparent);
    Py_XDECREF(c.dnames);
    Py_XDECREF(c.dkids);
    Py_XDECREF(c.wparents);
    return pass_outcome(r, result);
}

/* ---------------------------------------------------------------------------------------------- */
/* place_inodes: the loop of flatmount/image/writer.py `_place_inodes` (pass 4) */

#define SLOTPAD 31
#define FORM_OTHER 0
#define FORM_BOTH_INLINE 1
#define FORM_MC_SHARED 2
#define FORM_BOTH_SHARED 3

typedef struct {
    long long xsize, tail, isz, mode, layout, nblk, size;
    int form, fst;                   /* fst: fast[i] is true (an external regular file) */
    int digest_items;                /* xitems[i] becomes _digest_items(fast[i]) */
    int changed;                     /* nblk, tails, layouts or sizes changed */
} Place;

/* is `item` a (name, value) tuple whose value is bytes? */
static inline int is_item(PyObject *it)
{
    return PyTuple_CheckExact(it) && PyTuple_GET_SIZE(it) == 2 && PyBytes_CheckExact(PyTuple_GET_ITEM(it, 1));
}

PyDoc_STRVAR(place_inodes_doc,
"place_inodes(columns, keyinfo, shared_off, mc0, mc0_shared, shared_rd, mc_sh, rd_sh, rd_name,\n"
"             mc_suffix, rd_suffix, dg_mc_size, dg_rd_size, pos, max_xsize, digest_items)\n"
"-> (pos, xsizes, forms, nids) or None\n\n"
"The loop of pass 4 of flatmount.image.writer (`_place_inodes`), the names being those of its locals;\n"
"`columns` = (xitems, isz, tails, fast, modes, nblk, layouts, sizes), changed in place as the loop\n"
"changes them.  None, with nothing changed, on anything out of the common case (the Python loop then\n"
"runs and words any error).");

static PyObject *place_inodes(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *columns, *keyinfo, *shared_off, *mc0, *shared_rd, *mc_sh, *rd_sh, *rd_name, *digest_items;
    int mc0_shared;
    long long mc_suffix, rd_suffix, dg_mc_size, dg_rd_size, pos, max_xsize;
    if (!PyArg_ParseTuple(args, "O!O!O!O!pO!O!O!SLLLLLLO:place_inodes", &PyTuple_Type, &columns,
                          &PyDict_Type, &keyinfo, &PyDict_Type, &shared_off, &PyTuple_Type, &mc0, &mc0_shared,
                          &PySet_Type, &shared_rd, &PySet_Type, &mc_sh, &PySet_Type, &rd_sh, &rd_name,
                          &mc_suffix, &rd_suffix, &dg_mc_size, &dg_rd_size, &pos, &max_xsize, &digest_items))
        return NULL;
    enum { X_ITEMS, X_ISZ, X_TAILS, X_FAST, X_MODES, X_NBLK, X_LAYOUTS, X_SIZES, NX };
    if (PyTuple_GET_SIZE(columns) != NX)
        Py_RETURN_NONE;
    PyObject *col[NX];
    Py_ssize_t n = -1;
    for (int c = 0; c < NX; c++) {
        col[c] = PyTuple_GET_ITEM(columns, c);
        if (!PyList_CheckExact(col[c]) || (n >= 0 && PyList_GET_SIZE(col[c]) != n))
            Py_RETURN_NONE;
        n = PyList_GET_SIZE(col[c]);
    }
    if (n == 0)
        Py_RETURN_NONE;
    int dg_shared = PySet_GET_SIZE(mc_sh) > 0 || PySet_GET_SIZE(rd_sh) > 0;
    Place *pl = PyMem_Calloc((size_t)n, sizeof(Place));
    long long *nids = PyMem_Calloc((size_t)n, sizeof(long long));
    PyObject *result = NULL, *xs_list = NULL, *forms_list = NULL, *nids_list = NULL;
    int r = OK;
    if (pl == NULL || nids == NULL) {
        PyErr_NoMemory();
        r = FAIL;
        goto done;
    }
    /* pass A: every inode's xattr body size and form, and its columns; nothing is changed */
    for (Py_ssize_t i = 0; i < n && r == OK; i++) {
        Place *p = &pl[i];
        prefetch_item(col[X_MODES], i + PF_AHEAD);   /* (hints: see PF_AHEAD) */
        prefetch_item(col[X_SIZES], i + PF_AHEAD);
        prefetch_item(col[X_FAST], i + PF_AHEAD);
        if ((r = item_ll(col[X_ISZ], i, COMPACT, EXTENDED, &p->isz)) != OK
                || (r = item_ll(col[X_TAILS], i, 0, 1LL << 40, &p->tail)) != OK
                || (r = item_ll(col[X_MODES], i, 0, 0xFFFF, &p->mode)) != OK
                || (r = item_ll(col[X_NBLK], i, 0, 1LL << 40, &p->nblk)) != OK
                || (r = item_ll(col[X_LAYOUTS], i, 0, 0xFFFF, &p->layout)) != OK
                || (r = item_ll(col[X_SIZES], i, 0, 0x7FFFFFFFFFFFFFFFLL, &p->size)) != OK)
            break;
        PyObject *items = PyList_GET_ITEM(col[X_ITEMS], i), *fst = PyList_GET_ITEM(col[X_FAST], i);
        if (!PyTuple_CheckExact(items) && !PyList_CheckExact(items)) {
            r = GIVE_UP;
            break;
        }
        Py_ssize_t ni = PySequence_Fast_GET_SIZE(items);
        PyObject **it = PySequence_Fast_ITEMS(items);
        int fst_true = PyObject_IsTrue(fst);
        if (fst_true < 0) {
            r = FAIL;
            break;
        }
        if (ni) {
            if (fst_true) {
                if (ni != 2 || !is_item(it[0]) || !is_item(it[1])) {
                    r = GIVE_UP;
                    break;
                }
                int m_sh = it[0] == mc0 ? mc0_shared : PyDict_Contains(shared_off, it[0]);
                PyObject *rv = PyTuple_GET_ITEM(it[1], 1);
                int r_sh = PySet_Contains(shared_rd, rv);
                if (m_sh < 0 || r_sh < 0) {
                    r = FAIL;
                    break;
                }
                if (r_sh) {
                    int eq = PyObject_RichCompareBool(PyTuple_GET_ITEM(it[1], 0), rd_name, Py_EQ);
                    if (eq < 0) {
                        r = FAIL;
                        break;
                    }
                    r_sh = eq;
                }
                long long xsize = m_sh ? XHDR + XID : XHDR + ((mc_suffix + PyBytes_GET_SIZE(PyTuple_GET_ITEM(it[0], 1))) & ~3LL);
                if (r_sh) {
                    xsize += XID;
                    p->form = xsize == XHDR + 2 * XID ? FORM_BOTH_SHARED : FORM_OTHER;
                } else {
                    xsize += (rd_suffix + PyBytes_GET_SIZE(rv)) & ~3LL;
                    p->form = m_sh ? FORM_MC_SHARED : FORM_BOTH_INLINE;
                }
                p->xsize = xsize;
            } else {
                long long nsh = 0, xsize = XHDR;
                for (Py_ssize_t k = 0; k < ni; k++) {
                    if (!is_item(it[k])) {
                        r = GIVE_UP;
                        break;
                    }
                    int sh = nsh < MAX_SHARED ? PyDict_Contains(shared_off, it[k]) : 0;
                    if (sh < 0) {
                        r = FAIL;
                        break;
                    }
                    if (sh) {
                        nsh++;
                        xsize += XID;
                    } else {
                        KeyInfo ki;
                        if ((r = key_info(keyinfo, PyTuple_GET_ITEM(it[k], 0), &ki)) != OK)
                            break;
                        xsize += (XENT + 3 + ki.nlen + PyBytes_GET_SIZE(PyTuple_GET_ITEM(it[k], 1))) & ~3LL;
                    }
                }
                if (r != OK)
                    break;
                if (xsize > max_xsize) {    /* too many xattrs: Python words it */
                    r = GIVE_UP;
                    break;
                }
                p->xsize = xsize;
            }
        } else if (fst_true) {               /* metacopy and redirect from the digest `fst` */
            if (!PyBytes_CheckExact(fst)) {
                r = GIVE_UP;
                break;
            }
            int in_mc = 0, in_rd = 0;
            if (dg_shared) {
                in_mc = PySet_Contains(mc_sh, fst);
                in_rd = in_mc < 0 ? -1 : PySet_Contains(rd_sh, fst);
                if (in_rd < 0) {
                    r = FAIL;
                    break;
                }
            }
            if (in_mc || in_rd) {
                long long xsize = in_mc ? XHDR + XID : dg_mc_size;
                if (in_rd) {
                    xsize += XID;
                    p->form = xsize == XHDR + 2 * XID ? FORM_BOTH_SHARED : FORM_OTHER;
                } else {
                    xsize += dg_rd_size;
                    p->form = FORM_MC_SHARED;
                }
                p->xsize = xsize;
                p->digest_items = 1;
            } else {
                p->xsize = dg_mc_size + dg_rd_size;
                p->form = FORM_BOTH_INLINE;
            }
        }
        p->fst = fst_true;
    }
    if (r != OK)
        goto done;
    /* pass B: the positions (the inode moves down, or its tail becomes a full block) */
    for (Py_ssize_t i = 0; i < n; i++) {
        Place *p = &pl[i];
        int fst = p->fst;
        long long base = p->isz + p->xsize, tail = p->tail;
        pos = (pos + SLOTPAD) & ~(long long)SLOTPAD;
        if (tail) {
            if (!fst && (p->mode & S_IFMT_) == S_IFLNK_) {
                long long total = base + tail;
                if (total >= BLKSZ) {        /* inode, xattrs and target do not fit one block */
                    p->nblk = 1;
                    p->tail = tail = 0;
                    p->layout = LAYOUT_PLAIN;
                    p->changed = 1;
                }
                if (pos / BLKSZ != (pos + total - 1) / BLKSZ)
                    pos = (pos + BLKSZ - 1) & ~(long long)(BLKSZ - 1);
            } else {
                long long rem = BLKSZ - (pos + base) % BLKSZ;
                if (rem < tail) {
                    long long extra = (rem + SLOTPAD) & ~(long long)SLOTPAD;
                    if (tail <= BLKSZ - (pos + base + extra) % BLKSZ)
                        pos += extra;
                    else {                   /* no inline tail after all: a full block */
                        p->nblk += 1;
                        if (fst && PySequence_Fast_GET_SIZE(PyList_GET_ITEM(col[X_ITEMS], i)) == 0)
                            p->digest_items = 1;
                        p->tail = tail = 0;
                        if (p->layout != LAYOUT_CHUNK)
                            p->layout = LAYOUT_PLAIN;
                        if ((p->mode & S_IFMT_) == S_IFDIR_)
                            p->size = p->nblk * BLKSZ;
                        p->changed = 1;
                        pos = (pos + BLKSZ - 1) & ~(long long)(BLKSZ - 1);
                    }
                }
            }
        }
        nids[i] = pos >> SLOTBITS;
        pos += base + tail;
    }
    /* pass C: the results, and the changed columns */
    xs_list = PyList_New(n);
    forms_list = PyList_New(n);
    nids_list = PyList_New(n);
    if (xs_list == NULL || forms_list == NULL || nids_list == NULL) {
        r = FAIL;
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Place *p = &pl[i];
        PyObject *a = PyLong_FromLongLong(p->xsize), *b = PyLong_FromLong(p->form), *c = PyLong_FromLongLong(nids[i]);
        if (a == NULL || b == NULL || c == NULL) {
            Py_XDECREF(a); Py_XDECREF(b); Py_XDECREF(c);
            r = FAIL;
            goto done;
        }
        PyList_SET_ITEM(xs_list, i, a);
        PyList_SET_ITEM(forms_list, i, b);
        PyList_SET_ITEM(nids_list, i, c);
        if (p->changed && (set_ll(col[X_NBLK], i, p->nblk) || set_ll(col[X_TAILS], i, p->tail)
                           || set_ll(col[X_LAYOUTS], i, p->layout) || set_ll(col[X_SIZES], i, p->size))) {
            r = FAIL;
            goto done;
        }
        if (p->digest_items) {
            PyObject *its = PyObject_CallOneArg(digest_items, PyList_GET_ITEM(col[X_FAST], i));
            if (its == NULL) {
                r = FAIL;
                goto done;
            }
            PyList_SetItem(col[X_ITEMS], i, its);
        }
    }
    result = Py_BuildValue("(LOOO)", pos, xs_list, forms_list, nids_list);
done:
    PyMem_Free(pl);
    PyMem_Free(nids);
    Py_XDECREF(xs_list);
    Py_XDECREF(forms_list);
    Py_XDECREF(nids_list);
    return pass_outcome(r, result);
}

/* ---------------------------------------------------------------------------------------------- */

/* ---------------------------------------------------------------------------------------------- */
/* repeated: the digests of flatmount/image/writer.py `_share_xattrs` used more than once */

typedef struct {
    PyObject *key;                   /* borrowed from the list (which nothing changes meanwhile) */
    uint32_t hash;                   /* the low bits of the key's hash */
    uint32_t count;
} Tally;

/* the slot of bytes `v` (hash `h`) in the table of `cap` slots: its own, or the empty one where it goes */
static inline size_t tally_slot(const Tally *t, size_t cap, PyObject *v, Py_hash_t h)
{
    size_t k = (size_t)h & (cap - 1);
    Py_ssize_t len = PyBytes_GET_SIZE(v);
    while (t[k].key != NULL) {
        PyObject *w = t[k].key;
        if (t[k].hash == (uint32_t)h && PyBytes_GET_SIZE(w) == len
                && memcmp(PyBytes_AS_STRING(w), PyBytes_AS_STRING(v), (size_t)len) == 0)
            break;
        k = (k + 1) & (cap - 1);
    }
    return k;
}

PyDoc_STRVAR(repeated_doc,
"repeated(values, also=()) -> {value: count} of the bytes values of the list met more than once, and\n"
"of those in the list `also` met at all; or None\n\n"
"`{v: c for v, c in Counter(values).items() if c > 1 or v in also}` for lists of exact bytes objects\n"
"(None for anything else): `_share_xattrs` needs the counts of the digests that repeat and of the\n"
"few an xattr of an inode names (most digests are used once), without a scan of `values` for each.");

static PyObject *repeated(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *values, *also = NULL;
    if (!PyArg_ParseTuple(args, "O|O:repeated", &values, &also))
        return NULL;
    if (!PyList_CheckExact(values) || (also != NULL && !PyList_CheckExact(also)))
        Py_RETURN_NONE;
    for (Py_ssize_t i = 0; also != NULL && i < PyList_GET_SIZE(also); i++)
        if (!PyBytes_CheckExact(PyList_GET_ITEM(also, i)))
            Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(values);
    if ((size_t)n >= UINT32_MAX / 2)
        Py_RETURN_NONE;                  /* (counts in 32 bits) */
    size_t cap = 16;
    while (4 * cap < 5 * (size_t)n)      /* at most 80% full: a smaller table (fewer fresh pages to */
        cap <<= 1;                       /* fault in) at the price of a few more probes */
    Tally *t = PyMem_Calloc(cap, sizeof(Tally));
    if (t == NULL)
        return PyErr_NoMemory();
    PyObject *out = NULL;
    int some = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyList_GET_ITEM(values, i);
        if (!PyBytes_CheckExact(v)) {
            PyMem_Free(t);
            Py_RETURN_NONE;
        }
        Py_hash_t h = PyObject_Hash(v);      /* (bytes: cached in the object, never fails) */
        if (h == -1 && PyErr_Occurred()) {
            PyMem_Free(t);
            return NULL;
        }
        size_t k = tally_slot(t, cap, v, h);
        if (t[k].key == NULL) {
            t[k].key = v;
            t[k].hash = (uint32_t)h;
        } else
            some = 1;
        t[k].count++;
    }
    out = PyDict_New();
    for (size_t k = 0; out != NULL && some && k < cap; k++)
        if (t[k].count > 1) {
            PyObject *c = PyLong_FromSsize_t(t[k].count);
            if (c == NULL || PyDict_SetItem(out, t[k].key, c) < 0)
                Py_CLEAR(out);
            Py_XDECREF(c);
        }
    /* the values of `also` met once too (the table looked up, not the list scanned) */
    for (Py_ssize_t i = 0; out != NULL && also != NULL && i < PyList_GET_SIZE(also); i++) {
        PyObject *v = PyList_GET_ITEM(also, i);
        Py_hash_t h = PyObject_Hash(v);
        if (h == -1 && PyErr_Occurred()) {
            Py_CLEAR(out);
            break;
        }
        size_t k = tally_slot(t, cap, v, h);
        if (t[k].key != NULL && t[k].count == 1) {
            PyObject *c = PyLong_FromSsize_t(1);
            if (c == NULL || PyDict_SetItem(out, t[k].key, c) < 0)
                Py_CLEAR(out);
            Py_XDECREF(c);
        }
    }
    PyMem_Free(t);
    return out;
}

/* ---------------------------------------------------------------------------------------------- */
/* emit_shared: the shared xattr entries of flatmount/image/writer.py `_emit_head` */

PyDoc_STRVAR(emit_shared_doc,
"emit_shared(buf, pos, shared, keyinfo) -> bool\n\n"
"The shared xattr entries `shared` ((name, value) tuples in on-disk order) written into the zeroed\n"
"writable `buf` from byte `pos` on, as flatmount.image.writer._emit_head writes them.  False when\n"
"anything is out of the common case (the caller then writes them in Python: the same bytes).");

static PyObject *emit_shared(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer view;
    long long p;
    PyObject *shared, *keyinfo;
    if (!PyArg_ParseTuple(args, "w*LO!O!:emit_shared", &view, &p, &PyList_Type, &shared, &PyDict_Type, &keyinfo))
        return NULL;
    Out o = {view.buf, view.len};
    int r = OK;
    PyObject *last = NULL;               /* the name `ki` describes (items come grouped by name) */
    KeyInfo ki = {0};
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(shared) && r == OK; i++) {
        PyObject *it = PyList_GET_ITEM(shared, i);
        if (!PyTuple_CheckExact(it) || PyTuple_GET_SIZE(it) != 2 || !PyBytes_CheckExact(PyTuple_GET_ITEM(it, 0))
                || !PyBytes_CheckExact(PyTuple_GET_ITEM(it, 1))) {
            r = GIVE_UP;
            break;
        }
        PyObject *k = PyTuple_GET_ITEM(it, 0), *v = PyTuple_GET_ITEM(it, 1);
        if (k != last) {
            if ((r = key_info(keyinfo, k, &ki)) != OK)
                break;
            last = k;
        }
        Py_ssize_t vlen = PyBytes_GET_SIZE(v);
        long long size = (XENT + ki.nlen + vlen + 3) & ~3LL;
        if (vlen > 0xFFFF || !fits(&o, p, size)) {
            r = GIVE_UP;
            break;
        }
        p += put_entry(o.buf + p, &ki, PyBytes_AS_STRING(v), vlen);
    }
    PyBuffer_Release(&view);
    if (r == FAIL)
        return NULL;
    return PyBool_FromLong(r == OK);
}

static PyMethodDef methods[] = {
    {"parse_dump", parse_dump, METH_VARARGS, parse_dump_doc},
    {"emit_inodes", emit_inodes, METH_VARARGS, emit_inodes_doc},
    {"inode_fields", inode_fields, METH_VARARGS, inode_fields_doc},
    {"collect", collect, METH_VARARGS, collect_doc},
    {"place_inodes", place_inodes, METH_VARARGS, place_inodes_doc},
    {"repeated", repeated, METH_VARARGS, repeated_doc},
    {"emit_shared", emit_shared, METH_VARARGS, emit_shared_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "flatmount.image._cwrite",
    "Compiled fast paths of mkimage --from-dump (dump parsing, image writing); see _cwrite.c.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cwrite(void)
{
    if (dot_names[0] == NULL) {
        dot_names[0] = PyBytes_FromStringAndSize(".", 1);
        dot_names[1] = PyBytes_FromStringAndSize("..", 2);
        if (dot_names[0] == NULL || dot_names[1] == NULL)
            return NULL;
    }
    return PyModule_Create(&module);
}
