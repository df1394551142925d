/* The compiled core of kotoba_memory.cache_manager.CacheManager.
 *
 * One `Core` object holds a cache's table and every policy's bookkeeping (LRU, FIFO, LFU and ADAPTIVE
 * with its frequency sketch, admission, ghost lists and window adaptation), the expiry heap, the
 * ghost-entry miss-ratio-curve estimator and the stats counters. It mirrors the pure-Python reference
 * (memory.py, policies.py, adaptive.py, mrc.py) step for step: the same operation sequence gives the
 * same results, stats and eviction order. Python keeps the cold paths (stats objects, analysis).
 *
 * Concurrency: there is no lock. Every operation runs under the GIL and calls no Python code while
 * the structures are inconsistent. Python code can only run (a) before an operation touches the
 * table (hashing, weighing, ttl checks), (b) in a key's __eq__ during a lookup, which restarts when
 * the table changed meanwhile, as dict does, and (c) after it (eviction listeners, deferred
 * decrefs). Indices, never pointers into the arrays, are held across (b): a re-entrant call may
 * reallocate them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define KIND_LRU 0
#define KIND_LFU 1
#define KIND_FIFO 2
#define KIND_ADAPTIVE 3

#define SEG_WINDOW 0
#define SEG_PROBATION 1
#define SEG_PROTECTED 2

#define NONE_EXPIRY INFINITY
#define NIL (-1)
#define SAMPLE_MASK 63
#define LAT_RING 512
#define EXPIRE_PER_OP 8
#define PROMO_MAX 4096
#define HIST_BUCKETS 64
#define MAX_RESTARTS 100
/* Weights above this are refused (both implementations): totals stay exact in 64 bits. */
#define MAX_WEIGHT (((int64_t)1) << 48)

static const uint64_t MIX1 = 0x9E3779B97F4A7C15ULL;
static const uint64_t MIX2 = 0xC2B2AE3D27D4EB4FULL;

/* ------------------------------------------------------------------------------------------------ */
/* Types                                                                                              */

typedef struct {
    PyObject *key; /* NULL: free slot */
    PyObject *value;
    Py_hash_t hash;
    double expires; /* NONE_EXPIRY: never */
    int64_t weight;
    int32_t prev, next;
    uint32_t hits, gen;
    uint8_t seg;
} Slot;

typedef struct {
    int32_t head, tail;
    int64_t size; /* ADAPTIVE: units held by the segment */
} List;

typedef struct {
    double expires;
    uint64_t seq;
    PyObject *key; /* strong */
    Py_hash_t hash;
} ExpItem;

typedef struct {
    int64_t seq;
    uint32_t count; /* hits are saturating 32-bit counters */
    int32_t slot;
} LfuItem;

/* Binary min-heaps over arrays of items (the LFU order and the expiry order): one template, each
   instance with its own item type and order. */
#define DEFINE_HEAP(name, T, LESS)                                                                   \
    static void name##_sift_down(T *h, Py_ssize_t n, Py_ssize_t i)                                   \
    {                                                                                                \
        T item = h[i];                                                                               \
        for (;;) {                                                                                   \
            Py_ssize_t l = 2 * i + 1;                                                                \
            if (l >= n)                                                                              \
                break;                                                                               \
            Py_ssize_t m = (l + 1 < n && LESS(&h[l + 1], &h[l])) ? l + 1 : l;                        \
            if (!LESS(&h[m], &item))                                                                 \
                break;                                                                               \
            h[i] = h[m];                                                                             \
            i = m;                                                                                   \
        }                                                                                            \
        h[i] = item;                                                                                 \
    }                                                                                                \
    /* Appends item to h[0..*n) (room reserved by the caller) and restores the order. */            \
    static void name##_push_into(T *h, Py_ssize_t *n, T item)                                        \
    {                                                                                                \
        Py_ssize_t i = (*n)++;                                                                       \
        while (i > 0) {                                                                              \
            Py_ssize_t p = (i - 1) / 2;                                                              \
            if (!LESS(&item, &h[p]))                                                                 \
                break;                                                                               \
            h[i] = h[p];                                                                             \
            i = p;                                                                                   \
        }                                                                                            \
        h[i] = item;                                                                                 \
    }                                                                                                \
    static T name##_pop_from(T *h, Py_ssize_t *n)                                                    \
    {                                                                                                \
        T top = h[0];                                                                                \
        (*n)--;                                                                                      \
        if (*n > 0) {                                                                                \
            h[0] = h[*n];                                                                            \
            name##_sift_down(h, *n, 0);                                                              \
        }                                                                                            \
        return top;                                                                                  \
    }

/* Room for `extra` more items in a heap array of `*cap` (doubling); -1 with MemoryError. */
static int
heap_reserve(void **h, Py_ssize_t *cap, Py_ssize_t len, Py_ssize_t extra, size_t item_size)
{
    if (len + extra <= *cap)
        return 0;
    Py_ssize_t want = *cap ? *cap * 2 : 16;
    while (want < len + extra)
        want *= 2;
    void *grown = PyMem_Realloc(*h, (size_t)want * item_size);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *h = grown;
    *cap = want;
    return 0;
}

typedef struct {
    PyObject *key; /* strong */
    Py_hash_t hash;
    int32_t slot;
    uint32_t gen;
} PromoItem;

/* An insertion-ordered map uint64 fingerprint -> int64, as the reference's OrderedDict[int, int]. */
typedef struct {
    uint64_t fp;
    int64_t val;
    int32_t prev, next;
} ONode;

typedef struct {
    ONode *nodes;
    int32_t *index;
    int32_t cap, used, free_head, count, head, tail;
    int bits;
} OMap;

/* A GhostList of adaptive.py */
typedef struct {
    OMap map;
    int64_t limit, size;
    int shift;
    uint64_t mask;
} Ghosts;

typedef struct {
    PyObject_HEAD
    int kind;
    int64_t max_bytes;   /* -1: none; as built: whether units are bytes (policy sizes, MRC) */
    int64_t bound_bytes; /* -1: none; the byte bound puts are held to (CacheManager.max_bytes) */
    int64_t max_entries; /* -1: none; the entry bound (CacheManager.max_entries, may change) */
    int64_t capacity;    /* max_bytes if set, else max_entries */

    Slot *slots;
    int32_t slot_cap, slot_used, free_head;
    int32_t *index;
    int index_bits;
    Py_ssize_t len;
    uint64_t version;
    List lists[3];
    int64_t bytes;

    uint64_t gets, misses, bad_keys, puts, deletes, evictions, expirations, rejections;
    int64_t hit_ns[LAT_RING], miss_ns[LAT_RING];
    int hit_n, hit_pos, miss_n, miss_pos;

    ExpItem *heap;
    Py_ssize_t heap_len, heap_cap;
    uint64_t exp_seq;
    int sweeping, start_sweeper;

    /* LFU */
    int64_t *lfu_seq;
    LfuItem *lheap;
    Py_ssize_t lheap_len, lheap_cap;
    int64_t lseq, next_aging, aging_factor;

    /* ADAPTIVE */
    uint8_t *sk_table, *sk_door;
    int64_t sk_width, sk_sample, sk_additions;
    uint64_t sk_mask, sk_door_mask;
    int64_t max_window, max_protected, adjustments;
    double window_target, initial_window, protected_share, ghost_gain;
    PromoItem *promo; /* a ring of promo_cap items, grown up to PROMO_MAX (the reference's deque maxlen) */
    int promo_head, promo_len, promo_cap;
    Ghosts rejected, evicted;
    PyObject *rng_random;

    /* miss-ratio-curve ghosts (mrc.py) */
    OMap mrc;
    int64_t mrc_evicted, mrc_span;
    int mrc_shift;
    uint64_t mrc_mask;
    int64_t hist[HIST_BUCKETS];
    int64_t ghost_hits;
    int32_t max_ghosts;     /* GhostMrc.max_ghosts */
    int32_t max_ghost_keys; /* GhostList.max_keys */

    /* configuration and the Python objects the core calls */
    double default_ttl; /* NAN: none */
    int strict;
    PyObject *weigher;         /* a user weigher, or NULL for the default one */
    PyObject *default_weigher; /* the reference's default_weigher (non-flat values) */
    PyObject *notify;          /* notify(events) or NULL when nobody listens */
    PyObject *on_schedule;     /* called when the first ttl'd entry needs the sweeper */
    PyObject *clock;           /* NULL: CLOCK_MONOTONIC */
    PyObject *check_ttl;
    PyObject *too_large;      /* EntryTooLargeError */
    PyObject *unhashable;     /* UnhashableKeyError */
    PyObject *cached_value_type;
    PyObject *cause_size, *cause_expired;

    /* objects to release once the current operation has finished */
    PyObject **trash;
    Py_ssize_t trash_len, trash_cap;
} Core;

static PyTypeObject CoreType;
static PyObject *getsizeof_fn; /* sys.getsizeof */
static PyObject *str_ttl;

/* ------------------------------------------------------------------------------------------------ */
/* Small helpers                                                                                      */

static int
now_mono(Core *c, double *out)
{
    if (c->clock != NULL) {
        PyObject *r = PyObject_CallNoArgs(c->clock);
        if (r == NULL)
            return -1;
        double v = PyFloat_AsDouble(r);
        Py_DECREF(r);
        if (v == -1.0 && PyErr_Occurred())
            return -1;
        *out = v;
        return 0;
    }
#if defined(CLOCK_MONOTONIC)
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    *out = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    return 0;
#else
    PyErr_SetString(PyExc_RuntimeError, "no monotonic clock: pass clock=");
    return -1;
#endif
}

static inline int64_t
perf_ns(void)
{
#if defined(CLOCK_MONOTONIC)
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
#else
    return 0;
#endif
}

/* Hold `obj` (a reference we own) until the operation ends, so no __del__ runs mid-operation. */
static void
defer_decref(Core *c, PyObject *obj)
{
    if (obj == NULL)
        return;
    if (c->trash_len == c->trash_cap) {
        Py_ssize_t cap = c->trash_cap ? c->trash_cap * 2 : 16;
        PyObject **t = PyMem_Realloc(c->trash, (size_t)cap * sizeof(PyObject *));
        if (t == NULL) {
            /* Out of memory: release now. The structures are consistent at every defer point
               except mid-unlink, where callers defer only after finishing the unlink. */
            Py_DECREF(obj);
            return;
        }
        c->trash = t;
        c->trash_cap = cap;
    }
    c->trash[c->trash_len++] = obj;
}

static void
flush_trash(Core *c)
{
    while (c->trash_len > 0) {
        PyObject *obj = c->trash[--c->trash_len];
        Py_DECREF(obj); /* may run Python code that re-enters; the loop re-reads the length */
    }
    if (c->trash_cap > 1024 && c->trash_len == 0) {
        PyMem_Free(c->trash);
        c->trash = NULL;
        c->trash_cap = 0;
    }
}

static inline uint64_t
fingerprint(Py_hash_t hash)
{
    uint64_t h = (uint64_t)hash * MIX1;
    return h ^ (h >> 29);
}

static int
add_event(PyObject **events, PyObject *key, PyObject *value, PyObject *cause)
{
    if (*events == NULL) {
        *events = PyList_New(0);
        if (*events == NULL)
            return -1;
    }
    PyObject *t = PyTuple_Pack(3, key, value, cause);
    if (t == NULL)
        return -1;
    int r = PyList_Append(*events, t);
    Py_DECREF(t);
    return r;
}

/* ------------------------------------------------------------------------------------------------ */
/* OMap: ordered fingerprint map with linear probing and backward-shift deletion                     */

static inline int32_t
omap_ideal(OMap *m, uint64_t fp)
{
    return (int32_t)((fp * MIX1) >> (64 - m->bits));
}

static void
omap_free(OMap *m)
{
    PyMem_Free(m->nodes);
    PyMem_Free(m->index);
    memset(m, 0, sizeof(*m));
    m->free_head = m->head = m->tail = NIL;
}

static void
omap_init(OMap *m)
{
    memset(m, 0, sizeof(*m));
    m->free_head = m->head = m->tail = NIL;
}

static int
omap_find_pos(OMap *m, uint64_t fp, int32_t *pos)
{
    if (m->index == NULL)
        return NIL;
    int32_t mask = (1 << m->bits) - 1;
    int32_t i = omap_ideal(m, fp);
    for (;;) {
        int32_t n = m->index[i];
        if (n == NIL) {
            *pos = i;
            return NIL;
        }
        if (m->nodes[n].fp == fp) {
            *pos = i;
            return n;
        }
        i = (i + 1) & mask;
    }
}

static int
omap_reindex(OMap *m, int bits)
{
    int32_t size = 1 << bits;
    int32_t *index = PyMem_Malloc((size_t)size * sizeof(int32_t));
    if (index == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int32_t i = 0; i < size; i++)
        index[i] = NIL;
    PyMem_Free(m->index);
    m->index = index;
    m->bits = bits;
    int32_t mask = size - 1;
    for (int32_t n = m->head; n != NIL; n = m->nodes[n].next) {
        int32_t i = omap_ideal(m, m->nodes[n].fp);
        while (index[i] != NIL)
            i = (i + 1) & mask;
        index[i] = n;
    }
    return 0;
}

static void
omap_delete_at(OMap *m, int32_t pos)
{
    int32_t mask = (1 << m->bits) - 1;
    int32_t n = m->index[pos];
    ONode *node = &m->nodes[n];
    if (node->prev != NIL)
        m->nodes[node->prev].next = node->next;
    else
        m->head = node->next;
    if (node->next != NIL)
        m->nodes[node->next].prev = node->prev;
    else
        m->tail = node->prev;
    node->next = m->free_head;
    m->free_head = n;
    m->count--;
    int32_t i = pos, j = pos;
    for (;;) {
        j = (j + 1) & mask;
        int32_t o = m->index[j];
        if (o == NIL)
            break;
        int32_t k = omap_ideal(m, m->nodes[o].fp);
        if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) {
            m->index[i] = o;
            i = j;
        }
    }
    m->index[i] = NIL;
}

/* Remove fp; 1 and *val if it was there. */
static int
omap_pop(OMap *m, uint64_t fp, int64_t *val)
{
    int32_t pos;
    int32_t n = omap_find_pos(m, fp, &pos);
    if (n == NIL)
        return 0;
    *val = m->nodes[n].val;
    omap_delete_at(m, pos);
    return 1;
}

static void
omap_pop_first(OMap *m, uint64_t *fp, int64_t *val)
{
    int32_t n = m->head;
    int32_t pos;
    *fp = m->nodes[n].fp;
    *val = m->nodes[n].val;
    omap_find_pos(m, *fp, &pos);
    omap_delete_at(m, pos);
}

/* Append fp (absent) at the end. */
static int
omap_append(OMap *m, uint64_t fp, int64_t val)
{
    if (m->index == NULL || (m->count + 1) * 2 > (1 << m->bits)) {
        if (omap_reindex(m, m->index == NULL ? 4 : m->bits + 1) < 0)
            return -1;
    }
    int32_t n;
    if (m->free_head != NIL) {
        n = m->free_head;
        m->free_head = m->nodes[n].next;
    }
    else {
        if (m->used == m->cap) {
            int32_t cap = m->cap ? m->cap * 2 : 8;
            ONode *nodes = PyMem_Realloc(m->nodes, (size_t)cap * sizeof(ONode));
            if (nodes == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            m->nodes = nodes;
            m->cap = cap;
        }
        n = m->used++;
    }
    ONode *node = &m->nodes[n];
    node->fp = fp;
    node->val = val;
    node->next = NIL;
    node->prev = m->tail;
    if (m->tail != NIL)
        m->nodes[m->tail].next = n;
    else
        m->head = n;
    m->tail = n;
    m->count++;
    int32_t mask = (1 << m->bits) - 1;
    int32_t i = omap_ideal(m, fp);
    while (m->index[i] != NIL)
        i = (i + 1) & mask;
    m->index[i] = n;
    return 0;
}

static void
omap_clear(OMap *m)
{
    omap_free(m);
}

static size_t
omap_bytes(OMap *m)
{
    return (size_t)m->cap * sizeof(ONode) + (m->index ? ((size_t)1 << m->bits) * sizeof(int32_t) : 0);
}

/* ------------------------------------------------------------------------------------------------ */
/* Ghost lists (adaptive.GhostList)                                                                  */

static int
ghosts_add(Ghosts *g, uint64_t fp, int64_t unit, int32_t max_keys)
{
    if (fp & g->mask)
        return 0;
    int64_t old;
    if (omap_pop(&g->map, fp, &old))
        g->size -= old;
    if (omap_append(&g->map, fp, unit) < 0)
        return -1;
    g->size += unit;
    int64_t limit = g->limit >> g->shift;
    while (g->size > limit && g->map.count) {
        uint64_t f;
        int64_t v;
        omap_pop_first(&g->map, &f, &v);
        g->size -= v;
    }
    if (g->map.count > max_keys) {
        g->shift++;
        g->mask = (((uint64_t)1) << g->shift) - 1;
        int32_t n = g->map.head;
        while (n != NIL) {
            int32_t next = g->map.nodes[n].next;
            uint64_t f = g->map.nodes[n].fp;
            if (f & g->mask) {
                int64_t v = 0;
                omap_pop(&g->map, f, &v);
                g->size -= v;
            }
            n = next;
        }
    }
    return 0;
}

/* 1 and *units (scaled by the sampling rate) when fp was held. */
static int
ghosts_take(Ghosts *g, uint64_t fp, int64_t *units)
{
    if (fp & g->mask)
        return 0;
    int64_t v;
    if (!omap_pop(&g->map, fp, &v))
        return 0;
    g->size -= v;
    *units = v << g->shift;
    return 1;
}

/* ------------------------------------------------------------------------------------------------ */
/* Table: slots + open-addressing index                                                              */

static inline int32_t
ideal_pos(Core *c, Py_hash_t hash)
{
    return (int32_t)(((uint64_t)hash * MIX1) >> (64 - c->index_bits));
}

static int
reindex(Core *c, int bits)
{
    int32_t size = (int32_t)1 << bits;
    int32_t *index = PyMem_Malloc((size_t)size * sizeof(int32_t));
    if (index == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int32_t i = 0; i < size; i++)
        index[i] = NIL;
    PyMem_Free(c->index);
    c->index = index;
    c->index_bits = bits;
    int32_t mask = size - 1;
    for (int32_t s = 0; s < c->slot_used; s++) {
        if (c->slots[s].key == NULL)
            continue;
        int32_t i = ideal_pos(c, c->slots[s].hash);
        while (index[i] != NIL)
            i = (i + 1) & mask;
        index[i] = s;
    }
    return 0;
}

static inline int
keys_equal_fast(PyObject *a, PyObject *b, int *eq)
{
    /* Exact builtin types compare without running Python code. */
    PyTypeObject *t = Py_TYPE(a);
    if (t == Py_TYPE(b) &&
        (t == &PyUnicode_Type || t == &PyLong_Type || t == &PyBytes_Type || t == &PyFloat_Type)) {
        *eq = PyObject_RichCompareBool(a, b, Py_EQ);
        return 1;
    }
    return 0;
}

/* The slot holding `key`, NIL when absent (then *pos is the empty bucket it would go to), or -2 on
   error. Restarts when a key's __eq__ changed the table, as dict does. */
static int32_t
lookup(Core *c, PyObject *key, Py_hash_t hash, int32_t *pos)
{
    int restarts = 0;
restart:
    if (c->index == NULL) {
        *pos = NIL;
        return NIL;
    }
    int32_t mask = ((int32_t)1 << c->index_bits) - 1;
    int32_t i = ideal_pos(c, hash);
    for (;;) {
        int32_t s = c->index[i];
        if (s == NIL) {
            *pos = i;
            return NIL;
        }
        Slot *slot = &c->slots[s];
        if (slot->key == key) {
            *pos = i;
            return s;
        }
        if (slot->hash == hash) {
            int eq;
            PyObject *start = slot->key;
            if (!keys_equal_fast(start, key, &eq)) {
                uint64_t version = c->version;
                Py_INCREF(start);
                eq = PyObject_RichCompareBool(start, key, Py_EQ);
                int changed = c->version != version || c->index == NULL || c->index[i] != s ||
                              c->slots[s].key != start;
                Py_DECREF(start);
                if (eq < 0)
                    return -2;
                if (changed) {
                    if (++restarts > MAX_RESTARTS) {
                        PyErr_SetString(PyExc_RuntimeError,
                                        "cache changed during every key comparison (a key's __eq__ "
                                        "keeps mutating the cache)");
                        return -2;
                    }
                    goto restart;
                }
            }
            else if (eq < 0)
                return -2;
            if (eq) {
                *pos = i;
                return s;
            }
        }
        i = (i + 1) & mask;
    }
}

static int32_t
find_pos_of_slot(Core *c, int32_t s)
{
    int32_t mask = ((int32_t)1 << c->index_bits) - 1;
    int32_t i = ideal_pos(c, c->slots[s].hash);
    while (c->index[i] != s)
        i = (i + 1) & mask;
    return i;
}

static void
index_delete_at(Core *c, int32_t pos)
{
    int32_t mask = ((int32_t)1 << c->index_bits) - 1;
    int32_t i = pos, j = pos;
    for (;;) {
        j = (j + 1) & mask;
        int32_t o = c->index[j];
        if (o == NIL)
            break;
        int32_t k = ideal_pos(c, c->slots[o].hash);
        if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) {
            c->index[i] = o;
            i = j;
        }
    }
    c->index[i] = NIL;
}

/* Make room for one more entry; *pos (from a failed lookup) is recomputed if the index grew. */
static int
reserve_one(Core *c, Py_hash_t hash, int32_t *pos)
{
    /* linear probing kept at a load factor <= 2/3, as dict */
    if (c->index == NULL || (c->len + 1) * 3 > ((Py_ssize_t)1 << c->index_bits) * 2) {
        int bits = c->index == NULL ? 3 : c->index_bits + 1;
        while (((Py_ssize_t)1 << bits) * 2 < (c->len + 1) * 3)
            bits++;
        if (bits > 30) {
            PyErr_SetString(PyExc_MemoryError, "cache table is full (2**29 entries)");
            return -1;
        }
        if (reindex(c, bits) < 0)
            return -1;
        int32_t mask = ((int32_t)1 << c->index_bits) - 1;
        int32_t i = ideal_pos(c, hash);
        while (c->index[i] != NIL)
            i = (i + 1) & mask;
        *pos = i;
    }
    if (c->free_head == NIL && c->slot_used == c->slot_cap) {
        int64_t want = c->slot_cap ? (int64_t)c->slot_cap * 2 : 8;
        /* an entry-bounded table never holds more than max_entries + 1 (+1 for a put re-entered
           from a key's __eq__), so its array stops there */
        if (c->max_entries >= 0 && want > c->max_entries + 2)
            want = c->max_entries + 2;
        if (want <= c->slot_cap)
            want = (int64_t)c->slot_cap + 8;
        if (want > INT32_MAX / 2) {
            PyErr_SetString(PyExc_MemoryError, "cache table is full");
            return -1;
        }
        int32_t cap = (int32_t)want;
        Slot *slots = PyMem_Realloc(c->slots, (size_t)cap * sizeof(Slot));
        if (slots == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        c->slots = slots;
        if (c->kind == KIND_LFU) {
            int64_t *seqs = PyMem_Realloc(c->lfu_seq, (size_t)cap * sizeof(int64_t));
            if (seqs == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            c->lfu_seq = seqs;
        }
        c->slot_cap = cap;
    }
    return 0;
}

/* A new slot for (key, value) at index bucket pos (reserve_one succeeded). Steals no references. */
static int32_t
slot_new(Core *c, PyObject *key, Py_hash_t hash, PyObject *value, int64_t weight, double expires,
         int32_t pos)
{
    int32_t s;
    if (c->free_head != NIL) {
        s = c->free_head;
        c->free_head = c->slots[s].next;
    }
    else {
        s = c->slot_used++;
        c->slots[s].gen = 0;
    }
    Slot *slot = &c->slots[s];
    Py_INCREF(key);
    Py_INCREF(value);
    slot->key = key;
    slot->value = value;
    slot->hash = hash;
    slot->expires = expires;
    slot->weight = weight;
    slot->prev = slot->next = NIL;
    slot->hits = 0;
    slot->seg = 0;
    c->index[pos] = s;
    c->len++;
    c->version++;
    return s;
}

/* Drop slot s from the index and free it; its key and value are released after the operation. */
static void
slot_free(Core *c, int32_t s)
{
    index_delete_at(c, find_pos_of_slot(c, s));
    Slot *slot = &c->slots[s];
    PyObject *key = slot->key, *value = slot->value;
    slot->key = slot->value = NULL;
    slot->gen++;
    slot->next = c->free_head;
    c->free_head = s;
    c->len--;
    c->version++;
    defer_decref(c, key);
    defer_decref(c, value);
}

/* ------------------------------------------------------------------------------------------------ */
/* Linked lists over slots                                                                           */

static inline void
list_append(Core *c, List *l, int32_t s)
{
    Slot *slot = &c->slots[s];
    slot->next = NIL;
    slot->prev = l->tail;
    if (l->tail != NIL)
        c->slots[l->tail].next = s;
    else
        l->head = s;
    l->tail = s;
}

static inline void
list_prepend(Core *c, List *l, int32_t s)
{
    Slot *slot = &c->slots[s];
    slot->prev = NIL;
    slot->next = l->head;
    if (l->head != NIL)
        c->slots[l->head].prev = s;
    else
        l->tail = s;
    l->head = s;
}

static inline void
list_unlink(Core *c, List *l, int32_t s)
{
    Slot *slot = &c->slots[s];
    if (slot->prev != NIL)
        c->slots[slot->prev].next = slot->next;
    else
        l->head = slot->next;
    if (slot->next != NIL)
        c->slots[slot->next].prev = slot->prev;
    else
        l->tail = slot->prev;
}

static inline void
list_move_to_end(Core *c, List *l, int32_t s)
{
    if (l->tail == s)
        return;
    list_unlink(c, l, s);
    list_append(c, l, s);
}

/* ------------------------------------------------------------------------------------------------ */
/* Frequency sketch (adaptive.FrequencySketch)                                                       */

static int
sketch_resize(Core *c, int64_t expected)
{
    int64_t width = 16;
    while (width < expected) {
        if (width > ((int64_t)1 << 40)) {
            PyErr_SetString(PyExc_MemoryError, "frequency sketch too large");
            return -1;
        }
        width <<= 1;
    }
    uint8_t *table = PyMem_Calloc((size_t)(4 * width), 1);
    uint8_t *door = PyMem_Calloc((size_t)(4 * width), 1);
    if (table == NULL || door == NULL) {
        PyMem_Free(table);
        PyMem_Free(door);
        PyErr_NoMemory();
        return -1;
    }
    PyMem_Free(c->sk_table);
    PyMem_Free(c->sk_door);
    c->sk_table = table;
    c->sk_door = door;
    c->sk_width = width;
    c->sk_mask = (uint64_t)width - 1;
    c->sk_sample = 10 * width;
    c->sk_additions = 0;
    c->sk_door_mask = (uint64_t)(32 * width) - 1;
    return 0;
}

typedef struct {
    uint64_t h;
    int64_t i[4];
} SkIdx;

static inline SkIdx
sketch_indexes(Core *c, Py_hash_t hash)
{
    SkIdx r;
    uint64_t h = (uint64_t)hash * MIX1;
    h ^= h >> 31;
    uint64_t g = h * MIX2;
    g ^= g >> 29;
    int64_t w = c->sk_width;
    uint64_t m = c->sk_mask;
    r.h = h;
    r.i[0] = (int64_t)(h & m);
    r.i[1] = w + (int64_t)((h >> 32) & m);
    r.i[2] = 2 * w + (int64_t)(g & m);
    r.i[3] = 3 * w + (int64_t)((g >> 32) & m);
    return r;
}

static inline int
sketch_in_door(Core *c, uint64_t h, int insert)
{
    uint64_t i = (h >> 7) & c->sk_door_mask, j = (h >> 41) & c->sk_door_mask;
    uint8_t *d = c->sk_door;
    int present = (d[i >> 3] & (1 << (i & 7))) && (d[j >> 3] & (1 << (j & 7)));
    if (insert && !present) {
        d[i >> 3] |= (uint8_t)(1 << (i & 7));
        d[j >> 3] |= (uint8_t)(1 << (j & 7));
    }
    return present;
}

static void
sketch_age(Core *c)
{
    int64_t n = 4 * c->sk_width;
    for (int64_t i = 0; i < n; i++)
        c->sk_table[i] >>= 1;
    memset(c->sk_door, 0, (size_t)n);
    c->sk_additions /= 2;
}

static void
sketch_add(Core *c, Py_hash_t hash, int64_t count)
{
    if (count <= 0)
        return;
    c->sk_additions += count;
    SkIdx x = sketch_indexes(c, hash);
    if (!sketch_in_door(c, x.h, 1))
        count -= 1; /* the first request of a key only sets its doorkeeper bit */
    if (count) {
        for (int k = 0; k < 4; k++) {
            int64_t v = c->sk_table[x.i[k]] + count;
            c->sk_table[x.i[k]] = (uint8_t)(v < 15 ? v : 15);
        }
    }
    if (c->sk_additions >= c->sk_sample)
        sketch_age(c);
}

static int64_t
sketch_frequency(Core *c, Py_hash_t hash)
{
    SkIdx x = sketch_indexes(c, hash);
    uint8_t *t = c->sk_table;
    int64_t m = t[x.i[0]];
    for (int k = 1; k < 4; k++)
        if (t[x.i[k]] < m)
            m = t[x.i[k]];
    return m + (sketch_in_door(c, x.h, 0) ? 1 : 0);
}

/* ------------------------------------------------------------------------------------------------ */
/* ADAPTIVE                                                                                          */

static inline int64_t
unit_of(Core *c, int32_t s)
{
    return c->max_bytes >= 0 ? c->slots[s].weight : 1;
}

static void
set_main_limits(Core *c)
{
    int64_t main = c->capacity - c->max_window;
    c->max_protected = (int64_t)((double)main * c->protected_share);
}

static inline int64_t
a_total(Core *c)
{
    return c->lists[0].size + c->lists[1].size + c->lists[2].size;
}

static void
a_to_probation(Core *c, int32_t s)
{
    c->slots[s].seg = SEG_PROBATION;
    list_append(c, &c->lists[SEG_PROBATION], s);
    c->lists[SEG_PROBATION].size += unit_of(c, s);
}

static void
a_spill_window(Core *c)
{
    List *w = &c->lists[SEG_WINDOW];
    while (w->size > c->max_window && w->head != NIL) {
        int32_t s = w->head;
        list_unlink(c, w, s);
        w->size -= unit_of(c, s);
        a_to_probation(c, s);
    }
}

static void
a_demote_protected(Core *c)
{
    List *p = &c->lists[SEG_PROTECTED];
    while (p->size > c->max_protected && p->head != NIL) {
        int32_t s = p->head;
        list_unlink(c, p, s);
        p->size -= unit_of(c, s);
        a_to_probation(c, s);
    }
}

static void
a_resize_window(Core *c, double target)
{
    double cap = (double)c->capacity;
    if (target < 0.0)
        target = 0.0;
    if (target > cap)
        target = cap;
    c->window_target = target;
    int64_t new_window = (int64_t)target;
    if (new_window == c->max_window)
        return;
    c->adjustments++;
    c->max_window = new_window;
    set_main_limits(c);
    a_spill_window(c);
    List *w = &c->lists[SEG_WINDOW];
    while (w->size < c->max_window &&
           (c->lists[SEG_PROBATION].head != NIL || c->lists[SEG_PROTECTED].head != NIL)) {
        int seg = c->lists[SEG_PROBATION].head != NIL ? SEG_PROBATION : SEG_PROTECTED;
        List *l = &c->lists[seg];
        int32_t s = l->head;
        int64_t unit = unit_of(c, s);
        list_unlink(c, l, s);
        l->size -= unit;
        c->slots[s].seg = SEG_WINDOW;
        list_prepend(c, w, s);
        w->size += unit;
    }
    a_demote_protected(c);
}

static void
a_ghost_feedback(Core *c, Py_hash_t hash)
{
    uint64_t fp = fingerprint(hash);
    int64_t units;
    if (ghosts_take(&c->rejected, fp, &units)) {
        a_resize_window(c, c->window_target + (double)units * c->ghost_gain);
        return;
    }
    if (ghosts_take(&c->evicted, fp, &units))
        a_resize_window(c, c->window_target - (double)units * c->ghost_gain);
}

static int
a_remember(Core *c, int rejected, int32_t s)
{
    return ghosts_add(rejected ? &c->rejected : &c->evicted, fingerprint(c->slots[s].hash), unit_of(c, s),
                      c->max_ghost_keys);
}

static int
a_insert(Core *c, int32_t s)
{
    Slot *slot = &c->slots[s];
    slot->seg = SEG_WINDOW;
    list_append(c, &c->lists[SEG_WINDOW], s);
    c->lists[SEG_WINDOW].size += unit_of(c, s);
    sketch_add(c, slot->hash, 1);
    a_ghost_feedback(c, c->slots[s].hash);
    if (c->max_bytes >= 0 && c->len > c->sk_width) {
        if (sketch_resize(c, c->len) < 0)
            return -1;
    }
    if (c->lists[SEG_WINDOW].size > c->max_window && a_total(c) <= c->capacity)
        a_spill_window(c);
    return 0;
}

static void
a_promote(Core *c, int32_t s)
{
    int64_t unit = unit_of(c, s);
    list_unlink(c, &c->lists[SEG_PROBATION], s);
    c->lists[SEG_PROBATION].size -= unit;
    c->slots[s].seg = SEG_PROTECTED;
    list_append(c, &c->lists[SEG_PROTECTED], s);
    c->lists[SEG_PROTECTED].size += unit;
}

/* Apply the probation hits buffered by the lock-free read path (may run a key's __eq__). */
static int
a_drain(Core *c)
{
    if (c->promo_len == 0)
        return 0;
    while (c->promo_len > 0) {
        PromoItem item = c->promo[c->promo_head];
        c->promo_head = (c->promo_head + 1) % c->promo_cap;
        c->promo_len--;
        int32_t s = item.slot;
        if (!(s < c->slot_used && c->slots[s].key != NULL && c->slots[s].gen == item.gen)) {
            int32_t pos;
            s = lookup(c, item.key, item.hash, &pos);
            if (s == -2) {
                Py_DECREF(item.key);
                return -1;
            }
        }
        defer_decref(c, item.key);
        if (s == NIL || c->slots[s].seg != SEG_PROBATION)
            continue;
        a_promote(c, s);
    }
    a_demote_protected(c);
    return 0;
}

static int
a_frequency(Core *c, int32_t s)
{
    uint32_t hits = c->slots[s].hits;
    if (hits) {
        c->slots[s].hits = 0;
        sketch_add(c, c->slots[s].hash, hits);
    }
    return (int)sketch_frequency(c, c->slots[s].hash);
}

/* 1: admit the candidate, 0: keep the victim, -1: error */
static int
a_admit(Core *c, int32_t cand, int32_t victim)
{
    int cf = a_frequency(c, cand);
    int vf = a_frequency(c, victim);
    if (cf > vf)
        return 1;
    if (cf < 6)
        return 0;
    PyObject *r = PyObject_CallNoArgs(c->rng_random);
    if (r == NULL)
        return -1;
    double v = PyFloat_AsDouble(r);
    Py_DECREF(r);
    if (v == -1.0 && PyErr_Occurred())
        return -1;
    return v < 1.0 / 128;
}

static int32_t
a_main_victim(Core *c)
{
    if (c->lists[SEG_PROBATION].head != NIL)
        return c->lists[SEG_PROBATION].head;
    return c->lists[SEG_PROTECTED].head;
}

static void
a_segment_remove(Core *c, int32_t s)
{
    int seg = c->slots[s].seg;
    list_unlink(c, &c->lists[seg], s);
    c->lists[seg].size -= unit_of(c, s);
}

/* Choose the victim and unlink it from the policy (the caller frees it); NIL when nothing is held. */
static int32_t
a_evict(Core *c)
{
    if (a_drain(c) < 0)
        return -2;
    List *w = &c->lists[SEG_WINDOW];
    if (w->size > c->max_window && w->head != NIL) {
        int32_t cand = w->head;
        list_unlink(c, w, cand);
        w->size -= unit_of(c, cand);
        int32_t victim = a_main_victim(c);
        if (victim == NIL)
            return cand;
        int admit = a_admit(c, cand, victim);
        if (admit < 0) {
            /* put the candidate back where it was */
            list_prepend(c, w, cand);
            w->size += unit_of(c, cand);
            return -2;
        }
        if (admit) {
            a_segment_remove(c, victim);
            a_to_probation(c, cand);
            if (a_remember(c, 0, victim) < 0)
                PyErr_Clear(); /* a ghost not remembered only weakens adaptation */
            return victim;
        }
        if (a_remember(c, 1, cand) < 0)
            PyErr_Clear();
        return cand;
    }
    int32_t victim = a_main_victim(c);
    if (victim == NIL) {
        victim = w->head;
        if (victim == NIL)
            return NIL;
        list_unlink(c, w, victim);
        w->size -= unit_of(c, victim);
        if (a_remember(c, 1, victim) < 0)
            PyErr_Clear();
    }
    else {
        a_segment_remove(c, victim);
        if (a_remember(c, 0, victim) < 0)
            PyErr_Clear();
    }
    return victim;
}

static void
a_replace(Core *c, int32_t s, int64_t new_unit)
{
    Slot *slot = &c->slots[s];
    int64_t delta = new_unit - (c->max_bytes >= 0 ? slot->weight : 1);
    slot->hits = slot->hits == UINT32_MAX ? UINT32_MAX : slot->hits + 1;
    List *l = &c->lists[slot->seg];
    l->size += delta;
    if (slot->seg != SEG_PROBATION)
        list_move_to_end(c, l, s);
}

/* ------------------------------------------------------------------------------------------------ */
/* LFU                                                                                               */

static inline int
lfu_less(const LfuItem *a, const LfuItem *b)
{
    return a->count < b->count || (a->count == b->count && a->seq < b->seq);
}

DEFINE_HEAP(lfu, LfuItem, lfu_less)

static int
lfu_push(Core *c, int64_t count, int64_t seq, int32_t s)
{
    if (heap_reserve((void **)&c->lheap, &c->lheap_cap, c->lheap_len, 1, sizeof(LfuItem)) < 0)
        return -1;
    LfuItem item = {seq, (uint32_t)count, s};
    lfu_push_into(c->lheap, &c->lheap_len, item);
    return 0;
}

static int
lfu_rebuild(Core *c)
{
    Py_ssize_t n = c->len;
    LfuItem *h = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(LfuItem));
    if (h == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t k = 0;
    for (int32_t s = c->lists[0].head; s != NIL; s = c->slots[s].next) {
        int64_t seq = c->lseq++;
        c->lfu_seq[s] = seq;
        h[k].count = c->slots[s].hits;
        h[k].seq = seq;
        h[k].slot = s;
        k++;
    }
    for (Py_ssize_t i = k / 2 - 1; i >= 0; i--)
        lfu_sift_down(h, k, i);
    PyMem_Free(c->lheap);
    c->lheap = h;
    c->lheap_len = k;
    c->lheap_cap = n ? n : 1;
    return 0;
}

static int
lfu_insert(Core *c, int32_t s)
{
    c->slots[s].hits = 1;
    int64_t seq = c->lseq++;
    c->lfu_seq[s] = seq;
    list_append(c, &c->lists[0], s);
    if (lfu_push(c, 1, seq, s) < 0)
        return -1;
    if (c->lheap_len > 2 * c->len + 64)
        return lfu_rebuild(c);
    return 0;
}

static int32_t
lfu_evict(Core *c)
{
    while (c->lheap_len > 0) {
        LfuItem item = lfu_pop_from(c->lheap, &c->lheap_len);
        int32_t s = item.slot;
        if (s >= c->slot_used || c->slots[s].key == NULL || c->lfu_seq[s] != item.seq)
            continue;
        int64_t hits = c->slots[s].hits;
        if (hits != (int64_t)item.count) {
            int64_t seq = c->lseq++;
            c->lfu_seq[s] = seq;
            if (lfu_push(c, hits, seq, s) < 0)
                return -2;
            continue;
        }
        list_unlink(c, &c->lists[0], s);
        return s;
    }
    if (lfu_rebuild(c) < 0)
        return -2;
    int32_t s = c->lists[0].head;
    if (s != NIL)
        list_unlink(c, &c->lists[0], s);
    return s;
}

static int
lfu_maintain(Core *c)
{
    int64_t requests = (int64_t)(c->gets - c->bad_keys);
    if (requests < c->next_aging)
        return 0;
    int64_t period = c->aging_factor * (c->len > 16 ? c->len : 16);
    if (c->next_aging) {
        for (int32_t s = c->lists[0].head; s != NIL; s = c->slots[s].next)
            c->slots[s].hits >>= 1;
        if (lfu_rebuild(c) < 0)
            return -1;
    }
    c->next_aging = requests + period;
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Policy dispatch                                                                                   */

static int
policy_insert(Core *c, int32_t s)
{
    switch (c->kind) {
    case KIND_LFU:
        return lfu_insert(c, s);
    case KIND_ADAPTIVE:
        return a_insert(c, s);
    default:
        list_append(c, &c->lists[0], s);
        return 0;
    }
}

/* Unlink s from the policy's structures (delete, overwrite-rejection, expiry). */
static void
policy_unlink(Core *c, int32_t s)
{
    if (c->kind == KIND_ADAPTIVE)
        a_segment_remove(c, s);
    else
        list_unlink(c, &c->lists[0], s);
}

static int32_t
policy_evict(Core *c)
{
    switch (c->kind) {
    case KIND_LFU:
        return lfu_evict(c);
    case KIND_ADAPTIVE:
        return a_evict(c);
    default: {
        int32_t s = c->lists[0].head;
        if (s != NIL)
            list_unlink(c, &c->lists[0], s);
        return s;
    }
    }
}

static int
policy_maintain(Core *c)
{
    if (c->kind == KIND_ADAPTIVE)
        return a_drain(c);
    if (c->kind == KIND_LFU)
        return lfu_maintain(c);
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* MRC ghosts (mrc.GhostMrc)                                                                         */

static void
mrc_on_evict(Core *c, Py_hash_t hash, int64_t weight)
{
    int64_t evicted = c->mrc_evicted + (c->max_bytes >= 0 ? weight : 1);
    c->mrc_evicted = evicted;
    uint64_t fp = fingerprint(hash);
    if (fp & c->mrc_mask)
        return;
    OMap *g = &c->mrc;
    int64_t old;
    omap_pop(g, fp, &old);
    if (omap_append(g, fp, evicted) < 0) {
        PyErr_Clear(); /* a lost ghost only loses a sample */
        return;
    }
    int64_t horizon = evicted - c->mrc_span;
    while (g->count && g->nodes[g->head].val <= horizon) {
        uint64_t f;
        int64_t v;
        omap_pop_first(g, &f, &v);
    }
    if (g->count > c->max_ghosts) {
        c->mrc_shift++;
        c->mrc_mask = (((uint64_t)1) << c->mrc_shift) - 1;
        int32_t n = g->head;
        while (n != NIL) {
            int32_t next = g->nodes[n].next;
            uint64_t f = g->nodes[n].fp;
            if (f & c->mrc_mask) {
                int64_t v;
                omap_pop(g, f, &v);
            }
            n = next;
        }
    }
}

static void
mrc_on_miss(Core *c, Py_hash_t hash)
{
    if (c->mrc.count == 0)
        return;
    uint64_t fp = fingerprint(hash);
    if (fp & c->mrc_mask)
        return;
    int64_t at;
    if (!omap_pop(&c->mrc, fp, &at))
        return;
    int64_t depth = c->mrc_evicted - at;
    if (depth >= 0 && depth <= c->mrc_span) {
        /* depth * 64 // (span + 1); depth and span may be byte counts */
        int64_t b;
        if (depth <= INT64_MAX / HIST_BUCKETS)
            b = depth * HIST_BUCKETS / (c->mrc_span + 1);
        else
#if defined(__SIZEOF_INT128__)
            b = (int64_t)(((__int128)depth * HIST_BUCKETS) / ((__int128)c->mrc_span + 1));
#else
            b = (int64_t)((long double)depth * HIST_BUCKETS / ((long double)c->mrc_span + 1));
#endif
        if (b > HIST_BUCKETS - 1)
            b = HIST_BUCKETS - 1;
        c->hist[b] += ((int64_t)1) << c->mrc_shift;
        c->ghost_hits++;
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Expiry heap                                                                                       */

static inline int
exp_less(const ExpItem *a, const ExpItem *b)
{
    return a->expires < b->expires || (a->expires == b->expires && a->seq < b->seq);
}

DEFINE_HEAP(exp, ExpItem, exp_less)

static int
exp_reserve(Core *c, Py_ssize_t extra)
{
    return heap_reserve((void **)&c->heap, &c->heap_cap, c->heap_len, extra, sizeof(ExpItem));
}

/* Drop heap items whose key is gone or now expires at another time (overwritten, touched, deleted).
   Lookups may run a key's __eq__, so the heap is detached while it is filtered. */
static int
exp_compact(Core *c)
{
    ExpItem *old = c->heap;
    Py_ssize_t n = c->heap_len;
    c->heap = NULL;
    c->heap_len = c->heap_cap = 0;
    ExpItem *kept = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(ExpItem));
    if (kept == NULL) {
        c->heap = old;
        c->heap_len = c->heap_cap = n;
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t k = 0, i = 0;
    int err = 0;
    for (; i < n; i++) {
        ExpItem item = old[i];
        int32_t pos;
        int32_t s = err ? NIL : lookup(c, item.key, item.hash, &pos);
        if (s == -2) {
            err = 1;
            s = NIL;
        }
        if (!err && s != NIL && c->slots[s].expires == item.expires)
            kept[k++] = item;
        else if (err)
            kept[k++] = item; /* keep the rest as it was */
        else
            defer_decref(c, item.key);
    }
    PyMem_Free(old);
    /* items pushed by re-entrant calls while detached */
    ExpItem *extra = c->heap;
    Py_ssize_t extra_len = c->heap_len;
    c->heap = kept;
    c->heap_len = k;
    c->heap_cap = n ? n : 1;
    if (extra_len) {
        if (exp_reserve(c, extra_len) < 0) {
            for (Py_ssize_t j = 0; j < extra_len; j++)
                defer_decref(c, extra[j].key);
            err = 1;
        }
        else {
            memcpy(c->heap + c->heap_len, extra, (size_t)extra_len * sizeof(ExpItem));
            c->heap_len += extra_len;
        }
    }
    PyMem_Free(extra);
    for (Py_ssize_t j = c->heap_len / 2 - 1; j >= 0; j--)
        exp_sift_down(c->heap, c->heap_len, j);
    return err ? -1 : 0;
}

static int
exp_schedule(Core *c, PyObject *key, Py_hash_t hash, double expires)
{
    if (exp_reserve(c, 1) < 0)
        return -1;
    Py_INCREF(key);
    ExpItem item = {expires, c->exp_seq++, key, hash};
    exp_push_into(c->heap, &c->heap_len, item);
    if (c->heap_len > 2 * c->len + 64) {
        if (exp_compact(c) < 0)
            return -1;
    }
    if (!c->sweeping) {
        c->sweeping = 1;
        c->start_sweeper = 1;
    }
    return 0;
}

/* Remove an entry that is leaving for expiry or a delete (not an eviction). */
static void
unlink_entry(Core *c, int32_t s)
{
    policy_unlink(c, s);
    c->bytes -= c->slots[s].weight;
    slot_free(c, s);
}

static int
expire_some(Core *c, int limit, double now, PyObject **events)
{
    int collect = c->notify != NULL;
    while (c->heap_len > 0 && limit > 0 && c->heap[0].expires <= now) {
        ExpItem item = exp_pop_from(c->heap, &c->heap_len);
        int32_t pos;
        int32_t s = lookup(c, item.key, item.hash, &pos);
        defer_decref(c, item.key);
        if (s == -2)
            return -1;
        if (s == NIL || c->slots[s].expires > now) /* also the never-expiring (infinite) ones */
            continue;
        if (collect && add_event(events, item.key, c->slots[s].value, c->cause_expired) < 0)
            return -1;
        unlink_entry(c, s);
        c->expirations++;
        limit--;
    }
    return 0;
}

static int
evict_over_bound(Core *c, PyObject **events)
{
    int collect = c->notify != NULL;
    while (c->len > 0 && ((c->bound_bytes >= 0 && c->bytes > c->bound_bytes) ||
                          (c->max_entries >= 0 && c->len > c->max_entries))) {
        int32_t s = policy_evict(c);
        if (s == -2)
            return -1;
        if (s == NIL)
            break;
        Slot *slot = &c->slots[s];
        c->bytes -= slot->weight;
        c->evictions++;
        mrc_on_evict(c, slot->hash, slot->weight);
        if (collect && add_event(events, slot->key, slot->value, c->cause_size) < 0) {
            slot_free(c, s);
            return -1;
        }
        slot_free(c, s);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Operation epilogue: listeners, sweeper registration, deferred releases                           */


#if PY_VERSION_HEX >= 0x030C0000
#define SAVE_ERROR(name) PyObject *name = PyErr_GetRaisedException()
#define RESTORE_ERROR(name) PyErr_SetRaisedException(name)
#else
#define SAVE_ERROR(name)                                                                            \
    PyObject *name##_t, *name##_v, *name##_tb;                                                      \
    PyErr_Fetch(&name##_t, &name##_v, &name##_tb)
#define RESTORE_ERROR(name) PyErr_Restore(name##_t, name##_v, name##_tb)
#endif

/* Runs after every operation that changed the table: registers the sweeper, calls the listeners and
   releases what the operation dropped. `result` is the return value (NULL: an error is set, and the
   listeners are not called, as in the reference). Returns `result`, or NULL if the epilogue failed. */
static PyObject *
finish(Core *c, PyObject *events, PyObject *result)
{
    if (result == NULL) {
        c->start_sweeper = 0;
        Py_XDECREF(events);
        SAVE_ERROR(err);
        flush_trash(c);
        RESTORE_ERROR(err);
        return NULL;
    }
    if (c->start_sweeper) {
        c->start_sweeper = 0;
        if (c->on_schedule != NULL) {
            PyObject *r = PyObject_CallNoArgs(c->on_schedule);
            if (r == NULL) {
                Py_CLEAR(result);
                Py_XDECREF(events);
                SAVE_ERROR(err);
                flush_trash(c);
                RESTORE_ERROR(err);
                return NULL;
            }
            Py_DECREF(r);
        }
    }
    if (events != NULL) {
        PyObject *notify = c->notify;
        if (notify != NULL) {
            Py_INCREF(notify);
            PyObject *r = PyObject_CallOneArg(notify, events);
            Py_DECREF(notify);
            if (r == NULL)
                Py_CLEAR(result);
            else
                Py_DECREF(r);
        }
        Py_DECREF(events);
    }
    if (c->trash_len) {
        if (result == NULL) {
            SAVE_ERROR(err);
            flush_trash(c);
            RESTORE_ERROR(err);
        }
        else
            flush_trash(c);
    }
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* Argument helpers                                                                                  */

static int
parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
           const char *const *names, int required, int total, PyObject **out)
{
    if (nargs > total) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fname, total, nargs);
        return -1;
    }
    for (int i = 0; i < total; i++)
        out[i] = NULL;
    for (Py_ssize_t i = 0; i < nargs; i++)
        out[i] = args[i];
    if (kwnames != NULL) {
        Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nk; k++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, k);
            int found = 0;
            for (int i = 0; i < total; i++) {
                if (PyUnicode_CompareWithASCIIString(name, names[i]) == 0) {
                    if (out[i] != NULL) {
                        PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                                     names[i]);
                        return -1;
                    }
                    out[i] = args[nargs + k];
                    found = 1;
                    break;
                }
            }
            if (!found) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fname, name);
                return -1;
            }
        }
    }
    for (int i = 0; i < required; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname, names[i]);
            return -1;
        }
    }
    return 0;
}

/* The key's hash, or -1 with UnhashableKeyError (for a TypeError) or the original error set. */
static Py_hash_t
hash_key(Core *c, PyObject *key, int count_bad)
{
    Py_hash_t hash = PyObject_Hash(key);
    if (hash == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            if (count_bad)
                c->bad_keys++;
            PyObject *exc = PyObject_CallOneArg(c->unhashable, key);
            if (exc != NULL) {
                PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
                Py_DECREF(exc);
            }
        }
        return -1;
    }
    return hash;
}

/* A lookup failed (a key's __eq__ raised): TypeError becomes UnhashableKeyError where the reference
   converts it (reads), other errors propagate. */
static void
lookup_failed(Core *c, PyObject *key, int count_bad)
{
    if (PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        if (count_bad)
            c->bad_keys++;
        PyObject *exc = PyObject_CallOneArg(c->unhashable, key);
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Reads                                                                                             */

static inline void
record_latency(int64_t *ring, int *n, int *pos, int64_t ns)
{
    ring[*pos] = ns;
    *pos = (*pos + 1) % LAT_RING;
    if (*n < LAT_RING)
        (*n)++;
}

/* A hit's policy bookkeeping; returns the promotion-buffer key dropped to make room (or NULL). */
static inline PyObject *
on_hit(Core *c, int32_t s)
{
    Slot *slot = &c->slots[s];
    switch (c->kind) {
    case KIND_LRU:
        list_move_to_end(c, &c->lists[0], s);
        return NULL;
    case KIND_FIFO:
        return NULL;
    case KIND_LFU:
        if (slot->hits != UINT32_MAX)
            slot->hits++;
        return NULL;
    default:
        break;
    }
    if (slot->hits != UINT32_MAX)
        slot->hits++;
    if (slot->seg == SEG_PROBATION) {
        PyObject *dropped = NULL;
        if (c->promo_len == c->promo_cap && c->promo_cap < PROMO_MAX) {
            int cap = c->promo_cap ? c->promo_cap * 2 : 16;
            PromoItem *ring = PyMem_Malloc((size_t)cap * sizeof(PromoItem));
            if (ring == NULL)
                return NULL; /* out of memory: the hit is just not promoted */
            for (int i = 0; i < c->promo_len; i++)
                ring[i] = c->promo[(c->promo_head + i) % c->promo_cap];
            PyMem_Free(c->promo);
            c->promo = ring;
            c->promo_head = 0;
            c->promo_cap = cap;
        }
        if (c->promo_len == c->promo_cap) {
            dropped = c->promo[c->promo_head].key;
            c->promo_head = (c->promo_head + 1) % c->promo_cap;
            c->promo_len--;
        }
        PromoItem *item = &c->promo[(c->promo_head + c->promo_len) % c->promo_cap];
        Py_INCREF(slot->key);
        item->key = slot->key;
        item->hash = slot->hash;
        item->slot = s;
        item->gen = slot->gen;
        c->promo_len++;
        return dropped;
    }
    list_move_to_end(c, &c->lists[slot->seg], s);
    return NULL;
}

/* The amortized upkeep a sampled read does: a batch of expiries and the policy's maintenance. */
static int
upkeep(Core *c, PyObject **events)
{
    if (c->heap_len > 0) {
        double now;
        if (now_mono(c, &now) < 0)
            return -1;
        if (expire_some(c, EXPIRE_PER_OP * 4, now, events) < 0)
            return -1;
    }
    return policy_maintain(c);
}

static PyObject *
Core_get(Core *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *key, *dflt;
    if (kwnames == NULL && nargs == 1) {
        key = args[0];
        dflt = Py_None;
    }
    else if (kwnames == NULL && nargs == 2) {
        key = args[0];
        dflt = args[1];
    }
    else {
        static const char *const names[] = {"key", "default"};
        PyObject *out[2];
        if (parse_args("get", args, nargs, kwnames, names, 1, 2, out) < 0)
            return NULL;
        key = out[0];
        dflt = out[1] ? out[1] : Py_None;
    }
    uint64_t g = c->gets++;
    int sampled = !(g & SAMPLE_MASK);
    int64_t start = sampled ? perf_ns() : 0;
    Py_hash_t hash = hash_key(c, key, 1);
    if (hash == -1 && PyErr_Occurred())
        return NULL;
    int32_t pos;
    int32_t s = lookup(c, key, hash, &pos);
    PyObject *result;
    PyObject *events = NULL;
    int hit = 0;
    if (s >= 0) {
        double expires = c->slots[s].expires;
        double now = 0;
        if (expires != NONE_EXPIRY && now_mono(c, &now) < 0)
            return NULL;
        if (expires != NONE_EXPIRY && expires <= now) {
            if (c->notify != NULL &&
                add_event(&events, key, c->slots[s].value, c->cause_expired) < 0)
                return finish(c, events, NULL);
            unlink_entry(c, s);
            c->expirations++;
            c->misses++;
            mrc_on_miss(c, hash);
            result = Py_NewRef(dflt);
        }
        else {
            result = Py_NewRef(c->slots[s].value);
            PyObject *dropped = on_hit(c, s);
            hit = 1;
            if (!sampled) {
                Py_XDECREF(dropped);
                return result;
            }
            defer_decref(c, dropped);
        }
    }
    else if (s == NIL) {
        c->misses++;
        mrc_on_miss(c, hash);
        if (!sampled)
            return Py_NewRef(dflt);
        result = Py_NewRef(dflt);
    }
    else {
        lookup_failed(c, key, 1);
        return NULL;
    }
    if (sampled) {
        int64_t ns = perf_ns() - start;
        if (hit)
            record_latency(c->hit_ns, &c->hit_n, &c->hit_pos, ns);
        else
            record_latency(c->miss_ns, &c->miss_n, &c->miss_pos, ns);
        if (upkeep(c, &events) < 0)
            Py_CLEAR(result);
    }
    return finish(c, events, result);
}

static int
Core_contains(Core *c, PyObject *key)
{
    Py_hash_t hash = hash_key(c, key, 0);
    if (hash == -1 && PyErr_Occurred())
        return -1;
    int32_t pos;
    int32_t s = lookup(c, key, hash, &pos);
    if (s == -2) {
        lookup_failed(c, key, 0);
        return -1;
    }
    if (s == NIL)
        return 0;
    double expires = c->slots[s].expires;
    if (expires == NONE_EXPIRY)
        return 1;
    double now;
    if (now_mono(c, &now) < 0)
        return -1;
    return expires > now;
}

static Py_ssize_t
Core_len(Core *c)
{
    return c->len;
}

static PyObject *
Core_ttl_remaining(Core *c, PyObject *key)
{
    Py_hash_t hash = hash_key(c, key, 0);
    if (hash == -1 && PyErr_Occurred())
        return NULL;
    int32_t pos;
    int32_t s = lookup(c, key, hash, &pos);
    if (s == -2) {
        lookup_failed(c, key, 0);
        return NULL;
    }
    double now;
    if (now_mono(c, &now) < 0)
        return NULL;
    if (s == NIL || c->slots[s].expires <= now) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    double expires = c->slots[s].expires;
    if (expires == NONE_EXPIRY)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(expires - now);
}

/* (value, weight, expires or None) of the entry under key, expired or not; None when absent. */
static PyObject *
Core_entry(Core *c, PyObject *key)
{
    Py_hash_t hash = hash_key(c, key, 0);
    if (hash == -1 && PyErr_Occurred())
        return NULL;
    int32_t pos;
    int32_t s = lookup(c, key, hash, &pos);
    if (s == -2) {
        lookup_failed(c, key, 0);
        return NULL;
    }
    if (s == NIL)
        Py_RETURN_NONE;
    Slot *slot = &c->slots[s];
    if (slot->expires == NONE_EXPIRY)
        return Py_BuildValue("(OLO)", slot->value, (long long)slot->weight, Py_None);
    return Py_BuildValue("(OLd)", slot->value, (long long)slot->weight, slot->expires);
}

static PyObject *
Core_keys(Core *c, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(c->len);
    if (out == NULL)
        return NULL;
    Py_ssize_t k = 0;
    int lists = c->kind == KIND_ADAPTIVE ? 3 : 1;
    for (int l = 0; l < lists; l++) {
        for (int32_t s = c->lists[l].head; s != NIL && k < c->len; s = c->slots[s].next) {
            PyList_SET_ITEM(out, k, Py_NewRef(c->slots[s].key));
            k++;
        }
    }
    if (k != c->len) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_RuntimeError, "cache lists out of step with the table");
        return NULL;
    }
    return out;
}

/* ------------------------------------------------------------------------------------------------ */
/* Writes                                                                                            */

static int
is_flat(PyTypeObject *t)
{
    return t == &PyUnicode_Type || t == &PyByteArray_Type || t == &PyLong_Type || t == &PyFloat_Type ||
           t == &PyComplex_Type || t == &PyBool_Type || t == Py_TYPE(Py_None) || t == &PyMemoryView_Type ||
           t == &PyRange_Type;
}

/* The common flat types' own __sizeof__ (method descriptors), called without sys.getsizeof's argument
   parsing and attribute lookup; sys.getsizeof adds nothing to them (they are not GC-tracked). */
#define N_SIZEOF 4
static PyTypeObject *sizeof_types[N_SIZEOF];
static PyObject *sizeof_descrs[N_SIZEOF];

static int
init_sizeof(void)
{
    PyTypeObject *types[N_SIZEOF] = {&PyLong_Type, &PyUnicode_Type, &PyFloat_Type, &PyByteArray_Type};
    for (int i = 0; i < N_SIZEOF; i++) {
        if (PyType_IS_GC(types[i]))
            continue;
        PyObject *d = PyObject_GetAttrString((PyObject *)types[i], "__sizeof__");
        if (d == NULL)
            return -1;
        sizeof_types[i] = types[i];
        sizeof_descrs[i] = d;
    }
    return 0;
}

/* The value's weight, validated as the reference does. -1 with an error set on failure. */
static int64_t
weigh(Core *c, PyObject *key, PyObject *value)
{
    PyObject *r;
    if (c->weigher == NULL) {
        PyTypeObject *t = Py_TYPE(value);
        if (t == &PyBytes_Type)
            return (int64_t)PyBytes_Type.tp_basicsize + (int64_t)PyBytes_GET_SIZE(value);
        r = NULL;
        for (int i = 0; i < N_SIZEOF; i++) {
            if (t == sizeof_types[i]) {
                r = PyObject_Vectorcall(sizeof_descrs[i], &value, 1, NULL);
                if (r == NULL)
                    return -1;
                break;
            }
        }
        if (r == NULL)
            r = PyObject_CallOneArg(is_flat(t) ? getsizeof_fn : c->default_weigher, value);
    }
    else
        r = PyObject_CallOneArg(c->weigher, value);
    if (r == NULL)
        return -1;
    if (!PyLong_Check(r) || PyBool_Check(r)) {
        PyObject *name = PyType_GetName(Py_TYPE(r));
        if (name != NULL) {
            PyErr_Format(PyExc_TypeError, "weigher must return an int, got %U for key %R", name, key);
            Py_DECREF(name);
        }
        Py_DECREF(r);
        return -1;
    }
    int overflow;
    long long w = PyLong_AsLongLongAndOverflow(r, &overflow);
    if (w == -1 && PyErr_Occurred()) {
        Py_DECREF(r);
        return -1;
    }
    if (overflow < 0 || (!overflow && w < 0)) {
        PyErr_Format(PyExc_ValueError, "weigher returned a negative weight (%S) for key %R", r, key);
        Py_DECREF(r);
        return -1;
    }
    if (overflow > 0 || w > MAX_WEIGHT) {
        PyErr_Format(PyExc_ValueError,
                     "weigher returned %S for key %R: more than the largest weight a cache accepts (2**48)",
                     r, key);
        Py_DECREF(r);
        return -1;
    }
    Py_DECREF(r);
    return (int64_t)w;
}

/* The ttl in seconds (NAN: never expires) for a put. */
static int
resolve_ttl(Core *c, PyObject *value, PyObject *ttl, double *out)
{
    PyObject *own = NULL;
    if ((ttl == NULL || ttl == Py_None) && c->cached_value_type != NULL &&
        Py_TYPE(value) == (PyTypeObject *)c->cached_value_type) {
        own = PyObject_GetAttr(value, str_ttl);
        if (own == NULL)
            return -1;
        ttl = own;
    }
    if (ttl == NULL || ttl == Py_None) {
        Py_XDECREF(own);
        *out = c->default_ttl;
        return 0;
    }
    if (PyFloat_CheckExact(ttl)) {
        double v = PyFloat_AS_DOUBLE(ttl);
        if (isfinite(v) && v > 0) {
            Py_XDECREF(own);
            *out = v;
            return 0;
        }
    }
    PyObject *r = PyObject_CallOneArg(c->check_ttl, ttl);
    Py_XDECREF(own);
    if (r == NULL)
        return -1;
    if (r == Py_None) {
        Py_DECREF(r);
        *out = NAN;
        return 0;
    }
    double v = PyFloat_AsDouble(r);
    Py_DECREF(r);
    if (v == -1.0 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

typedef struct {
    Py_hash_t hash;
    int64_t weight;
    double expires;
    double now;
} Prepared;

/* Everything a put checks before it touches the table: hash, ttl, weight, strict bound. */
static int
prepare(Core *c, PyObject *key, PyObject *value, PyObject *ttl, Prepared *p)
{
    p->hash = hash_key(c, key, 0);
    if (p->hash == -1 && PyErr_Occurred())
        return -1;
    double seconds;
    if (resolve_ttl(c, value, ttl, &seconds) < 0)
        return -1;
    p->weight = weigh(c, key, value);
    if (p->weight < 0)
        return -1;
    if (c->strict && c->bound_bytes >= 0 && p->weight > c->bound_bytes) {
        c->rejections++;
        PyObject *exc = PyObject_CallFunction(c->too_large, "OLL", key, (long long)p->weight,
                                              (long long)c->bound_bytes);
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        return -1;
    }
    /* the clock is read only when something needs it (NAN: not read yet) */
    p->now = NAN;
    if (!isnan(seconds) && now_mono(c, &p->now) < 0)
        return -1;
    p->expires = isnan(seconds) ? NONE_EXPIRY : p->now + seconds;
    return 0;
}

/* The locked half of a put (memory.CacheManager._put_locked): 1 kept, 0 not kept, -1 error. */
static int
put_locked(Core *c, PyObject *key, Py_hash_t hash, PyObject *value, int64_t weight, double expires,
           double now, PyObject **events)
{
    int32_t pos;
    int32_t s = lookup(c, key, hash, &pos);
    if (s == -2)
        return -1;
    if (c->bound_bytes >= 0 && weight > c->bound_bytes) {
        c->rejections++;
        if (s != NIL)
            unlink_entry(c, s);
        return 0;
    }
    if (s != NIL) {
        Slot *slot = &c->slots[s];
        int64_t old_weight = slot->weight;
        if (c->kind == KIND_ADAPTIVE)
            a_replace(c, s, c->max_bytes >= 0 ? weight : 1);
        else if (c->kind == KIND_LFU) {
            if (slot->hits != UINT32_MAX)
                slot->hits++;
        }
        else if (c->kind == KIND_LRU) {
            list_move_to_end(c, &c->lists[0], s);
            if (slot->key != key) { /* the reference pops and re-inserts: the new key object stays */
                PyObject *old_key = slot->key;
                slot->key = Py_NewRef(key);
                defer_decref(c, old_key);
            }
        }
        PyObject *old_value = slot->value;
        slot->value = Py_NewRef(value);
        slot->weight = weight;
        slot->expires = expires;
        defer_decref(c, old_value);
        c->bytes += weight - old_weight;
    }
    else {
        if (reserve_one(c, hash, &pos) < 0)
            return -1;
        s = slot_new(c, key, hash, value, weight, expires, pos);
        c->bytes += weight;
        if (policy_insert(c, s) < 0)
            return -1;
    }
    uint32_t gen = c->slots[s].gen;
    c->puts++;
    if (expires != NONE_EXPIRY && exp_schedule(c, key, hash, expires) < 0)
        return -1;
    if (c->heap_len > 0) {
        if (isnan(now) && now_mono(c, &now) < 0)
            return -1;
        if (expire_some(c, EXPIRE_PER_OP, now, events) < 0)
            return -1;
    }
    if (evict_over_bound(c, events) < 0)
        return -1;
    if (policy_maintain(c) < 0)
        return -1;
    return s < c->slot_used && c->slots[s].key != NULL && c->slots[s].gen == gen;
}

static PyObject *
Core_put(Core *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"key", "value", "ttl"};
    PyObject *out[3];
    if (kwnames == NULL && (nargs == 2 || nargs == 3)) {
        out[0] = args[0];
        out[1] = args[1];
        out[2] = nargs == 3 ? args[2] : NULL;
    }
    else if (parse_args("put", args, nargs, kwnames, names, 2, 3, out) < 0)
        return NULL;
    Prepared p;
    if (prepare(c, out[0], out[1], out[2], &p) < 0)
        return NULL;
    PyObject *events = NULL;
    int kept = put_locked(c, out[0], p.hash, out[1], p.weight, p.expires, p.now, &events);
    return finish(c, events, kept < 0 ? NULL : PyBool_FromLong(kept));
}

static PyObject *
Core_add(Core *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"key", "value", "ttl"};
    PyObject *out[3];
    if (parse_args("add", args, nargs, kwnames, names, 2, 3, out) < 0)
        return NULL;
    Prepared p;
    if (prepare(c, out[0], out[1], out[2], &p) < 0)
        return NULL;
    int32_t pos;
    int32_t s = lookup(c, out[0], p.hash, &pos);
    if (s == -2)
        return finish(c, NULL, NULL);
    if (s != NIL && c->slots[s].expires != NONE_EXPIRY && isnan(p.now) && now_mono(c, &p.now) < 0)
        return finish(c, NULL, NULL);
    if (s != NIL && (c->slots[s].expires == NONE_EXPIRY || c->slots[s].expires > p.now))
        return finish(c, NULL, Py_NewRef(Py_False));
    PyObject *events = NULL;
    int kept = put_locked(c, out[0], p.hash, out[1], p.weight, p.expires, p.now, &events);
    return finish(c, events, kept < 0 ? NULL : PyBool_FromLong(kept));
}

/* prepare(key, value, ttl) -> (weight, expires or None): put_many validates every item first. */
static PyObject *
Core_prepare(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "prepare(key, value, ttl)");
        return NULL;
    }
    Prepared p;
    if (prepare(c, args[0], args[1], args[2], &p) < 0)
        return NULL;
    if (p.expires == NONE_EXPIRY)
        return Py_BuildValue("(LO)", (long long)p.weight, Py_None);
    return Py_BuildValue("(Ld)", (long long)p.weight, p.expires);
}

/* put_prepared([(key, value, weight, expires or None), ...]): the locked half of put_many. */
static PyObject *
Core_put_prepared(Core *c, PyObject *items)
{
    if (!PyList_CheckExact(items)) {
        PyErr_SetString(PyExc_TypeError, "put_prepared() takes a list");
        return NULL;
    }
    double now = NAN; /* read by the first put that needs it */
    PyObject *events = NULL;
    Py_INCREF(items);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items); i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        PyObject *key, *value, *expires_obj;
        long long weight;
        if (!PyArg_ParseTuple(item, "OOLO", &key, &value, &weight, &expires_obj))
            goto error;
        double expires = NONE_EXPIRY;
        if (expires_obj != Py_None) {
            expires = PyFloat_AsDouble(expires_obj);
            if (expires == -1.0 && PyErr_Occurred())
                goto error;
        }
        Py_hash_t hash = hash_key(c, key, 0);
        if (hash == -1 && PyErr_Occurred())
            goto error;
        if (isnan(now) && c->heap_len > 0 && now_mono(c, &now) < 0)
            goto error;
        if (put_locked(c, key, hash, value, weight, expires, now, &events) < 0)
            goto error;
    }
    Py_DECREF(items);
    return finish(c, events, Py_NewRef(Py_None));
error:
    Py_DECREF(items);
    return finish(c, events, NULL);
}

static PyObject *
Core_touch(Core *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"key", "ttl"};
    PyObject *out[2];
    if (parse_args("touch", args, nargs, kwnames, names, 1, 2, out) < 0)
        return NULL;
    double seconds = c->default_ttl;
    if (out[1] != NULL && out[1] != Py_None) {
        PyObject *r = PyObject_CallOneArg(c->check_ttl, out[1]);
        if (r == NULL)
            return NULL;
        seconds = PyFloat_AsDouble(r);
        Py_DECREF(r);
        if (seconds == -1.0 && PyErr_Occurred())
            return NULL;
    }
    PyObject *key = out[0];
    Py_hash_t hash = hash_key(c, key, 0);
    if (hash == -1 && PyErr_Occurred())
        return NULL;
    double now;
    if (now_mono(c, &now) < 0)
        return NULL;
    int32_t pos;
    int32_t s = lookup(c, key, hash, &pos);
    if (s == -2)
        return NULL;
    if (s == NIL || c->slots[s].expires <= now)
        Py_RETURN_FALSE;
    double expires = isnan(seconds) ? NONE_EXPIRY : now + seconds;
    c->slots[s].expires = expires;
    if (expires != NONE_EXPIRY && exp_schedule(c, key, hash, expires) < 0)
        return finish(c, NULL, NULL);
    return finish(c, NULL, Py_NewRef(Py_True));
}

/* Remove key for delete()/pop(): 1 live (value in *value, a new reference), 0 absent or expired. */
static int
remove_key(Core *c, PyObject *key, PyObject **value)
{
    Py_hash_t hash = hash_key(c, key, 0);
    if (hash == -1 && PyErr_Occurred())
        return -1;
    int32_t pos;
    int32_t s = lookup(c, key, hash, &pos);
    if (s == -2)
        return -1;
    if (s == NIL)
        return 0;
    double expires = c->slots[s].expires;
    if (value != NULL)
        *value = Py_NewRef(c->slots[s].value);
    unlink_entry(c, s);
    double now = 0;
    if (expires != NONE_EXPIRY && now_mono(c, &now) < 0)
        return -1;
    if (expires != NONE_EXPIRY && expires <= now) {
        c->expirations++;
        if (value != NULL)
            Py_CLEAR(*value);
        return 0;
    }
    c->deletes++;
    return 1;
}

static PyObject *
Core_delete(Core *c, PyObject *key)
{
    int r = remove_key(c, key, NULL);
    return finish(c, NULL, r < 0 ? NULL : PyBool_FromLong(r));
}

static PyObject *
Core_pop(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop(key[, default])");
        return NULL;
    }
    PyObject *value = NULL;
    int r = remove_key(c, args[0], &value);
    if (r < 0) {
        Py_XDECREF(value);
        return finish(c, NULL, NULL);
    }
    if (r == 0) {
        if (nargs == 2)
            return finish(c, NULL, Py_NewRef(args[1]));
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return finish(c, NULL, NULL);
    }
    return finish(c, NULL, value);
}

/* Detach every entry, heap item and buffered key; release them after the structures are reset. */
static void
clear_all(Core *c)
{
    Slot *slots = c->slots;
    int32_t used = c->slot_used;
    ExpItem *heap = c->heap;
    Py_ssize_t heap_len = c->heap_len;
    PromoItem *promo = c->promo;
    int promo_head = c->promo_head, promo_len = c->promo_len, promo_cap = c->promo_cap;

    c->slots = NULL;
    c->slot_cap = c->slot_used = 0;
    c->free_head = NIL;
    PyMem_Free(c->index);
    c->index = NULL;
    c->index_bits = 0;
    c->len = 0;
    c->version++;
    for (int i = 0; i < 3; i++) {
        c->lists[i].head = c->lists[i].tail = NIL;
        c->lists[i].size = 0;
    }
    c->bytes = 0;
    c->heap = NULL;
    c->heap_len = c->heap_cap = 0;
    c->promo = NULL;
    c->promo_head = c->promo_len = c->promo_cap = 0;
    PyMem_Free(c->lheap);
    c->lheap = NULL;
    c->lheap_len = c->lheap_cap = 0;
    PyMem_Free(c->lfu_seq);
    c->lfu_seq = NULL;
    omap_clear(&c->rejected.map);
    c->rejected.size = 0;
    omap_clear(&c->evicted.map);
    c->evicted.size = 0;

    for (int32_t s = 0; s < used; s++) {
        if (slots[s].key != NULL) {
            defer_decref(c, slots[s].key);
            defer_decref(c, slots[s].value);
        }
    }
    PyMem_Free(slots);
    for (Py_ssize_t i = 0; i < heap_len; i++)
        defer_decref(c, heap[i].key);
    PyMem_Free(heap);
    for (int i = 0; i < promo_len; i++)
        defer_decref(c, promo[(promo_head + i) % promo_cap].key);
    PyMem_Free(promo);
}

static PyObject *
Core_clear(Core *c, PyObject *Py_UNUSED(ignored))
{
    clear_all(c);
    return finish(c, NULL, Py_NewRef(Py_None));
}

/* sweep(limit) -> (events or None, next deadline or None, stop sweeping: bool) */
static PyObject *
Core_sweep(Core *c, PyObject *arg)
{
    long limit = PyLong_AsLong(arg);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *events = NULL;
    if (c->heap_len > 0) {
        double now;
        if (now_mono(c, &now) < 0)
            return NULL;
        if (expire_some(c, (int)(limit > INT32_MAX ? INT32_MAX : limit), now, &events) < 0) {
            Py_XDECREF(events);
            return finish(c, NULL, NULL);
        }
    }
    int stop = 0;
    PyObject *deadline;
    if (c->heap_len > 0)
        deadline = PyFloat_FromDouble(c->heap[0].expires);
    else {
        deadline = Py_NewRef(Py_None);
        if (c->sweeping) {
            c->sweeping = 0;
            stop = 1;
        }
    }
    PyObject *r = Py_BuildValue("(NNO)", events ? events : Py_NewRef(Py_None), deadline,
                                stop ? Py_True : Py_False);
    return finish(c, NULL, r);
}

/* set_bounds(max_entries, max_bytes): new bounds for later puts (-1: none); policy units stay as built. */
static PyObject *
Core_set_bounds(Core *c, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set_bounds(max_entries, max_bytes)");
        return NULL;
    }
    long long entries = PyLong_AsLongLong(args[0]);
    if (entries == -1 && PyErr_Occurred())
        return NULL;
    long long nbytes = PyLong_AsLongLong(args[1]);
    if (nbytes == -1 && PyErr_Occurred())
        return NULL;
    if (entries == 0 || nbytes == 0 || entries < -1 || nbytes < -1) {
        PyErr_SetString(PyExc_ValueError, "bounds must be positive (or -1 for none)");
        return NULL;
    }
    c->max_entries = entries;
    c->bound_bytes = nbytes;
    Py_RETURN_NONE;
}

static PyObject *
Core_reset_after_fork(Core *c, PyObject *Py_UNUSED(ignored))
{
    c->sweeping = 0;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------ */
/* Introspection                                                                                     */

static size_t
metadata_bytes(Core *c)
{
    size_t n = sizeof(Core);
    n += (size_t)c->slot_cap * sizeof(Slot);
    if (c->index)
        n += ((size_t)1 << c->index_bits) * sizeof(int32_t);
    n += (size_t)c->heap_cap * sizeof(ExpItem);
    n += (size_t)c->lheap_cap * sizeof(LfuItem);
    if (c->lfu_seq)
        n += (size_t)c->slot_cap * sizeof(int64_t);
    if (c->sk_table)
        n += (size_t)(8 * c->sk_width);
    n += (size_t)c->promo_cap * sizeof(PromoItem);
    n += omap_bytes(&c->rejected.map) + omap_bytes(&c->evicted.map) + omap_bytes(&c->mrc);
    return n;
}

static PyObject *
ring_list(int64_t *ring, int n)
{
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLongLong(ring[i]);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    return out;
}

/* stats() -> (gets, misses, bad_keys, evictions, expirations, rejections, puts, deletes, bytes,
   entries, metadata_bytes, hit_ns, miss_ns) */
static PyObject *
Core_stats(Core *c, PyObject *Py_UNUSED(ignored))
{
    PyObject *hit = ring_list(c->hit_ns, c->hit_n);
    PyObject *miss = hit ? ring_list(c->miss_ns, c->miss_n) : NULL;
    if (miss == NULL) {
        Py_XDECREF(hit);
        return NULL;
    }
    return Py_BuildValue("(KKKKKKKKLnnNN)", (unsigned long long)c->gets, (unsigned long long)c->misses,
                         (unsigned long long)c->bad_keys, (unsigned long long)c->evictions,
                         (unsigned long long)c->expirations, (unsigned long long)c->rejections,
                         (unsigned long long)c->puts, (unsigned long long)c->deletes, (long long)c->bytes,
                         c->len, (Py_ssize_t)metadata_bytes(c), hit, miss);
}

/* lookups() -> (gets, misses, bad_keys): stats()'s counters without its latency lists. */
static PyObject *
Core_lookups(Core *c, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(KKK)", (unsigned long long)c->gets, (unsigned long long)c->misses,
                         (unsigned long long)c->bad_keys);
}

/* mrc() -> (histogram list, ghost_hits, ghosts held, capacity, span) */
static PyObject *
Core_mrc(Core *c, PyObject *Py_UNUSED(ignored))
{
    PyObject *hist = ring_list(c->hist, HIST_BUCKETS);
    if (hist == NULL)
        return NULL;
    return Py_BuildValue("(NLiLL)", hist, (long long)c->ghost_hits, (int)c->mrc.count, (long long)c->capacity,
                         (long long)c->mrc_span);
}

static PyObject *
Core_describe(Core *c, PyObject *Py_UNUSED(ignored))
{
    if (c->kind == KIND_ADAPTIVE) {
        double cap = (double)c->capacity;
        return Py_BuildValue("{s:d,s:L,s:L,s:L,s:L,s:L}", "window_fraction",
                             cap ? (double)c->max_window / cap : 0.0, "window", (long long)c->lists[0].size,
                             "probation", (long long)c->lists[1].size, "protected",
                             (long long)c->lists[2].size, "adjustments", (long long)c->adjustments,
                             "sketch_width", (long long)c->sk_width);
    }
    if (c->kind == KIND_LFU)
        return Py_BuildValue("{s:n}", "heap_items", c->lheap_len);
    return PyDict_New();
}

/* Checks every internal invariant (tests call it after fuzzing); raises AssertionError naming the
   first broken one. */
static PyObject *
Core_check(Core *c, PyObject *Py_UNUSED(ignored))
{
#define FAIL(msg)                                                                                   \
    do {                                                                                            \
        PyErr_SetString(PyExc_AssertionError, msg);                                                 \
        return NULL;                                                                                \
    } while (0)
    Py_ssize_t live = 0;
    int64_t bytes = 0;
    for (int32_t s = 0; s < c->slot_used; s++) {
        if (c->slots[s].key == NULL)
            continue;
        live++;
        bytes += c->slots[s].weight;
        if (c->index[find_pos_of_slot(c, s)] != s)
            FAIL("slot missing from the index");
    }
    if (live != c->len)
        FAIL("len differs from the live slots");
    if (bytes != c->bytes)
        FAIL("bytes differs from the sum of weights");
    Py_ssize_t listed = 0;
    int lists = c->kind == KIND_ADAPTIVE ? 3 : 1;
    for (int l = 0; l < lists; l++) {
        int64_t units = 0;
        int32_t prev = NIL;
        for (int32_t s = c->lists[l].head; s != NIL; s = c->slots[s].next) {
            if (c->slots[s].key == NULL)
                FAIL("a free slot is linked");
            if (c->slots[s].prev != prev)
                FAIL("broken prev link");
            if (c->kind == KIND_ADAPTIVE && c->slots[s].seg != l)
                FAIL("entry in the wrong segment");
            units += unit_of(c, s);
            prev = s;
            if (++listed > c->len)
                FAIL("a list is longer than the table");
        }
        if (c->lists[l].tail != prev)
            FAIL("broken tail");
        if (c->kind == KIND_ADAPTIVE && units != c->lists[l].size)
            FAIL("segment size differs from its entries");
    }
    if (listed != c->len)
        FAIL("lists hold a different number of entries than the table");
    Py_RETURN_NONE;
#undef FAIL
}

static PyObject *
Core_get_notify(Core *c, void *Py_UNUSED(closure))
{
    return Py_NewRef(c->notify ? c->notify : Py_None);
}

static int
Core_set_notify(Core *c, PyObject *value, void *Py_UNUSED(closure))
{
    if (value != NULL && value != Py_None && !PyCallable_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "notify must be callable or None");
        return -1;
    }
    PyObject *old = c->notify;
    c->notify = (value == NULL || value == Py_None) ? NULL : Py_NewRef(value);
    Py_XDECREF(old);
    return 0;
}

static PyObject *
Core_get_sweeping(Core *c, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(c->sweeping);
}

/* ------------------------------------------------------------------------------------------------ */
/* Construction, GC                                                                                  */

static int
Core_init(Core *c, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"kind",         "max_entries",       "max_bytes",      "default_ttl",
                         "weigher",      "default_weigher",   "strict",         "notify",
                         "on_schedule",  "clock",             "check_ttl",      "too_large",
                         "unhashable",   "cached_value_type", "cause_size",     "cause_expired",
                         "rng_random",   "initial_window",    "protected_share", "ghost_depth",
                         "ghost_gain",   "aging_factor",      "max_ghosts",     "max_ghost_keys",
                         NULL};
    int kind, strict = 0, aging_factor = 8, max_ghosts = 4096, max_ghost_keys = 4096;
    long long max_entries, max_bytes;
    PyObject *default_ttl = Py_None, *weigher = Py_None, *default_weigher, *notify = Py_None,
             *on_schedule = Py_None, *clock = Py_None, *check_ttl, *too_large, *unhashable,
             *cached_value_type, *cause_size, *cause_expired, *rng_random = Py_None;
    double initial_window = 0.01, protected_share = 0.8, ghost_depth = 0.1, ghost_gain = 0.5;
    if (c->slots != NULL || c->check_ttl != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Core.__init__ called twice");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iLLOOOpOOOOOOOOO|Oddddiii", kw, &kind, &max_entries,
                                     &max_bytes, &default_ttl, &weigher, &default_weigher, &strict, &notify,
                                     &on_schedule, &clock, &check_ttl, &too_large, &unhashable,
                                     &cached_value_type, &cause_size, &cause_expired, &rng_random,
                                     &initial_window, &protected_share, &ghost_depth, &ghost_gain,
                                     &aging_factor, &max_ghosts, &max_ghost_keys))
        return -1;
    if (kind < KIND_LRU || kind > KIND_ADAPTIVE) {
        PyErr_SetString(PyExc_ValueError, "unknown policy kind");
        return -1;
    }
    const long long limit = ((long long)1) << 62;
    if (max_entries > limit || max_bytes > limit || (max_entries < 0 && max_bytes < 0) || max_entries == 0 ||
        max_bytes == 0) {
        PyErr_SetString(PyExc_ValueError, "bounds must be in 1..2**62 (or -1 for none), at least one set");
        return -1;
    }
    if (kind == KIND_ADAPTIVE && !PyCallable_Check(rng_random)) {
        PyErr_SetString(PyExc_TypeError, "ADAPTIVE needs rng_random");
        return -1;
    }
    c->kind = kind;
    c->max_entries = max_entries < 0 ? -1 : max_entries;
    c->max_bytes = max_bytes < 0 ? -1 : max_bytes;
    c->bound_bytes = c->max_bytes;
    c->capacity = c->max_bytes >= 0 ? c->max_bytes : c->max_entries;
    c->free_head = NIL;
    for (int i = 0; i < 3; i++)
        c->lists[i].head = c->lists[i].tail = NIL;
    if (default_ttl == Py_None)
        c->default_ttl = NAN;
    else {
        c->default_ttl = PyFloat_AsDouble(default_ttl);
        if (c->default_ttl == -1.0 && PyErr_Occurred())
            return -1;
    }
    c->strict = strict;
    c->weigher = weigher == Py_None ? NULL : Py_NewRef(weigher);
    c->default_weigher = Py_NewRef(default_weigher);
    c->notify = notify == Py_None ? NULL : Py_NewRef(notify);
    c->on_schedule = on_schedule == Py_None ? NULL : Py_NewRef(on_schedule);
    c->clock = clock == Py_None ? NULL : Py_NewRef(clock);
#if !defined(CLOCK_MONOTONIC)
    if (c->clock == NULL) {
        PyErr_SetString(PyExc_ValueError, "this platform needs clock=time.monotonic");
        return -1;
    }
#endif
    c->check_ttl = Py_NewRef(check_ttl);
    c->too_large = Py_NewRef(too_large);
    c->unhashable = Py_NewRef(unhashable);
    c->cached_value_type = cached_value_type == Py_None ? NULL : Py_NewRef(cached_value_type);
    c->cause_size = Py_NewRef(cause_size);
    c->cause_expired = Py_NewRef(cause_expired);
    c->rng_random = rng_random == Py_None ? NULL : Py_NewRef(rng_random);
    c->aging_factor = aging_factor;
    c->max_ghosts = max_ghosts;
    omap_init(&c->mrc);
    c->mrc_span = c->capacity > 1 ? c->capacity : 1;
    omap_init(&c->rejected.map);
    omap_init(&c->evicted.map);
    if (kind == KIND_ADAPTIVE) {
        c->initial_window = initial_window;
        c->protected_share = protected_share;
        c->ghost_gain = ghost_gain;
        int64_t cap = c->capacity;
        int64_t w = (int64_t)((double)cap * initial_window);
        c->max_window = (c->max_bytes < 0 && w < 1) ? 1 : w;
        c->window_target = (double)c->max_window;
        set_main_limits(c);
        if (sketch_resize(c, c->max_entries >= 0 ? c->max_entries : 1024) < 0)
            return -1;
        int64_t depth = (int64_t)((double)cap * ghost_depth);
        if (depth < 1)
            depth = 1;
        c->rejected.limit = c->evicted.limit = depth;
    }
    c->max_ghost_keys = max_ghost_keys;
    return 0;
}

static int
Core_traverse(Core *c, visitproc visit, void *arg)
{
    for (int32_t s = 0; s < c->slot_used; s++) {
        Py_VISIT(c->slots[s].key);
        Py_VISIT(c->slots[s].value);
    }
    for (Py_ssize_t i = 0; i < c->heap_len; i++)
        Py_VISIT(c->heap[i].key);
    for (int i = 0; i < c->promo_len; i++)
        Py_VISIT(c->promo[(c->promo_head + i) % c->promo_cap].key);
    for (Py_ssize_t i = 0; i < c->trash_len; i++)
        Py_VISIT(c->trash[i]);
    Py_VISIT(c->weigher);
    Py_VISIT(c->default_weigher);
    Py_VISIT(c->notify);
    Py_VISIT(c->on_schedule);
    Py_VISIT(c->clock);
    Py_VISIT(c->check_ttl);
    Py_VISIT(c->too_large);
    Py_VISIT(c->unhashable);
    Py_VISIT(c->cached_value_type);
    Py_VISIT(c->cause_size);
    Py_VISIT(c->cause_expired);
    Py_VISIT(c->rng_random);
    return 0;
}

static int
Core_clear_refs(Core *c)
{
    clear_all(c);
    flush_trash(c);
    Py_CLEAR(c->weigher);
    Py_CLEAR(c->default_weigher);
    Py_CLEAR(c->notify);
    Py_CLEAR(c->on_schedule);
    Py_CLEAR(c->clock);
    Py_CLEAR(c->check_ttl);
    Py_CLEAR(c->too_large);
    Py_CLEAR(c->unhashable);
    Py_CLEAR(c->cached_value_type);
    Py_CLEAR(c->cause_size);
    Py_CLEAR(c->cause_expired);
    Py_CLEAR(c->rng_random);
    return 0;
}

static void
Core_dealloc(Core *c)
{
    PyObject_GC_UnTrack(c);
    Core_clear_refs(c);
    PyMem_Free(c->trash);
    PyMem_Free(c->sk_table);
    PyMem_Free(c->sk_door);
    omap_free(&c->mrc);
    omap_free(&c->rejected.map);
    omap_free(&c->evicted.map);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef Core_methods[] = {
    {"get", (PyCFunction)(void (*)(void))Core_get, METH_FASTCALL | METH_KEYWORDS,
     "get(key, default=None): the live value under key, else default."},
    {"put", (PyCFunction)(void (*)(void))Core_put, METH_FASTCALL | METH_KEYWORDS,
     "put(key, value, ttl=None) -> bool: store value; False if it was not kept."},
    {"add", (PyCFunction)(void (*)(void))Core_add, METH_FASTCALL | METH_KEYWORDS,
     "add(key, value, ttl=None) -> bool: store only if key has no live entry."},
    {"touch", (PyCFunction)(void (*)(void))Core_touch, METH_FASTCALL | METH_KEYWORDS,
     "touch(key, ttl=None) -> bool: give a live entry a new ttl."},
    {"prepare", (PyCFunction)(void (*)(void))Core_prepare, METH_FASTCALL,
     "prepare(key, value, ttl) -> (weight, expires): a put's checks, without storing."},
    {"put_prepared", (PyCFunction)Core_put_prepared, METH_O,
     "put_prepared(items): store prepared (key, value, weight, expires) items."},
    {"delete", (PyCFunction)Core_delete, METH_O, "delete(key) -> bool: remove a live entry."},
    {"pop", (PyCFunction)(void (*)(void))Core_pop, METH_FASTCALL,
     "pop(key[, default]): remove key and return its live value."},
    {"clear", (PyCFunction)Core_clear, METH_NOARGS, "Remove every entry."},
    {"ttl_remaining", (PyCFunction)Core_ttl_remaining, METH_O, "Seconds until key expires."},
    {"entry", (PyCFunction)Core_entry, METH_O, "(value, weight, expires) under key, or None."},
    {"keys", (PyCFunction)Core_keys, METH_NOARGS, "The keys held, in policy order."},
    {"sweep", (PyCFunction)Core_sweep, METH_O, "sweep(limit) -> (events, deadline, stop)."},
    {"stats", (PyCFunction)Core_stats, METH_NOARGS, "The raw counters."},
    {"lookups", (PyCFunction)Core_lookups, METH_NOARGS, "(gets, misses, bad_keys), without the latency lists."},
    {"mrc", (PyCFunction)Core_mrc, METH_NOARGS, "(histogram, ghost_hits, ghosts)."},
    {"describe", (PyCFunction)Core_describe, METH_NOARGS, "Policy internals."},
    {"check", (PyCFunction)Core_check, METH_NOARGS, "Verify internal invariants."},
    {"set_bounds", (PyCFunction)(void (*)(void))Core_set_bounds, METH_FASTCALL,
     "set_bounds(max_entries, max_bytes): the bounds later puts are held to (-1: none)."},
    {"reset_after_fork", (PyCFunction)Core_reset_after_fork, METH_NOARGS,
     "In a forked child: the sweeper registers again on the next ttl'd put."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Core_getset[] = {
    {"notify", (getter)Core_get_notify, (setter)Core_set_notify, "notify(events) or None.", NULL},
    {"sweeping", (getter)Core_get_sweeping, NULL, "Whether the sweeper watches this cache.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods Core_as_sequence = {
    .sq_length = (lenfunc)Core_len,
    .sq_contains = (objobjproc)Core_contains,
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kotoba_memory._ccache.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The compiled table and policy bookkeeping behind CacheManager.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_traverse = (traverseproc)Core_traverse,
    .tp_clear = (inquiry)Core_clear_refs,
    .tp_methods = Core_methods,
    .tp_getset = Core_getset,
    .tp_as_sequence = &Core_as_sequence,
};

static struct PyModuleDef ccache_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kotoba_memory._ccache",
    .m_doc = "Compiled core of kotoba_memory's in-memory cache (see cache_manager/memory.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__ccache(void)
{
    if (PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *sys = PyImport_ImportModule("sys");
    if (sys == NULL)
        return NULL;
    getsizeof_fn = PyObject_GetAttrString(sys, "getsizeof");
    Py_DECREF(sys);
    if (getsizeof_fn == NULL)
        return NULL;
    if (init_sizeof() < 0)
        return NULL;
    str_ttl = PyUnicode_InternFromString("ttl");
    if (str_ttl == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&ccache_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Core", (PyObject *)&CoreType) < 0 ||
        PyModule_AddIntConstant(m, "LRU", KIND_LRU) < 0 || PyModule_AddIntConstant(m, "LFU", KIND_LFU) < 0 ||
        PyModule_AddIntConstant(m, "FIFO", KIND_FIFO) < 0 ||
        PyModule_AddIntConstant(m, "ADAPTIVE", KIND_ADAPTIVE) < 0 ||
        PyModule_AddObject(m, "MAX_WEIGHT", PyLong_FromLongLong(MAX_WEIGHT)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
