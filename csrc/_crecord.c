/* kotoba_memory._crecord: the request recorder's begin/finish in C.
 *
 * Recorder is the base of CRequestRecorder (kotoba_memory_integrations/request.py): it holds the
 * recorder's settings as C fields and serves begin(), next_gap() and deliver() without a Python frame.
 * Measurement is the in-flight measurement begin() returns; finish() records it. Both follow the
 * pure-Python PyRequestRecorder / PyRequestMeasurement step by step (that code is the reference; the
 * differential tests drive both with the same sequences). The requests in flight and the activity event
 * counter live here (process.activity serves them from here when this module is built, so there is still
 * one count); request.py hands over each new tuple of listeners. What stays Python is called back: the
 * GC optimizer and profiler come from their getters, RSS from the recorder's reader, gaps from
 * request._rng, errors are counted by request._count_error.
 *
 * configure() hands this module those objects once; the Measurement type is created there because its
 * base is the Python class RequestMeasurement (so isinstance checks see both implementations).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <stdint.h>
#include <time.h>
#include <limits.h>
#include <string.h>
#ifndef _WIN32
#include <unistd.h>
#endif
#ifdef _WIN32
#include <windows.h>
#endif

/* Set by configure(); NULL before it. */
static PyTypeObject *Measurement_Type = NULL;
static PyTypeObject *metrics_type = NULL;   /* RequestMetrics (a tuple subclass) */
static PyObject *current_var = NULL;        /* the ContextVar of the running measurement */
static PyObject *sched = NULL;              /* the process scheduler (paused_by_fork, resume) */
static PyObject *listeners = NULL;          /* request._listeners (a tuple), handed over at each change */
static PyObject *count_error_fn = NULL;     /* request._count_error */
static PyObject *rng_random = NULL;         /* request._rng.random */
static PyObject *unmatched = NULL, *known_methods = NULL, *other_method = NULL;
static PyObject *is_tracing_fn = NULL, *get_traced_fn = NULL;
static PyObject *reuse_s = NULL;            /* float: RssReader.recent's max age */
static PyObject *registry_active = NULL;    /* process.registry's dict: kind -> running component */
/* known_methods' members, copied into one small buffer at configure when they are all short ASCII str: a
 * lookup then touches this buffer and the method's characters, not the set's table and its strings. */
#define KNOWN_MAX 16
#define KNOWN_LEN 8
static char known_text[KNOWN_MAX][KNOWN_LEN];
static unsigned char known_size[KNOWN_MAX];
static int known_count = -1;  /* -1: ask the set */
static PyObject *gc_getter = NULL, *profiler_getter = NULL;  /* registry.getter("gc_optimizer"), ("profiler") */

static PyObject *str_paused_by_fork, *str_resume, *str_pause_total_ns, *str_request_ended, *str_rss,
    *str_recent, *str_record_request, *str_request_sink, *str_qualname, *str_route,
    *str_rss_delta,
    *str_sampled, *str_traced_delta, *str_duration_s, *str_GET, *str_method, *str_status, *str_fail,
    *str_finish, *str_close;
static PyObject *int_zero, *int_500;
static PyObject *str_deliver, *str_next_gap, *str_gc_optimizer, *str_profiler;
static PyObject *c_deliver, *c_next_gap, *c_begin, *c_rss, *c_recent;  /* Recorder's own method descriptors */

/* Whether `name` on the recorder's class is still Recorder's C method `ours`, or a subclass overrides it
 * (then it is called, as the reference calls self.deliver() and self.next_gap()). */
static int
overridden(PyObject *rec, PyObject *name, PyObject *ours)
{
#if PY_VERSION_HEX < 0x030E0000
    return _PyType_Lookup(Py_TYPE(rec), name) != ours;  /* borrowed; through the type's method cache */
#else
    PyObject *found = PyObject_GetAttr((PyObject *)Py_TYPE(rec), name);
    if (found == NULL) {
        PyErr_Clear();
        return 1;
    }
    Py_DECREF(found);
    return found != ours;
#endif
}

#define METRICS_FIELDS 10

static int64_t
now_ns(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyTime_t t;
    if (PyTime_PerfCounterRaw(&t) < 0) return 0;  /* never fails on supported platforms */
    return (int64_t)t;
#elif defined(_WIN32)
    static LARGE_INTEGER freq;
    LARGE_INTEGER c;
    if (!freq.QuadPart) QueryPerformanceFrequency(&freq);
    QueryPerformanceCounter(&c);
    return (int64_t)((double)c.QuadPart * 1e9 / (double)freq.QuadPart);
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);  /* time.perf_counter's clock on Linux and macOS */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
#endif
}

static int
not_configured(void)
{
    PyErr_SetString(PyExc_RuntimeError,
                    "kotoba_memory._crecord is not configured (import kotoba_memory_integrations.request)");
    return -1;
}

/* An exception is set: count and clear it when it is an Exception (the reference's `except
 * Exception`), else leave it set and return -1 so that it propagates (KeyboardInterrupt, SystemExit). */
static int
swallow(void)
{
    if (!PyErr_ExceptionMatches(PyExc_Exception)) return -1;
    PyErr_Clear();
    PyObject *r = PyObject_CallNoArgs(count_error_fn);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* The pending exception as one object (NULL if none), cleared; restore_error() sets it again. */
static PyObject *
take_error(void)
{
#if PY_VERSION_HEX >= 0x030C0000
    return PyErr_GetRaisedException();
#else
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL) return NULL;
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
#endif
}

/* Steals `exc`. */
static void
restore_error(PyObject *exc)
{
    if (exc == NULL) return;
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(exc);
#else
    PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(exc)), exc, PyException_GetTraceback(exc));
#endif
}

/* The pending error replaces `earlier` (stolen), which becomes its __context__, as in a Python
 * `finally:` or `except:` block that raises. */
static void
chain_error(PyObject *earlier)
{
    PyObject *later = take_error();
    if (later != NULL && earlier != NULL && later != earlier) PyException_SetContext(later, earlier);
    else Py_XDECREF(earlier);
    restore_error(later);
}

/* process.activity's state (its pure-Python twin is a list and an itertools.count): requests in flight
 * and the event counter that tells whether another request began or ended while one ran. Changed only
 * with the GIL held, by code that does not release it. */
static Py_ssize_t in_flight_n = 0;
static long long events_n = 0;
/* Set at configure and after every fork: the next begin() asks the scheduler whether fork paused it. */
static int fork_pending = 1;

/* activity.mark_start(): one request in, with no overlap bookkeeping. */
static void
activity_mark_start(void)
{
    in_flight_n += 1;
}

/* activity.begin(): one request in; whether it is alone, and the event number it began at. */
static void
activity_begin(char *alone, long long *epoch)
{
    activity_mark_start();
    *alone = in_flight_n == 1;
    *epoch = ++events_n;
}

/* activity.mark_end(): one request out (unbalanced calls ignored). */
static void
activity_mark_end(void)
{
    if (in_flight_n > 0) in_flight_n -= 1;
}

/* activity.end(alone, epoch): one request out; whether another began or ended while it ran. */
static int
activity_end(int alone, long long epoch)
{
    activity_mark_end();
    return !alone || ++events_n != epoch + 1;
}

static PyObject *
mod_activity_begin(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    char alone;
    long long epoch;
    activity_begin(&alone, &epoch);
    return Py_BuildValue("(OL)", alone ? Py_True : Py_False, epoch);
}

static PyObject *
mod_activity_end(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "end() takes exactly 2 arguments (%zd given)", nargs);
        return NULL;
    }
    int alone = PyObject_IsTrue(args[0]);
    if (alone < 0) return NULL;
    long long epoch = 0;
    if (alone) {  /* the reference reads the epoch only then */
        epoch = PyLong_AsLongLong(args[1]);
        if (epoch == -1 && PyErr_Occurred()) return NULL;
    }
    return PyBool_FromLong(activity_end(alone, epoch));
}

static PyObject *
mod_mark_start(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    activity_mark_start();
    Py_RETURN_NONE;
}

static PyObject *
mod_mark_end(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    activity_mark_end();
    Py_RETURN_NONE;
}

static PyObject *
mod_in_flight(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(in_flight_n);
}

/* The WSGI request running on this thread, while its app runs (a strong reference; NULL between
 * requests). A WSGI request runs on one thread from the app's call to its return, so until someone
 * looks for a measurement where this slot cannot answer, MemoryMiddleware keeps it here instead of in
 * the context variable: setting and resetting a ContextVar is ~3-4 µs of a request in a worker that
 * waits between requests (measured: benchmarks/cold_path.py --against), this is two pointer writes. */
static _Thread_local PyObject *thread_current = NULL;
/* Set once current_measurement() was asked where the slot cannot answer (another thread, possibly
 * with a copied context, while requests are in flight; or greenlets sharing one thread): from then
 * on every request is also made current in the context variable, as activate() does. */
static int context_wanted = 0;
static PyObject *str_gevent = NULL, *str_eventlet = NULL;

/* Whether a library that runs several requests on one OS thread (greenlets) is loaded. */
static int
greenlet_servers_loaded(void)
{
    PyObject *modules = PyImport_GetModuleDict();
    if (PyDict_GetItemWithError(modules, str_gevent) != NULL) return 1;
    if (PyErr_Occurred()) return -1;
    if (PyDict_GetItemWithError(modules, str_eventlet) != NULL) return 1;
    return PyErr_Occurred() ? -1 : 0;
}

/* After fork(): the child serves none of the parent's requests, and its scheduler may be paused. */
static PyObject *
mod_after_fork(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    in_flight_n = 0;
    fork_pending = 1;
    Py_RETURN_NONE;
}

static PyObject *
mod_set_listeners(PyObject *Py_UNUSED(module), PyObject *value)
{
    if (!PyTuple_CheckExact(value)) {
        PyErr_Format(PyExc_TypeError, "set_listeners() wants a tuple, not %.100s", Py_TYPE(value)->tp_name);
        return NULL;
    }
    Py_XSETREF(listeners, Py_NewRef(value));
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------ */
/* RouteTable: the memory profiler's per-route aggregates (memory_profiler.profiler._RouteTable)      */

typedef struct {
    int64_t requests, rss, traced, traced_requests, rss_requests, window;
    double duration;
} RouteRow;

typedef struct {
    PyObject_HEAD
    Py_ssize_t max_routes;
    PyObject *index;  /* dict: route (exact str) -> int row */
    PyObject *names;  /* list: route by row */
    RouteRow *rows;
    Py_ssize_t n, cap;
} RouteTableObject;

static PyTypeObject RouteTable_Type;
static PyObject *str_other;  /* "<other>": every route past max_routes */

static PyObject *
RouteTable_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_routes", NULL};
    Py_ssize_t max_routes;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:RouteTable", kwlist, &max_routes)) return NULL;
    if (max_routes < 1) {
        PyErr_Format(PyExc_ValueError, "max_routes must be >= 1, got %zd", max_routes);
        return NULL;
    }
    RouteTableObject *self = (RouteTableObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->max_routes = max_routes;
    self->index = PyDict_New();
    self->names = PyList_New(0);
    if (self->index == NULL || self->names == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void
RouteTable_dealloc(RouteTableObject *self)
{
    Py_CLEAR(self->index);
    Py_CLEAR(self->names);
    PyMem_Free(self->rows);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* An optional int (None stays absent), as int(x) converts it. */
static int
optional_int64(PyObject *o, int64_t *out, int *present)
{
    *present = 0;
    if (o == Py_None) return 0;
    PyObject *i = PyNumber_Long(o);
    if (i == NULL) return -1;
    long long v = PyLong_AsLongLong(i);
    Py_DECREF(i);
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = (int64_t)v;
    *present = 1;
    return 0;
}

/* Add one request to `route`'s row. Every conversion (which may run Python code) happens before the
 * table changes; the change itself allocates no tracked object, so no other thread interleaves. */
static int
route_table_record(RouteTableObject *self, PyObject *route, PyObject *rss, PyObject *traced, PyObject *duration)
{
    if (!PyUnicode_Check(route)) {
        PyErr_Format(PyExc_TypeError, "route must be a str, got %.100s", Py_TYPE(route)->tp_name);
        return -1;
    }
    int64_t rss_v = 0, traced_v = 0;
    int has_rss, has_traced;
    if (optional_int64(rss, &rss_v, &has_rss) < 0 || optional_int64(traced, &traced_v, &has_traced) < 0)
        return -1;
    double dur;
    if (PyFloat_CheckExact(duration)) {
        dur = PyFloat_AS_DOUBLE(duration);
    }
    else {
        PyObject *f = PyNumber_Float(duration);
        if (f == NULL) return -1;
        dur = PyFloat_AS_DOUBLE(f);
        Py_DECREF(f);
    }
    /* A str subclass could hash and compare in Python: key the table by an exact copy. */
    PyObject *key = PyUnicode_CheckExact(route) ? Py_NewRef(route) : PyUnicode_FromObject(route);
    if (key == NULL) return -1;
    if (PyUnicode_READY(key) < 0 || PyObject_Hash(key) == -1) {
        Py_DECREF(key);
        return -1;
    }
    PyObject *at = PyDict_GetItemWithError(self->index, key);  /* borrowed */
    if (at == NULL && !PyErr_Occurred() && self->n >= self->max_routes) {
        Py_SETREF(key, Py_NewRef(str_other));
        at = PyDict_GetItemWithError(self->index, key);
    }
    Py_ssize_t row;
    if (at != NULL) {
        row = PyLong_AsSsize_t(at);
    }
    else {
        if (PyErr_Occurred()) {
            Py_DECREF(key);
            return -1;
        }
        if (self->n == self->cap) {
            Py_ssize_t cap = self->cap ? 2 * self->cap : 16;
            RouteRow *rows = PyMem_Realloc(self->rows, (size_t)cap * sizeof(RouteRow));
            if (rows == NULL) {
                Py_DECREF(key);
                PyErr_NoMemory();
                return -1;
            }
            self->rows = rows;
            self->cap = cap;
        }
        PyObject *i = PyLong_FromSsize_t(self->n);
        if (i == NULL || PyList_Append(self->names, key) < 0) {
            Py_XDECREF(i);
            Py_DECREF(key);
            return -1;
        }
        if (PyDict_SetItem(self->index, key, i) < 0) {
            Py_DECREF(i);
            Py_DECREF(key);
            (void)PyList_SetSlice(self->names, self->n, self->n + 1, NULL);
            return -1;
        }
        Py_DECREF(i);
        row = self->n++;
        memset(&self->rows[row], 0, sizeof(RouteRow));
    }
    Py_DECREF(key);
    RouteRow *r = &self->rows[row];
    r->requests += 1;
    if (has_rss) {
        r->rss += rss_v;
        r->rss_requests += 1;
    }
    if (has_traced) {
        r->traced += traced_v;
        r->traced_requests += 1;
    }
    r->duration += dur;
    r->window += 1;
    return 0;
}

static PyObject *
RouteTable_record(RouteTableObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "record() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    if (route_table_record(self, args[0], args[1], args[2], args[3]) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *
RouteTable_take_window_counts(RouteTableObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *counts = PyDict_New();
    if (counts == NULL) return NULL;
    for (Py_ssize_t i = 0; i < self->n; i++) {
        if (self->rows[i].window == 0) continue;
        PyObject *v = PyLong_FromLongLong(self->rows[i].window);
        if (v == NULL || PyDict_SetItem(counts, PyList_GET_ITEM(self->names, i), v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(counts);
            return NULL;
        }
        Py_DECREF(v);
    }
    for (Py_ssize_t i = 0; i < self->n; i++) self->rows[i].window = 0;
    return counts;
}

static PyObject *
RouteTable_rows(RouteTableObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(self->n);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < self->n; i++) {
        RouteRow *r = &self->rows[i];
        PyObject *t = Py_BuildValue("(OLLLLdL)", PyList_GET_ITEM(self->names, i), (long long)r->requests,
                                    (long long)r->rss, (long long)r->traced, (long long)r->traced_requests,
                                    r->duration, (long long)r->rss_requests);
        if (t == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, t);
    }
    return out;
}

static PyObject *
RouteTable_clear_rows(RouteTableObject *self, PyObject *Py_UNUSED(ignored))
{
    PyDict_Clear(self->index);
    if (PyList_SetSlice(self->names, 0, PY_SSIZE_T_MAX, NULL) < 0) return NULL;
    self->n = 0;
    Py_RETURN_NONE;
}

static Py_ssize_t
RouteTable_len(RouteTableObject *self)
{
    return self->n;
}

static PyMethodDef RouteTable_methods[] = {
    {"record", (PyCFunction)(void (*)(void))RouteTable_record, METH_FASTCALL,
     "record(route, rss_delta, traced_delta, duration_s): add one finished request to route's row."},
    {"take_window_counts", (PyCFunction)RouteTable_take_window_counts, METH_NOARGS,
     "Requests per route since the last call (routes without any left out), and start counting anew."},
    {"rows", (PyCFunction)RouteTable_rows, METH_NOARGS,
     "[(route, requests, rss_delta, traced_delta, traced_requests, duration_s, rss_requests)], first seen first."},
    {"clear", (PyCFunction)RouteTable_clear_rows, METH_NOARGS, "Forget every route."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef RouteTable_members[] = {
    {"max_routes", T_PYSSIZET, offsetof(RouteTableObject, max_routes), READONLY,
     "routes kept apart; later ones count as \"<other>\""},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods RouteTable_as_sequence = {
    .sq_length = (lenfunc)RouteTable_len,
};

static PyTypeObject RouteTable_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kotoba_memory._crecord.RouteTable",
    .tp_basicsize = sizeof(RouteTableObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "RouteTable(max_routes): bounded per-route request aggregates, fed by the recorder without a "
              "Python frame (the reference is memory_profiler.profiler._RouteTable).",
    .tp_new = RouteTable_new,
    .tp_dealloc = (destructor)RouteTable_dealloc,
    .tp_methods = RouteTable_methods,
    .tp_members = RouteTable_members,
    .tp_as_sequence = &RouteTable_as_sequence,
};

/* ------------------------------------------------------------------------------------------------ */
/* RssCore: the state and fast path of process.memory.RssReader (PyRssReader is the reference).       */
/* The RSS read itself is one pread of a kept /proc/self/statm descriptor; in a worker that waits     */
/* between requests the Python method around it cost more than the read.                              */

typedef struct {
    PyObject_HEAD
    int fd;                 /* the kept descriptor, -1 when none */
    long page_size;
    long long last_value;   /* the last reading and when (CLOCK_MONOTONIC, time.monotonic()'s clock) */
    double last_at;
    long long peak;
} RssCoreObject;

static PyTypeObject RssCore_Type;
static PyObject *str_rss_uncached;

/* time.monotonic(): the clock the reference (and the Python fallback) stamps _last with. */
static double
monotonic_s(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyTime_t t;
    if (PyTime_MonotonicRaw(&t) < 0) return 0.0;  /* never fails on supported platforms */
#else
    _PyTime_t t = _PyTime_GetMonotonicClock();
#endif
    return (double)t / 1e9;
}

static PyObject *
RssCore_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    RssCoreObject *self = (RssCoreObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->fd = -1;
    self->page_size = 4096;
    self->last_at = -1e18;
    return (PyObject *)self;
}

static void
RssCore_dealloc(RssCoreObject *self)
{
    /* A Python subclass's dealloc has already cleared its __dict__ and weak references. */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The resident pages from statm ("size resident shared ..."), or -1 when the read or parse fails. */
static long long
statm_resident(int fd)
{
#ifdef _WIN32
    return -1;
#else
    char buf[64];
    ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
    if (n <= 0) return -1;
    buf[n] = '\0';
    char *p = strchr(buf, ' ');
    if (p == NULL || p[1] < '0' || p[1] > '9') return -1;
    long long pages = 0;
    for (p++; *p >= '0' && *p <= '9'; p++) {
        if (pages > (LLONG_MAX - 9) / 10) return -1;
        pages = pages * 10 + (*p - '0');
    }
    if (*p != ' ' && *p != '\0' && *p != '\n') return -1;
    return pages;
#endif
}

/* reader.rss(): read in C when the descriptor is open and reads, else the reference's Python path. */
static PyObject *
rss_core_read(RssCoreObject *self)
{
    if (self->fd >= 0) {
        long long pages = statm_resident(self->fd);
        if (pages >= 0 && pages <= LLONG_MAX / (self->page_size > 0 ? self->page_size : 1)) {
            long long value = pages * self->page_size;
            self->last_value = value;
            self->last_at = monotonic_s();
            if (value > self->peak) self->peak = value;
            return PyLong_FromLongLong(value);
        }
    }
    return PyObject_CallMethodNoArgs((PyObject *)self, str_rss_uncached);
}

static PyObject *
rss_core_recent(RssCoreObject *self, double max_age_s)
{
    if (monotonic_s() - self->last_at <= max_age_s) return PyLong_FromLongLong(self->last_value);
    return rss_core_read(self);
}

static PyObject *
RssCore_rss(RssCoreObject *self, PyObject *Py_UNUSED(ignored))
{
    return rss_core_read(self);
}

static PyObject *
RssCore_recent(RssCoreObject *self, PyObject *arg)
{
    double max_age = PyFloat_AsDouble(arg);
    if (max_age == -1.0 && PyErr_Occurred()) return NULL;
    return rss_core_recent(self, max_age);
}

static PyObject *
RssCore_get_fd(RssCoreObject *self, void *Py_UNUSED(closure))
{
    if (self->fd < 0) Py_RETURN_NONE;
    return PyLong_FromLong(self->fd);
}

static int
RssCore_set_fd(RssCoreObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL || value == Py_None) {
        self->fd = -1;
        return 0;
    }
    long fd = PyLong_AsLong(value);
    if (fd == -1 && PyErr_Occurred()) return -1;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "_fd must be None or a descriptor >= 0, got %ld", fd);
        return -1;
    }
    self->fd = (int)fd;
    return 0;
}

static PyObject *
RssCore_get_last(RssCoreObject *self, void *Py_UNUSED(closure))
{
    return Py_BuildValue("(Ld)", self->last_value, self->last_at);
}

static int
RssCore_set_last(RssCoreObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    long long v;
    double at;
    if (value == NULL || !PyTuple_Check(value) || !PyArg_ParseTuple(value, "Ld", &v, &at)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "_last must be a (value, monotonic time) tuple");
        return -1;
    }
    self->last_value = v;
    self->last_at = at;
    return 0;
}

static PyObject *
RssCore_get_peak(RssCoreObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLongLong(self->peak);
}

static int
RssCore_set_peak(RssCoreObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "_peak cannot be deleted");
        return -1;
    }
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) return -1;
    self->peak = v;
    return 0;
}

static PyObject *
RssCore_get_page_size(RssCoreObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->page_size);
}

static int
RssCore_set_page_size(RssCoreObject *self, PyObject *value, void *Py_UNUSED(closure))
{
    long v = value == NULL ? -1 : PyLong_AsLong(value);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v <= 0) {
        PyErr_SetString(PyExc_ValueError, "_page_size must be a positive int");
        return -1;
    }
    self->page_size = v;
    return 0;
}

static PyMethodDef RssCore_methods[] = {
    {"rss", (PyCFunction)RssCore_rss, METH_NOARGS, "Resident set size in bytes (0 if it cannot be read)."},
    {"recent", (PyCFunction)RssCore_recent, METH_O,
     "recent(max_age_s): the last reading if it is at most max_age_s old, else a fresh one."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef RssCore_getset[] = {
    {"_fd", (getter)RssCore_get_fd, (setter)RssCore_set_fd, "the kept statm descriptor, or None", NULL},
    {"_last", (getter)RssCore_get_last, (setter)RssCore_set_last, "(last reading, its monotonic time)", NULL},
    {"_peak", (getter)RssCore_get_peak, (setter)RssCore_set_peak, "the highest reading", NULL},
    {"_page_size", (getter)RssCore_get_page_size, (setter)RssCore_set_page_size, "bytes per page", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RssCore_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kotoba_memory._crecord.RssCore",
    .tp_basicsize = sizeof(RssCoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The C base of RssReader: its descriptor, last reading and peak, and rss()/recent().",
    .tp_new = RssCore_new,
    .tp_dealloc = (destructor)RssCore_dealloc,
    .tp_methods = RssCore_methods,
    .tp_getset = RssCore_getset,
};

/* ------------------------------------------------------------------------------------------------ */
/* GcTally and GcHooks: the GC optimizer's per-request state as C fields (the bases of GcRecorder and  */
/* GcOptimizer; PyGcTally / PyGcHooks in kotoba_memory.gc_optimizer are the reference). The recorder    */
/* reads the pause total and counts a request's end here without calling a Python method: in a worker  */
/* that waits between requests, touching the optimizer's Python objects cost ~2 µs a request.          */

#define GC_NEVER (1LL << 62)

typedef struct {
    PyObject_HEAD
    long long pause_total_ns;  /* GC pause observed through gc.callbacks, cumulative */
} GcTallyObject;

/* A long long field of a C object, as a getset's closure: where it lies and the name errors give. */
typedef struct {
    Py_ssize_t offset;
    const char *name;
} LongLongField;

static PyObject *
long_long_get(PyObject *self, void *closure)
{
    return PyLong_FromLongLong(*(long long *)((char *)self + ((LongLongField *)closure)->offset));
}

/* Set from an int (not a bool); nothing is stored when `value` is refused. (A T_LONGLONG member would
 * store -1 before reporting an out-of-range value on 3.11.) */
static int
long_long_set(PyObject *self, PyObject *value, void *closure)
{
    const LongLongField *field = closure;
    if (value == NULL) {
        PyErr_Format(PyExc_TypeError, "%s cannot be deleted", field->name);
        return -1;
    }
    if (!PyLong_Check(value) || PyBool_Check(value)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %.100s", field->name, Py_TYPE(value)->tp_name);
        return -1;
    }
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Format(PyExc_OverflowError, "%s must fit in 64 bits, got %R", field->name, value);
        }
        return -1;
    }
    *(long long *)((char *)self + field->offset) = v;
    return 0;
}

static LongLongField pause_total_field = {offsetof(GcTallyObject, pause_total_ns), "pause_total_ns"};

static PyGetSetDef GcTally_getset[] = {
    {"pause_total_ns", long_long_get, long_long_set,
     "cumulative GC pause observed through gc.callbacks, in nanoseconds", &pause_total_field},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject GcTally_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kotoba_memory._crecord.GcTally",
    .tp_basicsize = sizeof(GcTallyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The C base of GcRecorder: its pause total, which the request recorder reads directly.",
    .tp_new = PyType_GenericNew,
    .tp_getset = GcTally_getset,
};

typedef struct {
    PyObject_HEAD
    PyObject *recorder;    /* _recorder: a GcTally (else its pause_total_ns attribute is asked) */
    long long ended;       /* requests ended (requests_seen) */
    long long next_check;  /* _next_check: the count at which request_ended() calls _check_at_boundary(n) */
} GcHooksObject;

static PyTypeObject GcHooks_Type;
static PyObject *str_check_at_boundary;
static PyObject *c_pause_total_ns, *c_request_ended;  /* GcHooks' own method descriptors */

static PyObject *
GcHooks_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    GcHooksObject *self = (GcHooksObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->next_check = GC_NEVER;
    return (PyObject *)self;
}

static int
GcHooks_traverse(GcHooksObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->recorder);
    return 0;
}

static int
GcHooks_clear(GcHooksObject *self)
{
    Py_CLEAR(self->recorder);
    return 0;
}

static void
GcHooks_dealloc(GcHooksObject *self)
{
    PyObject_GC_UnTrack(self);
    GcHooks_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The tally behind `hooks`, or NULL when its recorder is not a GcTally (then the attribute is asked). */
static GcTallyObject *
gc_tally(GcHooksObject *hooks)
{
    PyObject *rec = hooks->recorder;
    return rec != NULL && PyObject_TypeCheck(rec, &GcTally_Type) ? (GcTallyObject *)rec : NULL;
}

/* Whether the request recorder may read `gc`'s fields: a GcHooks whose class keeps both C methods (a
 * subclass overriding either is called, as the reference calls them) and whose recorder is a GcTally. */
static int
gc_fast(PyObject *gc)
{
    return PyObject_TypeCheck(gc, &GcHooks_Type) && gc_tally((GcHooksObject *)gc) != NULL &&
           !overridden(gc, str_pause_total_ns, c_pause_total_ns) &&
           !overridden(gc, str_request_ended, c_request_ended);
}

/* One request ended: count it, and run the optimizer's boundary check when it is due. */
static int
gc_hooks_ended(GcHooksObject *self, long long *n_out)
{
    long long n = ++self->ended;  /* under the GIL: no end is lost to a racing thread */
    *n_out = n;
    if (n < self->next_check) return 0;
    PyObject *arg = PyLong_FromLongLong(n);
    if (arg == NULL) return -1;
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, str_check_at_boundary, arg);
    Py_DECREF(arg);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *
GcHooks_request_ended(GcHooksObject *self, PyObject *Py_UNUSED(ignored))
{
    long long n;
    if (gc_hooks_ended(self, &n) < 0) return NULL;
    return PyLong_FromLongLong(n);
}

static PyObject *
GcHooks_pause_total_ns(GcHooksObject *self, PyObject *Py_UNUSED(ignored))
{
    GcTallyObject *tally = gc_tally(self);
    if (tally != NULL) return PyLong_FromLongLong(tally->pause_total_ns);
    if (self->recorder == NULL) {
        PyErr_SetString(PyExc_AttributeError, "the GC optimizer has no _recorder");
        return NULL;
    }
    return PyObject_GetAttr(self->recorder, str_pause_total_ns);
}

static PyObject *
GcHooks_reset_requests(GcHooksObject *self, PyObject *Py_UNUSED(ignored))
{
    self->ended = 0;
    Py_RETURN_NONE;
}

static PyMethodDef GcHooks_methods[] = {
    {"pause_total_ns", (PyCFunction)GcHooks_pause_total_ns, METH_NOARGS,
     "Cumulative GC pause observed through gc.callbacks since start(), in nanoseconds."},
    {"request_ended", (PyCFunction)GcHooks_request_ended, METH_NOARGS,
     "Count a request's end; runs _check_at_boundary(n) once n reaches _next_check. Returns n."},
    {"_reset_requests", (PyCFunction)GcHooks_reset_requests, METH_NOARGS,
     "Count requests from zero again (a forked child)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef GcHooks_members[] = {
    {"_recorder", T_OBJECT_EX, offsetof(GcHooksObject, recorder), 0, "the GcRecorder"},
    {NULL, 0, 0, 0, NULL},
};

static LongLongField next_check_field = {offsetof(GcHooksObject, next_check), "_next_check"};
static LongLongField ended_field = {offsetof(GcHooksObject, ended), "requests_seen"};

static PyGetSetDef GcHooks_getset[] = {
    {"_next_check", long_long_get, long_long_set,
     "the requests_seen at which request_ended() runs the boundary check", &next_check_field},
    {"requests_seen", long_long_get, NULL, "Requests ended since the count began.", &ended_field},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject GcHooks_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kotoba_memory._crecord.GcHooks",
    .tp_basicsize = sizeof(GcHooksObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C base of GcOptimizer: its per-request counters, pause_total_ns() and request_ended().",
    .tp_new = GcHooks_new,
    .tp_dealloc = (destructor)GcHooks_dealloc,
    .tp_traverse = (traverseproc)GcHooks_traverse,
    .tp_clear = (inquiry)GcHooks_clear,
    .tp_methods = GcHooks_methods,
    .tp_members = GcHooks_members,
    .tp_getset = GcHooks_getset,
};

/* ------------------------------------------------------------------------------------------------ */
/* Recorder                                                                                           */

typedef struct {
    PyObject_HEAD
    Py_ssize_t every;      /* rss_sample_every */
    Py_ssize_t countdown;  /* requests left until the next measured one */
    double log_q;          /* log1p(-1/mean gap), -inf when every == 1 */
    double rss_budget;     /* share of request time the reads may cost; 0.0: none */
    double rss_cost_s, rss_duration_s;  /* running means over measured requests */
    int rss_samples;       /* measured requests in the means, counted up to RSS_MEAN_OVER */
    PyObject *gc_optimizer, *profiler, *on_request, *rss_reader;
    /* The last profiler seen and its route table (NULL: it has none), so that a request reaches the
     * table without a Python frame; looked up again whenever the getter returns another profiler. */
    PyObject *sink_owner, *sink;
} RecorderObject;

static PyTypeObject Recorder_Type;

typedef struct {
    PyObject_HEAD
    PyObject *recorder;
    PyObject *route, *method, *status, *error;
    PyObject *gc;         /* the GC optimizer seen at begin, NULL when none (or its getter failed) */
    PyObject *gc_pause0;  /* int; NULL when gc_fast */
    long long gc_pause0_ns;  /* when gc_fast: the tally read directly */
    PyObject *rss0;       /* NULL when this request's RSS is not measured */
    PyObject *traced0;    /* NULL when tracemalloc was not tracing at begin */
    PyObject *token;      /* from activate() */
    long long epoch;
    int64_t t0;
    int64_t read_ns;      /* what the RSS read at begin took */
    char alone, done, sampled, gc_fast;
} MeasurementObject;

#define MAX_RSS_GAP 1000000.0
#define RSS_MEAN_OVER 16
#define RSS_COST_CLAMP 4.0

/* The reference's _note_rss_cost: running means of read cost (each at most RSS_COST_CLAMP times the mean)
 * and duration (the n-th weighs 1/n up to RSS_MEAN_OVER), and the mean gap at which the reads cost
 * rss_budget of request time (never below every). */
static void
note_rss_cost(RecorderObject *self, double cost_s, double duration_s)
{
    if (self->rss_samples) {
        double most = RSS_COST_CLAMP * self->rss_cost_s;
        cost_s = most < cost_s ? most : cost_s;  /* min(cost_s, most), NaN included, as in the reference */
    }
    int n = self->rss_samples = self->rss_samples < RSS_MEAN_OVER ? self->rss_samples + 1 : RSS_MEAN_OVER;
    self->rss_cost_s += (cost_s - self->rss_cost_s) / n;
    self->rss_duration_s += (duration_s - self->rss_duration_s) / n;
    double allowed = self->rss_budget * self->rss_duration_s;
    double gap = allowed > 0.0 ? self->rss_cost_s / allowed : MAX_RSS_GAP;
    double every = (double)self->every;
    gap = gap > every ? gap : every;  /* as max(every, gap) in the reference: a NaN gap falls to every */
    gap = gap < MAX_RSS_GAP ? gap : MAX_RSS_GAP;
    self->log_q = log1p(-1.0 / gap);
}

static PyObject *
Recorder_note_rss_cost(RecorderObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "_note_rss_cost() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    double cost = PyFloat_AsDouble(args[0]);
    if (cost == -1.0 && PyErr_Occurred()) return NULL;
    double duration = PyFloat_AsDouble(args[1]);
    if (duration == -1.0 && PyErr_Occurred()) return NULL;
    note_rss_cost(self, cost, duration);
    Py_RETURN_NONE;
}

/* 1 + int(log(1 - random()) / log_q), with the errors int() and math.log raise. */
static int
draw_gap(RecorderObject *self, Py_ssize_t *out)
{
    PyObject *r = PyObject_CallNoArgs(rng_random);
    if (r == NULL) return -1;
    double x = PyFloat_AsDouble(r);
    Py_DECREF(r);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    double arg = 1.0 - x;
    if (!(arg > 0.0) && !isnan(arg)) {
        PyErr_SetString(PyExc_ValueError, "math domain error");
        return -1;
    }
    if (self->log_q == 0.0) {
        PyErr_SetString(PyExc_ZeroDivisionError, "float division by zero");
        return -1;
    }
    double q = log(arg) / self->log_q;
    if (isnan(q)) {
        PyErr_SetString(PyExc_ValueError, "cannot convert float NaN to integer");
        return -1;
    }
    if (isinf(q)) {
        PyErr_SetString(PyExc_OverflowError, "cannot convert float infinity to integer");
        return -1;
    }
    q = trunc(q);
    /* Beyond the field's range a gap is "never" either way. */
    if (q >= (double)(PY_SSIZE_T_MAX / 2)) q = (double)(PY_SSIZE_T_MAX / 2);
    if (q <= (double)(PY_SSIZE_T_MIN / 2)) q = (double)(PY_SSIZE_T_MIN / 2);
    *out = 1 + (Py_ssize_t)q;
    return 0;
}

static PyObject *
Recorder_next_gap(RecorderObject *self, PyObject *Py_UNUSED(ignored))
{
    if (rng_random == NULL && not_configured() < 0) return NULL;
    Py_ssize_t gap;
    if (draw_gap(self, &gap) < 0) return NULL;
    return PyLong_FromSsize_t(gap);
}

/* Calls a field of the recorder; held for the call, since the call may replace the field. The registry's
 * own getter (`_active.get` bound to `kind`) is not called: the registry is read here, as it would. */
static PyObject *
call_getter(PyObject *getter, const char *name)
{
    if (getter == NULL) {
        PyErr_Format(PyExc_AttributeError, "the recorder has no %s", name);
        return NULL;
    }
    PyObject *kind = getter == gc_getter ? str_gc_optimizer : getter == profiler_getter ? str_profiler : NULL;
    if (kind != NULL && registry_active != NULL) {
        PyObject *found = PyDict_GetItemWithError(registry_active, kind);  /* borrowed */
        if (found == NULL && PyErr_Occurred()) return NULL;
        return Py_NewRef(found != NULL ? found : Py_None);
    }
    Py_INCREF(getter);
    PyObject *r = PyObject_CallNoArgs(getter);
    Py_DECREF(getter);
    return r;
}

/* reader.rss() or reader.recent(reuse_s), the reader held for the call (it may replace itself). */
static PyObject *
read_rss(RecorderObject *rec, int recent)
{
    PyObject *reader = rec->rss_reader;
    if (reader == NULL) {
        PyErr_SetString(PyExc_AttributeError, "the recorder has no rss_reader");
        return NULL;
    }
    Py_INCREF(reader);
    PyObject *r;
    if (PyObject_TypeCheck(reader, &RssCore_Type) && !overridden(reader, str_rss, c_rss) &&
        !overridden(reader, str_recent, c_recent)) {
        r = recent ? rss_core_recent((RssCoreObject *)reader, PyFloat_AS_DOUBLE(reuse_s))
                   : rss_core_read((RssCoreObject *)reader);
    }
    else {
        r = recent ? PyObject_CallMethodOneArg(reader, str_recent, reuse_s)
                   : PyObject_CallMethodNoArgs(reader, str_rss);
    }
    Py_DECREF(reader);
    return r;
}

/* `method in known_methods`, with the set's exact semantics (an exact str is equal to a member only if
 * both have the same characters; anything else asks the set, which may call __hash__/__eq__). */
static int
is_known_method(PyObject *method)
{
    if (known_count >= 0 && PyUnicode_CheckExact(method)) {
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(method) < 0) return -1;  /* a legacy string: its characters are not laid out yet */
#endif
        if (!PyUnicode_IS_ASCII(method)) return 0;  /* every member is ASCII */
        Py_ssize_t n = PyUnicode_GET_LENGTH(method);
        if (n >= KNOWN_LEN) return 0;
        const char *text = (const char *)PyUnicode_DATA(method);
        for (int i = 0; i < known_count; i++) {
            if (known_size[i] == n && memcmp(known_text[i], text, (size_t)n) == 0) return 1;
        }
        return 0;
    }
    return PySet_Contains(known_methods, method);  /* unhashable: TypeError, as `in` raises */
}

/* Copy the members of `known` into known_text when they all fit, else leave lookups to the set. */
static int
copy_known_methods(PyObject *known)
{
    known_count = -1;
    if (PySet_GET_SIZE(known) > KNOWN_MAX) return 0;
    PyObject *it = PyObject_GetIter(known);
    if (it == NULL) return -1;
    PyObject *key;
    int n = 0, fits = 1;
    while (fits && (key = PyIter_Next(it)) != NULL) {
        fits = n < KNOWN_MAX && PyUnicode_CheckExact(key) && PyUnicode_IS_ASCII(key) &&
               PyUnicode_GET_LENGTH(key) < KNOWN_LEN;
        if (fits) {
            known_size[n] = (unsigned char)PyUnicode_GET_LENGTH(key);
            memcpy(known_text[n], PyUnicode_DATA(key), known_size[n]);
            n++;
        }
        Py_DECREF(key);
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) return -1;
    if (fits) known_count = n;
    return 0;
}

static PyObject *
begin(RecorderObject *self, PyObject *method)
{
    int known = is_known_method(method);
    if (known < 0) return NULL;
    MeasurementObject *m = (MeasurementObject *)Measurement_Type->tp_alloc(Measurement_Type, 0);
    if (m == NULL) return NULL;
    m->recorder = Py_NewRef((PyObject *)self);
    m->method = Py_NewRef(known ? method : other_method);
    m->route = Py_NewRef(Py_None);
    m->status = Py_NewRef(Py_None);
    m->error = Py_NewRef(Py_None);

    /* Only fork() pauses the scheduler (paused_by_fork), so only the first request after one asks. */
    if (fork_pending) {
        PyObject *paused = PyObject_GetAttr(sched, str_paused_by_fork);
        if (paused == NULL) goto fail;
        int p = PyObject_IsTrue(paused);
        Py_DECREF(paused);
        if (p < 0) goto fail;
        if (p) {  /* the first request of a forked worker: resume our background work */
            PyObject *r = PyObject_CallMethodNoArgs(sched, str_resume);
            if (r == NULL) goto fail;
            Py_DECREF(r);
        }
        fork_pending = 0;
    }

    activity_begin(&m->alone, &m->epoch);

    PyObject *gc = call_getter(self->gc_optimizer, "gc_optimizer");
    if (gc == NULL) goto fail_counted;
    if (gc != Py_None && gc_fast(gc)) {
        m->gc = gc;
        m->gc_fast = 1;
        m->gc_pause0_ns = gc_tally((GcHooksObject *)gc)->pause_total_ns;
    }
    else if (gc != Py_None) {
        PyObject *v = PyObject_CallMethodNoArgs(gc, str_pause_total_ns);
        PyObject *iv = v != NULL ? PyNumber_Long(v) : NULL;
        Py_XDECREF(v);
        if (iv == NULL) {
            Py_DECREF(gc);
            if (swallow() < 0) goto fail_counted;
        }
        else {
            m->gc = gc;
            m->gc_pause0 = iv;
        }
    }
    else {
        Py_DECREF(gc);
    }

    if (self->every == 1) {
        m->sampled = 1;
        m->rss0 = read_rss(self, 1);
        if (m->rss0 == NULL) goto fail_counted;
    }
    else if (self->countdown > 1) {
        /* Under the GIL this countdown is exact; the reference may lose a step to a racing thread. */
        self->countdown -= 1;
        m->sampled = 0;
    }
    else {
        Py_ssize_t gap;
        if (overridden((PyObject *)self, str_next_gap, c_next_gap)) {
            PyObject *g = PyObject_CallMethodNoArgs((PyObject *)self, str_next_gap);
            if (g == NULL) goto fail_counted;
            gap = PyLong_AsSsize_t(g);
            Py_DECREF(g);
            if (gap == -1 && PyErr_Occurred()) goto fail_counted;
        }
        else if (draw_gap(self, &gap) < 0) {
            goto fail_counted;
        }
        self->countdown = gap;
        m->sampled = 1;
        /* A fresh reading: the last one may predate unmeasured requests, whose growth it would add. */
        int64_t started = now_ns();
        m->rss0 = read_rss(self, 0);
        if (m->rss0 == NULL) goto fail_counted;
        m->read_ns = now_ns() - started;
    }

    PyObject *tracing = PyObject_CallNoArgs(is_tracing_fn);
    if (tracing == NULL) goto fail_counted;
    int t = PyObject_IsTrue(tracing);
    Py_DECREF(tracing);
    if (t < 0) goto fail_counted;
    if (t) {
        PyObject *mem = PyObject_CallNoArgs(get_traced_fn);
        if (mem == NULL) goto fail_counted;
        m->traced0 = PySequence_GetItem(mem, 0);
        Py_DECREF(mem);
        if (m->traced0 == NULL) goto fail_counted;
    }
    m->t0 = now_ns();
    return (PyObject *)m;

fail_counted:
    activity_mark_end();  /* a request that failed to begin must not stay counted in flight */
fail:
    Py_DECREF(m);
    return NULL;
}

static PyObject *
Recorder_begin(RecorderObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    if (Measurement_Type == NULL && not_configured() < 0) return NULL;
    PyObject *method = str_GET;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs > 1 || nargs + nkw > 1) {
        PyErr_Format(PyExc_TypeError, "begin() takes at most 1 argument (%zd given)", nargs + nkw);
        return NULL;
    }
    if (nargs == 1) {
        method = args[0];
    }
    else if (nkw == 1) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, 0);
        int eq = PyUnicode_Check(name) ? PyUnicode_Compare(name, str_method) == 0 : 0;
        if (!eq) {
            PyErr_Format(PyExc_TypeError, "begin() got an unexpected keyword argument %R", name);
            return NULL;
        }
        method = args[0];
    }
    return begin(self, method);
}

/* The route table `profiler` records requests into (borrowed), or NULL: then record_request() is called.
 * A profiler offers its table as `_request_sink` only while record_request is its class's own and does
 * nothing but add to that table, so writing to the table is the same as calling it. */
static PyObject *
profiler_sink(RecorderObject *self, PyObject *profiler)
{
    if (profiler == self->sink_owner) return self->sink;
    PyObject *sink = PyObject_GetAttr(profiler, str_request_sink);
    if (sink == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return NULL;
        PyErr_Clear();
    }
    else if (!PyObject_TypeCheck(sink, &RouteTable_Type)) {
        Py_CLEAR(sink);
    }
    Py_XSETREF(self->sink_owner, Py_NewRef(profiler));
    Py_XSETREF(self->sink, sink);
    return sink;
}

/* Hand a request's route, RSS delta (None when not sampled), traced delta and duration to the running
 * profiler: its route table directly, else its record_request(). Exceptions are counted, never raised.
 * Every request, measured or not: the leak profiler's route attribution regresses a site's growth on
 * per-route request counts, which thinning would blur. */
static int
deliver_to_profiler(RecorderObject *self, PyObject *profiler, PyObject *route, PyObject *rss, PyObject *traced,
                    PyObject *duration)
{
    PyObject *r = NULL;
    PyObject *sink = profiler_sink(self, profiler);
    if (sink == NULL && PyErr_Occurred()) goto done;
    if (sink != NULL) {
        Py_INCREF(sink);  /* held: converting the values may run code that replaces the cache */
        if (route_table_record((RouteTableObject *)sink, route, rss, traced, duration) == 0)
            r = Py_NewRef(Py_None);
        Py_DECREF(sink);
    }
    else {
        PyObject *callargs[5] = {profiler, route, rss, traced, duration};
        r = PyObject_VectorcallMethod(str_record_request, callargs, 5 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
done:
    if (r == NULL) return swallow();
    Py_DECREF(r);
    return 0;
}

/* The running profiler (a new reference, Py_None when none); NULL with the getter's error counted. A
 * getter that fails returns NULL with no error set; one that raises what must propagate returns NULL with
 * it set. With no profiler, the last one's route table is let go. */
static PyObject *
running_profiler(RecorderObject *self)
{
    PyObject *profiler = call_getter(self->profiler, "profiler");
    if (profiler == NULL) {
        swallow();
        return NULL;
    }
    if (profiler == Py_None) {  /* do not keep the last one (and its buffers) alive */
        Py_CLEAR(self->sink_owner);
        Py_CLEAR(self->sink);
    }
    return profiler;
}

/* Hand `metrics` to the profiler, on_request and the listeners; Exceptions are counted, never raised. */
static int
deliver(RecorderObject *self, PyObject *metrics)
{
    PyObject *profiler = running_profiler(self);
    if (profiler == NULL) {
        if (PyErr_Occurred()) return -1;
    }
    else if (profiler != Py_None) {
        PyObject *route = NULL, *rss = NULL, *traced = NULL, *duration = NULL;
        int ok = 0;
        if (Py_TYPE(metrics) == metrics_type && PyTuple_GET_SIZE(metrics) >= METRICS_FIELDS) {
            route = Py_NewRef(PyTuple_GET_ITEM(metrics, 0));
            int sampled = PyObject_IsTrue(PyTuple_GET_ITEM(metrics, 9));
            if (sampled < 0) goto profiler_done;
            rss = Py_NewRef(sampled ? PyTuple_GET_ITEM(metrics, 4) : Py_None);
            traced = Py_NewRef(PyTuple_GET_ITEM(metrics, 5));
            duration = Py_NewRef(PyTuple_GET_ITEM(metrics, 3));
        }
        else {  /* anything else, as the reference reads it: by attribute */
            if ((route = PyObject_GetAttr(metrics, str_route)) == NULL) goto profiler_done;
            PyObject *s = PyObject_GetAttr(metrics, str_sampled);
            if (s == NULL) goto profiler_done;
            int sampled = PyObject_IsTrue(s);
            Py_DECREF(s);
            if (sampled < 0) goto profiler_done;
            rss = sampled ? PyObject_GetAttr(metrics, str_rss_delta) : Py_NewRef(Py_None);
            if (rss == NULL) goto profiler_done;
            if ((traced = PyObject_GetAttr(metrics, str_traced_delta)) == NULL) goto profiler_done;
            if ((duration = PyObject_GetAttr(metrics, str_duration_s)) == NULL) goto profiler_done;
        }
        ok = 1;
    profiler_done:
        if (ok) ok = deliver_to_profiler(self, profiler, route, rss, traced, duration) == 0;
        else ok = swallow() == 0;
        Py_XDECREF(route);
        Py_XDECREF(rss);
        Py_XDECREF(traced);
        Py_XDECREF(duration);
        Py_DECREF(profiler);
        if (!ok) return -1;
    }
    else {
        Py_DECREF(profiler);
    }

    if (self->on_request != NULL && self->on_request != Py_None) {
        PyObject *on_request = Py_NewRef(self->on_request);  /* it may replace itself */
        PyObject *r = PyObject_CallOneArg(on_request, metrics);
        Py_DECREF(on_request);
        if (r == NULL) {
            if (swallow() < 0) return -1;
        }
        else {
            Py_DECREF(r);
        }
    }

    if (listeners == NULL || PyTuple_GET_SIZE(listeners) == 0) return 0;
    /* The tuple of this moment, like the reference's loop over the module's tuple: listeners may add or
     * remove (which hands over a new tuple). */
    PyObject *seq = Py_NewRef(listeners);
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *listener = Py_NewRef(PyTuple_GET_ITEM(seq, i));
        PyObject *r = PyObject_CallOneArg(listener, metrics);
        Py_DECREF(listener);
        if (r == NULL) {
            if (swallow() < 0) {
                Py_DECREF(seq);
                return -1;
            }
        }
        else {
            Py_DECREF(r);
        }
    }
    Py_DECREF(seq);
    return 0;
}

static PyObject *
Recorder_deliver(RecorderObject *self, PyObject *metrics)
{
    if (sched == NULL && not_configured() < 0) return NULL;
    if (deliver(self, metrics) < 0) return NULL;
    Py_RETURN_NONE;
}

static int
Recorder_traverse(RecorderObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->gc_optimizer);
    Py_VISIT(self->profiler);
    Py_VISIT(self->on_request);
    Py_VISIT(self->rss_reader);
    Py_VISIT(self->sink_owner);
    return 0;
}

static int
Recorder_clear(RecorderObject *self)
{
    Py_CLEAR(self->gc_optimizer);
    Py_CLEAR(self->profiler);
    Py_CLEAR(self->on_request);
    Py_CLEAR(self->rss_reader);
    Py_CLEAR(self->sink_owner);
    Py_CLEAR(self->sink);
    return 0;
}

static void
Recorder_dealloc(RecorderObject *self)
{
    PyObject_GC_UnTrack(self);
    Recorder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Recorder_methods[] = {
    {"begin", (PyCFunction)(void (*)(void))Recorder_begin, METH_FASTCALL | METH_KEYWORDS,
     "begin(method='GET'): start measuring a request."},
    {"next_gap", (PyCFunction)Recorder_next_gap, METH_NOARGS,
     "Requests from one RSS measurement to the next: geometric with mean mean_gap."},
    {"_note_rss_cost", (PyCFunction)(void (*)(void))Recorder_note_rss_cost, METH_FASTCALL,
     "A measured request's reads took cost_s over its duration_s: set the gap the budget allows."},
    {"deliver", (PyCFunction)Recorder_deliver, METH_O,
     "Hand finished metrics to the profiler, on_request and the listeners; never raises an Exception."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Recorder_members[] = {
    {"every", T_PYSSIZET, offsetof(RecorderObject, every), 0, "rss_sample_every"},
    {"countdown", T_PYSSIZET, offsetof(RecorderObject, countdown), 0, "requests left until the next measured one"},
    {"_log_q", T_DOUBLE, offsetof(RecorderObject, log_q), 0, NULL},
    {"_rss_budget", T_DOUBLE, offsetof(RecorderObject, rss_budget), 0, NULL},
    {"_rss_cost_s", T_DOUBLE, offsetof(RecorderObject, rss_cost_s), 0, NULL},
    {"_rss_duration_s", T_DOUBLE, offsetof(RecorderObject, rss_duration_s), 0, NULL},
    {"_rss_samples", T_INT, offsetof(RecorderObject, rss_samples), 0, NULL},
    {"gc_optimizer", T_OBJECT, offsetof(RecorderObject, gc_optimizer), 0, "getter of the GC optimizer"},
    {"profiler", T_OBJECT, offsetof(RecorderObject, profiler), 0, "getter of the memory profiler"},
    {"on_request", T_OBJECT, offsetof(RecorderObject, on_request), 0, "called with every RequestMetrics"},
    {"rss_reader", T_OBJECT, offsetof(RecorderObject, rss_reader), 0, "the RssReader"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject Recorder_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kotoba_memory._crecord.Recorder",
    .tp_basicsize = sizeof(RecorderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C base of CRequestRecorder: its settings, begin(), next_gap() and deliver().",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Recorder_dealloc,
    .tp_traverse = (traverseproc)Recorder_traverse,
    .tp_clear = (inquiry)Recorder_clear,
    .tp_methods = Recorder_methods,
    .tp_members = Recorder_members,
};

/* ------------------------------------------------------------------------------------------------ */
/* Measurement                                                                                        */

static PyObject *
or_none(PyObject *o)
{
    return o != NULL ? o : Py_None;
}

static PyObject *
new_metrics(PyObject **items)
{
#if PY_VERSION_HEX < 0x030E0000
    /* What tuple.__new__(RequestMetrics, items) does, without the temporary tuple. */
    PyObject *t = metrics_type->tp_alloc(metrics_type, METRICS_FIELDS);
    if (t == NULL) return NULL;
    for (Py_ssize_t i = 0; i < METRICS_FIELDS; i++) PyTuple_SET_ITEM(t, i, Py_NewRef(items[i]));
    return t;
#else
    PyObject *tmp = PyTuple_New(METRICS_FIELDS);
    if (tmp == NULL) return NULL;
    for (Py_ssize_t i = 0; i < METRICS_FIELDS; i++) PyTuple_SET_ITEM(tmp, i, Py_NewRef(items[i]));
    PyObject *args = PyTuple_Pack(1, tmp);
    Py_DECREF(tmp);
    if (args == NULL) return NULL;
    PyObject *t = PyTuple_Type.tp_new(metrics_type, args, NULL);
    Py_DECREF(args);
    return t;
#endif
}

/* Record the request once. `want`: the caller uses the RequestMetrics; without it (the WSGI wrappers
 * finishing a request) no tuple is built when nothing but the profiler's route table reads one, and
 * None is returned. */
static PyObject *
measurement_finish(MeasurementObject *self, int want)
{
    if (self->done) Py_RETURN_NONE;
    if (self->recorder == NULL || sched == NULL) {
        PyErr_SetString(PyExc_TypeError, "measurement was not made by RequestRecorder.begin()");
        return NULL;
    }
    self->done = 1;
    int64_t ended = now_ns();
    double duration = (double)(ended - self->t0) / 1e9;
    RecorderObject *rec = (RecorderObject *)self->recorder;
    PyObject *rss_delta = NULL, *traced = NULL, *gc_pause = NULL, *dur = NULL, *metrics = NULL;
    PyObject *route = NULL;

    int overlapped = activity_end(self->alone, self->epoch);

    if (self->sampled && self->rss0 != NULL) {
        PyObject *now = read_rss(rec, 0);
        if (now == NULL) return NULL;
        rss_delta = PyNumber_Subtract(now, self->rss0);
        Py_DECREF(now);
        if (rss_delta == NULL) return NULL;
        if (rec->rss_budget != 0.0) {
            note_rss_cost(rec, (double)(self->read_ns + now_ns() - ended) / 1e9, duration);
        }
    }
    else {
        rss_delta = Py_NewRef(int_zero);
    }

    traced = Py_NewRef(Py_None);
    if (self->traced0 != NULL && !overlapped) {
        PyObject *tracing = PyObject_CallNoArgs(is_tracing_fn);
        if (tracing == NULL) goto done;
        int t = PyObject_IsTrue(tracing);
        Py_DECREF(tracing);
        if (t < 0) goto done;
        if (t) {
            PyObject *mem = PyObject_CallNoArgs(get_traced_fn);
            if (mem == NULL) goto done;
            PyObject *now = PySequence_GetItem(mem, 0);
            Py_DECREF(mem);
            if (now == NULL) goto done;
            Py_SETREF(traced, PyNumber_Subtract(now, self->traced0));
            Py_DECREF(now);
            if (traced == NULL) goto done;
        }
    }

    gc_pause = Py_NewRef(int_zero);
    if (self->gc != NULL && self->gc_fast) {
        /* The tally is read again in case _recorder was replaced meanwhile (then no pause is told). */
        GcTallyObject *tally = gc_tally((GcHooksObject *)self->gc);
        long long d = tally != NULL ? tally->pause_total_ns - self->gc_pause0_ns : 0;
        long long n;
        int ok = 1;
        if (d > 0) {
            PyObject *v = PyLong_FromLongLong(d);
            if (v != NULL) Py_SETREF(gc_pause, v);
            else ok = 0;
        }
        if (ok && gc_hooks_ended((GcHooksObject *)self->gc, &n) < 0) ok = 0;
        if (!ok && swallow() < 0) goto done;
    }
    else if (self->gc != NULL) {
        PyObject *v = PyObject_CallMethodNoArgs(self->gc, str_pause_total_ns);
        PyObject *iv = v != NULL ? PyNumber_Long(v) : NULL;
        Py_XDECREF(v);
        PyObject *d = iv != NULL ? PyNumber_Subtract(iv, self->gc_pause0) : NULL;
        Py_XDECREF(iv);
        int ok = d != NULL;
        if (ok) {
            int negative = PyObject_RichCompareBool(d, int_zero, Py_LT);
            if (negative < 0) {
                ok = 0;
            }
            else if (!negative) {  /* max(0, d) */
                Py_SETREF(gc_pause, Py_NewRef(d));
            }
            Py_DECREF(d);
        }
        if (ok) {
            PyObject *r = PyObject_CallMethodNoArgs(self->gc, str_request_ended);
            ok = r != NULL;
            Py_XDECREF(r);
        }
        if (!ok && swallow() < 0) goto done;
    }

    route = Py_NewRef(or_none(self->route));  /* held: its __bool__ may replace the field */
    int has_route = PyObject_IsTrue(route);
    if (has_route < 0) goto done;
    dur = PyFloat_FromDouble(duration);
    if (dur == NULL) goto done;
    if (!want && (rec->on_request == NULL || rec->on_request == Py_None) &&
        (listeners == NULL || PyTuple_GET_SIZE(listeners) == 0) &&
        !overridden((PyObject *)rec, str_deliver, c_deliver)) {
        /* What deliver() would do with the tuple: hand the profiler its four values. */
        PyObject *profiler = running_profiler(rec);
        if (profiler == NULL) {
            if (PyErr_Occurred()) goto done;
        }
        else {
            int r = 0;
            if (profiler != Py_None) {
                r = deliver_to_profiler(rec, profiler, has_route ? route : unmatched,
                                        self->sampled ? rss_delta : Py_None, traced, dur);
            }
            Py_DECREF(profiler);
            if (r < 0) goto done;
        }
        metrics = Py_NewRef(Py_None);
        goto done;
    }
    {
        PyObject *items[METRICS_FIELDS] = {
            has_route ? route : unmatched,
            or_none(self->method),
            or_none(self->status),
            dur,
            rss_delta,
            traced,
            gc_pause,
            or_none(self->error),
            overlapped ? Py_True : Py_False,
            self->sampled ? Py_True : Py_False,
        };
        metrics = new_metrics(items);
    }
    if (metrics != NULL) {
        if (!overridden((PyObject *)rec, str_deliver, c_deliver)) {
            if (deliver(rec, metrics) < 0) Py_CLEAR(metrics);
        }
        else {
            PyObject *r = PyObject_CallMethodOneArg((PyObject *)rec, str_deliver, metrics);
            if (r == NULL) Py_CLEAR(metrics);
            Py_XDECREF(r);
        }
    }

done:
    Py_XDECREF(route);
    Py_XDECREF(rss_delta);
    Py_XDECREF(traced);
    Py_XDECREF(gc_pause);
    Py_XDECREF(dur);
    return metrics;
}

static PyObject *
Measurement_finish(MeasurementObject *self, PyObject *Py_UNUSED(ignored))
{
    return measurement_finish(self, 1);
}

static PyObject *
Measurement_fail(MeasurementObject *self, PyObject *exc)
{
    if (self->error == NULL || self->error == Py_None) {
        PyObject *name = PyObject_GetAttr((PyObject *)Py_TYPE(exc), str_qualname);
        if (name == NULL) return NULL;
        Py_XSETREF(self->error, name);
    }
    if (self->status == NULL || self->status == Py_None) Py_XSETREF(self->status, Py_NewRef(int_500));
    Py_RETURN_NONE;
}

static PyObject *
Measurement_activate(MeasurementObject *self, PyObject *Py_UNUSED(ignored))
{
    if (current_var == NULL && not_configured() < 0) return NULL;
    PyObject *token = PyContextVar_Set(current_var, (PyObject *)self);
    if (token == NULL) return NULL;
    Py_XSETREF(self->token, token);
    Py_RETURN_NONE;
}

static PyObject *
Measurement_deactivate(MeasurementObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->token == NULL || self->token == Py_None) Py_RETURN_NONE;
    if (PyContextVar_Reset(current_var, self->token) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError)) return NULL;
        PyErr_Clear();  /* reset from another context: just clear ours */
        PyObject *t = PyContextVar_Set(current_var, Py_None);
        if (t == NULL) return NULL;
        Py_DECREF(t);
    }
    Py_CLEAR(self->token);
    Py_RETURN_NONE;
}

static PyObject *
Measurement_get_finished(MeasurementObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->done);
}

static int
Measurement_traverse(MeasurementObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->recorder);
    Py_VISIT(self->route);
    Py_VISIT(self->method);
    Py_VISIT(self->status);
    Py_VISIT(self->error);
    Py_VISIT(self->gc);
    Py_VISIT(self->gc_pause0);
    Py_VISIT(self->rss0);
    Py_VISIT(self->traced0);
    Py_VISIT(self->token);
    return 0;
}

static int
Measurement_clear(MeasurementObject *self)
{
    Py_CLEAR(self->recorder);
    Py_CLEAR(self->route);
    Py_CLEAR(self->method);
    Py_CLEAR(self->status);
    Py_CLEAR(self->error);
    Py_CLEAR(self->gc);
    Py_CLEAR(self->gc_pause0);
    Py_CLEAR(self->rss0);
    Py_CLEAR(self->traced0);
    Py_CLEAR(self->token);
    return 0;
}

static void
Measurement_dealloc(MeasurementObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    Measurement_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMethodDef Measurement_methods[] = {
    {"finish", (PyCFunction)Measurement_finish, METH_NOARGS,
     "Record the request (idempotent: later calls return None)."},
    {"fail", (PyCFunction)Measurement_fail, METH_O, "Note that the app raised exc while serving this request."},
    {"activate", (PyCFunction)Measurement_activate, METH_NOARGS,
     "Make this the current measurement of the running context."},
    {"deactivate", (PyCFunction)Measurement_deactivate, METH_NOARGS,
     "Undo activate() in the context that activated it."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Measurement_members[] = {
    {"route", T_OBJECT, offsetof(MeasurementObject, route), 0, "the route template, once known"},
    {"method", T_OBJECT, offsetof(MeasurementObject, method), 0, "the HTTP method (normalized)"},
    {"status", T_OBJECT, offsetof(MeasurementObject, status), 0, "the response status, once known"},
    {"error", T_OBJECT, offsetof(MeasurementObject, error), 0, "the name of the exception the app raised"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Measurement_getset[] = {
    {"finished", (getter)Measurement_get_finished, NULL, "Whether finish() already ran.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot Measurement_slots[] = {
    {Py_tp_doc, "The in-flight measurement of one request (C); finish() records it exactly once."},
    {Py_tp_dealloc, Measurement_dealloc},
    {Py_tp_traverse, Measurement_traverse},
    {Py_tp_clear, Measurement_clear},
    {Py_tp_methods, Measurement_methods},
    {Py_tp_members, Measurement_members},
    {Py_tp_getset, Measurement_getset},
    {0, NULL},
};

static PyType_Spec Measurement_spec = {
    "kotoba_memory._crecord.Measurement",
    sizeof(MeasurementObject),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    Measurement_slots,
};

/* ------------------------------------------------------------------------------------------------ */
/* WSGI: the start_response wrapper and the response body (wsgi.py's closure and _MeasuredBody, which  */
/* stay the reference). Any measurement works; the C one is reached without a method lookup.         */

static int
set_field(PyObject *m, PyObject *name, PyObject **field, PyObject *value)
{
    if (Py_TYPE(m) == Measurement_Type) {
        Py_XSETREF(*field, Py_NewRef(value));
        return 0;
    }
    return PyObject_SetAttr(m, name, value);
}

static PyObject *
call_fail(PyObject *m, PyObject *exc)
{
    if (Py_TYPE(m) == Measurement_Type) return Measurement_fail((MeasurementObject *)m, exc);
    return PyObject_CallMethodOneArg(m, str_fail, exc);
}

static PyObject *
call_finish(PyObject *m)
{
    if (Py_TYPE(m) == Measurement_Type) return measurement_finish((MeasurementObject *)m, 0);
    return PyObject_CallMethodNoArgs(m, str_finish);
}

/* The pending exception is handed to measurement.fail() and stays pending (fail's own error, if any,
 * replaces it with the original as its context, as a Python `except: fail(exc); raise` would). */
static void
fail_keeping_error(PyObject *m)
{
    PyObject *exc = take_error();
    PyObject *r = call_fail(m, exc != NULL ? exc : Py_None);
    if (r != NULL) {
        Py_DECREF(r);
        restore_error(exc);
    }
    else {
        chain_error(exc);
    }
}

typedef struct {
    PyObject_HEAD
    PyObject *measurement, *start_response, *route_of, *environ;
    vectorcallfunc vectorcall;
} StartResponseObject;

/* int(status[:3]), or NULL with its error (ValueError: not a number; TypeError: not sliceable). Three ASCII
 * digits, what every server sends, are read in place: no slice, no int parser. */
static PyObject *
status_code(PyObject *status)
{
    if (PyUnicode_CheckExact(status)
#if PY_VERSION_HEX < 0x030C0000
        && PyUnicode_READY(status) == 0
#endif
        && PyUnicode_IS_ASCII(status) && PyUnicode_GET_LENGTH(status) >= 3) {
        const unsigned char *s = PyUnicode_1BYTE_DATA(status);
        if (s[0] >= '0' && s[0] <= '9' && s[1] >= '0' && s[1] <= '9' && s[2] >= '0' && s[2] <= '9') {
            return PyLong_FromLong((s[0] - '0') * 100 + (s[1] - '0') * 10 + (s[2] - '0'));
        }
    }
    if (PyErr_Occurred()) return NULL;  /* PyUnicode_READY failed */
    PyObject *code = PySequence_GetSlice(status, 0, 3);  /* status[:3]: a TypeError propagates */
    if (code == NULL) return NULL;
    PyObject *number = PyNumber_Long(code);
    Py_DECREF(code);
    return number;
}


static PyObject *
StartResponse_vectorcall(StartResponseObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *status = NULL, *headers = NULL, *exc_info = Py_None;
    static const char *const names[] = {"status", "headers", "exc_info"};
    PyObject *slots[3] = {NULL, NULL, NULL};
    if (nargs > 3) {
        PyErr_Format(PyExc_TypeError, "start_response() takes from 2 to 3 positional arguments but %zd were given",
                     nargs);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) slots[i] = args[i];
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int found = 0;
        for (int j = 0; j < 3; j++) {
            if (PyUnicode_CompareWithASCIIString(key, names[j]) == 0) {
                if (slots[j] != NULL) {
                    PyErr_Format(PyExc_TypeError, "start_response() got multiple values for argument '%s'",
                                 names[j]);
                    return NULL;
                }
                slots[j] = args[nargs + k];
                found = 1;
                break;
            }
        }
        if (!found) {
            PyErr_Format(PyExc_TypeError, "start_response() got an unexpected keyword argument %R", key);
            return NULL;
        }
    }
    if (slots[0] == NULL || slots[1] == NULL) {
        PyErr_SetString(PyExc_TypeError, "start_response() missing required arguments 'status' and 'headers'");
        return NULL;
    }
    status = slots[0];
    headers = slots[1];
    if (slots[2] != NULL) exc_info = slots[2];
    PyObject *m = self->measurement;

    PyObject *number = status_code(status);
    if (number == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError)) return NULL;
        PyErr_Clear();
    }
    else {
        MeasurementObject *cm = (MeasurementObject *)m;
        int rc = set_field(m, str_status, Py_TYPE(m) == Measurement_Type ? &cm->status : NULL, number);
        Py_DECREF(number);
        if (rc < 0) return NULL;
    }

    if (self->route_of != Py_None) {
        PyObject *route;
        if (Py_TYPE(m) == Measurement_Type) {
            route = Py_NewRef(or_none(((MeasurementObject *)m)->route));
        }
        else if ((route = PyObject_GetAttr(m, str_route)) == NULL) {
            return NULL;
        }
        int unset = route == Py_None;
        Py_DECREF(route);
        if (unset) {
            PyObject *label = PyObject_CallOneArg(self->route_of, self->environ);
            if (label == NULL) {  /* a route label is never worth failing the response */
                if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
                PyErr_Clear();
            }
            else {
                MeasurementObject *cm = (MeasurementObject *)m;
                int rc = set_field(m, str_route, Py_TYPE(m) == Measurement_Type ? &cm->route : NULL, label);
                Py_DECREF(label);
                if (rc < 0) {
                    if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
                    PyErr_Clear();
                }
            }
        }
    }
    PyObject *callargs[3] = {status, headers, exc_info};
    return PyObject_Vectorcall(self->start_response, callargs, exc_info == Py_None ? 2 : 3, NULL);
}

/* A wrapper of `sr` for measurement `m`, with the checks StartResponse() makes (also for WSGICall). */
static PyObject *
start_response_make(PyTypeObject *type, PyObject *m, PyObject *sr, PyObject *route_of, PyObject *environ)
{
    if (!PyCallable_Check(sr)) {
        PyErr_Format(PyExc_TypeError, "start_response must be callable, not %.100s", Py_TYPE(sr)->tp_name);
        return NULL;
    }
    if (route_of != Py_None && !PyCallable_Check(route_of)) {
        PyErr_Format(PyExc_TypeError, "route_of must be callable or None, not %.100s", Py_TYPE(route_of)->tp_name);
        return NULL;
    }
    StartResponseObject *self = (StartResponseObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->measurement = Py_NewRef(m);
    self->start_response = Py_NewRef(sr);
    self->route_of = Py_NewRef(route_of);
    self->environ = Py_NewRef(environ);
    self->vectorcall = (vectorcallfunc)StartResponse_vectorcall;
    return (PyObject *)self;
}

static PyObject *
StartResponse_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *m, *sr, *route_of, *environ;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "StartResponse() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "StartResponse", 4, 4, &m, &sr, &route_of, &environ)) return NULL;
    return start_response_make(type, m, sr, route_of, environ);
}

static int
StartResponse_traverse(StartResponseObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->measurement);
    Py_VISIT(self->start_response);
    Py_VISIT(self->route_of);
    Py_VISIT(self->environ);
    return 0;
}

static int
StartResponse_clear(StartResponseObject *self)
{
    Py_CLEAR(self->measurement);
    Py_CLEAR(self->start_response);
    Py_CLEAR(self->route_of);
    Py_CLEAR(self->environ);
    return 0;
}

static void
StartResponse_dealloc(StartResponseObject *self)
{
    PyObject_GC_UnTrack(self);
    StartResponse_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
StartResponse_call(PyObject *self, PyObject *args, PyObject *kwargs)
{
    if (((StartResponseObject *)self)->measurement == NULL) {
        PyErr_SetString(PyExc_TypeError, "uninitialised StartResponse");
        return NULL;
    }
    return PyVectorcall_Call(self, args, kwargs);
}

static PyTypeObject StartResponse_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kotoba_memory._crecord.StartResponse",
    .tp_basicsize = sizeof(StartResponseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "StartResponse(measurement, start_response, route_of, environ): the app's start_response, "
              "noting the status (and the route, from route_of(environ), if none is set yet).",
    .tp_new = StartResponse_new,
    .tp_dealloc = (destructor)StartResponse_dealloc,
    .tp_traverse = (traverseproc)StartResponse_traverse,
    .tp_clear = (inquiry)StartResponse_clear,
    .tp_vectorcall_offset = offsetof(StartResponseObject, vectorcall),
    .tp_call = StartResponse_call,
};

typedef struct {
    PyObject_HEAD
    PyObject *result, *measurement, *iterator;
} BodyObject;

/* The app's response iterable `result`, finishing measurement `m` when closed (also for WSGICall). */
static PyObject *
body_make(PyTypeObject *type, PyObject *result, PyObject *m)
{
    BodyObject *self = (BodyObject *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->result = Py_NewRef(result);
    self->measurement = Py_NewRef(m);
    return (PyObject *)self;
}

static PyObject *
Body_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *result, *m;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Body() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Body", 2, 2, &result, &m)) return NULL;
    return body_make(type, result, m);
}

static int
Body_check(BodyObject *self)
{
    if (self->result == NULL) {
        PyErr_SetString(PyExc_TypeError, "uninitialised Body");
        return -1;
    }
    return 0;
}

static PyObject *
Body_iter(BodyObject *self)
{
    if (Body_check(self) < 0) return NULL;
    if (PyList_CheckExact(self->result) || PyTuple_CheckExact(self->result))
        return PyObject_GetIter(self->result);  /* iterating a list cannot fail: no wrapper per chunk */
    return Py_NewRef((PyObject *)self);
}

static PyObject *
Body_iternext(BodyObject *self)
{
    if (Body_check(self) < 0) return NULL;
    if (self->iterator == NULL) {
        self->iterator = PyObject_GetIter(self->result);
        if (self->iterator == NULL) return NULL;
    }
    PyObject *it = Py_NewRef(self->iterator);
    PyObject *item = Py_TYPE(it)->tp_iternext(it);
    Py_DECREF(it);
    if (item != NULL || !PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_StopIteration)) return item;
    fail_keeping_error(self->measurement);
    return NULL;
}

static PyObject *
Body_close(BodyObject *self, PyObject *Py_UNUSED(ignored))
{
    if (Body_check(self) < 0) return NULL;
    PyObject *m = Py_NewRef(self->measurement);
    int failed = 0;
    PyObject *close = NULL;
    if (!PyList_CheckExact(self->result) && !PyTuple_CheckExact(self->result)) {  /* those have none */
        /* getattr(result, "close", None), without an AttributeError raised and dropped */
#if PY_VERSION_HEX >= 0x030D0000
        if (PyObject_GetOptionalAttr(self->result, str_close, &close) < 0) failed = 1;
#else
        if (_PyObject_LookupAttr(self->result, str_close, &close) < 0) failed = 1;
#endif
    }
    if (close != NULL && close != Py_None) {
        PyObject *r = PyObject_CallNoArgs(close);
        if (r == NULL) failed = 1;
        Py_XDECREF(r);
    }
    Py_XDECREF(close);
    PyObject *pending = NULL;
    if (failed) {
        fail_keeping_error(m);
        pending = take_error();
    }
    PyObject *r = call_finish(m);  /* the reference's `finally:` */
    Py_DECREF(m);
    if (r == NULL) {
        chain_error(pending);  /* finish's error wins, the close error as its context */
        return NULL;
    }
    Py_DECREF(r);
    if (failed) {
        restore_error(pending);
        return NULL;
    }
    Py_RETURN_NONE;
}

static int
Body_traverse(BodyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->result);
    Py_VISIT(self->measurement);
    Py_VISIT(self->iterator);
    return 0;
}

static int
Body_clear(BodyObject *self)
{
    Py_CLEAR(self->result);
    Py_CLEAR(self->measurement);
    Py_CLEAR(self->iterator);
    return 0;
}

static void
Body_dealloc(BodyObject *self)
{
    PyObject_GC_UnTrack(self);
    Body_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Body_methods[] = {
    {"close", (PyCFunction)Body_close, METH_NOARGS,
     "Close the app's iterable and finish the measurement (also when closing fails)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject Body_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kotoba_memory._crecord.Body",
    .tp_basicsize = sizeof(BodyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Body(result, measurement): the app's response iterable, finishing the measurement when "
              "closed and noting an exception raised while iterating.",
    .tp_new = Body_new,
    .tp_dealloc = (destructor)Body_dealloc,
    .tp_traverse = (traverseproc)Body_traverse,
    .tp_clear = (inquiry)Body_clear,
    .tp_iter = (getiterfunc)Body_iter,
    .tp_iternext = (iternextfunc)Body_iternext,
    .tp_methods = Body_methods,
};

/* ------------------------------------------------------------------------------------------------ */
/* WSGICall: MemoryMiddleware.__call__ (kotoba_memory_integrations/wsgi.py; PyMemoryMiddleware is the   */
/* reference). In a worker that waits between requests, the Python frame of __call__ was a few        */
/* microseconds of cold caches on every request.                                                      */

typedef struct {
    PyObject_HEAD
    PyObject *app, *recorder, *route_of;
} WSGICallObject;

static PyObject *str_environ_key, *str_request_method, *str_begin, *str_activate, *str_deactivate,
    *str_finished, *str_get;

/* environ.get(key, default) (a new reference, NULL with an error set). */
static PyObject *
environ_get(PyObject *environ, PyObject *key, PyObject *default_value)
{
    if (PyDict_Check(environ)) {
        PyObject *v = PyDict_GetItemWithError(environ, key);
        if (v != NULL) return Py_NewRef(v);
        return PyErr_Occurred() ? NULL : Py_NewRef(default_value);
    }
    return PyObject_CallMethodObjArgs(environ, str_get, key, default_value, NULL);
}

/* measurement.<name>() for a C measurement without a lookup, else by method call (0, or -1 on error). */
static int
measurement_call(PyObject *m, PyObject *name, PyObject *(*direct)(MeasurementObject *, PyObject *), PyObject *arg)
{
    PyObject *r;
    if (Py_TYPE(m) == Measurement_Type) r = direct((MeasurementObject *)m, arg);
    else r = arg != NULL ? PyObject_CallMethodOneArg(m, name, arg) : PyObject_CallMethodNoArgs(m, name);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

static PyObject *
mod_thread_measurement(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    PyObject *m = thread_current;
    int greenlets = greenlet_servers_loaded();
    if (greenlets < 0) return NULL;
    if (m != NULL && !greenlets && !((MeasurementObject *)m)->done) return Py_NewRef(m);
    /* Asked outside every request (nothing in flight) is no sign of a copied context: no switch. */
    if (in_flight_n > 0 || greenlets) context_wanted = 1;
    Py_RETURN_NONE;
}

static PyObject *
mod_greenlets_loaded(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    int loaded = greenlet_servers_loaded();
    return loaded < 0 ? NULL : PyBool_FromLong(loaded);
}

static PyObject *
mod_context_wanted(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_Format(PyExc_TypeError, "context_wanted() takes at most 1 argument (%zd given)", nargs);
        return NULL;
    }
    int was = context_wanted;
    if (nargs == 1) {
        int v = PyObject_IsTrue(args[0]);
        if (v < 0) return NULL;
        context_wanted = v;
    }
    return PyBool_FromLong(was);
}

static PyObject *
wsgi_call(PyObject *app, PyObject *recorder, PyObject *route_of, PyObject *environ, PyObject *start_response)
{
    /* Already measured by an outer MemoryMiddleware: measuring twice would double-count. */
    PyObject *outer = environ_get(environ, str_environ_key, Py_None);
    if (outer == NULL) return NULL;
    int nested = 0;
    if (outer != Py_None) {
        int is_m = PyObject_IsInstance(outer, (PyObject *)Measurement_Type->tp_base);
        if (is_m > 0) {
            int finished;
            if (Py_TYPE(outer) == Measurement_Type) {
                finished = ((MeasurementObject *)outer)->done;
            }
            else {
                PyObject *f = PyObject_GetAttr(outer, str_finished);
                finished = f == NULL ? -1 : PyObject_IsTrue(f);
                Py_XDECREF(f);
            }
            if (finished < 0) is_m = -1;
            else nested = !finished;
        }
        if (is_m < 0) {
            Py_DECREF(outer);
            return NULL;
        }
    }
    Py_DECREF(outer);
    if (nested) return PyObject_CallFunctionObjArgs(app, environ, start_response, NULL);
    /* Refused before the measurement begins: a request that is never served must not stay in flight. */
    if (!PyCallable_Check(start_response)) {
        PyErr_Format(PyExc_TypeError, "start_response must be callable, not %.100s",
                     Py_TYPE(start_response)->tp_name);
        return NULL;
    }

    PyObject *method = environ_get(environ, str_request_method, str_GET);
    if (method == NULL) return NULL;
    PyObject *m;
    if (PyObject_TypeCheck(recorder, &Recorder_Type) && !overridden(recorder, str_begin, c_begin)) {
        m = begin((RecorderObject *)recorder, method);
    }
    else {
        m = PyObject_CallMethodOneArg(recorder, str_begin, method);
    }
    Py_DECREF(method);
    if (m == NULL) return NULL;

    PyObject *result = NULL, *sr = NULL;
    if (PyObject_SetItem(environ, str_environ_key, m) < 0) goto done;
    /* Made (and checked) where the reference makes its StartResponse. */
    sr = start_response_make(&StartResponse_Type, m, start_response, route_of, environ);
    if (sr == NULL) goto done;
    /* A C measurement goes to this thread's slot until a context variable is wanted (see thread_current);
     * the slot is restored when the app returns, so nested middlewares on one thread unwind in order. */
    int slotted = Py_TYPE(m) == Measurement_Type && !context_wanted;
    PyObject *slot_before = NULL;
    if (slotted) {
        slot_before = thread_current;
        thread_current = Py_NewRef(m);
    }
    else if (measurement_call(m, str_activate, Measurement_activate, NULL) < 0) goto done;

    PyObject *app_result = PyObject_CallFunctionObjArgs(app, environ, sr, NULL);
    if (app_result == NULL) {
        /* except BaseException as exc: measurement.fail(exc); measurement.finish(); raise */
        PyObject *exc = take_error();
        if (measurement_call(m, str_fail, Measurement_fail, exc) < 0 ||
            measurement_call(m, str_finish, Measurement_finish, NULL) < 0) {
            chain_error(exc);
        }
        else {
            restore_error(exc);
        }
    }
    /* finally: measurement.deactivate() */
    if (slotted) {
        PyObject *ours = thread_current;
        thread_current = slot_before;
        Py_XDECREF(ours);
    }
    else {
        PyObject *pending = take_error();
        if (measurement_call(m, str_deactivate, Measurement_deactivate, NULL) < 0) {
            Py_XDECREF(app_result);
            app_result = NULL;
            chain_error(pending);
        }
        else {
            restore_error(pending);
        }
    }
    if (app_result == NULL) goto done;
    result = body_make(&Body_Type, app_result, m);
    Py_DECREF(app_result);
done:
    Py_XDECREF(sr);
    Py_DECREF(m);
    return result;
}

static PyObject *
WSGICall_call(WSGICallObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *environ, *start_response;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "a WSGI app takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "__call__", 2, 2, &environ, &start_response)) return NULL;
    if (Measurement_Type == NULL && not_configured() < 0) return NULL;
    if (self->app == NULL || self->recorder == NULL) {
        PyErr_SetString(PyExc_TypeError, "MemoryMiddleware.__init__() was not called");
        return NULL;
    }
    /* Held for the call: the app may replace the middleware's fields while it runs. */
    PyObject *app = Py_NewRef(self->app), *recorder = Py_NewRef(self->recorder);
    PyObject *route_of = Py_NewRef(self->route_of != NULL ? self->route_of : Py_None);
    PyObject *r = wsgi_call(app, recorder, route_of, environ, start_response);
    Py_DECREF(app);
    Py_DECREF(recorder);
    Py_DECREF(route_of);
    return r;
}

static int
WSGICall_traverse(WSGICallObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    Py_VISIT(self->recorder);
    Py_VISIT(self->route_of);
    return 0;
}

static int
WSGICall_clear(WSGICallObject *self)
{
    Py_CLEAR(self->app);
    Py_CLEAR(self->recorder);
    Py_CLEAR(self->route_of);
    return 0;
}

static void
WSGICall_dealloc(WSGICallObject *self)
{
    PyObject_GC_UnTrack(self);
    WSGICall_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef WSGICall_members[] = {
    {"app", T_OBJECT, offsetof(WSGICallObject, app), 0, "the wrapped WSGI app"},
    {"recorder", T_OBJECT, offsetof(WSGICallObject, recorder), 0, "the RequestRecorder"},
    {"route_of", T_OBJECT, offsetof(WSGICallObject, route_of), 0, "route_of(environ) or None"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject WSGICall_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kotoba_memory._crecord.WSGICall",
    .tp_basicsize = sizeof(WSGICallObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C base of MemoryMiddleware: its app, recorder and route_of, and "
              "__call__(environ, start_response).",
    .tp_new = PyType_GenericNew,
    .tp_call = (ternaryfunc)WSGICall_call,
    .tp_dealloc = (destructor)WSGICall_dealloc,
    .tp_traverse = (traverseproc)WSGICall_traverse,
    .tp_clear = (inquiry)WSGICall_clear,
    .tp_members = WSGICall_members,
};

/* ------------------------------------------------------------------------------------------------ */
/* Module                                                                                             */

static int
check_type(PyObject *o, int ok, const char *name, const char *expected)
{
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "configure(): %s must be %s, not %.100s", name, expected,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

static PyObject *
configure(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *base, *mtype, *cvar, *sch, *cerr, *rnd, *unm, *known, *other, *ist, *gtm, *reuse, *act, *gcg,
        *prg;
    if (!PyArg_UnpackTuple(args, "configure", 15, 15, &base, &mtype, &cvar, &sch, &cerr, &rnd, &unm, &known,
                           &other, &ist, &gtm, &reuse, &act, &gcg, &prg))
        return NULL;
    if (check_type(base, PyType_Check(base), "measurement_base", "a class") < 0 ||
        check_type(mtype, PyType_Check(mtype) && PyType_IsSubtype((PyTypeObject *)mtype, &PyTuple_Type),
                   "metrics_type", "a tuple subclass") < 0 ||
        check_type(cvar, PyContextVar_CheckExact(cvar), "current", "a ContextVar") < 0 ||
        check_type(cerr, PyCallable_Check(cerr), "count_error", "callable") < 0 ||
        check_type(rnd, PyCallable_Check(rnd), "random", "callable") < 0 ||
        check_type(unm, PyUnicode_Check(unm), "unmatched", "a str") < 0 ||
        check_type(known, PyAnySet_Check(known), "known_methods", "a set") < 0 ||
        check_type(other, PyUnicode_Check(other), "other_method", "a str") < 0 ||
        check_type(ist, PyCallable_Check(ist), "is_tracing", "callable") < 0 ||
        check_type(gtm, PyCallable_Check(gtm), "get_traced_memory", "callable") < 0 ||
        check_type(reuse, PyFloat_Check(reuse), "rss_reuse_s", "a float") < 0 ||
        check_type(act, PyDict_CheckExact(act), "registry", "a dict") < 0 ||
        check_type(gcg, PyCallable_Check(gcg), "gc_optimizer_getter", "callable") < 0 ||
        check_type(prg, PyCallable_Check(prg), "profiler_getter", "callable") < 0)
        return NULL;
    if (copy_known_methods(known) < 0) return NULL;
    PyObject *bases = PyTuple_Pack(1, base);
    if (bases == NULL) return NULL;
    PyObject *mt = PyType_FromSpecWithBases(&Measurement_spec, bases);
    Py_DECREF(bases);
    if (mt == NULL) return NULL;
    Py_XSETREF(Measurement_Type, (PyTypeObject *)mt);
    Py_XSETREF(metrics_type, (PyTypeObject *)Py_NewRef(mtype));
    Py_XSETREF(current_var, Py_NewRef(cvar));
    Py_XSETREF(sched, Py_NewRef(sch));
    fork_pending = 1;
    Py_XSETREF(count_error_fn, Py_NewRef(cerr));
    Py_XSETREF(rng_random, Py_NewRef(rnd));
    Py_XSETREF(unmatched, Py_NewRef(unm));
    Py_XSETREF(known_methods, Py_NewRef(known));
    Py_XSETREF(other_method, Py_NewRef(other));
    Py_XSETREF(is_tracing_fn, Py_NewRef(ist));
    Py_XSETREF(get_traced_fn, Py_NewRef(gtm));
    Py_XSETREF(reuse_s, Py_NewRef(reuse));
    Py_XSETREF(registry_active, Py_NewRef(act));
    Py_XSETREF(gc_getter, Py_NewRef(gcg));
    Py_XSETREF(profiler_getter, Py_NewRef(prg));
    return Py_NewRef(mt);
}

static PyMethodDef module_methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(measurement_base, metrics_type, current, scheduler, count_error, random, unmatched, "
     "known_methods, other_method, is_tracing, get_traced_memory, rss_reuse_s, registry, gc_optimizer_getter, "
     "profiler_getter) -> "
     "the Measurement type (a subclass of measurement_base)."},
    {"activity_begin", mod_activity_begin, METH_NOARGS,
     "Count a request in; returns (alone, epoch) to hand back to activity_end()."},
    {"activity_end", (PyCFunction)(void (*)(void))mod_activity_end, METH_FASTCALL,
     "activity_end(alone, epoch): count a request out; True if another began or ended while it ran."},
    {"mark_start", mod_mark_start, METH_NOARGS, "Count one request in, with no overlap bookkeeping."},
    {"mark_end", mod_mark_end, METH_NOARGS, "Count one request out (unbalanced calls are ignored)."},
    {"in_flight", mod_in_flight, METH_NOARGS, "Requests begun and not yet ended."},
    {"thread_measurement", mod_thread_measurement, METH_NOARGS,
     "The C MemoryMiddleware's request running on this thread, if it is kept there; else None, and a "
     "context variable is wanted from then on if requests are in flight."},
    {"greenlets_loaded", mod_greenlets_loaded, METH_NOARGS,
     "Whether gevent or eventlet (several requests on one thread) is imported."},
    {"context_wanted", (PyCFunction)(void (*)(void))mod_context_wanted, METH_FASTCALL,
     "context_wanted([value]): whether MemoryMiddleware also sets the context variable (sets it if given)."},
    {"after_fork", mod_after_fork, METH_NOARGS,
     "In a forked child: no request in flight; the next begin() checks whether the scheduler is paused."},
    {"set_listeners", mod_set_listeners, METH_O, "Hand over request._listeners (a tuple) after a change."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef crecord_module = {
    PyModuleDef_HEAD_INIT,
    "kotoba_memory._crecord",
    "The request recorder's begin/finish in C (see kotoba_memory_integrations/request.py).",
    -1,
    module_methods,
};

PyMODINIT_FUNC
PyInit__crecord(void)
{
    if (PyType_Ready(&GcTally_Type) < 0 || PyType_Ready(&GcHooks_Type) < 0 || PyType_Ready(&Recorder_Type) < 0 || PyType_Ready(&StartResponse_Type) < 0 ||
        PyType_Ready(&Body_Type) < 0 || PyType_Ready(&RouteTable_Type) < 0 || PyType_Ready(&WSGICall_Type) < 0 ||
        PyType_Ready(&RssCore_Type) < 0)
        return NULL;
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(str_paused_by_fork, "paused_by_fork");
    INTERN(str_resume, "resume");
    INTERN(str_pause_total_ns, "pause_total_ns");
    INTERN(str_request_ended, "request_ended");
    INTERN(str_rss, "rss");
    INTERN(str_recent, "recent");
    INTERN(str_record_request, "record_request");
    INTERN(str_request_sink, "_request_sink");
    INTERN(str_other, "<other>");
    INTERN(str_qualname, "__qualname__");
    INTERN(str_route, "route");
    INTERN(str_rss_delta, "rss_delta");
    INTERN(str_sampled, "sampled");
    INTERN(str_traced_delta, "traced_delta");
    INTERN(str_duration_s, "duration_s");
    INTERN(str_GET, "GET");
    INTERN(str_method, "method");
    INTERN(str_status, "status");
    INTERN(str_fail, "fail");
    INTERN(str_finish, "finish");
    INTERN(str_close, "close");
    INTERN(str_deliver, "deliver");
    INTERN(str_next_gap, "next_gap");
    INTERN(str_gc_optimizer, "gc_optimizer");
    INTERN(str_profiler, "profiler");
    INTERN(str_environ_key, "kotoba_memory.request");
    INTERN(str_request_method, "REQUEST_METHOD");
    INTERN(str_begin, "begin");
    INTERN(str_activate, "activate");
    INTERN(str_gevent, "gevent");
    INTERN(str_eventlet, "eventlet");
    INTERN(str_deactivate, "deactivate");
    INTERN(str_finished, "finished");
    INTERN(str_get, "get");
    INTERN(str_rss_uncached, "_rss_uncached");
    INTERN(str_check_at_boundary, "_check_at_boundary");
    c_pause_total_ns = PyDict_GetItemWithError(GcHooks_Type.tp_dict, str_pause_total_ns);
    c_request_ended = PyDict_GetItemWithError(GcHooks_Type.tp_dict, str_request_ended);
    if (c_pause_total_ns == NULL || c_request_ended == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "GcHooks has no pause_total_ns/request_ended");
        return NULL;
    }
    c_deliver = PyDict_GetItemWithError(Recorder_Type.tp_dict, str_deliver);  /* borrowed: lives with the type */
    c_next_gap = PyDict_GetItemWithError(Recorder_Type.tp_dict, str_next_gap);
    c_begin = PyDict_GetItemWithError(Recorder_Type.tp_dict, str_begin);
    c_rss = PyDict_GetItemWithError(RssCore_Type.tp_dict, str_rss);
    c_recent = PyDict_GetItemWithError(RssCore_Type.tp_dict, str_recent);
    if (c_deliver == NULL || c_next_gap == NULL || c_begin == NULL || c_rss == NULL || c_recent == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "Recorder has no deliver/next_gap");
        return NULL;
    }
#undef INTERN
    if ((int_zero = PyLong_FromLong(0)) == NULL || (int_500 = PyLong_FromLong(500)) == NULL) return NULL;
    PyObject *m = PyModule_Create(&crecord_module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Recorder", (PyObject *)&Recorder_Type) < 0 ||
        PyModule_AddObjectRef(m, "StartResponse", (PyObject *)&StartResponse_Type) < 0 ||
        PyModule_AddObjectRef(m, "Body", (PyObject *)&Body_Type) < 0 ||
        PyModule_AddObjectRef(m, "RouteTable", (PyObject *)&RouteTable_Type) < 0 ||
        PyModule_AddObjectRef(m, "WSGICall", (PyObject *)&WSGICall_Type) < 0 ||
        PyModule_AddObjectRef(m, "RssCore", (PyObject *)&RssCore_Type) < 0 ||
        PyModule_AddObjectRef(m, "GcTally", (PyObject *)&GcTally_Type) < 0 ||
        PyModule_AddObjectRef(m, "GcHooks", (PyObject *)&GcHooks_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
