/* kotoba_memory._cpool: the MemoryPool's hot paths in C.
 *
 * PoolCore is the base of CMemoryPool (memory_pool/pool.py): it holds the slab size-class free lists
 * (heads and live counts live in array('q') objects shared with the Python slow paths), the deferred
 * large-block cache and the counters, and serves allocate() and Block.release() without a Python frame
 * whenever the reference implementation would take its fast path; everything else (new slabs, the
 * buddy allocator, exhaustion, heap fallback, collected blocks) is the Python code's, called back.
 * Block is the handle: it exports the buffer protocol (no memoryview per use) and refuses exports and
 * release once released, like the reference. Lock is the pool lock both sides take.
 *
 * Every entry point reachable from Python checks its arguments and every offset it dereferences, so a
 * corrupted free list or hostile input sends the call to the Python path (which raises) instead of
 * touching memory outside the mapping.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <pythread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#ifdef _WIN32
#include <windows.h>
#endif

#define SLAB_MAX 8192
#define SLAB_MIN_SHIFT 14
#define MIN_BLOCK 512
#define LC_MAX 32            /* _LARGE_CACHE_MAX_BLOCKS */
#define TIME_SAMPLE_MASK 31
#define CLASS_OF_LEN ((SLAB_MAX >> 4) + 1)

/* The fast paths rely on the GIL: they run without releasing it and without running Python code, so
 * checking that no thread holds the pool lock (lock->owner, set by whoever takes it, right after it
 * got the GIL back) is enough to exclude the Python slow paths, which always hold it. A free-threaded
 * build has no such guarantee and takes the lock on every call. */
#ifdef Py_GIL_DISABLED
#define FAST_LOCKING 0
#else
#define FAST_LOCKING 1
#endif

/* Released Block objects kept for reuse (their memory only); GIL-protected, so off without a GIL. */
#if FAST_LOCKING
#define BLOCK_FREELIST_MAX 64
#else
#define BLOCK_FREELIST_MAX 0
#endif

static PyObject *ReleasedError = NULL;  /* BlockReleasedError */
static PyObject *InUseError = NULL;     /* BlockInUseError */
static PyObject *ClosedError = NULL;    /* PoolClosedError */
static PyObject *str_allocate_slow, *str_free_block, *str_release, *str_append;

static int64_t
now_ns(void)
{
#ifdef _WIN32
    static LARGE_INTEGER freq;
    LARGE_INTEGER c;
    if (!freq.QuadPart) QueryPerformanceFrequency(&freq);
    QueryPerformanceCounter(&c);
    return (int64_t)((double)c.QuadPart * 1e9 / (double)freq.QuadPart);
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
#endif
}

static int
released_error(const char *msg)
{
    PyErr_SetString(ReleasedError ? ReleasedError : PyExc_ValueError, msg);
    return -1;
}

/* ------------------------------------------------------------------------------------------------ */
/* Lock: a non-reentrant lock with threading.Lock's interface; C takes it without a method call.     */

typedef struct {
    PyObject_HEAD
    PyThread_type_lock lock;
    unsigned long owner;  /* thread holding it, 0 when free */
} LockObject;

static PyTypeObject Lock_Type;

static PyObject *
Lock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Lock() takes no arguments");
        return NULL;
    }
    LockObject *self = (LockObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->lock = PyThread_allocate_lock();
    if (!self->lock) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void
Lock_dealloc(LockObject *self)
{
    if (self->lock) {
        if (self->owner) PyThread_release_lock(self->lock);
        PyThread_free_lock(self->lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Take the lock from C, waiting with the GIL released. -1 (RuntimeError) if this thread holds it:
 * a re-entrant call (a finaliser or callback inside a pool operation) must fail, not deadlock. */
static int
lock_take(LockObject *lk)
{
    unsigned long me = PyThread_get_thread_ident();
    if (PyThread_acquire_lock(lk->lock, NOWAIT_LOCK) != PY_LOCK_ACQUIRED) {
        if (lk->owner == me) {
            PyErr_SetString(PyExc_RuntimeError, "re-entrant call into a memory pool that this thread is using");
            return -1;
        }
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(lk->lock, WAIT_LOCK);
        Py_END_ALLOW_THREADS
    }
    lk->owner = me;
    return 0;
}

static void
lock_give(LockObject *lk)
{
    lk->owner = 0;
    PyThread_release_lock(lk->lock);
}

static PyObject *
Lock_acquire(LockObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"blocking", "timeout", NULL};
    int blocking = 1;
    double timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|pd:acquire", kwlist, &blocking, &timeout)) return NULL;
    if (!blocking && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
        return NULL;
    }
    if (timeout < 0 && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "timeout value must be a non-negative number");
        return NULL;
    }
    PyLockStatus r = PyThread_acquire_lock_timed(self->lock, 0, 0);
    if (r != PY_LOCK_ACQUIRED && blocking && timeout < 0 && self->owner == PyThread_get_thread_ident()) {
        /* Waiting forever for ourselves: a finaliser or callback re-entered the pool. */
        PyErr_SetString(PyExc_RuntimeError, "re-entrant call into a memory pool that this thread is using");
        return NULL;
    }
    if (r != PY_LOCK_ACQUIRED && blocking) {
        PY_TIMEOUT_T us = -1;
        if (timeout >= 0) {
            if (timeout * 1e6 >= (double)PY_TIMEOUT_MAX) {
                PyErr_SetString(PyExc_OverflowError, "timeout value is too large");
                return NULL;
            }
            us = (PY_TIMEOUT_T)(timeout * 1e6);
        }
        Py_BEGIN_ALLOW_THREADS
        r = PyThread_acquire_lock_timed(self->lock, us, 0);
        Py_END_ALLOW_THREADS
    }
    if (r == PY_LOCK_ACQUIRED) {
        self->owner = PyThread_get_thread_ident();
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyObject *
Lock_release(LockObject *self, PyObject *unused)
{
    if (!self->owner) {
        PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        return NULL;
    }
    lock_give(self);
    Py_RETURN_NONE;
}

static PyObject *
Lock_exit(LockObject *self, PyObject *args)
{
    return Lock_release(self, NULL);
}

static PyObject *
Lock_locked(LockObject *self, PyObject *unused)
{
    return PyBool_FromLong(self->owner != 0);
}

static PyMethodDef Lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))Lock_acquire, METH_VARARGS | METH_KEYWORDS, "Take the lock."},
    {"release", (PyCFunction)Lock_release, METH_NOARGS, "Give the lock back."},
    {"locked", (PyCFunction)Lock_locked, METH_NOARGS, "Whether the lock is held."},
    {"__enter__", (PyCFunction)(void (*)(void))Lock_acquire, METH_VARARGS | METH_KEYWORDS, NULL},
    {"__exit__", (PyCFunction)Lock_exit, METH_VARARGS, NULL},
    {NULL},
};

static PyTypeObject Lock_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kotoba_memory._cpool.Lock",
    .tp_basicsize = sizeof(LockObject),
    .tp_dealloc = (destructor)Lock_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The pool lock: threading.Lock's interface, taken by the C fast paths without a call.",
    .tp_methods = Lock_methods,
    .tp_new = Lock_new,
};

/* ------------------------------------------------------------------------------------------------ */
/* PoolCore                                                                                          */

typedef struct {
    int64_t cap;
    int64_t off;
} LcEntry;

typedef struct {
    PyObject_HEAD
    LockObject *lock;
    PyObject *pending;   /* deque of (offset, cls, size) from collected blocks */
    int pending_is_deque;
    PyObject *base_view; /* the pool's memoryview of the mapping (as_slice slices it) */
    /* bound state (between _bind_core and _unbind) */
    int bound;
    Py_buffer mm_buf, heads_buf, live_buf;
    char *base;
    int64_t capacity;
    int64_t *heads;
    int64_t *live;
    Py_ssize_t n_classes, n_live;
    int16_t class_of[CLASS_OF_LEN];
    int64_t *slab_sizes;
    int64_t *slab_masks;
    int octave_shift;
    Py_ssize_t exports;  /* buffer exports of this pool's blocks */
    /* counters (members, shared with the Python code) */
    long long used, requested, allocs, releases, failures, timed_ns, timed;
    /* the deferred large-block cache: most recent last */
    int lc_n;
    LcEntry lc[LC_MAX];
} PoolObject;

typedef struct {
    PyObject_HEAD
    PoolObject *pool;  /* NULL once released */
    PyObject *view;    /* the cached as_slice() memoryview */
    PyObject *heap;    /* bytearray of a heap-fallback block */
    int64_t offset, size, cls;
    Py_ssize_t exports;
} BlockObject;

static PyTypeObject Pool_Type, Block_Type;

static void
pool_unbind(PoolObject *self)
{
    if (!self->bound) return;
    self->bound = 0;
    self->base = NULL;
    self->heads = self->live = NULL;
    PyBuffer_Release(&self->mm_buf);
    PyBuffer_Release(&self->heads_buf);
    PyBuffer_Release(&self->live_buf);
    PyMem_Free(self->slab_sizes);
    PyMem_Free(self->slab_masks);
    self->slab_sizes = self->slab_masks = NULL;
    self->n_classes = self->n_live = 0;
}

static int
Pool_traverse(PoolObject *self, visitproc visit, void *arg)
{
    /* The heap subclass's type is visited by subtype_traverse (this base is a static type). */
    Py_VISIT(self->lock);
    Py_VISIT(self->pending);
    Py_VISIT(self->base_view);
    return 0;
}

static int
Pool_clear(PoolObject *self)
{
    Py_CLEAR(self->lock);
    Py_CLEAR(self->pending);
    Py_CLEAR(self->base_view);
    return 0;
}

static void
Pool_dealloc(PoolObject *self)
{
    PyObject_GC_UnTrack(self);
    pool_unbind(self);
    Pool_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
get_i64_buffer(PyObject *obj, Py_buffer *buf, const char *what)
{
    if (PyObject_GetBuffer(obj, buf, PyBUF_WRITABLE | PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (buf->itemsize != 8 || !buf->format || strcmp(buf->format, "q") != 0) {
        PyBuffer_Release(buf);
        PyErr_Format(PyExc_TypeError, "%s must be an array('q')", what);
        return -1;
    }
    return 0;
}

/* _bind_core(mm, base_view, heads, slab_live, class_of, slab_sizes, slab_bytes, octave_shift) */
static PyObject *
Pool_bind_core(PoolObject *self, PyObject *args)
{
    PyObject *mm, *base_view, *heads, *live, *class_of, *sizes, *slab_bytes;
    int octave_shift;
    if (!PyArg_ParseTuple(args, "OOOOOOOi:_bind_core", &mm, &base_view, &heads, &live, &class_of, &sizes,
                          &slab_bytes, &octave_shift))
        return NULL;
    if (self->bound) {
        PyErr_SetString(PyExc_RuntimeError, "pool core already bound");
        return NULL;
    }
    if (!PyMemoryView_Check(base_view)) {
        PyErr_SetString(PyExc_TypeError, "base_view must be a memoryview");
        return NULL;
    }
    if (octave_shift < 0 || octave_shift > 5) {
        PyErr_SetString(PyExc_ValueError, "octave_shift out of range");
        return NULL;
    }
    PyObject *sizes_seq = PySequence_Fast(sizes, "slab_sizes must be a sequence");
    if (!sizes_seq) return NULL;
    PyObject *bytes_seq = PySequence_Fast(slab_bytes, "slab_bytes must be a sequence");
    if (!bytes_seq) {
        Py_DECREF(sizes_seq);
        return NULL;
    }
    Py_buffer cbuf = {0};
    Py_ssize_t n = PySequence_Fast_GET_SIZE(sizes_seq);
    int ok = 0;
    memset(&self->mm_buf, 0, sizeof(Py_buffer));
    memset(&self->heads_buf, 0, sizeof(Py_buffer));
    memset(&self->live_buf, 0, sizeof(Py_buffer));
    if (n < 1 || n > 4096 || PySequence_Fast_GET_SIZE(bytes_seq) != n) {
        PyErr_SetString(PyExc_ValueError, "slab_sizes and slab_bytes must have the same, small, length");
        goto done;
    }
    if (PyObject_GetBuffer(mm, &self->mm_buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (get_i64_buffer(heads, &self->heads_buf, "heads") < 0) goto fail_mm;
    if (get_i64_buffer(live, &self->live_buf, "slab_live") < 0) goto fail_heads;
    if (self->heads_buf.len / 8 != n) {
        PyErr_SetString(PyExc_ValueError, "heads must have one entry per slab class");
        goto fail_live;
    }
    if (self->mm_buf.len < MIN_BLOCK || self->live_buf.len / 8 < (self->mm_buf.len >> SLAB_MIN_SHIFT) + 1) {
        PyErr_SetString(PyExc_ValueError, "slab_live too short for the mapping");
        goto fail_live;
    }
    if (PyObject_GetBuffer(class_of, &cbuf, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) goto fail_live;
    if (cbuf.itemsize != 2 || !cbuf.format || strcmp(cbuf.format, "h") != 0 || cbuf.len / 2 != CLASS_OF_LEN) {
        PyErr_SetString(PyExc_TypeError, "class_of must be an array('h') of (SLAB_MAX >> 4) + 1 entries");
        goto fail_live;
    }
    memcpy(self->class_of, cbuf.buf, sizeof(self->class_of));
    for (Py_ssize_t i = 0; i < CLASS_OF_LEN; i++) {
        if (self->class_of[i] < 0 || self->class_of[i] >= n) {
            PyErr_SetString(PyExc_ValueError, "class_of names a class that does not exist");
            goto fail_live;
        }
    }
    self->slab_sizes = PyMem_Calloc(n, sizeof(int64_t));
    self->slab_masks = PyMem_Calloc(n, sizeof(int64_t));
    if (!self->slab_sizes || !self->slab_masks) {
        PyErr_NoMemory();
        goto fail_arrays;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long sz = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(sizes_seq, i));
        long long sb = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(bytes_seq, i));
        if (PyErr_Occurred()) goto fail_arrays;
        if (sz < 16 || sz > SLAB_MAX || (sz & 7) || sb < sz || (sb & (sb - 1))) {
            PyErr_SetString(PyExc_ValueError, "bad slab class geometry");
            goto fail_arrays;
        }
        self->slab_sizes[i] = sz;
        self->slab_masks[i] = ~(sb - 1);
    }
    self->base = self->mm_buf.buf;
    self->capacity = self->mm_buf.len;
    self->heads = self->heads_buf.buf;
    self->live = self->live_buf.buf;
    self->n_classes = n;
    self->n_live = self->live_buf.len / 8;
    self->octave_shift = octave_shift;
    Py_INCREF(base_view);
    Py_XSETREF(self->base_view, base_view);
    self->bound = 1;
    ok = 1;
    goto done;
fail_arrays:
    PyMem_Free(self->slab_sizes);
    PyMem_Free(self->slab_masks);
    self->slab_sizes = self->slab_masks = NULL;
fail_live:
    PyBuffer_Release(&self->live_buf);
fail_heads:
    PyBuffer_Release(&self->heads_buf);
fail_mm:
    PyBuffer_Release(&self->mm_buf);
done:
    if (cbuf.obj) PyBuffer_Release(&cbuf);
    Py_DECREF(sizes_seq);
    Py_DECREF(bytes_seq);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Pool_unbind(PoolObject *self, PyObject *unused)
{
    if (self->exports > 0) {
        PyErr_Format(InUseError ? InUseError : PyExc_BufferError,
                     "%zd buffer exports of this pool's blocks are still alive", self->exports);
        return NULL;
    }
    pool_unbind(self);
    Py_RETURN_NONE;
}

static BlockObject *block_freelist[BLOCK_FREELIST_MAX + 1];
static int block_freelist_n = 0;

static BlockObject *
block_new(PoolObject *pool, int64_t off, int64_t size, int64_t cls)
{
    BlockObject *b;
    if (block_freelist_n > 0) {
        b = block_freelist[--block_freelist_n];
        PyObject_Init((PyObject *)b, &Block_Type);
    }
    else {
        b = PyObject_New(BlockObject, &Block_Type);
        if (!b) return NULL;
    }
    Py_INCREF(pool);
    b->pool = pool;
    b->view = NULL;
    b->heap = NULL;
    b->offset = off;
    b->size = size;
    b->cls = cls;
    b->exports = 0;
    return b;
}

static int
pool_lock(PoolObject *self)
{
    if (!self->lock) {
        PyErr_SetString(PyExc_RuntimeError, "pool has no lock (not initialised)");
        return -1;
    }
    return lock_take(self->lock);
}

/* The large class a request of size > SLAB_MAX is rounded to (the reference's inlined _large_size). */
static int64_t
large_cap(int64_t size, int octave_shift)
{
    int bits = 0;
    uint64_t v = (uint64_t)(size - 1);
#if defined(__GNUC__) || defined(__clang__)
    bits = v ? 64 - __builtin_clzll(v) : 0;
#else
    while (v) {
        bits++;
        v >>= 1;
    }
#endif
    int64_t step = (int64_t)1 << (bits - 1 - octave_shift);
    int64_t cap = (size + step - 1) / step * step;
    if (cap & (MIN_BLOCK - 1)) cap = (cap | (MIN_BLOCK - 1)) + 1;
    return cap;
}

static int64_t
lc_pop(PoolObject *self, int64_t cap)
{
    for (int i = self->lc_n - 1; i >= 0; i--) {
        if (self->lc[i].cap == cap) {
            int64_t off = self->lc[i].off;
            memmove(&self->lc[i], &self->lc[i + 1], (size_t)(self->lc_n - 1 - i) * sizeof(LcEntry));
            self->lc_n--;
            return off;
        }
    }
    return -1;
}

static PyObject *
call_slow(PoolObject *self, PyObject *size, int zero)
{
    PyObject *z = zero ? Py_True : Py_False;
    PyObject *args[3] = {(PyObject *)self, size, z};
    return PyObject_VectorcallMethod(str_allocate_slow, args, 3, NULL);
}

static PyObject *
Pool_allocate(PoolObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    int zero = 0;
    if (nargs != 1) {
        PyErr_Format(PyExc_TypeError, "allocate() takes exactly one positional argument (%zd given)", nargs);
        return NULL;
    }
    if (kwnames) {
        Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nk; i++) {
            PyObject *k = PyTuple_GET_ITEM(kwnames, i);
            if (!PyUnicode_Check(k) || PyUnicode_CompareWithASCIIString(k, "zero") != 0) {
                PyErr_Format(PyExc_TypeError, "allocate() got an unexpected keyword argument %R", k);
                return NULL;
            }
            zero = PyObject_IsTrue(args[1 + i]);
            if (zero < 0) return NULL;
        }
    }
    PyObject *size_obj = args[0];
    if (!PyLong_CheckExact(size_obj) || !self->bound) return call_slow(self, size_obj, zero);
    int overflow = 0;
    long long size = PyLong_AsLongLongAndOverflow(size_obj, &overflow);
    if (overflow || size <= 0 || size > self->capacity || !self->lock) return call_slow(self, size_obj, zero);
#if FAST_LOCKING
    if (self->lock->owner) return call_slow(self, size_obj, zero);  /* a slow path is running */
#else
    if (pool_lock(self) < 0) return NULL;
#endif
    if (self->pending) {
        Py_ssize_t waiting = self->pending_is_deque ? Py_SIZE(self->pending) : PyObject_Length(self->pending);
        if (waiting != 0) {
            PyErr_Clear();
            goto slow;
        }
    }
    int64_t off, cls, add;
    if (size <= SLAB_MAX) {
        cls = self->class_of[(size + 15) >> 4];
        off = self->heads[cls];
        int64_t slot = self->slab_sizes[cls];
        if (off < 0 || (off & 7) || off > self->capacity - slot) goto slow;
        int64_t nxt = *(int64_t *)(self->base + off);
        if (nxt >= self->capacity || nxt < -1) goto slow;  /* corrupted: the Python path raises */
        Py_ssize_t g = (Py_ssize_t)((off & self->slab_masks[cls]) >> SLAB_MIN_SHIFT);
        if (g < 0 || g >= self->n_live) goto slow;
        self->heads[cls] = nxt;
        self->live[g] += 1;
        add = slot;
    }
    else {
        int64_t cap = large_cap(size, self->octave_shift);
        off = lc_pop(self, cap);
        if (off < 0) goto slow;
        cls = -cap;
        add = cap;
    }
    long long n = ++self->allocs;
    int64_t t0 = (n & TIME_SAMPLE_MASK) ? 0 : now_ns();
    self->used += add;
    self->requested += size;
    BlockObject *b = block_new(self, off, size, cls);
    if (t0) {
        self->timed_ns += now_ns() - t0;
        self->timed += 1;
    }
#if !FAST_LOCKING
    lock_give(self->lock);
#endif
    if (!b) return NULL;
    if (zero) memset(self->base + off, 0, (size_t)size);
    return (PyObject *)b;
slow:
#if !FAST_LOCKING
    lock_give(self->lock);
#endif
    return call_slow(self, size_obj, zero);
}

static int
check_range(PoolObject *self, long long off, long long size)
{
    if (!self->bound) {
        PyErr_SetString(ClosedError ? ClosedError : PyExc_ValueError, "pool is closed");
        return -1;
    }
    if (off < 0 || size <= 0 || off > self->capacity || size > self->capacity - off) {
        PyErr_Format(PyExc_ValueError, "block [%lld, %lld) outside the pool's %lld bytes", off, off + size,
                     (long long)self->capacity);
        return -1;
    }
    return 0;
}

static PyObject *
Pool_new_block(PoolObject *self, PyObject *args)
{
    long long off, size, cls;
    if (!PyArg_ParseTuple(args, "LLL:_new_block", &off, &size, &cls)) return NULL;
    if (check_range(self, off, size) < 0) return NULL;
    if (cls >= 0 ? cls >= self->n_classes : -cls < size) {
        PyErr_SetString(PyExc_ValueError, "bad size class for a block");
        return NULL;
    }
    return (PyObject *)block_new(self, off, size, cls);
}

static PyObject *
Pool_heap_block(PoolObject *self, PyObject *arg)
{
    long long size = PyLong_AsLongLong(arg);
    if (size == -1 && PyErr_Occurred()) return NULL;
    if (size <= 0 || size > PY_SSIZE_T_MAX) {
        PyErr_SetString(PyExc_ValueError, "heap block size must be positive");
        return NULL;
    }
    PyObject *heap = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (!heap) return NULL;
    memset(PyByteArray_AS_STRING(heap), 0, (size_t)size);
    BlockObject *b = block_new(self, -1, size, -size);
    if (!b) {
        Py_DECREF(heap);
        return NULL;
    }
    b->heap = heap;
    b->view = PyMemoryView_FromObject(heap);
    if (!b->view) {
        Py_DECREF(b);
        return NULL;
    }
    return (PyObject *)b;
}

static PyObject *
Pool_lc_pop(PoolObject *self, PyObject *arg)
{
    int overflow = 0;
    long long cap = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (cap == -1 && PyErr_Occurred()) return NULL;
    if (overflow) return PyLong_FromLong(-1);  /* no block that large is ever cached */
    return PyLong_FromLongLong(lc_pop(self, cap));
}

static PyObject *
Pool_lc_push(PoolObject *self, PyObject *args)
{
    long long cap, off;
    if (!PyArg_ParseTuple(args, "LL:_lc_push", &cap, &off)) return NULL;
    if (check_range(self, off, cap) < 0) return NULL;
    if (self->lc_n >= LC_MAX) {
        PyErr_SetString(PyExc_RuntimeError, "large-block cache full");
        return NULL;
    }
    self->lc[self->lc_n].cap = cap;
    self->lc[self->lc_n].off = off;
    self->lc_n++;
    Py_RETURN_NONE;
}

static PyObject *
lc_list(PoolObject *self, int clear)
{
    PyObject *out = PyList_New(self->lc_n);
    if (!out) return NULL;
    for (int i = 0; i < self->lc_n; i++) {
        PyObject *t = Py_BuildValue("(LL)", (long long)self->lc[i].cap, (long long)self->lc[i].off);
        if (!t) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, t);
    }
    if (clear) self->lc_n = 0;
    return out;
}

static PyObject *
Pool_lc_entries(PoolObject *self, PyObject *unused)
{
    return lc_list(self, 0);
}

static PyObject *
Pool_lc_drain(PoolObject *self, PyObject *unused)
{
    return lc_list(self, 1);
}

static PyObject *
Pool_lc_metadata_bytes(PoolObject *self, PyObject *unused)
{
    return PyLong_FromSsize_t((Py_ssize_t)(sizeof(self->lc) + sizeof(self->class_of) +
                                           2 * sizeof(int64_t) * self->n_classes));
}

static PyObject *
Pool_get_lock(PoolObject *self, void *closure)
{
    if (!self->lock) Py_RETURN_NONE;
    Py_INCREF(self->lock);
    return (PyObject *)self->lock;
}

static int
Pool_set_lock(PoolObject *self, PyObject *value, void *closure)
{
    if (!value || !PyObject_TypeCheck(value, &Lock_Type)) {
        PyErr_SetString(PyExc_TypeError, "_lock must be a kotoba_memory._cpool.Lock");
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(self->lock, (LockObject *)value);
    return 0;
}

static PyObject *
Pool_get_pending(PoolObject *self, void *closure)
{
    if (!self->pending) Py_RETURN_NONE;
    Py_INCREF(self->pending);
    return self->pending;
}

static int
Pool_set_pending(PoolObject *self, PyObject *value, void *closure)
{
    if (!value) {
        PyErr_SetString(PyExc_TypeError, "cannot delete _pending");
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(self->pending, value);
    /* A deque keeps its length in ob_size: read it directly on the fast path. */
    self->pending_is_deque = strcmp(Py_TYPE(value)->tp_name, "collections.deque") == 0;
    return 0;
}

static PyObject *
Pool_get_large_cached(PoolObject *self, void *closure)
{
    return PyLong_FromLong(self->lc_n);
}

static PyMethodDef Pool_methods[] = {
    {"allocate", (PyCFunction)(void (*)(void))Pool_allocate, METH_FASTCALL | METH_KEYWORDS,
     "A block of ``size`` bytes; contents are left as they were unless ``zero=True``."},
    {"_bind_core", (PyCFunction)Pool_bind_core, METH_VARARGS, NULL},
    {"_unbind", (PyCFunction)Pool_unbind, METH_NOARGS, NULL},
    {"_new_block", (PyCFunction)Pool_new_block, METH_VARARGS, NULL},
    {"_heap_block", (PyCFunction)Pool_heap_block, METH_O, NULL},
    {"_lc_pop", (PyCFunction)Pool_lc_pop, METH_O, NULL},
    {"_lc_push", (PyCFunction)Pool_lc_push, METH_VARARGS, NULL},
    {"_lc_entries", (PyCFunction)Pool_lc_entries, METH_NOARGS, NULL},
    {"_lc_drain", (PyCFunction)Pool_lc_drain, METH_NOARGS, NULL},
    {"_lc_metadata_bytes", (PyCFunction)Pool_lc_metadata_bytes, METH_NOARGS, NULL},
    {NULL},
};

static PyMemberDef Pool_members[] = {
    {"_used", T_LONGLONG, offsetof(PoolObject, used), 0, NULL},
    {"_requested", T_LONGLONG, offsetof(PoolObject, requested), 0, NULL},
    {"_allocs", T_LONGLONG, offsetof(PoolObject, allocs), 0, NULL},
    {"_releases", T_LONGLONG, offsetof(PoolObject, releases), 0, NULL},
    {"_failures", T_LONGLONG, offsetof(PoolObject, failures), 0, NULL},
    {"_timed_ns", T_LONGLONG, offsetof(PoolObject, timed_ns), 0, NULL},
    {"_timed", T_LONGLONG, offsetof(PoolObject, timed), 0, NULL},
    {NULL},
};

static PyGetSetDef Pool_getset[] = {
    {"_lock", (getter)Pool_get_lock, (setter)Pool_set_lock, NULL, NULL},
    {"_pending", (getter)Pool_get_pending, (setter)Pool_set_pending, NULL, NULL},
    {"_large_cached", (getter)Pool_get_large_cached, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject Pool_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kotoba_memory._cpool.PoolCore",
    .tp_basicsize = sizeof(PoolObject),
    .tp_dealloc = (destructor)Pool_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C hot paths of a MemoryPool (subclassed by CMemoryPool).",
    .tp_traverse = (traverseproc)Pool_traverse,
    .tp_clear = (inquiry)Pool_clear,
    .tp_methods = Pool_methods,
    .tp_members = Pool_members,
    .tp_getset = Pool_getset,
    .tp_new = PyType_GenericNew,
};

/* ------------------------------------------------------------------------------------------------ */
/* Block                                                                                             */

static PyObject *
call_free_block(PoolObject *pool, int64_t off, int64_t cls, int64_t size)
{
    PyObject *a = PyLong_FromLongLong(off), *c = PyLong_FromLongLong(cls), *s = PyLong_FromLongLong(size);
    PyObject *r = NULL;
    if (a && c && s) {
        PyObject *args[4] = {(PyObject *)pool, a, c, s};
        r = PyObject_VectorcallMethod(str_free_block, args, 4, NULL);
    }
    Py_XDECREF(a);
    Py_XDECREF(c);
    Py_XDECREF(s);
    return r;
}

/* Release the cached view; -1 with BlockInUseError set if something still exports it. */
static int
release_view(BlockObject *self)
{
    PyObject *view = self->view;
    if (!view) return 0;
    PyObject *r = PyObject_CallMethodNoArgs(view, str_release);
    if (!r) {
        if (PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            PyErr_SetString(InUseError ? InUseError : PyExc_BufferError,
                            "cannot release block: its buffer is still exported (numpy, PickleBuffer, ...); "
                            "drop those references first");
        }
        return -1;
    }
    Py_DECREF(r);
    self->view = NULL;
    Py_DECREF(view);
    return 0;
}

/* Push a released block on its free list or the large cache; 0 if it needs the Python path. Called
 * under the lock, or (FAST_LOCKING) with the GIL held and the lock free. */
static int
push_inline(PoolObject *pool, int64_t off, int64_t cls, int64_t size)
{
    if (off < 0 || !pool->bound) return 0;
    if (cls >= 0) {
        if (cls >= pool->n_classes || off > pool->capacity - 8) return 0;
        Py_ssize_t g = (Py_ssize_t)((off & pool->slab_masks[cls]) >> SLAB_MIN_SHIFT);
        if (g < 0 || g >= pool->n_live) return 0;
        pool->releases++;
        pool->used -= pool->slab_sizes[cls];
        pool->requested -= size;
        *(int64_t *)(pool->base + off) = pool->heads[cls];
        pool->heads[cls] = off;
        pool->live[g] -= 1;
        return 1;
    }
    if (pool->lc_n >= LC_MAX) return 0;
    pool->releases++;
    pool->used += cls;
    pool->requested -= size;
    pool->lc[pool->lc_n].cap = -cls;
    pool->lc[pool->lc_n].off = off;
    pool->lc_n++;
    return 1;
}

static PyObject *
Block_release(BlockObject *self, PyObject *unused)
{
    PoolObject *pool = self->pool;
    if (!pool) {
        released_error("block released twice");
        return NULL;
    }
#if FAST_LOCKING
    if (pool->lock && !pool->lock->owner && !self->exports) {
        /* Releasing the view runs no Python code (its buffer belongs to the pool's mapping or our
         * bytearray), so this stays atomic under the GIL. */
        if (release_view(self) < 0) return NULL;
        if (push_inline(pool, self->offset, self->cls, self->size)) {
            self->pool = NULL;
            Py_DECREF(pool);
            Py_RETURN_NONE;
        }
    }
#endif
    if (pool_lock(pool) < 0) return NULL;
    if (self->pool != pool) {  /* another thread released it while we waited */
        lock_give(pool->lock);
        released_error("block released twice");
        return NULL;
    }
    if (self->exports > 0) {
        lock_give(pool->lock);
        PyErr_SetString(InUseError ? InUseError : PyExc_BufferError,
                        "cannot release block: its buffer is still exported (a memoryview of it, numpy, ...); "
                        "drop those references first");
        return NULL;
    }
    LockObject *lock = pool->lock;
    Py_INCREF(lock);
    if (release_view(self) < 0) {
        lock_give(lock);
        Py_DECREF(lock);
        return NULL;
    }
    self->pool = NULL;  /* our reference moves to this frame */
    int64_t off = self->offset, cls = self->cls, size = self->size;
    int ok = push_inline(pool, off, cls, size) ? 2 : 1;
    if (ok != 2) {
        PyObject *r = call_free_block(pool, off, cls, size);
        if (!r) ok = 0;
        Py_XDECREF(r);
    }
    lock_give(lock);
    Py_DECREF(lock);
    Py_DECREF(pool);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Block_as_slice(BlockObject *self, PyObject *unused)
{
    if (self->view) {
        Py_INCREF(self->view);
        return self->view;
    }
    PoolObject *pool = self->pool;
    if (!pool) {
        released_error("block already released; its memory may belong to another block");
        return NULL;
    }
    if (!pool->bound || !pool->base_view) {
        PyErr_SetString(ClosedError ? ClosedError : PyExc_ValueError, "pool is closed");
        return NULL;
    }
    Py_INCREF(pool);
    PyObject *view = NULL;
    PyObject *lo = PyLong_FromLongLong(self->offset), *hi = PyLong_FromLongLong(self->offset + self->size);
    PyObject *slice = (lo && hi) ? PySlice_New(lo, hi, NULL) : NULL;
    if (slice) view = PyObject_GetItem(pool->base_view, slice);
    Py_XDECREF(lo);
    Py_XDECREF(hi);
    Py_XDECREF(slice);
    Py_DECREF(pool);
    if (!view) return NULL;
    /* Making the view may have run other threads (a collection): look again. */
    if (self->pool == NULL || self->view != NULL) {
        PyObject *r = PyObject_CallMethodNoArgs(view, str_release);
        Py_XDECREF(r);
        PyErr_Clear();
        Py_DECREF(view);
        if (self->view) {
            Py_INCREF(self->view);
            return self->view;
        }
        released_error("block already released; its memory may belong to another block");
        return NULL;
    }
    self->view = view;
    Py_INCREF(view);
    return view;
}

static PyObject *
Block_size(BlockObject *self, PyObject *unused)
{
    return PyLong_FromLongLong(self->size);
}

static Py_ssize_t
Block_len(BlockObject *self)
{
    return (Py_ssize_t)self->size;
}

static PyObject *
Block_enter(BlockObject *self, PyObject *unused)
{
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyObject *
Block_exit(BlockObject *self, PyObject *args)
{
    if (self->pool) return Block_release(self, NULL);
    Py_RETURN_NONE;
}

static PyObject *
Block_get_capacity(BlockObject *self, void *closure)
{
    if (!self->pool) {
        released_error("block already released");
        return NULL;
    }
    if (self->cls < 0) return PyLong_FromLongLong(-self->cls);
    if (self->cls >= self->pool->n_classes) {
        PyErr_SetString(ClosedError ? ClosedError : PyExc_ValueError, "pool is closed");
        return NULL;
    }
    return PyLong_FromLongLong(self->pool->slab_sizes[self->cls]);
}

static PyObject *
Block_get_released(BlockObject *self, void *closure)
{
    return PyBool_FromLong(self->pool == NULL);
}

static PyObject *
Block_get_from_heap(BlockObject *self, void *closure)
{
    return PyBool_FromLong(self->offset < 0);
}

static PyObject *
Block_get_address(BlockObject *self, void *closure)
{
    if (!self->pool) {
        released_error("block already released");
        return NULL;
    }
    if (self->heap) return PyLong_FromVoidPtr(PyByteArray_AS_STRING(self->heap));
    if (!self->pool->bound) {
        PyErr_SetString(ClosedError ? ClosedError : PyExc_ValueError, "pool is closed");
        return NULL;
    }
    return PyLong_FromVoidPtr(self->pool->base + self->offset);
}

static PyObject *
Block_repr(BlockObject *self)
{
    if (!self->pool) return PyUnicode_FromFormat("<MemoryBlock size=%lld released>", (long long)self->size);
    long long cap = self->cls < 0 ? -self->cls
                    : (self->cls < self->pool->n_classes ? self->pool->slab_sizes[self->cls] : 0);
    if (self->offset < 0)
        return PyUnicode_FromFormat("<MemoryBlock size=%lld capacity=%lld heap>", (long long)self->size, cap);
    return PyUnicode_FromFormat("<MemoryBlock size=%lld capacity=%lld @%lld>", (long long)self->size, cap,
                                (long long)self->offset);
}

static int
Block_getbuffer(BlockObject *self, Py_buffer *view, int flags)
{
    PoolObject *pool = self->pool;
    if (!pool) return released_error("block already released; its memory may belong to another block");
    char *ptr;
    if (self->heap) ptr = PyByteArray_AS_STRING(self->heap);
    else {
        if (!pool->bound) {
            PyErr_SetString(ClosedError ? ClosedError : PyExc_ValueError, "pool is closed");
            return -1;
        }
        if (self->offset < 0 || self->offset > pool->capacity - self->size) {
            PyErr_SetString(PyExc_ValueError, "block lies outside its pool's mapping");
            return -1;
        }
        ptr = pool->base + self->offset;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, ptr, (Py_ssize_t)self->size, 0, flags) < 0) return -1;
    self->exports++;
    pool->exports++;
    return 0;
}

static void
Block_releasebuffer(BlockObject *self, Py_buffer *view)
{
    self->exports--;
    if (self->pool) self->pool->exports--;
}

static void
pending_append(PoolObject *pool, int64_t a, int64_t b, int64_t c)
{
    if (!pool->pending) return;
    PyObject *t = Py_BuildValue("(LLL)", (long long)a, (long long)b, (long long)c);
    if (t) {
        PyObject *r = PyObject_CallMethodOneArg(pool->pending, str_append, t);
        Py_XDECREF(r);
        Py_DECREF(t);
    }
}

static void
Block_dealloc(BlockObject *self)
{
    PoolObject *pool = self->pool;
    if (pool) {
        /* Collected while live: hand it to the pool through the pending queue (never the lock: a
         * collection can run while this thread holds it). */
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *exc = PyErr_GetRaisedException();
#else
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
#endif
        if (self->view) {
            PyObject *r = PyObject_CallMethodNoArgs(self->view, str_release);
            if (r) {
                Py_DECREF(r);
                pending_append(pool, self->offset, self->cls, self->size);
            }
            else {
                pending_append(pool, -2, 0, 0);  /* still exported: never reuse this memory */
            }
        }
        else {
            pending_append(pool, self->offset, self->cls, self->size);
        }
        PyErr_Clear();
#if PY_VERSION_HEX >= 0x030C0000
        PyErr_SetRaisedException(exc);
#else
        PyErr_Restore(et, ev, tb);
#endif
        self->pool = NULL;
        Py_DECREF(pool);
    }
    Py_CLEAR(self->view);
    Py_CLEAR(self->heap);
    if (block_freelist_n < BLOCK_FREELIST_MAX) block_freelist[block_freelist_n++] = self;
    else PyObject_Free(self);
}

static PyBufferProcs Block_as_buffer = {
    .bf_getbuffer = (getbufferproc)Block_getbuffer,
    .bf_releasebuffer = (releasebufferproc)Block_releasebuffer,
};

static PySequenceMethods Block_as_sequence = {
    .sq_length = (lenfunc)Block_len,
};

static PyMethodDef Block_methods[] = {
    {"size", (PyCFunction)Block_size, METH_NOARGS, "The requested size in bytes."},
    {"as_slice", (PyCFunction)Block_as_slice, METH_NOARGS,
     "A writable memoryview of exactly ``size()`` bytes, invalidated when the block is released."},
    {"release", (PyCFunction)Block_release, METH_NOARGS,
     "Give the block back to the pool; raises ``BlockReleasedError`` if already released."},
    {"__enter__", (PyCFunction)Block_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)Block_exit, METH_VARARGS, NULL},
    {NULL},
};

static PyMemberDef Block_members[] = {
    {"_offset", T_LONGLONG, offsetof(BlockObject, offset), READONLY, NULL},
    {"_size", T_LONGLONG, offsetof(BlockObject, size), READONLY, NULL},
    {"_cls", T_LONGLONG, offsetof(BlockObject, cls), READONLY, NULL},
    {NULL},
};

static PyGetSetDef Block_getset[] = {
    {"capacity", (getter)Block_get_capacity, NULL, "Bytes actually reserved for this block (its size class).", NULL},
    {"released", (getter)Block_get_released, NULL, "True once the block has been given back to the pool.", NULL},
    {"from_heap", (getter)Block_get_from_heap, NULL, "True when the pool was full and this came from the heap.", NULL},
    {"address", (getter)Block_get_address, NULL, "The block's memory address.", NULL},
    {NULL},
};

static PyTypeObject Block_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kotoba_memory._cpool.Block",
    .tp_basicsize = sizeof(BlockObject),
    .tp_dealloc = (destructor)Block_dealloc,
    .tp_repr = (reprfunc)Block_repr,
    .tp_as_sequence = &Block_as_sequence,
    .tp_as_buffer = &Block_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A block of pool memory; a writable buffer (pass it to readinto, memoryview, numpy...).\n\n"
              "Released by ``release()``, on leaving a ``with`` block, or when collected.",
    .tp_methods = Block_methods,
    .tp_members = Block_members,
    .tp_getset = Block_getset,
};

/* ------------------------------------------------------------------------------------------------ */

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *released, *in_use, *closed;
    if (!PyArg_ParseTuple(args, "OOO:configure", &released, &in_use, &closed)) return NULL;
    PyObject *all[3] = {released, in_use, closed};
    for (int i = 0; i < 3; i++) {
        if (!PyType_Check(all[i]) || !PyType_IsSubtype((PyTypeObject *)all[i], (PyTypeObject *)PyExc_Exception)) {
            PyErr_SetString(PyExc_TypeError, "configure() takes three exception classes");
            return NULL;
        }
    }
    Py_INCREF(released);
    Py_XSETREF(ReleasedError, released);
    Py_INCREF(in_use);
    Py_XSETREF(InUseError, in_use);
    Py_INCREF(closed);
    Py_XSETREF(ClosedError, closed);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", (PyCFunction)configure, METH_VARARGS,
     "configure(BlockReleasedError, BlockInUseError, PoolClosedError): the errors the C code raises."},
    {NULL},
};

static struct PyModuleDef cpool_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kotoba_memory._cpool",
    .m_doc = "C hot paths of kotoba_memory.memory_pool.MemoryPool (see memory_pool/pool.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__cpool(void)
{
    if (PyType_Ready(&Lock_Type) < 0 || PyType_Ready(&Pool_Type) < 0 || PyType_Ready(&Block_Type) < 0)
        return NULL;
    str_allocate_slow = PyUnicode_InternFromString("_allocate_slow");
    str_free_block = PyUnicode_InternFromString("_free_block");
    str_release = PyUnicode_InternFromString("release");
    str_append = PyUnicode_InternFromString("append");
    if (!str_allocate_slow || !str_free_block || !str_release || !str_append) return NULL;
    PyObject *m = PyModule_Create(&cpool_module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Lock", (PyObject *)&Lock_Type) < 0 ||
        PyModule_AddObjectRef(m, "PoolCore", (PyObject *)&Pool_Type) < 0 ||
        PyModule_AddObjectRef(m, "Block", (PyObject *)&Block_Type) < 0 ||
        PyModule_AddIntConstant(m, "LARGE_CACHE_MAX_BLOCKS", LC_MAX) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
