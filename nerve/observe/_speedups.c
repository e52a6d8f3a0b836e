/* nerve.observe._speedups: the per-span work of tracing, in C.
 *
 * Optional: built when the package is installed (hatch_build.py) where a C compiler
 * is at hand; nerve.observe.otlp and nerve.observe.tracing use it when it imports
 * and has the ABI they expect, else their pure-Python code, which gives the same
 * results (tests/observe/test_speedups.py checks both against each other).
 *
 * - parse_traceparent(value): a W3C traceparent (version 00 format, 55 characters)
 *   as the parent tuple (trace_id, span_id, sampled, "", True), None when invalid.
 * - encode_span(span, head, prefixes, other_value): one span that is not "detailed"
 *   as an OTLP ScopeSpans.spans field, the bytes OtlpEncoder writes for it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define SPEEDUPS_ABI 1

static signed char HEX[256];
static PyObject *EMPTY, *S_trace_id, *S_span_id, *S_parent_id, *S_remote, *S_start_time,
    *S_end_time, *S_values, *SIXTY_FOUR;

static PyObject *
u128(uint64_t hi, uint64_t lo)
{
    if (hi == 0) {
        return PyLong_FromUnsignedLongLong(lo);
    }
    unsigned char buf[16];
    for (int i = 0; i < 8; i++) {
        buf[i] = (unsigned char)(hi >> (56 - 8 * i));
        buf[8 + i] = (unsigned char)(lo >> (56 - 8 * i));
    }
#if PY_VERSION_HEX >= 0x030D0000
    return PyLong_FromUnsignedNativeBytes(buf, 16, Py_ASNATIVEBYTES_BIG_ENDIAN);
#else
    return _PyLong_FromByteArray(buf, 16, 0, 0);
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
    PyObject *span_id = PyLong_FromUnsignedLongLong(span);
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

static int
get_u64(PyObject *span, PyObject *name, uint64_t *out)
{
    PyObject *value = PyObject_GetAttr(span, name);
    if (value == NULL) {
        return -1;
    }
    unsigned long long n = PyLong_AsUnsignedLongLong(value);
    Py_DECREF(value);
    if (n == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    *out = (uint64_t)n;
    return 0;
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
    PyObject *span = args[0], *head = args[1], *prefixes = args[2], *other_value = args[3];
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
    PyObject *trace_id = PyObject_GetAttr(span, S_trace_id);
    if (trace_id == NULL) {
        return NULL;
    }
    lo = (uint64_t)PyLong_AsUnsignedLongLongMask(trace_id);
    if (lo == (uint64_t)-1 && PyErr_Occurred()) {
        Py_DECREF(trace_id);
        return NULL;
    }
    PyObject *high = PyNumber_Rshift(trace_id, SIXTY_FOUR);
    Py_DECREF(trace_id);
    if (high == NULL) {
        return NULL;
    }
    hi = (uint64_t)PyLong_AsUnsignedLongLong(high); /* OverflowError: > 128 bits, < 0 */
    Py_DECREF(high);
    if (hi == (uint64_t)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (get_u64(span, S_span_id, &span_id) || get_u64(span, S_parent_id, &parent_id)
        || get_u64(span, S_start_time, &start) || get_u64(span, S_end_time, &end)) {
        return NULL;
    }
    int remote = 0;
    if (parent_id) {
        PyObject *r = PyObject_GetAttr(span, S_remote);
        if (r == NULL) {
            return NULL;
        }
        remote = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (remote < 0) {
            return NULL;
        }
    }
    seq = PyObject_GetAttr(span, S_values);
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
                  + 8;
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

static PyMethodDef methods[] = {
    {"parse_traceparent", (PyCFunction)parse_traceparent, METH_O,
     "A W3C traceparent as (trace_id, span_id, sampled, '', True); None when invalid."},
    {"encode_span", (PyCFunction)(void (*)(void))encode_span, METH_FASTCALL,
     "One span as an OTLP ScopeSpans.spans field."},
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
#undef INTERN
    if ((SIXTY_FOUR = PyLong_FromLong(64)) == NULL) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "ABI", SPEEDUPS_ABI) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
