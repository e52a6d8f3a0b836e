/* nerve._speedups: the per-event work of tracing and decoding, in C.
 *
 * Optional: built when the package is installed (hatch_build.py) where a C compiler
 * is at hand; nerve._native loads it when it imports and has the ABI this code
 * expects, else the pure-Python twins of these functions do the same work with the
 * same results (tests/observe/test_otlp.py and tests/test_event.py compare them).
 *
 * Decoding:
 * - extension_names(extra, attributes): the keys of a document that are in the set
 *   `extra`, in the document's order.
 * - register_decoding(reserved, checked, fromisoformat, loads), plain_event(attributes,
 *   data): the event nerve.event.from_attributes builds from a dict of plain attributes
 *   (the common case), None for anything else, which the Python code then builds or
 *   refuses; decode_document(raw): the event nerve.event.decode returns for raw bytes
 *   holding such a document, else the parsed document (or None) for Python to finish.
 * Tracing (nerve.observe):
 * - parse_traceparent(value): a W3C traceparent (version 00) as the parent tuple
 *   (trace_id, span_id, sampled, "", True), None when invalid.
 * - SpanFields, HandleFields: the C bases of otlp.Span and tracing.HandlerTrace.
 * - start_span(...): a started span with random ids (random.getrandbits), sampled as
 *   its parent is: SpanRecorder.start with the SDK's default ids and sampler.
 * - ProcessSpans: a handler attempt's process span started (made the current span)
 *   and ended, a create span started, ended and written as a traceparent; its
 *   starter(function, ctx_type) is what the runner calls with each attempt's ctx, its
 *   ender(count, ctx_type) what it calls as the attempt ends (metrics, then the span).
 * - register_event(Event), traced_copy(event, traceparent, tracestate): an event
 *   copied with its trace extensions.
 * - encode_span(s), encode_spans(batch, ...): spans as OTLP protobuf; SpanWriter: one
 *   span as it ends (the pipeline of an OTLP/HTTP exporter queues bytes, not spans).
 * NATS (nerve.transport.nats):
 * - nats_headers(raw): a message's header block as nats-py parses it.
 * Metrics (nerve.observe.hooks):
 * - MetricsEnd: the metrics of an attempt that succeeded (a duration bucketed, a
 *   count), the other outcomes handed to FunctionObserver._counted.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#if PY_VERSION_HEX < 0x030C0000
#include <structmember.h>
#define Py_T_OBJECT_EX T_OBJECT_EX
#endif

#define SPEEDUPS_ABI 14

static signed char HEX[256];

/* The event class registered by register_event, and its slots' offsets. */
#define EVENT_SLOTS 10
static PyTypeObject *EVENT_TYPE;
static Py_ssize_t EVENT_OFFSETS[EVENT_SLOTS];
/* The same offsets by field name, in this order (-1 until register_event found all). */
static const char *const EVENT_FIELDS[EVENT_SLOTS] = {
    "type", "source", "id", "specversion", "time",
    "subject", "datacontenttype", "dataschema", "data", "extensions",
};
enum { F_TYPE, F_SOURCE, F_ID, F_SPECVERSION, F_TIME, F_SUBJECT, F_CONTENTTYPE, F_SCHEMA,
       F_DATA, F_EXTENSIONS };
static Py_ssize_t FIELD_OFFSETS[EVENT_SLOTS] = {-1};
static Py_ssize_t EXTENSIONS_OFFSET = -1, TYPE_OFFSET = -1, ID_OFFSET = -1;

#define SLOT(object, offset) (*(PyObject **)((char *)(object) + (offset)))

/* An attribute of an object: read from its slot when it is an instance of exactly
 * `type` (offset >= 0), else through getattr. A new reference. */
static PyObject *
slot_or_attr(PyObject *object, PyTypeObject *type, Py_ssize_t offset, PyObject *name)
{
    if (offset >= 0 && Py_TYPE(object) == type) {
        PyObject *value = SLOT(object, offset);
        if (value != NULL) {
            return Py_NewRef(value);
        }
    }
    return PyObject_GetAttr(object, name);
}

/* The offset of a plain slot (a member descriptor of an object) of `type`, -1 if none. */
static Py_ssize_t
slot_offset(PyTypeObject *type, const char *name)
{
    PyObject *descr = PyDict_GetItemString(type->tp_dict, name);
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)
        || ((PyMemberDescrObject *)descr)->d_member->type != Py_T_OBJECT_EX) {
        return -1;
    }
    return ((PyMemberDescrObject *)descr)->d_member->offset;
}

/* The dict a mappingproxy wraps (borrowed), NULL for anything else: an event's
 * extensions are a MappingProxyType of a dict, read without the proxy's generic
 * mapping calls (its layout, one object after the header, is CPython's since 3.3). */
typedef struct {
    PyObject_HEAD
    PyObject *mapping;
} ProxyLayout;

static PyObject *
proxied_dict(PyObject *proxy)
{
    if (Py_IS_TYPE(proxy, &PyDictProxy_Type)) {
        PyObject *mapping = ((ProxyLayout *)proxy)->mapping;
        if (PyDict_CheckExact(mapping)) {
            return mapping;
        }
    }
    return NULL;
}

/* extensions[key] (new reference); NULL with no error set when it is absent. */
static PyObject *
extension(PyObject *extensions, PyObject *key)
{
    PyObject *dict = proxied_dict(extensions);
    if (dict != NULL) {
        return Py_XNewRef(PyDict_GetItemWithError(dict, key));
    }
    int has = PySequence_Contains(extensions, key);
    if (has <= 0) {
        return NULL;
    }
    return PyObject_GetItem(extensions, key);
}
static PyObject *EMPTY, *EMPTY_TUPLE, *ZERO, *ONE, *BITS_128, *BITS_64, *GETRANDBITS,
    *S_trace_id, *S_span_id, *S_parent_id, *S_remote, *S_start_time,
    *S_end_time, *S_values, *SIXTY_FOUR;

#if PY_VERSION_HEX < 0x030C0000 && PyLong_SHIFT == 30
/* Up to CPython 3.11 an int is its 30-bit digits (ob_digit, least significant first) and
 * their count (ob_size, negated for a negative int): an id read from them or made of
 * them is a few operations, where the public conversions of a value above 2**64 go
 * through a byte array or a shift (~470 instructions for a 128-bit trace id). */
#define LONG_DIGITS 1

/* v's value in two halves; -1 (no exception set) if negative or 2**128 or more */
static int
digits_u128(PyObject *v, uint64_t *hi, uint64_t *lo)
{
    Py_ssize_t size = Py_SIZE(v);
    if (size < 0 || size > 5) {
        return -1;
    }
    const digit *d = ((PyLongObject *)v)->ob_digit;
    uint64_t x[5] = {0, 0, 0, 0, 0};
    for (Py_ssize_t i = 0; i < size; i++) {
        x[i] = d[i];
    }
    if (x[4] >> 8) {
        return -1;
    }
    *lo = x[0] | x[1] << 30 | x[2] << 60;
    *hi = x[2] >> 4 | x[3] << 26 | x[4] << 56;
    return 0;
}

static PyObject *
digits_int(uint64_t hi, uint64_t lo)
{
    const uint64_t mask = ((uint64_t)1 << 30) - 1;
    digit x[5] = {(digit)(lo & mask), (digit)((lo >> 30) & mask),
                  (digit)((lo >> 60) | ((hi << 4) & mask)), (digit)((hi >> 26) & mask),
                  (digit)(hi >> 56)};
    Py_ssize_t size = 5;
    while (size > 0 && x[size - 1] == 0) {
        size--;
    }
    if (size <= 1) {
        return PyLong_FromLong((long)x[0]); /* a small int may be cached */
    }
    PyLongObject *v = _PyLong_New(size);
    if (v == NULL) {
        return NULL;
    }
    memcpy(v->ob_digit, x, sizeof(digit) * (size_t)size);
    return (PyObject *)v;
}
#endif

/* hi * 2**64 + lo as an int */
static PyObject *
u128(uint64_t hi, uint64_t lo)
{
#ifdef LONG_DIGITS
    return digits_int(hi, lo);
#else
    if (hi == 0) {
        return PyLong_FromUnsignedLongLong(lo);
    }
    unsigned char buf[16];
    for (int i = 0; i < 8; i++) {
        buf[i] = (unsigned char)(hi >> (56 - 8 * i));
        buf[8 + i] = (unsigned char)(lo >> (56 - 8 * i));
    }
    /* (hi << 64 | lo through two PyNumber operations measured 460 instructions more) */
#if PY_VERSION_HEX >= 0x030D0000
    return PyLong_FromUnsignedNativeBytes(buf, 16, Py_ASNATIVEBYTES_BIG_ENDIAN);
#else
    return _PyLong_FromByteArray(buf, 16, 0, 0);
#endif
#endif
}

/* Up to 16 lowercase hex digits; -1 on any other character. */
static int
hex64(const unsigned char *s, int n, uint64_t *out)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++) {
        int d = HEX[s[i]];
        if (d < 0) {
            return -1;
        }
        v = (v << 4) | (uint64_t)d;
    }
    *out = v;
    return 0;
}

static PyObject *
parse_traceparent(PyObject *module, PyObject *value)
{
    (void)module;
    if (!PyUnicode_CheckExact(value) || !PyUnicode_IS_ASCII(value)
        || PyUnicode_GET_LENGTH(value) != 55) {
        Py_RETURN_NONE;
    }
    const unsigned char *s = PyUnicode_1BYTE_DATA(value);
    uint64_t version, hi, lo, span, flags;
    if (hex64(s, 2, &version) || version == 0xff || s[2] != '-' || hex64(s + 3, 16, &hi)
        || hex64(s + 19, 16, &lo) || s[35] != '-' || hex64(s + 36, 16, &span) || s[52] != '-'
        || hex64(s + 53, 2, &flags) || (hi == 0 && lo == 0) || span == 0) {
        Py_RETURN_NONE;
    }
    PyObject *trace_id = u128(hi, lo);
    if (trace_id == NULL) {
        return NULL;
    }
    PyObject *span_id = u128(0, span);
    if (span_id == NULL) {
        Py_DECREF(trace_id);
        return NULL;
    }
    PyObject *sampled = PyLong_FromLong((long)(flags & 1));  /* a small int: cached */
    PyObject *parent = PyTuple_New(5);
    if (parent == NULL) {
        Py_DECREF(trace_id);
        Py_DECREF(span_id);
        Py_XDECREF(sampled);
        return NULL;
    }
    PyTuple_SET_ITEM(parent, 0, trace_id);
    PyTuple_SET_ITEM(parent, 1, span_id);
    PyTuple_SET_ITEM(parent, 2, sampled);
    Py_INCREF(EMPTY);
    PyTuple_SET_ITEM(parent, 3, EMPTY);
    Py_INCREF(Py_True);
    PyTuple_SET_ITEM(parent, 4, Py_True);
    return parent;
}

/* -- SpanFields ------------------------------------------------------------------ */

#define SPAN_FIELDS(X)                                                                  \
    X(trace_id)                                                                         \
    X(span_id)                                                                          \
    X(flags)                                                                            \
    X(start_time)                                                                       \
    X(end_time)                                                                         \
    X(parent_id)                                                                        \
    X(remote)                                                                           \
    X(recorder)                                                                         \
    X(layout)                                                                           \
    X(values)                                                                           \
    X(state)                                                                            \
    X(detailed)                                                                         \
    X(links)

typedef struct {
    PyObject_HEAD
#define DECLARE(name) PyObject *name;
    SPAN_FIELDS(DECLARE)
#undef DECLARE
} SpanFields;

static PyTypeObject SpanFieldsType;

static PyObject *
fields_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if ((args != NULL && PyTuple_GET_SIZE(args)) || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_Format(PyExc_TypeError, "%s() takes no arguments", type->tp_name);
        return NULL;
    }
    SpanFields *self = (SpanFields *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    /* the defaults of a span that was never started */
    self->trace_id = Py_NewRef(ZERO);
    self->span_id = Py_NewRef(ZERO);
    self->flags = Py_NewRef(ZERO);
    self->start_time = Py_NewRef(ZERO);
    self->end_time = Py_NewRef(ZERO);
    self->parent_id = Py_NewRef(ZERO);
    self->remote = Py_NewRef(Py_False);
    self->recorder = Py_NewRef(Py_None);
    self->layout = Py_NewRef(Py_None);
    self->values = Py_NewRef(EMPTY_TUPLE);
    self->state = Py_NewRef(EMPTY);
    self->detailed = Py_NewRef(Py_False);
    self->links = Py_NewRef(Py_None);
    return (PyObject *)self;
}

/* A GC-tracked type of this module, whose object references are the fields FIELDS(X)
 * names (an X-macro): its tp_traverse visits them, its tp_clear clears them, and its
 * tp_dealloc untracks the object, clears it and frees it. Defines prefix_traverse,
 * prefix_clear and prefix_dealloc. */
#define GC_VISIT_FIELD(name) Py_VISIT(self->name);
#define GC_CLEAR_FIELD(name) Py_CLEAR(self->name);
#define GC_FUNCTIONS(prefix, type, FIELDS)                                                 \
    static int prefix##_traverse(type *self, visitproc visit, void *arg)                 \
    {                                                                                    \
        FIELDS(GC_VISIT_FIELD)                                                           \
        return 0;                                                                        \
    }                                                                                    \
    static int prefix##_clear(type *self)                                                \
    {                                                                                    \
        FIELDS(GC_CLEAR_FIELD)                                                           \
        return 0;                                                                        \
    }                                                                                    \
    static void prefix##_dealloc(type *self)                                             \
    {                                                                                    \
        PyObject_GC_UnTrack(self);                                                       \
        prefix##_clear(self);                                                            \
        Py_TYPE(self)->tp_free((PyObject *)self);                                        \
    }

GC_FUNCTIONS(fields, SpanFields, SPAN_FIELDS)

static PyMemberDef fields_members[] = {
#define MEMBER(name) {#name, Py_T_OBJECT_EX, offsetof(SpanFields, name), 0, NULL},
    SPAN_FIELDS(MEMBER)
#undef MEMBER
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SpanFieldsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nerve._speedups.SpanFields",
    .tp_doc = "The fields of one span, in C: the base of nerve.observe.otlp.Span.",
    .tp_basicsize = sizeof(SpanFields),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = fields_new,
    .tp_dealloc = (destructor)fields_dealloc,
    .tp_traverse = (traverseproc)fields_traverse,
    .tp_clear = (inquiry)fields_clear,
    .tp_members = fields_members,
};

static inline void
replace(PyObject **slot, PyObject *value)
{
    PyObject *old = *slot;
    *slot = Py_NewRef(value);
    Py_DECREF(old);
}

static inline void
take(PyObject **slot, PyObject *value) /* steals value */
{
    PyObject *old = *slot;
    *slot = value;
    Py_DECREF(old);
}

/* getrandbits(bits), or 1 when it gives 0 (an id is never 0) */
static PyObject *
random_id(PyObject *bits)
{
    PyObject *id = PyObject_CallOneArg(GETRANDBITS, bits);
    if (id == NULL) {
        return NULL;
    }
    int nonzero = PyObject_IsTrue(id);
    if (nonzero <= 0) {
        Py_DECREF(id);
        return nonzero < 0 ? NULL : Py_NewRef(ONE);
    }
    return id;
}

static PyObject *
start_span_of(PyTypeObject *type, PyObject *recorder, PyObject *layout, PyObject *parent,
              PyObject *values, PyObject *links)
{
    PyObject *trace_id;
    int sampled = 1;
    if (parent == Py_None) {
        trace_id = random_id(BITS_128);
        if (trace_id == NULL) {
            return NULL;
        }
    }
    else {
        if (!PyTuple_Check(parent) || PyTuple_GET_SIZE(parent) != 5) {
            PyErr_SetString(PyExc_TypeError, "a parent is a tuple of 5");
            return NULL;
        }
        long flags = PyLong_AsLong(PyTuple_GET_ITEM(parent, 2));
        if (flags == -1 && PyErr_Occurred()) {
            return NULL;
        }
        sampled = (int)(flags & 1);
        trace_id = Py_NewRef(PyTuple_GET_ITEM(parent, 0));
    }
    SpanFields *span = (SpanFields *)type->tp_new(type, EMPTY_TUPLE, NULL);
    if (span == NULL) {
        Py_DECREF(trace_id);
        return NULL;
    }
    take(&span->trace_id, trace_id);
    if (sampled) {
        replace(&span->recorder, recorder);
        replace(&span->flags, ONE);
    }
    replace(&span->layout, layout);
    replace(&span->values, values);
    PyObject *span_id = random_id(BITS_64);
    if (span_id == NULL) {
        Py_DECREF(span);
        return NULL;
    }
    take(&span->span_id, span_id);
    if (parent != Py_None) {
        replace(&span->parent_id, PyTuple_GET_ITEM(parent, 1));
        PyObject *state = PyTuple_GET_ITEM(parent, 3);
        int has_state = PyObject_IsTrue(state);
        if (has_state < 0) {
            Py_DECREF(span);
            return NULL;
        }
        if (has_state) {
            replace(&span->state, state);
            replace(&span->detailed, Py_True);
        }
        replace(&span->remote, PyTuple_GET_ITEM(parent, 4));
    }
    if (links != Py_None) {
        int has_links = PyObject_IsTrue(links);
        if (has_links < 0) {
            Py_DECREF(span);
            return NULL;
        }
        if (has_links) {
            replace(&span->links, links); /* not detailed: the encoder writes links */
        }
    }
    struct timespec now;
    if (timespec_get(&now, TIME_UTC) == 0) {
        Py_DECREF(span);
        PyErr_SetString(PyExc_OSError, "timespec_get failed");
        return NULL;
    }
    PyObject *start = PyLong_FromLongLong((long long)now.tv_sec * 1000000000LL + now.tv_nsec);
    if (start == NULL) {
        Py_DECREF(span);
        return NULL;
    }
    take(&span->start_time, start);
    return (PyObject *)span;
}

static PyObject *
start_span(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 6 || !PyType_Check(args[0])
        || !PyType_IsSubtype((PyTypeObject *)args[0], &SpanFieldsType)) {
        PyErr_SetString(PyExc_TypeError, "start_span(span_type: type[SpanFields], recorder, "
                                         "layout, parent, values, links)");
        return NULL;
    }
    return start_span_of((PyTypeObject *)args[0], args[1], args[2], args[3], args[4], args[5]);
}

/* -- encoding -------------------------------------------------------------------- */

static size_t
varint_size(uint64_t n)
{
    size_t size = 1;
    while (n >= 0x80) {
        n >>= 7;
        size++;
    }
    return size;
}

static char *
put_varint(char *p, uint64_t n)
{
    while (n >= 0x80) {
        *p++ = (char)((n & 0x7f) | 0x80);
        n >>= 7;
    }
    *p++ = (char)n;
    return p;
}

static char *
put_be64(char *p, uint64_t n)
{
    for (int i = 0; i < 8; i++) {
        *p++ = (char)(n >> (56 - 8 * i));
    }
    return p;
}

static char *
put_le64(char *p, uint64_t n)
{
    for (int i = 0; i < 8; i++) {
        *p++ = (char)(n >> (8 * i));
    }
    return p;
}

/* How one value is written: its AnyValue, after the key's prefix and the AnyValue's
 * length (an attributes field: 0x4a, KeyValue length, prefix, AnyValue length). */
enum { V_NONE, V_STR, V_BOOL, V_INT, V_FLOAT, V_BYTES };

typedef struct {
    int kind;
    const char *data;  /* V_STR: UTF-8; V_BYTES: a whole field from other_value */
    Py_ssize_t size;   /* V_STR: data's size; V_BYTES: the field's */
    uint64_t number;   /* V_BOOL, V_INT: the value; V_FLOAT: the double's bits */
    size_t any_size;   /* the AnyValue's size */
    size_t kv_size;    /* the KeyValue's size */
} Value;

#define MAX_VALUES 16

/* v as an integer of 0 .. 2**64-1 (OverflowError outside, TypeError for a non-int).
 * PyLong_AsUnsignedLongLong goes through the generic byte-array conversion for any
 * value above 2**30: several times what this costs, for every id and time of a span. */
static int
as_u64(PyObject *v, uint64_t *out)
{
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "a span's ids and times are ints, not %.100s",
                     Py_TYPE(v)->tp_name);
        return -1;
    }
#ifdef LONG_DIGITS
    uint64_t hi;
    if (digits_u128(v, &hi, out) || hi) {
        PyErr_SetString(PyExc_OverflowError, "a span's ids and times are ints of 0 .. 2**64-1");
        return -1;
    }
#elif PY_VERSION_HEX >= 0x030D0000
    Py_ssize_t n = PyLong_AsNativeBytes(v, out, 8,
                                        Py_ASNATIVEBYTES_NATIVE_ENDIAN
                                            | Py_ASNATIVEBYTES_UNSIGNED_BUFFER
                                            | Py_ASNATIVEBYTES_REJECT_NEGATIVE);
    if (n < 0) {
        return -1;
    }
    if (n > 8) {
        PyErr_SetString(PyExc_OverflowError, "int too big to convert");
        return -1;
    }
#else
    if (_PyLong_Sign(v) < 0 || _PyLong_NumBits(v) > 64) {
        PyErr_SetString(PyExc_OverflowError, "int too big to convert");
        return -1;
    }
    *out = (uint64_t)PyLong_AsUnsignedLongLongMask(v);
#endif
    return 0;
}

/* v as an integer of 0 .. 2**128-1, in two halves. */
static int
as_u128(PyObject *v, uint64_t *hi, uint64_t *lo)
{
    if (!PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "a trace id is an int, not %.100s", Py_TYPE(v)->tp_name);
        return -1;
    }
#ifdef LONG_DIGITS
    if (digits_u128(v, hi, lo)) {
        PyErr_SetString(PyExc_OverflowError, "a trace id is an int of 0 .. 2**128-1");
        return -1;
    }
#elif PY_VERSION_HEX >= 0x030D0000
    uint64_t halves[2];
    Py_ssize_t n = PyLong_AsNativeBytes(v, halves, 16,
                                        Py_ASNATIVEBYTES_LITTLE_ENDIAN
                                            | Py_ASNATIVEBYTES_UNSIGNED_BUFFER
                                            | Py_ASNATIVEBYTES_REJECT_NEGATIVE);
    if (n < 0) {
        return -1;
    }
    if (n > 16) {
        PyErr_SetString(PyExc_OverflowError, "int too big to convert");
        return -1;
    }
    unsigned char *b = (unsigned char *)halves;
    uint64_t parts[2] = {0, 0};
    for (int i = 0; i < 16; i++) {
        parts[i / 8] |= (uint64_t)b[i] << (8 * (i % 8));
    }
    *lo = parts[0];
    *hi = parts[1];
#else
    size_t bits = _PyLong_NumBits(v);
    if (_PyLong_Sign(v) < 0 || bits > 128) {
        PyErr_SetString(PyExc_OverflowError, "int too big to convert");
        return -1;
    }
    *lo = (uint64_t)PyLong_AsUnsignedLongLongMask(v);
    *hi = 0;
    if (bits > 64) {
        PyObject *high = PyNumber_Rshift(v, SIXTY_FOUR);
        if (high == NULL) {
            return -1;
        }
        *hi = (uint64_t)PyLong_AsUnsignedLongLongMask(high);
        Py_DECREF(high);
    }
#endif
    return 0;
}

/* A span's attribute: from the struct of a SpanFields, else through getattr. */
static PyObject *
attr(PyObject *span, PyObject *name, size_t offset)
{
    if (PyObject_TypeCheck(span, &SpanFieldsType)) {
        PyObject *value = *(PyObject **)((char *)span + offset);
        if (value == NULL) {
            PyErr_SetObject(PyExc_AttributeError, name);
            return NULL;
        }
        return Py_NewRef(value);
    }
    return PyObject_GetAttr(span, name);
}

#define ATTR(span, field) attr(span, S_##field, offsetof(SpanFields, field))

static int
get_u64(PyObject *span, PyObject *name, size_t offset, uint64_t *out)
{
    PyObject *value = attr(span, name, offset);
    if (value == NULL) {
        return -1;
    }
    int failed = as_u64(value, out);
    Py_DECREF(value);
    return failed;
}

/* Whether encode_one writes a span's links itself: a list of (trace id, span id, flags,
 * tracestate, remote, None) tuples (links without attributes, as a batch's receive span
 * has); else the span is written by detailed(). */
static int
plain_links(PyObject *links)
{
    if (!PyList_CheckExact(links)) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(links); i++) {
        PyObject *link = PyList_GET_ITEM(links, i);
        if (!PyTuple_CheckExact(link) || PyTuple_GET_SIZE(link) != 6
            || PyTuple_GET_ITEM(link, 5) != Py_None) {
            return 0;
        }
    }
    return 1;
}

/* Span.links (13): one Link each, of trace id (1), span id (2) and flags (6), 35 bytes. */
#define LINK_SIZE 35

static char *
put_links(char *p, PyObject *links)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(links); i++) {
        PyObject *link = PyTuple_GET_ITEM(links, i);
        uint64_t hi, lo, span_id;
        if (as_u128(PyTuple_GET_ITEM(link, 0), &hi, &lo)
            || as_u64(PyTuple_GET_ITEM(link, 1), &span_id)) {
            return NULL;
        }
        int remote = PyObject_IsTrue(PyTuple_GET_ITEM(link, 4));
        if (remote < 0) {
            return NULL;
        }
        *p++ = 0x6a;
        *p++ = LINK_SIZE - 2;
        *p++ = 0x0a;
        *p++ = 0x10;
        p = put_be64(p, hi);
        p = put_be64(p, lo);
        *p++ = 0x12;
        *p++ = 0x08;
        p = put_be64(p, span_id);
        /* flags, fixed32: HAS_IS_REMOTE (0x100), and IS_REMOTE (0x200) */
        static const char flags[5] = {0x35, 0x00, 0x01, 0x00, 0x00};
        memcpy(p, flags, 5);
        if (remote) {
            p[2] = 0x03;
        }
        p += 5;
    }
    return p;
}

/* One span as a ScopeSpans.spans field, from its layout's head and prefixes; `links`:
 * NULL, or a tuple of the links plain_links() accepted. */
static PyObject *
encode_one(PyObject *span, PyObject *head, PyObject *prefixes, PyObject *other_value,
           PyObject *links)
{
    Py_ssize_t count = PyTuple_GET_SIZE(prefixes);
    if (count > MAX_VALUES) {
        PyErr_SetString(PyExc_ValueError, "encode_span: more than 16 keys");
        return NULL;
    }
    Value values[MAX_VALUES];
    PyObject *keep[MAX_VALUES]; /* other_value's results, until written */
    Py_ssize_t kept = 0;
    PyObject *result = NULL, *seq = NULL, *sequence = NULL;

    uint64_t hi, lo, span_id, parent_id = 0, start, end;
    PyObject *trace_id = ATTR(span, trace_id);
    if (trace_id == NULL) {
        return NULL;
    }
    int failed = as_u128(trace_id, &hi, &lo);
    Py_DECREF(trace_id);
    if (failed) {
        return NULL;
    }
#define GET_U64(field, out) get_u64(span, S_##field, offsetof(SpanFields, field), out)
    if (GET_U64(span_id, &span_id) || GET_U64(parent_id, &parent_id)
        || GET_U64(start_time, &start) || GET_U64(end_time, &end)) {
        return NULL;
    }
    int remote = 0;
    if (parent_id) {
        PyObject *r = ATTR(span, remote);
        if (r == NULL) {
            return NULL;
        }
        remote = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (remote < 0) {
            return NULL;
        }
    }
    seq = ATTR(span, values);
    if (seq == NULL) {
        return NULL;
    }
    sequence = PySequence_Fast(seq, "a span's values must be a sequence");
    if (sequence == NULL) {
        goto done;
    }
    if (PySequence_Fast_GET_SIZE(sequence) != count) {
        PyErr_Format(PyExc_ValueError, "the span has %zd values for %zd keys",
                     PySequence_Fast_GET_SIZE(sequence), count);
        goto done;
    }

    size_t body = 2 + 16 + 2 + 8 + (parent_id ? 2 + 8 : 0) + 18 + (size_t)PyBytes_GET_SIZE(head)
                  + 8 + (links == NULL ? 0 : LINK_SIZE * (size_t)PyTuple_GET_SIZE(links));
    PyObject **items = PySequence_Fast_ITEMS(sequence);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = items[i], *prefix = PyTuple_GET_ITEM(prefixes, i);
        Value *v = &values[i];
        if (!PyBytes_Check(prefix)) {
            PyErr_SetString(PyExc_TypeError, "encode_span: prefixes must be bytes");
            goto done;
        }
        size_t prefix_size = (size_t)PyBytes_GET_SIZE(prefix);
        if (item == Py_None) {
            v->kind = V_NONE;
            continue;
        }
        if (PyUnicode_CheckExact(item)) {
            v->data = PyUnicode_AsUTF8AndSize(item, &v->size);
            if (v->data == NULL) {
                goto done;
            }
            v->kind = V_STR;
            v->any_size = 1 + varint_size((uint64_t)v->size) + (size_t)v->size;
        }
        else if (PyBool_Check(item)) {
            v->kind = V_BOOL;
            v->number = item == Py_True;
            v->any_size = 2;
        }
        else if (PyLong_CheckExact(item)) {
            v->kind = V_INT;
            v->number = (uint64_t)PyLong_AsUnsignedLongLongMask(item);
            if (v->number == (uint64_t)-1 && PyErr_Occurred()) {
                goto done;
            }
            v->any_size = 1 + varint_size(v->number);
        }
        else if (PyFloat_CheckExact(item)) {
            double d = PyFloat_AS_DOUBLE(item);
            v->kind = V_FLOAT;
            memcpy(&v->number, &d, 8);
            v->any_size = 9;
        }
        else { /* anything else: the Python encoder's field (b"" to leave it out) */
            PyObject *field = PyObject_CallFunctionObjArgs(other_value, prefix, item, NULL);
            if (field == NULL) {
                goto done;
            }
            keep[kept++] = field;
            if (!PyBytes_Check(field)) {
                PyErr_SetString(PyExc_TypeError, "other_value must return bytes");
                goto done;
            }
            v->kind = V_BYTES;
            v->data = PyBytes_AS_STRING(field);
            v->size = PyBytes_GET_SIZE(field);
            body += (size_t)v->size;
            continue;
        }
        v->kv_size = prefix_size + varint_size(v->any_size) + v->any_size;
        body += 1 + varint_size(v->kv_size) + v->kv_size;
    }

    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(1 + varint_size(body) + body));
    if (result == NULL) {
        goto done;
    }
    char *p = PyBytes_AS_STRING(result);
    *p++ = 0x12;
    p = put_varint(p, body);
    *p++ = 0x0a;
    *p++ = 0x10;
    p = put_be64(p, hi);
    p = put_be64(p, lo);
    *p++ = 0x12;
    *p++ = 0x08;
    p = put_be64(p, span_id);
    if (parent_id) {
        *p++ = 0x22;
        *p++ = 0x08;
        p = put_be64(p, parent_id);
    }
    *p++ = 0x39;
    p = put_le64(p, start);
    *p++ = 0x41;
    p = put_le64(p, end);
    memcpy(p, PyBytes_AS_STRING(head), (size_t)PyBytes_GET_SIZE(head));
    p += PyBytes_GET_SIZE(head);
    for (Py_ssize_t i = 0; i < count; i++) {
        Value *v = &values[i];
        if (v->kind == V_NONE) {
            continue;
        }
        if (v->kind == V_BYTES) {
            memcpy(p, v->data, (size_t)v->size);
            p += v->size;
            continue;
        }
        PyObject *prefix = PyTuple_GET_ITEM(prefixes, i);
        *p++ = 0x4a;
        p = put_varint(p, v->kv_size);
        memcpy(p, PyBytes_AS_STRING(prefix), (size_t)PyBytes_GET_SIZE(prefix));
        p += PyBytes_GET_SIZE(prefix);
        p = put_varint(p, v->any_size);
        switch (v->kind) {
        case V_STR:
            *p++ = 0x0a;
            p = put_varint(p, (uint64_t)v->size);
            memcpy(p, v->data, (size_t)v->size);
            p += v->size;
            break;
        case V_BOOL:
            *p++ = 0x10;
            *p++ = (char)v->number;
            break;
        case V_INT:
            *p++ = 0x18;
            p = put_varint(p, v->number);
            break;
        default: /* V_FLOAT */
            *p++ = 0x21;
            p = put_le64(p, v->number);
        }
    }
    if (links != NULL && (p = put_links(p, links)) == NULL) {
        Py_CLEAR(result);
        goto done;
    }
    /* an unset status, then Span.flags: HAS_IS_REMOTE, and IS_REMOTE */
    static const char flags[8] = {0x7a, 0x00, (char)0x85, 0x01, 0x00, 0x01, 0x00, 0x00};
    memcpy(p, flags, 8);
    if (remote) {
        p[5] = 0x03;
    }
    p += 8;
    if (p != PyBytes_AS_STRING(result) + PyBytes_GET_SIZE(result)) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_SystemError, "encode_span: size mismatch");
    }
done:
    for (Py_ssize_t i = 0; i < kept; i++) {
        Py_DECREF(keep[i]);
    }
    Py_XDECREF(sequence);
    Py_XDECREF(seq);
    return result;
}

static PyObject *
encode_span(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4 || !PyBytes_Check(args[1]) || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "encode_span(span, head: bytes, prefixes: tuple, other_value)");
        return NULL;
    }
    return encode_one(args[0], args[1], args[2], args[3], NULL);
}

static PyObject *S_head, *S_prefixes;

/* The layout last written (a new reference each, or NULL): its head and prefixes are
 * read once for a run of spans of one layout. */
typedef struct {
    PyObject *layout, *head, *prefixes;
} LayoutParts;

static void
parts_clear(LayoutParts *parts)
{
    Py_CLEAR(parts->layout);
    Py_CLEAR(parts->head);
    Py_CLEAR(parts->prefixes);
}

/* One span as a ScopeSpans.spans field: a span of SpanFields that is not detailed from
 * its layout's head and prefixes (kept in `parts`), any other through detailed(span). */
static PyObject *
encode_item(PyObject *span, PyObject *detailed, PyObject *other_value, LayoutParts *parts)
{
    SpanFields *s = (SpanFields *)span;
    if (!PyObject_TypeCheck(span, &SpanFieldsType) || s->layout == Py_None
        || s->detailed != Py_False) {
        return PyObject_CallOneArg(detailed, span);
    }
    if (s->layout != parts->layout) {
        PyObject *layout = Py_NewRef(s->layout); /* the span may change while we read */
        parts_clear(parts);
        parts->layout = layout;
        parts->head = PyObject_GetAttr(layout, S_head);
        parts->prefixes = PyObject_GetAttr(layout, S_prefixes);
        if (parts->head == NULL || parts->prefixes == NULL) {
            parts_clear(parts);
            return NULL;
        }
        if (!PyBytes_Check(parts->head) || !PyTuple_Check(parts->prefixes)) {
            parts_clear(parts);
            PyErr_SetString(PyExc_TypeError, "a layout's head is bytes, its prefixes a tuple");
            return NULL;
        }
    }
    PyObject *links = NULL;
    if (s->links != Py_None) {
        if (!plain_links(s->links)) {
            return PyObject_CallOneArg(detailed, span);
        }
        /* a copy: other_value() may run Python code that changes the span's list */
        links = PyList_AsTuple(s->links);
        if (links == NULL) {
            return NULL;
        }
    }
    PyObject *encoded = encode_one(span, parts->head, parts->prefixes, other_value, links);
    Py_XDECREF(links);
    return encoded;
}

/* encode_spans(batch, detailed, other_value): OtlpEncoder.spans, the loop in C. */
static PyObject *
encode_spans(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encode_spans(batch, detailed, other_value)");
        return NULL;
    }
    PyObject *batch = PySequence_Fast(args[0], "encode_spans: batch must be a sequence");
    if (batch == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(batch);
    PyObject *out = PyList_New(n);
    LayoutParts parts = {NULL, NULL, NULL};
    if (out == NULL) {
        goto failed;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        /* the batch's items are read by index each time: detailed() may run any code */
        if (i >= PySequence_Fast_GET_SIZE(batch)) {
            PyErr_SetString(PyExc_RuntimeError, "encode_spans: the batch changed");
            goto failed;
        }
        PyObject *span = Py_NewRef(PySequence_Fast_GET_ITEM(batch, i));
        PyObject *encoded = encode_item(span, args[1], args[2], &parts);
        Py_DECREF(span);
        if (encoded == NULL) {
            goto failed;
        }
        PyList_SET_ITEM(out, i, encoded);
    }
    parts_clear(&parts);
    Py_DECREF(batch);
    return out;
failed:
    parts_clear(&parts);
    Py_XDECREF(out);
    Py_DECREF(batch);
    return NULL;
}

/* -- SpanWriter: a span written as OTLP as it ends ----------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *detailed;
    PyObject *other_value;
    vectorcallfunc vectorcall;
    LayoutParts parts; /* the layout of the last span written */
} SpanWriter;

/* writer(span): the span's ScopeSpans.spans field, what encode_spans([span], ...) gives. */
static PyObject *
writer_call(SpanWriter *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "a span writer takes one argument: span");
        return NULL;
    }
    /* the parts are copied for this call: detailed() and other_value() may run Python
       code, and another thread may write with this writer meanwhile */
    LayoutParts parts = {Py_XNewRef(self->parts.layout), Py_XNewRef(self->parts.head),
                         Py_XNewRef(self->parts.prefixes)};
    PyObject *encoded = encode_item(args[0], self->detailed, self->other_value, &parts);
    if (parts.layout != NULL && parts.layout != self->parts.layout) {
        LayoutParts old = self->parts;
        self->parts = parts;
        parts_clear(&old);
    }
    else {
        parts_clear(&parts);
    }
    return encoded;
}

static PyObject *
writer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"detailed", "other_value", NULL};
    PyObject *detailed, *other_value;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:SpanWriter", names, &detailed,
                                     &other_value)) {
        return NULL;
    }
    if (!PyCallable_Check(detailed) || !PyCallable_Check(other_value)) {
        PyErr_SetString(PyExc_TypeError, "SpanWriter(detailed, other_value): two callables");
        return NULL;
    }
    SpanWriter *self = (SpanWriter *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->detailed = Py_NewRef(detailed);
    self->other_value = Py_NewRef(other_value);
    self->vectorcall = (vectorcallfunc)writer_call;
    return (PyObject *)self;
}

#define WRITER_FIELDS(X)                                                                   \
    X(detailed) X(other_value) X(parts.layout) X(parts.head) X(parts.prefixes)

GC_FUNCTIONS(writer, SpanWriter, WRITER_FIELDS)

static PyTypeObject SpanWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nerve._speedups.SpanWriter",
    .tp_doc = "SpanWriter(detailed, other_value)(span): one span as OTLP protobuf (in C).",
    .tp_basicsize = sizeof(SpanWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(SpanWriter, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = writer_new,
    .tp_dealloc = (destructor)writer_dealloc,
    .tp_traverse = (traverseproc)writer_traverse,
    .tp_clear = (inquiry)writer_clear,
};


/* -- HandleFields: the base of nerve.observe.tracing.HandlerTrace -------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *span;
    PyObject *_tracing;
    PyObject *_token;
} HandleFields;

static PyObject *
handle_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds; /* HandlerTrace.__init__ takes the arguments */
    HandleFields *self = (HandleFields *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->span = Py_NewRef(Py_None);
    self->_tracing = Py_NewRef(Py_None);
    self->_token = Py_NewRef(Py_None);
    return (PyObject *)self;
}

#define HANDLE_FIELDS(X) X(span) X(_tracing) X(_token)

GC_FUNCTIONS(handle, HandleFields, HANDLE_FIELDS)

static PyMemberDef handle_members[] = {
    {"span", Py_T_OBJECT_EX, offsetof(HandleFields, span), 0, NULL},
    {"_tracing", Py_T_OBJECT_EX, offsetof(HandleFields, _tracing), 0, NULL},
    {"_token", Py_T_OBJECT_EX, offsetof(HandleFields, _token), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject HandleFieldsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nerve._speedups.HandleFields",
    .tp_doc = "The fields of a handler attempt's trace: the base of HandlerTrace.",
    .tp_basicsize = sizeof(HandleFields),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = handle_new,
    .tp_dealloc = (destructor)handle_dealloc,
    .tp_traverse = (traverseproc)handle_traverse,
    .tp_clear = (inquiry)handle_clear,
    .tp_members = handle_members,
};

/* -- ProcessSpans: Tracing.start_process and end_process, for the lean recorder ----- */

typedef struct {
    PyObject_HEAD
    PyObject *layouts;     /* dict: function -> {type -> Layout} */
    PyObject *make_layout; /* (function, type) -> Layout, kept in layouts */
    PyObject *parsed;      /* dict: event id -> parent parsed for a receive span */
    PyObject *parent_of;   /* (event) -> parent | None, for an event with a tracestate */
    PyObject *recorder;
    PyObject *span_type;
    PyObject *handle_type;
    PyObject *tracing;
    PyObject *var;          /* OpenTelemetry's context variable */
    PyObject *key;          /* the current span's key in its context */
    PyObject *context_type; /* opentelemetry.context.Context */
    PyObject *pipeline;
    PyObject *queue;    /* the pipeline's deque */
    PyObject *append;   /* its append method */
    PyObject *write;    /* the pipeline's _write: a span -> what its queue holds, or None */
    PyObject *add;      /* Pipeline.add: a span that write() refused (it logs why) */
    PyObject *slow_end; /* Tracing.end_process: every case but the plainest */
} ProcessSpans;

#define PROCESS_FIELDS(X)                                                                  \
    X(layouts) X(make_layout) X(parsed) X(parent_of) X(recorder) X(span_type)              \
    X(handle_type) X(tracing) X(var) X(key) X(context_type) X(pipeline) X(queue) X(append)   \
    X(write) X(add) X(slow_end)

static PyObject *S_type, *S_id, *S_extensions, *S_correlationid, *S_traceparent, *S_tracestate,
    *S_append, *S_check, *S_more, *S_write, *S_add;

GC_FUNCTIONS(process, ProcessSpans, PROCESS_FIELDS)

static PyTypeObject ProcessSpansType;

static PyObject *
process_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"layouts", "make_layout", "parsed", "parent_of", "recorder",
                            "span_type", "handle_type", "tracing", "var", "key",
                            "context_type", "pipeline", "slow_end", NULL};
    PyObject *o[13];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO!OOO!O!OO!UOOO:ProcessSpans", names,
                                     &PyDict_Type, &o[0], &o[1], &PyDict_Type, &o[2], &o[3],
                                     &o[4], &PyType_Type, &o[5], &PyType_Type, &o[6], &o[7],
                                     &PyContextVar_Type, &o[8], &o[9], &o[10], &o[11], &o[12])) {
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)o[5], &SpanFieldsType)
        || !PyType_IsSubtype((PyTypeObject *)o[6], &HandleFieldsType)) {
        PyErr_SetString(PyExc_TypeError, "span_type and handle_type must derive from "
                                         "SpanFields and HandleFields");
        return NULL;
    }
    if (!PyType_Check(o[10]) || !PyType_IsSubtype((PyTypeObject *)o[10], &PyDict_Type)
        || ((PyTypeObject *)o[10])->tp_new != PyDict_Type.tp_new
        || ((PyTypeObject *)o[10])->tp_init != PyDict_Type.tp_init) {
        PyErr_SetString(PyExc_TypeError, "context_type must be a dict subclass with dict's "
                                         "__new__ and __init__");
        return NULL;
    }
    PyObject *queue = PyObject_GetAttrString(o[11], "_queue");
    if (queue == NULL) {
        return NULL;
    }
    ProcessSpans *self = (ProcessSpans *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(queue);
        return NULL;
    }
    self->layouts = Py_NewRef(o[0]);
    self->make_layout = Py_NewRef(o[1]);
    self->parsed = Py_NewRef(o[2]);
    self->parent_of = Py_NewRef(o[3]);
    self->recorder = Py_NewRef(o[4]);
    self->span_type = Py_NewRef(o[5]);
    self->handle_type = Py_NewRef(o[6]);
    self->tracing = Py_NewRef(o[7]);
    self->var = Py_NewRef(o[8]);
    self->key = Py_NewRef(o[9]);
    self->context_type = Py_NewRef(o[10]);
    self->pipeline = Py_NewRef(o[11]);
    self->queue = queue;
    self->append = PyObject_GetAttr(queue, S_append);
    self->write = PyObject_GetAttr(o[11], S_write);
    self->add = PyObject_GetAttr(o[11], S_add);
    if (self->append == NULL || self->write == NULL || self->add == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->slow_end = Py_NewRef(o[12]);
    return (PyObject *)self;
}

static PyObject *start_span_of(PyTypeObject *type, PyObject *recorder, PyObject *layout,
                               PyObject *parent, PyObject *values, PyObject *links);
static PyObject *traceparent_text(SpanFields *span);

/* The parent context an event carries (new reference; None for none). */
static PyObject *
parent_of_event(ProcessSpans *self, PyObject *event, PyObject *extensions, PyObject *id)
{
    PyObject *value = extension(extensions, S_traceparent);
    if (value == NULL) {
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    }
    if (PyDict_GET_SIZE(self->parsed)) { /* parsed already for the receive span's links? */
        PyObject *parent = PyDict_GetItemWithError(self->parsed, id);
        if (parent != NULL) {
            Py_INCREF(parent);
            Py_DECREF(value);
            if (PyDict_DelItem(self->parsed, id) < 0) {
                Py_DECREF(parent);
                return NULL;
            }
            return parent;
        }
        if (PyErr_Occurred()) {
            Py_DECREF(value);
            return NULL;
        }
    }
    PyObject *state = extension(extensions, S_tracestate);
    if (state != NULL || PyErr_Occurred()) { /* with a tracestate: the Python way */
        Py_DECREF(value);
        Py_XDECREF(state);
        return PyErr_Occurred() ? NULL : PyObject_CallOneArg(self->parent_of, event);
    }
    PyObject *parent = parse_traceparent(NULL, value);
    Py_DECREF(value);
    return parent;
}

static PyObject *
process_start(ProcessSpans *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "start(function, event, attempt, current)");
        return NULL;
    }
    PyObject *function = args[0], *event = args[1], *attempt = args[2];
    int current = PyObject_IsTrue(args[3]);
    if (current < 0) {
        return NULL;
    }
    PyObject *type_name = NULL, *extensions = NULL, *id = NULL, *layout = NULL,
             *correlation = NULL, *values = NULL, *parent = NULL, *span = NULL,
             *result = NULL;
    if ((type_name = slot_or_attr(event, EVENT_TYPE, TYPE_OFFSET, S_type)) == NULL) {
        goto done;
    }
    PyObject *of_function = PyDict_GetItemWithError(self->layouts, function);
    if (of_function != NULL && PyDict_Check(of_function)) {
        layout = PyDict_GetItemWithError(of_function, type_name);
    }
    if (layout != NULL) {
        Py_INCREF(layout);
    }
    else if (PyErr_Occurred()
             || (layout = PyObject_CallFunctionObjArgs(self->make_layout, function, type_name,
                                                       NULL))
                    == NULL) {
        goto done;
    }
    if ((extensions = slot_or_attr(event, EVENT_TYPE, EXTENSIONS_OFFSET, S_extensions)) == NULL
        || (id = slot_or_attr(event, EVENT_TYPE, ID_OFFSET, S_id)) == NULL) {
        goto done;
    }
    correlation = extension(extensions, S_correlationid);
    if (correlation == NULL && PyErr_Occurred()) {
        goto done;
    }
    if (correlation != NULL) {
        if (correlation != Py_None && !PyUnicode_CheckExact(correlation)) {
            PyObject *text = PyObject_Str(correlation);
            Py_SETREF(correlation, text);
            if (correlation == NULL) {
                goto done;
            }
        }
    }
    if ((values = PyList_New(4)) == NULL) {
        goto done;
    }
    PyList_SET_ITEM(values, 0, Py_NewRef(id));
    PyList_SET_ITEM(values, 1, Py_NewRef(attempt));
    PyList_SET_ITEM(values, 2, correlation == NULL ? Py_NewRef(Py_None) : Py_NewRef(correlation));
    PyList_SET_ITEM(values, 3, Py_NewRef(Py_None));
    if ((parent = parent_of_event(self, event, extensions, id)) == NULL) {
        goto done;
    }
    span = start_span_of((PyTypeObject *)self->span_type, self->recorder, layout, parent,
                         values, Py_None);
    if (span == NULL) {
        goto done;
    }
    PyTypeObject *handle_type = (PyTypeObject *)self->handle_type;
    HandleFields *handle = (HandleFields *)handle_type->tp_new(handle_type, EMPTY_TUPLE, NULL);
    if (handle == NULL) {
        goto done;
    }
    Py_SETREF(handle->span, Py_NewRef(span));
    Py_SETREF(handle->_tracing, Py_NewRef(self->tracing));
    if (current) { /* the span is the current span until end() */
        PyObject *context = NULL;
        if (PyContextVar_Get(self->var, NULL, &context) < 0) {
            Py_DECREF(handle);
            goto done;
        }
        /* Context(values): a dict subclass (with dict's __new__ and __init__, checked
           when made), filled directly; its __setitem__ refuses only Python callers */
        PyTypeObject *context_type = (PyTypeObject *)self->context_type;
        PyObject *made = context_type->tp_new(context_type, EMPTY_TUPLE, NULL);
        if (made == NULL || (context != NULL && PyDict_Merge(made, context, 1) < 0)
            || PyDict_SetItem(made, self->key, span) < 0) {
            Py_XDECREF(context);
            Py_XDECREF(made);
            Py_DECREF(handle);
            goto done;
        }
        Py_XDECREF(context);
        PyObject *token = PyContextVar_Set(self->var, made);
        Py_DECREF(made);
        if (token == NULL) {
            Py_DECREF(handle);
            goto done;
        }
        Py_SETREF(handle->_token, token);
    }
    result = (PyObject *)handle;
done:
    Py_XDECREF(type_name);
    Py_XDECREF(extensions);
    Py_XDECREF(id);
    Py_XDECREF(layout);
    Py_XDECREF(correlation);
    Py_XDECREF(values);
    Py_XDECREF(parent);
    Py_XDECREF(span);
    return result;
}

/* Pipeline.add: the span into the export queue; the pipeline looks further (wakes its
 * thread, or drops a span from a full queue) once the queue reaches its _check. */
static int
queue_span(ProcessSpans *self, PyObject *span)
{
    PyObject *item = span; /* the span, or what the pipeline's _write made of it */
    if (self->write != Py_None) {
        item = PyObject_CallOneArg(self->write, span);
        if (item == NULL) { /* Pipeline.add writes it again, logs why it cannot, drops it */
            PyErr_Clear();
            PyObject *added = PyObject_CallOneArg(self->add, span);
            Py_XDECREF(added);
            return added == NULL ? -1 : 0;
        }
    }
    PyObject *appended = PyObject_CallOneArg(self->append, item);
    if (item != span) {
        Py_DECREF(item);
    }
    if (appended == NULL) {
        return -1;
    }
    Py_DECREF(appended);
    PyObject *check = PyObject_GetAttr(self->pipeline, S_check);
    if (check == NULL) {
        return -1;
    }
    Py_ssize_t limit = PyLong_AsSsize_t(check);
    Py_DECREF(check);
    if (limit == -1 && PyErr_Occurred()) {
        return -1;
    }
    Py_ssize_t length = PyObject_Length(self->queue);
    if (length < 0) {
        return -1;
    }
    if (length >= limit) {
        PyObject *done = PyObject_CallMethodNoArgs(self->pipeline, S_more);
        if (done == NULL) {
            return -1;
        }
        Py_DECREF(done);
    }
    return 0;
}

static PyObject *
process_end(ProcessSpans *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "end(handle, error=None, outcome='processed')");
        return NULL;
    }
    PyObject *handle = args[0];
    PyObject *error = nargs > 1 ? args[1] : Py_None;
    if (error != Py_None || nargs < 3 || !PyObject_TypeCheck(handle, &HandleFieldsType)) {
        return PyObject_Vectorcall(self->slow_end, args, (size_t)nargs, NULL);
    }
    PyObject *outcome = args[2];
    HandleFields *h = (HandleFields *)handle;
    if (h->_token != Py_None) {
        PyObject *token = h->_token;
        h->_token = Py_NewRef(Py_None);
        if (PyContextVar_Reset(self->var, token) < 0) {
            /* made in another context: Tracing.end_process tries again and logs it */
            PyErr_Clear();
            Py_SETREF(h->_token, token);
            return PyObject_Vectorcall(self->slow_end, args, (size_t)nargs, NULL);
        }
        Py_DECREF(token);
    }
    PyObject *span = h->span;
    if ((PyObject *)Py_TYPE(span) != self->span_type) {
        return PyObject_Vectorcall(self->slow_end, args, (size_t)nargs, NULL);
    }
    SpanFields *s = (SpanFields *)span;
    int ended = PyObject_IsTrue(s->end_time);
    if (ended < 0) {
        return NULL;
    }
    if (s->recorder == Py_None || ended) {
        Py_RETURN_NONE;
    }
    if (s->layout == Py_None) { /* an attribute of the layout was set: all are in extra */
        return PyObject_Vectorcall(self->slow_end, args, (size_t)nargs, NULL);
    }
    if (PySequence_SetItem(s->values, 3, outcome) < 0) {
        return NULL;
    }
    struct timespec now;
    if (timespec_get(&now, TIME_UTC) == 0) {
        PyErr_SetString(PyExc_OSError, "timespec_get failed");
        return NULL;
    }
    PyObject *end = PyLong_FromLongLong((long long)now.tv_sec * 1000000000LL + now.tv_nsec);
    if (end == NULL) {
        return NULL;
    }
    take(&s->end_time, end);
    if (queue_span(self, span) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* create(layout, parent): a create span (child of parent), started and ended, and its
 * traceparent: (span, traceparent). */
static PyObject *
process_create(ProcessSpans *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "create(layout, parent)");
        return NULL;
    }
    PyObject *span = start_span_of((PyTypeObject *)self->span_type, self->recorder, args[0],
                                   args[1], EMPTY_TUPLE, Py_None);
    if (span == NULL) {
        return NULL;
    }
    SpanFields *s = (SpanFields *)span;
    if (s->recorder != Py_None) { /* Span.end: the end time, then into the queue */
        Py_INCREF(s->start_time);
        take(&s->end_time, s->start_time); /* started and ended at once */
        if (queue_span(self, span) < 0) {
            Py_DECREF(span);
            return NULL;
        }
    }
    PyObject *traceparent = traceparent_text(s);
    if (traceparent == NULL) {
        Py_DECREF(span);
        return NULL;
    }
    PyObject *pair = PyTuple_Pack(2, span, traceparent);
    Py_DECREF(span);
    Py_DECREF(traceparent);
    return pair;
}


/* -- Starter: a function's handler attempts start their process span ---------------- */

typedef struct {
    PyObject_HEAD
    PyObject *spans; /* ProcessSpans */
    PyObject *function;
    vectorcallfunc vectorcall;
    PyTypeObject *ctx_type; /* the runtime's Context: its slots read and written directly */
    Py_ssize_t event_offset, attempt_offset, trace_offset;
} Starter;

static PyObject *S_event, *S_attempt, *S_trace;

static PyObject *process_start(ProcessSpans *self, PyObject *const *args, Py_ssize_t nargs);

/* starter(ctx): ctx.trace = the handle of a process span started for ctx.event and
 * ctx.attempt, made the current span (what FunctionObserver.start does). */
static PyObject *
starter_call(Starter *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "a starter takes one argument: ctx");
        return NULL;
    }
    PyObject *ctx = args[0];
    PyObject *event = slot_or_attr(ctx, self->ctx_type, self->event_offset, S_event);
    if (event == NULL) {
        return NULL;
    }
    PyObject *attempt = slot_or_attr(ctx, self->ctx_type, self->attempt_offset, S_attempt);
    if (attempt == NULL) {
        Py_DECREF(event);
        return NULL;
    }
    PyObject *start_args[4] = {self->function, event, attempt, Py_True};
    PyObject *handle = process_start((ProcessSpans *)self->spans, start_args, 4);
    Py_DECREF(event);
    Py_DECREF(attempt);
    if (handle == NULL) {
        return NULL;
    }
    if (Py_TYPE(ctx) == self->ctx_type && self->trace_offset >= 0) {
        PyObject *old = SLOT(ctx, self->trace_offset);
        SLOT(ctx, self->trace_offset) = handle;
        Py_XDECREF(old);
        Py_RETURN_NONE;
    }
    int failed = PyObject_SetAttr(ctx, S_trace, handle);
    Py_DECREF(handle);
    if (failed < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

#define STARTER_FIELDS(X) X(spans) X(function) X(ctx_type)

GC_FUNCTIONS(starter, Starter, STARTER_FIELDS)

static PyTypeObject StarterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nerve._speedups.Starter",
    .tp_doc = "starter(ctx): a handler attempt's process span, started (in C).",
    .tp_basicsize = sizeof(Starter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Starter, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_dealloc = (destructor)starter_dealloc,
    .tp_traverse = (traverseproc)starter_traverse,
    .tp_clear = (inquiry)starter_clear,
};

static PyObject *
process_starter(ProcessSpans *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyUnicode_Check(args[0]) || !PyType_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "starter(function: str, ctx_type: type)");
        return NULL;
    }
    PyTypeObject *ctx_type = (PyTypeObject *)args[1];
    Starter *starter = PyObject_GC_New(Starter, &StarterType);
    if (starter == NULL) {
        return NULL;
    }
    starter->spans = Py_NewRef((PyObject *)self);
    starter->function = Py_NewRef(args[0]);
    starter->vectorcall = (vectorcallfunc)starter_call;
    starter->ctx_type = (PyTypeObject *)Py_NewRef(ctx_type);
    starter->event_offset = slot_offset(ctx_type, "event");
    starter->attempt_offset = slot_offset(ctx_type, "attempt");
    starter->trace_offset = slot_offset(ctx_type, "trace");
    PyObject_GC_Track(starter);
    return (PyObject *)starter;
}

/* -- Ender: a function's handler attempts end (their metrics, then their span) -------- */

typedef struct {
    PyObject_HEAD
    PyObject *spans; /* ProcessSpans */
    PyObject *count; /* the metrics of an attempt (MetricsEnd or its Python twin), or None */
    vectorcallfunc vectorcall;
    PyTypeObject *ctx_type; /* the runtime's Context: its trace slot read directly */
    Py_ssize_t trace_offset;
} Ender;

/* ender(ctx, seconds, outcome, error=None): count(ctx, seconds, outcome) when metrics
 * are on, then the process span of ctx.trace (if any) ended with error and outcome
 * (what FunctionObserver._end does). */
static PyObject *
ender_call(Ender *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 3 || nargs > 4 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "an ender takes ctx, seconds, outcome[, error]");
        return NULL;
    }
    PyObject *ctx = args[0];
    if (self->count != Py_None) {
        PyObject *counted = PyObject_Vectorcall(self->count, args, 3, NULL);
        if (counted == NULL) {
            return NULL;
        }
        Py_DECREF(counted);
    }
    PyObject *handle = slot_or_attr(ctx, self->ctx_type, self->trace_offset, S_trace);
    if (handle == NULL) {
        return NULL;
    }
    if (handle == Py_None) {
        Py_DECREF(handle);
        Py_RETURN_NONE;
    }
    PyObject *end_args[3] = {handle, nargs > 3 ? args[3] : Py_None, args[2]};
    PyObject *ended = process_end((ProcessSpans *)self->spans, end_args, 3);
    Py_DECREF(handle);
    return ended;
}

#define ENDER_FIELDS(X) X(spans) X(count) X(ctx_type)

GC_FUNCTIONS(ender, Ender, ENDER_FIELDS)

static PyTypeObject EnderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nerve._speedups.Ender",
    .tp_doc = "ender(ctx, seconds, outcome, error=None): an attempt's metrics and process "
              "span, ended (in C).",
    .tp_basicsize = sizeof(Ender),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Ender, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_dealloc = (destructor)ender_dealloc,
    .tp_traverse = (traverseproc)ender_traverse,
    .tp_clear = (inquiry)ender_clear,
};

static PyObject *
process_ender(ProcessSpans *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyType_Check(args[1])
        || (args[0] != Py_None && !PyCallable_Check(args[0]))) {
        PyErr_SetString(PyExc_TypeError, "ender(count: callable | None, ctx_type: type)");
        return NULL;
    }
    PyTypeObject *ctx_type = (PyTypeObject *)args[1];
    Ender *ender = PyObject_GC_New(Ender, &EnderType);
    if (ender == NULL) {
        return NULL;
    }
    ender->spans = Py_NewRef((PyObject *)self);
    ender->count = Py_NewRef(args[0]);
    ender->vectorcall = (vectorcallfunc)ender_call;
    ender->ctx_type = (PyTypeObject *)Py_NewRef(ctx_type);
    ender->trace_offset = slot_offset(ctx_type, "trace");
    PyObject_GC_Track(ender);
    return (PyObject *)ender;
}

static PyMethodDef process_methods[] = {
    {"start", (PyCFunction)(void (*)(void))process_start, METH_FASTCALL,
     "start(function, event, attempt, current): Tracing.start_process, in C."},
    {"end", (PyCFunction)(void (*)(void))process_end, METH_FASTCALL,
     "end(handle, error=None, outcome='processed'): Tracing.end_process, in C."},
    {"starter", (PyCFunction)(void (*)(void))process_starter, METH_FASTCALL,
     "starter(function, ctx_type): a callable that starts the process span of its ctx."},
    {"ender", (PyCFunction)(void (*)(void))process_ender, METH_FASTCALL,
     "ender(count, ctx_type): a callable that counts an attempt and ends its span."},
    {"create", (PyCFunction)(void (*)(void))process_create, METH_FASTCALL,
     "create(layout, parent): a create span, started and ended; (span, traceparent)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ProcessSpansType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nerve._speedups.ProcessSpans",
    .tp_doc = "A handler attempt's process span, started and ended in C.",
    .tp_basicsize = sizeof(ProcessSpans),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = process_new,
    .tp_dealloc = (destructor)process_dealloc,
    .tp_traverse = (traverseproc)process_traverse,
    .tp_clear = (inquiry)process_clear,
    .tp_methods = process_methods,
};



/* -- decoding -------------------------------------------------------------------- */

/* extension_names(extra, attributes): the keys of the dict `attributes` that are in
 * the set `extra`, in the dict's order (a CloudEvents document's extensions, in the
 * order the document has them); stops once it found len(extra). */
static PyObject *
extension_names(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyAnySet_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "extension_names(extra: set, attributes: dict)");
        return NULL;
    }
    PyObject *extra = args[0], *attributes = args[1];
    Py_ssize_t wanted = PySet_GET_SIZE(extra), position = 0;
    PyObject *names = PyList_New(0), *key, *value;
    if (names == NULL) {
        return NULL;
    }
    while (PyList_GET_SIZE(names) < wanted && PyDict_Next(attributes, &position, &key, &value)) {
        int found = PySet_Contains(extra, key);
        if (found < 0 || (found && PyList_Append(names, key) < 0)) {
            Py_DECREF(names);
            return NULL;
        }
    }
    return names;
}

/* -- W3C traceparent text and traced copies of events ------------------------------ */

static const char HEXDIGITS[] = "0123456789abcdef";

static void
put_hex(Py_UCS1 *p, uint64_t n, int digits)
{
    for (int i = digits - 1; i >= 0; i--) {
        p[i] = (Py_UCS1)HEXDIGITS[n & 0xf];
        n >>= 4;
    }
}

/* "00-<trace id>-<span id>-<flags>" of a started SpanFields */
static PyObject *
traceparent_text(SpanFields *span)
{
    uint64_t hi, lo, id, flags;
    if (as_u128(span->trace_id, &hi, &lo) || as_u64(span->span_id, &id)
        || as_u64(span->flags, &flags)) {
        return NULL;
    }
    PyObject *text = PyUnicode_New(55, 127);
    if (text == NULL) {
        return NULL;
    }
    Py_UCS1 *p = PyUnicode_1BYTE_DATA(text);
    p[0] = '0';
    p[1] = '0';
    p[2] = '-';
    put_hex(p + 3, hi, 16);
    put_hex(p + 19, lo, 16);
    p[35] = '-';
    put_hex(p + 36, id, 16);
    p[52] = '-';
    put_hex(p + 53, flags & 0xff, 2);
    return text;
}

static PyObject *
span_traceparent(PyObject *module, PyObject *span)
{
    (void)module;
    if (!PyObject_TypeCheck(span, &SpanFieldsType)) {
        PyErr_SetString(PyExc_TypeError, "span_traceparent(span: SpanFields)");
        return NULL;
    }
    return traceparent_text((SpanFields *)span);
}

/* The event class whose exact instances traced_copy copies, and its slots' offsets
 * (read from its member descriptors by register_event). */
static PyObject *S_copy;

static PyObject *
register_event(PyObject *module, PyObject *type)
{
    (void)module;
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "register_event(Event)");
        return NULL;
    }
    PyObject *slots = PyObject_GetAttrString(type, "__slots__");
    if (slots == NULL) {
        return NULL;
    }
    PyObject *names = PySequence_Tuple(slots);
    Py_DECREF(slots);
    if (names == NULL) {
        return NULL;
    }
    if (PyTuple_GET_SIZE(names) != EVENT_SLOTS) {
        Py_DECREF(names);
        PyErr_Format(PyExc_TypeError, "an event class with %d slots expected", EVENT_SLOTS);
        return NULL;
    }
    Py_ssize_t offsets[EVENT_SLOTS], named[EVENT_SLOTS];
    for (int f = 0; f < EVENT_SLOTS; f++) {
        named[f] = -1;
    }
    for (Py_ssize_t i = 0; i < EVENT_SLOTS; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        PyObject *descr = PyDict_GetItemWithError(((PyTypeObject *)type)->tp_dict, name);
        if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)
            || ((PyMemberDescrObject *)descr)->d_member->type != Py_T_OBJECT_EX) {
            Py_DECREF(names);
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "the event's slots must be plain slots");
            }
            return NULL;
        }
        offsets[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        for (int f = 0; f < EVENT_SLOTS; f++) {
            if (PyUnicode_CompareWithASCIIString(name, EVENT_FIELDS[f]) == 0) {
                named[f] = offsets[i];
            }
        }
    }
    Py_DECREF(names);
    if (named[F_EXTENSIONS] < 0 || named[F_TYPE] < 0 || named[F_ID] < 0) {
        PyErr_SetString(PyExc_TypeError, "the event class has no type, id or extensions slot");
        return NULL;
    }
    memcpy(EVENT_OFFSETS, offsets, sizeof offsets);
    int all_named = 1;
    for (int f = 0; f < EVENT_SLOTS; f++) {
        all_named &= named[f] >= 0;
    }
    if (all_named) {
        memcpy(FIELD_OFFSETS, named, sizeof named);
    }
    else {
        FIELD_OFFSETS[0] = -1; /* plain_event then builds nothing */
    }
    EXTENSIONS_OFFSET = named[F_EXTENSIONS];
    TYPE_OFFSET = named[F_TYPE];
    ID_OFFSET = named[F_ID];
    Py_XSETREF(EVENT_TYPE, (PyTypeObject *)Py_NewRef(type));
    Py_RETURN_NONE;
}

/* traced_copy(event, traceparent, tracestate): a copy of an event of the registered
 * class (exactly) with its traceparent (and tracestate, when not "") extensions set:
 * what event.with_extensions(traceparent=..., tracestate=...) makes, without the
 * ten attribute stores and checks (the event was checked when it was made; these two
 * extensions' names and string values are valid). */
static PyObject *
traced_copy(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3 || EVENT_TYPE == NULL || Py_TYPE(args[0]) != EVENT_TYPE
        || !PyUnicode_CheckExact(args[1]) || !PyUnicode_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "traced_copy(event: Event, traceparent: str, "
                                         "tracestate: str) of a registered event class");
        return NULL;
    }
    PyObject *event = args[0];
    PyObject *proxy = *(PyObject **)((char *)event + EXTENSIONS_OFFSET);
    if (proxy == NULL) {
        PyErr_SetString(PyExc_AttributeError, "extensions");
        return NULL;
    }
    PyObject *merged = PyObject_CallMethodNoArgs(proxy, S_copy);
    if (merged == NULL) {
        return NULL;
    }
    if (!PyDict_Check(merged) || PyDict_SetItem(merged, S_traceparent, args[1]) < 0
        || (PyUnicode_GET_LENGTH(args[2]) && PyDict_SetItem(merged, S_tracestate, args[2]) < 0)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "extensions.copy() must give a dict");
        }
        Py_DECREF(merged);
        return NULL;
    }
    PyObject *extensions = PyDictProxy_New(merged);
    Py_DECREF(merged);
    if (extensions == NULL) {
        return NULL;
    }
    PyObject *copy = EVENT_TYPE->tp_alloc(EVENT_TYPE, 0);
    if (copy == NULL) {
        Py_DECREF(extensions);
        return NULL;
    }
    for (int i = 0; i < EVENT_SLOTS; i++) {
        Py_ssize_t offset = EVENT_OFFSETS[i];
        if (offset != EXTENSIONS_OFFSET) {
            PyObject *value = *(PyObject **)((char *)event + offset);
            *(PyObject **)((char *)copy + offset) = Py_XNewRef(value);
        }
    }
    *(PyObject **)((char *)copy + EXTENSIONS_OFFSET) = extensions;
    return copy;
}

/* Decoding: what register_decoding was given (nerve.event's _RESERVED, its set of
 * extension names checked already, datetime.fromisoformat and orjson.loads). */
static PyObject *D_reserved, *D_checked, *D_fromisoformat, *D_loads;
static PyObject *S_specversion, *S_time, *S_subject, *S_datacontenttype, *S_dataschema,
    *S_source, *S_tzinfo, *S_one_zero, *S_data, *S_data_base64;

static PyObject *
register_decoding(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4 || !PyAnySet_Check(args[0]) || !PySet_Check(args[1])
        || !PyCallable_Check(args[2]) || !PyCallable_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "register_decoding(reserved: frozenset, checked: set, "
                                         "fromisoformat, loads)");
        return NULL;
    }
    Py_XSETREF(D_reserved, Py_NewRef(args[0]));
    Py_XSETREF(D_checked, Py_NewRef(args[1]));
    Py_XSETREF(D_fromisoformat, Py_NewRef(args[2]));
    Py_XSETREF(D_loads, Py_NewRef(args[3]));
    Py_RETURN_NONE;
}

/* attributes[key] when it is absent, None or an exact str: 1 (value borrowed, NULL for
 * absent or None); 0 when it is anything else; -1 on error. */
static int
optional_text(PyObject *attributes, PyObject *key, PyObject **value)
{
    PyObject *found = PyDict_GetItemWithError(attributes, key);
    if (found == NULL) {
        *value = NULL;
        return PyErr_Occurred() ? -1 : 1;
    }
    if (found == Py_None) {
        *value = NULL;
        return 1;
    }
    *value = found;
    return PyUnicode_CheckExact(found) ? 1 : 0;
}

/* attributes[key] when it is a non-empty exact str (borrowed), else NULL (an error set
 * only if the look-up failed). */
static PyObject *
required_text(PyObject *attributes, PyObject *key)
{
    PyObject *found = PyDict_GetItemWithError(attributes, key);
    if (found != NULL && PyUnicode_CheckExact(found) && PyUnicode_GET_LENGTH(found) > 0) {
        return found;
    }
    return NULL;
}

/* plain_event(attributes, data): the event from_attributes(attributes, data) builds,
 * when attributes is a dict with non-empty str id, source and type, specversion "1.0",
 * subject, datacontenttype and dataschema absent, None or str, time absent, None or
 * an RFC 3339 str with an offset, and every other key (not reserved) None or a str
 * under a name checked already; else None, and from_attributes does the work (and
 * raises its errors) in Python. */
static PyObject *
plain_event(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "plain_event(attributes, data)");
        return NULL;
    }
    PyObject *attributes = args[0], *data = args[1];
    if (EVENT_TYPE == NULL || FIELD_OFFSETS[0] < 0 || D_reserved == NULL
        || !PyDict_CheckExact(attributes)) {
        Py_RETURN_NONE;
    }
    PyObject *id = required_text(attributes, S_id);
    PyObject *source = id ? required_text(attributes, S_source) : NULL;
    PyObject *type = source ? required_text(attributes, S_type) : NULL;
    if (type == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject *version = PyDict_GetItemWithError(attributes, S_specversion);
    if (version == NULL || !PyUnicode_CheckExact(version)
        || PyUnicode_Compare(version, S_one_zero) != 0) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject *subject, *content_type, *schema, *time_text;
    int plain;
    if ((plain = optional_text(attributes, S_subject, &subject)) != 1
        || (plain = optional_text(attributes, S_datacontenttype, &content_type)) != 1
        || (plain = optional_text(attributes, S_dataschema, &schema)) != 1
        || (plain = optional_text(attributes, S_time, &time_text)) != 1) {
        if (plain < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject *when = NULL;
    if (time_text != NULL) {
        when = PyObject_CallOneArg(D_fromisoformat, time_text);
        if (when == NULL) { /* not RFC 3339: Python says what is wrong */
            PyErr_Clear();
            Py_RETURN_NONE;
        }
        PyObject *zone = PyObject_GetAttr(when, S_tzinfo);
        if (zone == NULL) {
            Py_DECREF(when);
            return NULL;
        }
        Py_DECREF(zone);
        if (zone == Py_None) { /* no offset: refused, in Python */
            Py_DECREF(when);
            Py_RETURN_NONE;
        }
    }
    PyObject *extensions = PyDict_New();
    if (extensions == NULL) {
        Py_XDECREF(when);
        return NULL;
    }
    Py_ssize_t at = 0;
    PyObject *key, *value;
    while (PyDict_Next(attributes, &at, &key, &value)) {
        if (!PyUnicode_CheckExact(key)) {
            /* another kind of key: its hash or comparison could run Python code that
             * changes the dict under this loop; Python handles it */
            goto not_plain;
        }
        int reserved = PySet_Contains(D_reserved, key);
        if (reserved < 0) {
            goto fail;
        }
        if (reserved || value == Py_None) {
            continue;
        }
        int checked = PyUnicode_CheckExact(value) ? PySet_Contains(D_checked, key) : 0;
        if (checked < 0) {
            goto fail;
        }
        if (!checked) { /* a name or value Python must check first */
            goto not_plain;
        }
        if (PyDict_SetItem(extensions, key, value) < 0) {
            goto fail;
        }
    }
    PyObject *proxy = PyDictProxy_New(extensions);
    Py_DECREF(extensions);
    if (proxy == NULL) {
        Py_XDECREF(when);
        return NULL;
    }
    PyObject *event = EVENT_TYPE->tp_alloc(EVENT_TYPE, 0);
    if (event == NULL) {
        Py_DECREF(proxy);
        Py_XDECREF(when);
        return NULL;
    }
#define FIELD(f) (*(PyObject **)((char *)event + FIELD_OFFSETS[f]))
    FIELD(F_TYPE) = Py_NewRef(type);
    FIELD(F_SOURCE) = Py_NewRef(source);
    FIELD(F_ID) = Py_NewRef(id);
    FIELD(F_SPECVERSION) = Py_NewRef(S_one_zero);
    FIELD(F_TIME) = when != NULL ? when : Py_NewRef(Py_None);
    FIELD(F_SUBJECT) = Py_NewRef(subject != NULL ? subject : Py_None);
    FIELD(F_CONTENTTYPE) = Py_NewRef(content_type != NULL ? content_type : Py_None);
    FIELD(F_SCHEMA) = Py_NewRef(schema != NULL ? schema : Py_None);
    FIELD(F_DATA) = Py_NewRef(data);
    FIELD(F_EXTENSIONS) = proxy;
#undef FIELD
    return event;
not_plain:
    Py_DECREF(extensions);
    Py_XDECREF(when);
    Py_RETURN_NONE;
fail:
    Py_DECREF(extensions);
    Py_XDECREF(when);
    return NULL;
}

/* decode_document(raw): for exact bytes holding a JSON object with no "data_base64"
 * whose attributes plain_event builds, that event (its data: the document's "data",
 * None when absent), what nerve.event.decode returns for them. Otherwise the parsed
 * document, for the Python code to build or refuse (it is not parsed twice), or None
 * when raw is not bytes, loads refused it or an error happened: the Python code then
 * parses it again and raises the error it gives every caller. */
static PyObject *
decode_document(PyObject *module, PyObject *raw)
{
    if (D_loads == NULL || !PyBytes_CheckExact(raw)) {
        Py_RETURN_NONE;
    }
    PyObject *doc = PyObject_CallOneArg(D_loads, raw);
    if (doc == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (!PyDict_CheckExact(doc)) {
        return doc;
    }
    int binary = PyDict_Contains(doc, S_data_base64);
    if (binary != 0) {
        if (binary < 0) {
            PyErr_Clear();
            Py_DECREF(doc);
            Py_RETURN_NONE;
        }
        return doc;
    }
    PyObject *data = PyDict_GetItemWithError(doc, S_data);
    if (data == NULL && PyErr_Occurred()) {
        PyErr_Clear();
        Py_DECREF(doc);
        Py_RETURN_NONE;
    }
    PyObject *args[2] = {doc, data != NULL ? data : Py_None};
    PyObject *event = plain_event(module, args, 2);
    if (event == NULL) {
        PyErr_Clear();
        Py_DECREF(doc);
        Py_RETURN_NONE;
    }
    if (event == Py_None) {
        Py_DECREF(event);
        return doc;
    }
    Py_DECREF(doc);
    return event;
}

/* -- NATS message headers ------------------------------------------------------------ */

/* bytes.strip()'s whitespace, and str.isspace() of an ASCII character */
static int
bytes_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c;
}

static int
text_space(unsigned char c)
{
    return bytes_space(c) || (c >= 0x1c && c <= 0x1f);
}

/* nats_headers(raw): what nats-py's Client._parse_header_lines(raw) returns (its lines
 * split on CRLF; each "name: value" with the name stripped, ASCII and without
 * whitespace, the value stripped and decoded as UTF-8 with replacement; a later name
 * wins), in one pass instead of Python steps per line and per character. */
static PyObject *
nats_headers(PyObject *module, PyObject *raw)
{
    (void)module;
    if (!PyBytes_Check(raw)) {
        PyErr_SetString(PyExc_TypeError, "nats_headers(raw: bytes)");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(raw);
    Py_ssize_t n = PyBytes_GET_SIZE(raw);
    PyObject *out = PyDict_New();
    if (out == NULL) {
        return NULL;
    }
    Py_ssize_t start = 0;
    while (start < n) {
        Py_ssize_t end = start;
        while (end + 1 < n && !(p[end] == '\r' && p[end + 1] == '\n')) {
            end++;
        }
        if (end + 1 >= n) {
            end = n; /* the last line runs to the end */
        }
        Py_ssize_t next = end + 2;
        Py_ssize_t colon = start;
        while (colon < end && p[colon] != ':') {
            colon++;
        }
        if (colon < end) {
            Py_ssize_t a = start, b = colon; /* the name, stripped */
            while (a < b && bytes_space(p[a])) {
                a++;
            }
            while (b > a && bytes_space(p[b - 1])) {
                b--;
            }
            int usable = 1;
            for (Py_ssize_t i = a; i < b && usable; i++) {
                usable = p[i] < 0x80 && !text_space(p[i]);
            }
            if (usable) {
                Py_ssize_t c = colon + 1, d = end; /* the value, stripped */
                while (c < d && bytes_space(p[c])) {
                    c++;
                }
                while (d > c && bytes_space(p[d - 1])) {
                    d--;
                }
                PyObject *key = PyUnicode_DecodeASCII((const char *)p + a, b - a, NULL);
                PyObject *value = key == NULL ? NULL
                                              : PyUnicode_DecodeUTF8((const char *)p + c, d - c,
                                                                     "replace");
                if (value == NULL || PyDict_SetItem(out, key, value) < 0) {
                    Py_XDECREF(key);
                    Py_XDECREF(value);
                    Py_DECREF(out);
                    return NULL;
                }
                Py_DECREF(key);
                Py_DECREF(value);
            }
        }
        start = next;
    }
    return out;
}

/* -- MetricsEnd: an attempt's metrics, in C for a handler attempt that succeeded ------ */

#define MAX_BOUNDS 64

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *duration;  /* the duration histogram (Buckets): its sum */
    PyObject *counts;    /* its counts: a list of len(bounds) + 1 ints */
    PyObject *processed; /* dict: event type -> attempts processed */
    PyObject *slow;      /* the Python end: every other case */
    Py_ssize_t nbounds;
    double bounds[MAX_BOUNDS];
} MetricsEnd;

static PyObject *S_sum, *S_processed;

/* count(ctx, seconds, outcome[, error]): for outcome 'processed', float seconds and no
 * error argument, what FunctionObserver._counted does (the duration bucketed as
 * bisect_left does, its sum, the type's processed count); anything else goes to it. */
static PyObject *
metrics_end_call(MetricsEnd *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 3 || kwnames != NULL || !PyFloat_CheckExact(args[1])
        || !PyUnicode_Check(args[2])
        || (args[2] != S_processed && PyUnicode_Compare(args[2], S_processed) != 0)
        || PyList_GET_SIZE(self->counts) != self->nbounds + 1) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
    }
    double seconds = PyFloat_AS_DOUBLE(args[1]);
    Py_ssize_t lo = 0, hi = self->nbounds; /* bisect_left */
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (self->bounds[mid] < seconds) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    PyObject *count = PyNumber_Add(PyList_GET_ITEM(self->counts, lo), ONE);
    if (count == NULL) {
        return NULL;
    }
    PyList_SetItem(self->counts, lo, count); /* steals count */
    PyObject *sum = PyObject_GetAttr(self->duration, S_sum);
    if (sum == NULL) {
        return NULL;
    }
    Py_SETREF(sum, PyNumber_InPlaceAdd(sum, args[1]));
    if (sum == NULL || PyObject_SetAttr(self->duration, S_sum, sum) < 0) {
        Py_XDECREF(sum);
        return NULL;
    }
    Py_DECREF(sum);
    PyObject *event = PyObject_GetAttr(args[0], S_event);
    if (event == NULL) {
        return NULL;
    }
    PyObject *type_name = slot_or_attr(event, EVENT_TYPE, TYPE_OFFSET, S_type);
    Py_DECREF(event);
    if (type_name == NULL) {
        return NULL;
    }
    PyObject *seen = PyDict_GetItemWithError(self->processed, type_name);
    if (seen == NULL && PyErr_Occurred()) {
        Py_DECREF(type_name);
        return NULL;
    }
    PyObject *total = seen == NULL ? Py_NewRef(ONE) : PyNumber_Add(seen, ONE);
    int failed = total == NULL || PyDict_SetItem(self->processed, type_name, total) < 0;
    Py_XDECREF(total);
    Py_DECREF(type_name);
    if (failed) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
metrics_end_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"duration", "processed", "slow", NULL};
    PyObject *duration, *processed, *slow;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!O:MetricsEnd", names, &duration,
                                     &PyDict_Type, &processed, &slow)) {
        return NULL;
    }
    if (!PyCallable_Check(slow)) {
        PyErr_SetString(PyExc_TypeError, "MetricsEnd: slow must be callable");
        return NULL;
    }
    PyObject *bounds = PyObject_GetAttrString(duration, "bounds");
    PyObject *counts = PyObject_GetAttrString(duration, "counts");
    MetricsEnd *self = NULL;
    if (bounds == NULL || counts == NULL) {
        goto done;
    }
    if (!PyTuple_Check(bounds) || PyTuple_GET_SIZE(bounds) > MAX_BOUNDS || !PyList_Check(counts)
        || PyList_GET_SIZE(counts) != PyTuple_GET_SIZE(bounds) + 1) {
        PyErr_SetString(PyExc_TypeError, "MetricsEnd: a histogram of at most 64 float bounds "
                                         "(a tuple) and their counts (a list, one more)");
        goto done;
    }
    self = (MetricsEnd *)type->tp_alloc(type, 0);
    if (self == NULL) {
        goto done;
    }
    self->nbounds = PyTuple_GET_SIZE(bounds);
    for (Py_ssize_t i = 0; i < self->nbounds; i++) {
        PyObject *bound = PyTuple_GET_ITEM(bounds, i);
        if (!PyFloat_CheckExact(bound)) { /* an int bound compares as Python compares it */
            PyErr_SetString(PyExc_TypeError, "MetricsEnd: the bounds must be floats");
            Py_CLEAR(self);
            goto done;
        }
        self->bounds[i] = PyFloat_AS_DOUBLE(bound);
    }
    self->vectorcall = (vectorcallfunc)metrics_end_call;
    self->duration = Py_NewRef(duration);
    self->counts = Py_NewRef(counts);
    self->processed = Py_NewRef(processed);
    self->slow = Py_NewRef(slow);
done:
    Py_XDECREF(bounds);
    Py_XDECREF(counts);
    return (PyObject *)self;
}

#define METRICS_END_FIELDS(X) X(duration) X(counts) X(processed) X(slow)

GC_FUNCTIONS(metrics_end, MetricsEnd, METRICS_END_FIELDS)

static PyTypeObject MetricsEndType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nerve._speedups.MetricsEnd",
    .tp_doc = "MetricsEnd(duration, processed, slow)(ctx, seconds, outcome, error=None): an "
              "attempt's metrics (FunctionObserver._counted), in C for a processed attempt.",
    .tp_basicsize = sizeof(MetricsEnd),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(MetricsEnd, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = metrics_end_new,
    .tp_dealloc = (destructor)metrics_end_dealloc,
    .tp_traverse = (traverseproc)metrics_end_traverse,
    .tp_clear = (inquiry)metrics_end_clear,
};

static PyMethodDef methods[] = {
    {"parse_traceparent", (PyCFunction)parse_traceparent, METH_O,
     "A W3C traceparent as (trace_id, span_id, sampled, '', True); None when invalid."},
    {"encode_span", (PyCFunction)(void (*)(void))encode_span, METH_FASTCALL,
     "One span as an OTLP ScopeSpans.spans field."},
    {"encode_spans", (PyCFunction)(void (*)(void))encode_spans, METH_FASTCALL,
     "Spans as OTLP ScopeSpans.spans fields (detailed(span) for a detailed one)."},
    {"extension_names", (PyCFunction)(void (*)(void))extension_names, METH_FASTCALL,
     "The keys of a dict that are in a set, in the dict's order."},
    {"span_traceparent", (PyCFunction)span_traceparent, METH_O,
     "The W3C traceparent of a started span."},
    {"register_event", (PyCFunction)register_event, METH_O,
     "The event class traced_copy copies (its slots' offsets are read once)."},
    {"register_decoding", (PyCFunction)(void (*)(void))register_decoding, METH_FASTCALL,
     "What plain_event checks against: reserved names, checked extension names, the "
     "time parser; and the JSON parser decode_document calls."},
    {"plain_event", (PyCFunction)(void (*)(void))plain_event, METH_FASTCALL,
     "The event from_attributes builds from plain attributes; None for anything else."},
    {"nats_headers", (PyCFunction)nats_headers, METH_O,
     "nats-py's Client._parse_header_lines(raw), in C."},
    {"decode_document", (PyCFunction)decode_document, METH_O,
     "The event decode returns for raw bytes of a plain document; else the parsed "
     "document, or None."},
    {"traced_copy", (PyCFunction)(void (*)(void))traced_copy, METH_FASTCALL,
     "A copy of an event with its traceparent and tracestate extensions set."},
    {"start_span", (PyCFunction)(void (*)(void))start_span, METH_FASTCALL,
     "A started span of span_type: random ids, sampled as its parent is, the clock."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_speedups", "nerve's tracing hot path, in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    memset(HEX, -1, sizeof HEX);
    for (int c = '0'; c <= '9'; c++) {
        HEX[c] = (signed char)(c - '0');
    }
    for (int c = 'a'; c <= 'f'; c++) {
        HEX[c] = (signed char)(c - 'a' + 10);
    }
#define INTERN(var, text)                                                                  \
    if ((var = PyUnicode_InternFromString(text)) == NULL) {                                \
        return NULL;                                                                       \
    }
    INTERN(EMPTY, "")
    INTERN(S_trace_id, "trace_id")
    INTERN(S_span_id, "span_id")
    INTERN(S_parent_id, "parent_id")
    INTERN(S_remote, "remote")
    INTERN(S_start_time, "start_time")
    INTERN(S_end_time, "end_time")
    INTERN(S_values, "values")
    INTERN(S_type, "type")
    INTERN(S_copy, "copy")
    INTERN(S_specversion, "specversion")
    INTERN(S_time, "time")
    INTERN(S_subject, "subject")
    INTERN(S_datacontenttype, "datacontenttype")
    INTERN(S_dataschema, "dataschema")
    INTERN(S_source, "source")
    INTERN(S_tzinfo, "tzinfo")
    INTERN(S_one_zero, "1.0")
    INTERN(S_data, "data")
    INTERN(S_data_base64, "data_base64")
    INTERN(S_event, "event")
    INTERN(S_attempt, "attempt")
    INTERN(S_trace, "trace")
    INTERN(S_head, "head")
    INTERN(S_prefixes, "prefixes")
    INTERN(S_id, "id")
    INTERN(S_extensions, "extensions")
    INTERN(S_correlationid, "correlationid")
    INTERN(S_traceparent, "traceparent")
    INTERN(S_tracestate, "tracestate")
    INTERN(S_append, "append")
    INTERN(S_check, "_check")
    INTERN(S_more, "_more")
    INTERN(S_write, "_write")
    INTERN(S_sum, "sum")
    INTERN(S_processed, "processed")
    INTERN(S_add, "add")
#undef INTERN
    if ((SIXTY_FOUR = PyLong_FromLong(64)) == NULL || (BITS_64 = PyLong_FromLong(64)) == NULL
        || (BITS_128 = PyLong_FromLong(128)) == NULL || (ZERO = PyLong_FromLong(0)) == NULL
        || (ONE = PyLong_FromLong(1)) == NULL || (EMPTY_TUPLE = PyTuple_New(0)) == NULL) {
        return NULL;
    }
    PyObject *random = PyImport_ImportModule("random");
    if (random == NULL) {
        return NULL;
    }
    GETRANDBITS = PyObject_GetAttrString(random, "getrandbits");
    Py_DECREF(random);
    if (GETRANDBITS == NULL || PyType_Ready(&SpanFieldsType) < 0
        || PyType_Ready(&HandleFieldsType) < 0 || PyType_Ready(&ProcessSpansType) < 0
        || PyType_Ready(&StarterType) < 0 || PyType_Ready(&SpanWriterType) < 0
        || PyType_Ready(&MetricsEndType) < 0 || PyType_Ready(&EnderType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "SpanFields", (PyObject *)&SpanFieldsType) < 0
        || PyModule_AddObjectRef(module, "HandleFields", (PyObject *)&HandleFieldsType) < 0
        || PyModule_AddObjectRef(module, "ProcessSpans", (PyObject *)&ProcessSpansType) < 0
        || PyModule_AddObjectRef(module, "SpanWriter", (PyObject *)&SpanWriterType) < 0
        || PyModule_AddObjectRef(module, "MetricsEnd", (PyObject *)&MetricsEndType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "ABI", SPEEDUPS_ABI) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
