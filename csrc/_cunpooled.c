/* kotoba_memory._cunpooled: call a C function with its new objects kept out of pymalloc's pools.
 *
 * The leak profiler reads tracemalloc's traces back as tens of thousands of small tuples and ints per
 * snapshot, alive together until the window is grouped. Made in pymalloc's pools, they leave those
 * pools sparser for the rest of the process's life: the app's later allocations touch more pools and
 * cache lines (docs/performance.md, round ten). call() installs an object allocator for the length of
 * one call that takes new blocks from the raw domain instead.
 *
 * The allocator only composes the allocator it replaces: a new block is that allocator's malloc(0)
 * grown with its own realloc(). Under pymalloc, malloc(0) is served by the raw domain (and counted in
 * sys.getallocatedblocks(), as every raw-served object block is), and realloc() of a block pymalloc
 * does not own stays in the raw domain. Every block is thus one the replaced allocator made and frees
 * itself, after the call as during it: under any allocator (debug hooks, malloc, mimalloc, tracemalloc
 * on top of any of them) the worst case is no benefit, never a block freed by the wrong allocator.
 *
 * The function must not change the object allocator itself (tracemalloc.start/stop) nor release the
 * GIL; the collector is paused meanwhile (before 3.12 a collection runs inside an allocation, and its
 * finalizers could release the GIL). Free-threaded builds have no GIL to make the swap atomic and do
 * not build this; call() is refused while the process has another interpreter.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#ifdef Py_GIL_DISABLED
#error "kotoba_memory._cunpooled needs the GIL to swap the object allocator atomically"
#endif

/* The allocator replaced for the length of one call (static: a hook left installed by a misbehaving
 * function must keep working after call() returns). */
static PyMemAllocatorEx replaced;
static int active = 0;
static Py_ssize_t made_blocks = 0;
static Py_ssize_t made_bytes = 0;

/* What a block of ``size`` bytes takes in glibc's heap (request2size: a size word, 16-byte alignment,
 * 32 bytes at least), as mallinfo2() counts it. Computed, not asked: malloc_usable_size() would read a
 * header that a block made by another allocator (the debug hooks over pymalloc) does not have. */
static Py_ssize_t
heap_chunk(size_t size)
{
    size_t chunk = (size + sizeof(size_t) + 15) & ~(size_t)15;
    return (Py_ssize_t)(chunk < 32 ? 32 : chunk);
}

static void *
unpooled_malloc(void *ctx, size_t size)
{
    (void)ctx;
    if (size == 0) {
        return replaced.malloc(replaced.ctx, 0);
    }
    void *seed = replaced.malloc(replaced.ctx, 0);
    if (seed == NULL) {
        return NULL;
    }
    void *block = replaced.realloc(replaced.ctx, seed, size);
    if (block == NULL) {
        replaced.free(replaced.ctx, seed);
        return NULL;
    }
    made_blocks++;
    made_bytes += heap_chunk(size);
    return block;
}

static void *
unpooled_calloc(void *ctx, size_t nelem, size_t elsize)
{
    if (elsize != 0 && nelem > (size_t)PY_SSIZE_T_MAX / elsize) {
        return NULL;
    }
    size_t size = nelem * elsize;
    void *block = unpooled_malloc(ctx, size);
    if (block != NULL && size != 0) {
        memset(block, 0, size);
    }
    return block;
}

static void *
unpooled_realloc(void *ctx, void *ptr, size_t size)
{
    if (ptr == NULL) {
        return unpooled_malloc(ctx, size);
    }
    return replaced.realloc(replaced.ctx, ptr, size);
}

static void
unpooled_free(void *ctx, void *ptr)
{
    (void)ctx;
    replaced.free(replaced.ctx, ptr);
}

static PyMemAllocatorEx unpooled = {NULL, unpooled_malloc, unpooled_calloc, unpooled_realloc, unpooled_free};

/* True when this is the process's only interpreter. The allocator is process-wide, and its swap is
 * atomic only for the threads that hold this GIL: a subinterpreter with a GIL of its own (3.12+) could
 * allocate while the struct is half copied. Interpreters that share the main GIL (mod_wsgi's) are refused
 * too: they cannot be told apart here, and call()'s callers have a pooled fallback. */
static int
alone(void)
{
    PyInterpreterState *head = PyInterpreterState_Head();
    return head != NULL && PyInterpreterState_Next(head) == NULL;
}

static PyObject *
cunpooled_alone(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyBool_FromLong(alone());
}

static PyObject *
cunpooled_call(PyObject *module, PyObject *func)
{
    (void)module;
    if (!PyCallable_Check(func)) {
        PyErr_Format(PyExc_TypeError, "func must be callable, got %.100s", Py_TYPE(func)->tp_name);
        return NULL;
    }
    if (active) {
        PyErr_SetString(PyExc_RuntimeError, "kotoba_memory._cunpooled.call() is already running");
        return NULL;
    }
    if (!alone()) {
        PyErr_SetString(PyExc_RuntimeError,
                        "kotoba_memory._cunpooled.call() swaps the process's object allocator: refused "
                        "while another interpreter exists");
        return NULL;
    }
    active = 1;
    made_blocks = 0;
    made_bytes = 0;
    int collecting = PyGC_Disable();
    PyMem_GetAllocator(PYMEM_DOMAIN_OBJ, &replaced);
    PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &unpooled);
    PyObject *result = PyObject_CallNoArgs(func);
    PyMemAllocatorEx now;
    PyMem_GetAllocator(PYMEM_DOMAIN_OBJ, &now);
    int intact = now.malloc == unpooled_malloc && now.free == unpooled_free;
    if (intact) {
        PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &replaced);
        active = 0;
    }
    /* else: someone installed an allocator over ours and may still call it: leave ours in place (and
     * call() refused from now on) rather than free blocks through an allocator that is gone. */
    if (collecting) {
        PyGC_Enable();
    }
    if (result == NULL) {
        return NULL;
    }
    if (!intact) {
        Py_DECREF(result);
        PyErr_SetString(PyExc_RuntimeError, "the object allocator was replaced during kotoba_memory._cunpooled.call()");
        return NULL;
    }
    PyObject *out = Py_BuildValue("(Nnn)", result, made_blocks, made_bytes);
    return out;
}

static PyMethodDef cunpooled_methods[] = {
    {"call", (PyCFunction)cunpooled_call, METH_O,
     "call(func, /) -> (result, blocks, bytes): func() with the object blocks it makes kept out of\n"
     "pymalloc's pools; blocks and bytes: how many it made that way and the bytes they take in glibc's heap."},
    {"alone", (PyCFunction)cunpooled_alone, METH_NOARGS,
     "alone() -> bool: whether this is the process's only interpreter (call() is refused otherwise)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef cunpooled_module = {
    PyModuleDef_HEAD_INIT, "kotoba_memory._cunpooled",
    "Calls a C function with its new objects kept out of pymalloc's pools (the leak profiler's trace "
    "read-backs).",
    -1, cunpooled_methods,
};

PyMODINIT_FUNC
PyInit__cunpooled(void)
{
    return PyModule_Create(&cunpooled_module);
}
