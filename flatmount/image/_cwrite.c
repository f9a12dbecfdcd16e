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

/* set slot `f` of a new inode, stealing `v` (NULL: the slot keeps None) */
static inline void set_slot(PyObject *obj, const InodeInfo *info, int f, PyObject *v)
{
    PyObject **p = &SLOT(obj, info, f);
    PyObject *old = *p;
    *p = v;
    Py_XDECREF(old);
}

/* a new inode of `mode` with every other field at its __init__ default; NULL on error (set) */
static PyObject *new_inode(const InodeInfo *info, long mode)
{
    PyObject *obj = info->type->tp_alloc(info->type, 0);
    if (obj == NULL)
        return NULL;
    PyObject *m = PyLong_FromLong(mode);
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
} Parser;

enum { OK = 0, GIVE_UP = 1, FAIL = -1 };

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
    PyObject *node = new_inode(&ps->info, mode);
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

    PyObject *node = new_inode(&ps->info, mode);
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
        PyObject *v;
        if ((v = PyLong_FromLongLong(uid)) == NULL)
            goto out;
        set_slot(node, &ps->info, F_UID, v);
        if ((v = PyLong_FromLongLong(gid)) == NULL)
            goto out;
        set_slot(node, &ps->info, F_GID, v);
        if ((v = PyLong_FromLongLong(mtime)) == NULL)
            goto out;
        set_slot(node, &ps->info, F_MTIME, v);
        if ((v = PyLong_FromLongLong(sz)) == NULL)
            goto out;
        set_slot(node, &ps->info, F_SIZE, v);
        if ((v = PyLong_FromLongLong(rdev)) == NULL)
            goto out;
        set_slot(node, &ps->info, F_RDEV, v);
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
    PyMem_Free(f);
    PyMem_Free(ps.scratch);
    PyMem_Free(ps.last_parent);
    Py_XDECREF(ps.fixups);
    Py_XDECREF(ps.dirs);
    PyBuffer_Release(&buf);
    if (r == FAIL)
        return NULL;
    if (r == GIVE_UP)
        Py_RETURN_NONE;
    return result;
}

/* ---------------------------------------------------------------------------------------------- */

static PyMethodDef methods[] = {
    {"parse_dump", parse_dump, METH_VARARGS, parse_dump_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "flatmount.image._cwrite",
    "Compiled fast paths of mkimage --from-dump (dump parsing, image writing); see _cwrite.c.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cwrite(void)
{
    return PyModule_Create(&module);
}
