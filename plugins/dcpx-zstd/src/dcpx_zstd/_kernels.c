/*
 * Compiled byte-grouping and 7-bit packing kernels for dcpx_zstd.
 *
 * These compute exactly what grouping.Layout.split/join and packing.pack/unpack compute
 * with numpy, byte for byte, but in one pass over memory instead of a dozen: the numpy
 * code streams every intermediate array through the cache, while each loop here reads
 * every input byte once and writes every output byte once.  The loops are plain C over
 * restrict pointers, shaped so that an optimising compiler vectorises them with the
 * baseline instruction set of the target (no intrinsics, no CPU dispatch).
 *
 * Words are little-endian whatever the host, as in the numpy code.  Only whole words are
 * handled here; the trailing partial word of a chunk stays with the Python caller.
 *
 * Every entry point releases the GIL around its loop: chunks are encoded and decoded by
 * many threads at once.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define KERNEL static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define KERNEL static __forceinline
#else
#define KERNEL static inline
#endif

#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define KERNELS_BIG_ENDIAN 1
#else
#define KERNELS_BIG_ENDIAN 0
#endif

/* ---------------------------------------------------------------------------------- */
/* Unaligned little-endian loads and stores.  memcpy compiles to a single (vector) load
 * or store; chunks and payloads sit at arbitrary offsets, so nothing is assumed aligned. */

KERNEL uint16_t ld16(const uint8_t *p)
{
#if KERNELS_BIG_ENDIAN
    return (uint16_t)(p[0] | (p[1] << 8));
#else
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
#endif
}

KERNEL uint32_t ld32(const uint8_t *p)
{
#if KERNELS_BIG_ENDIAN
    return (uint32_t)ld16(p) | ((uint32_t)ld16(p + 2) << 16);
#else
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
#endif
}

KERNEL uint64_t ld64(const uint8_t *p)
{
#if KERNELS_BIG_ENDIAN
    return (uint64_t)ld32(p) | ((uint64_t)ld32(p + 4) << 32);
#else
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
#endif
}

KERNEL void st16(uint8_t *p, uint16_t v)
{
#if KERNELS_BIG_ENDIAN
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
#else
    memcpy(p, &v, sizeof v);
#endif
}

KERNEL void st32(uint8_t *p, uint32_t v)
{
#if KERNELS_BIG_ENDIAN
    st16(p, (uint16_t)v);
    st16(p + 2, (uint16_t)(v >> 16));
#else
    memcpy(p, &v, sizeof v);
#endif
}

KERNEL void st64(uint8_t *p, uint64_t v)
{
#if KERNELS_BIG_ENDIAN
    st32(p, (uint32_t)v);
    st32(p + 4, (uint32_t)(v >> 32));
#else
    memcpy(p, &v, sizeof v);
#endif
}

/* Rotations within 16 bits; r = 0 gives x back (both halves are x itself), so the
 * integer layouts are the float ones with no rotation. */
KERNEL uint16_t rotl16(uint16_t x, unsigned r)
{
    return (uint16_t)((x << r) | (x >> ((16u - r) & 15u)));
}

KERNEL uint16_t rotr16(uint16_t x, unsigned r)
{
    return (uint16_t)((x >> r) | (x << ((16u - r) & 15u)));
}

/* ---------------------------------------------------------------------------------- */
/* Byte grouping.  Planes in storage order: [byte 0, ..., byte width-3, sign, head],
 * where sign/head are the low/high byte of the word's top 16 bits rotated left by r.
 * With r = 0 that is plain byte planes 0..width-1.
 *
 * Two-byte words are loaded whole and rotated in 16-bit lanes.  Wider words are read
 * byte by byte: the compiler turns those strided byte loads and stores into shuffles,
 * which measured 1.5-2x faster than narrowing whole 32- or 64-bit words per plane. */

KERNEL void split2(const uint8_t *restrict src, uint8_t *restrict sign, uint8_t *restrict head,
                   size_t n, unsigned r)
{
    for (size_t i = 0; i < n; i++) {
        uint16_t t = rotl16(ld16(src + 2 * i), r);
        sign[i] = (uint8_t)t;
        head[i] = (uint8_t)(t >> 8);
    }
}

KERNEL void join2(const uint8_t *restrict sign, const uint8_t *restrict head, uint8_t *restrict dst,
                  size_t n, unsigned r)
{
    for (size_t i = 0; i < n; i++) {
        uint16_t t = (uint16_t)(sign[i] | (head[i] << 8));
        st16(dst + 2 * i, rotr16(t, r));
    }
}

KERNEL void split4(const uint8_t *restrict src, uint8_t *restrict b0, uint8_t *restrict b1,
                   uint8_t *restrict sign, uint8_t *restrict head, size_t n, unsigned r)
{
    for (size_t i = 0; i < n; i++) {
        const uint8_t *w = src + 4 * i;
        uint16_t t = rotl16((uint16_t)(w[2] | (w[3] << 8)), r);
        b0[i] = w[0];
        b1[i] = w[1];
        sign[i] = (uint8_t)t;
        head[i] = (uint8_t)(t >> 8);
    }
}

KERNEL void join4(const uint8_t *restrict b0, const uint8_t *restrict b1, const uint8_t *restrict sign,
                  const uint8_t *restrict head, uint8_t *restrict dst, size_t n, unsigned r)
{
    for (size_t i = 0; i < n; i++) {
        uint8_t *w = dst + 4 * i;
        uint16_t t = rotr16((uint16_t)(sign[i] | (head[i] << 8)), r);
        w[0] = b0[i];
        w[1] = b1[i];
        w[2] = (uint8_t)t;
        w[3] = (uint8_t)(t >> 8);
    }
}

KERNEL void split8(const uint8_t *restrict src, uint8_t *restrict b0, uint8_t *restrict b1,
                   uint8_t *restrict b2, uint8_t *restrict b3, uint8_t *restrict b4,
                   uint8_t *restrict b5, uint8_t *restrict sign, uint8_t *restrict head,
                   size_t n, unsigned r)
{
    for (size_t i = 0; i < n; i++) {
        const uint8_t *w = src + 8 * i;
        uint16_t t = rotl16((uint16_t)(w[6] | (w[7] << 8)), r);
        b0[i] = w[0];
        b1[i] = w[1];
        b2[i] = w[2];
        b3[i] = w[3];
        b4[i] = w[4];
        b5[i] = w[5];
        sign[i] = (uint8_t)t;
        head[i] = (uint8_t)(t >> 8);
    }
}

KERNEL void join8(const uint8_t *restrict b0, const uint8_t *restrict b1, const uint8_t *restrict b2,
                  const uint8_t *restrict b3, const uint8_t *restrict b4, const uint8_t *restrict b5,
                  const uint8_t *restrict sign, const uint8_t *restrict head, uint8_t *restrict dst,
                  size_t n, unsigned r)
{
    for (size_t i = 0; i < n; i++) {
        uint8_t *w = dst + 8 * i;
        uint16_t t = rotr16((uint16_t)(sign[i] | (head[i] << 8)), r);
        w[0] = b0[i];
        w[1] = b1[i];
        w[2] = b2[i];
        w[3] = b3[i];
        w[4] = b4[i];
        w[5] = b5[i];
        w[6] = (uint8_t)t;
        w[7] = (uint8_t)(t >> 8);
    }
}

/* Entry points per width: the layouts in use get a copy of the loop with the rotation
 * as a constant; any other rotation runs the same loop with it as a variable. */

static void split_words(const uint8_t *src, uint8_t *const *p, size_t n, unsigned width, unsigned r)
{
    switch (width) {
    case 2:
        switch (r) {
        case 0: split2(src, p[0], p[1], n, 0); break;
        case 1: split2(src, p[0], p[1], n, 1); break;
        case 2: split2(src, p[0], p[1], n, 2); break;
        default: split2(src, p[0], p[1], n, r); break;
        }
        break;
    case 4:
        switch (r) {
        case 0: split4(src, p[0], p[1], p[2], p[3], n, 0); break;
        case 2: split4(src, p[0], p[1], p[2], p[3], n, 2); break;
        default: split4(src, p[0], p[1], p[2], p[3], n, r); break;
        }
        break;
    default:
        switch (r) {
        case 0: split8(src, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], n, 0); break;
        case 2: split8(src, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], n, 2); break;
        default: split8(src, p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], n, r); break;
        }
        break;
    }
}

static void join_words(const uint8_t *const *p, uint8_t *dst, size_t n, unsigned width, unsigned r)
{
    switch (width) {
    case 2:
        switch (r) {
        case 0: join2(p[0], p[1], dst, n, 0); break;
        case 1: join2(p[0], p[1], dst, n, 1); break;
        case 2: join2(p[0], p[1], dst, n, 2); break;
        default: join2(p[0], p[1], dst, n, r); break;
        }
        break;
    case 4:
        switch (r) {
        case 0: join4(p[0], p[1], p[2], p[3], dst, n, 0); break;
        case 2: join4(p[0], p[1], p[2], p[3], dst, n, 2); break;
        default: join4(p[0], p[1], p[2], p[3], dst, n, r); break;
        }
        break;
    default:
        switch (r) {
        case 0: join8(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], dst, n, 0); break;
        case 2: join8(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], dst, n, 2); break;
        default: join8(p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], dst, n, r); break;
        }
        break;
    }
}

/* ---------------------------------------------------------------------------------- */
/* 7-bit packing (see packing.py): with q = 8 * (n // 64), segments S0..S7 of q bytes;
 * P_j = S_j | bit j+1 of S7, byte by byte, for j < 7; then the last n - 8q bytes as they
 * are.  Worked on 64-bit words: the per-byte shifts never cross a byte boundary. */

#define LOW_BITS UINT64_C(0x0101010101010101)
#define HIGH_BITS UINT64_C(0xFEFEFEFEFEFEFEFE)

static Py_ssize_t segment_size(Py_ssize_t n) { return 8 * (n / 64); }

static Py_ssize_t packed_size(Py_ssize_t n)
{
    Py_ssize_t q = segment_size(n);
    return 7 * q + (n - 8 * q);
}

/* 64-bit words per segment per pass.  A plane's segments are q bytes apart, and for the
 * usual power-of-two chunk sizes q is a multiple of the page size: a loop over all fifteen
 * segments at once maps every stream onto the same cache set and evicts itself.  One
 * segment pair at a time over a block of 2 KiB keeps each loop at three streams, with
 * the block of S7 staying in the L1 cache across the seven passes. */
#define PACK_BLOCK ((size_t)256)

/* P = S | bit `bit` of each byte of S7, moved to bit 0. */
KERNEL void pack_segment(const uint8_t *restrict seg, const uint8_t *restrict last, uint8_t *restrict out,
                         size_t words, unsigned bit)
{
    for (size_t i = 0; i < words; i++)
        st64(out + 8 * i, ld64(seg + 8 * i) | ((ld64(last + 8 * i) >> bit) & LOW_BITS));
}

/* S = P without bit 0; that bit goes to bit `bit` of each byte of the S7 block `acc`. */
KERNEL void unpack_segment(const uint8_t *restrict in, uint8_t *restrict out, uint64_t *restrict acc,
                           size_t words, unsigned bit)
{
    for (size_t i = 0; i < words; i++) {
        uint64_t w = ld64(in + 8 * i);
        st64(out + 8 * i, w & HIGH_BITS);
        acc[i] |= (w & LOW_BITS) << bit;
    }
}

static void pack7_plane(const uint8_t *s, uint8_t *p, size_t q)
{
    const uint8_t *last = s + 7 * q;
    for (size_t start = 0; start < q; start += 8 * PACK_BLOCK) {
        size_t words = (q - start) / 8 < PACK_BLOCK ? (q - start) / 8 : PACK_BLOCK;
        pack_segment(s + 0 * q + start, last + start, p + 0 * q + start, words, 1);
        pack_segment(s + 1 * q + start, last + start, p + 1 * q + start, words, 2);
        pack_segment(s + 2 * q + start, last + start, p + 2 * q + start, words, 3);
        pack_segment(s + 3 * q + start, last + start, p + 3 * q + start, words, 4);
        pack_segment(s + 4 * q + start, last + start, p + 4 * q + start, words, 5);
        pack_segment(s + 5 * q + start, last + start, p + 5 * q + start, words, 6);
        pack_segment(s + 6 * q + start, last + start, p + 6 * q + start, words, 7);
    }
}

static void unpack7_plane(const uint8_t *p, uint8_t *s, size_t q)
{
    uint64_t acc[PACK_BLOCK];
    for (size_t start = 0; start < q; start += 8 * PACK_BLOCK) {
        size_t words = (q - start) / 8 < PACK_BLOCK ? (q - start) / 8 : PACK_BLOCK;
        memset(acc, 0, sizeof acc);
        unpack_segment(p + 0 * q + start, s + 0 * q + start, acc, words, 1);
        unpack_segment(p + 1 * q + start, s + 1 * q + start, acc, words, 2);
        unpack_segment(p + 2 * q + start, s + 2 * q + start, acc, words, 3);
        unpack_segment(p + 3 * q + start, s + 3 * q + start, acc, words, 4);
        unpack_segment(p + 4 * q + start, s + 4 * q + start, acc, words, 5);
        unpack_segment(p + 5 * q + start, s + 5 * q + start, acc, words, 6);
        unpack_segment(p + 6 * q + start, s + 6 * q + start, acc, words, 7);
        for (size_t i = 0; i < words; i++)
            st64(s + 7 * q + start + 8 * i, acc[i]);
    }
}

/* ---------------------------------------------------------------------------------- */
/* Argument handling. */

#define MAX_PLANES 8

static int overlaps(const Py_buffer *a, const Py_buffer *b)
{
    const char *pa = (const char *)a->buf, *pb = (const char *)b->buf;
    if (a->len == 0 || b->len == 0)
        return 0;
    return pa < pb + b->len && pb < pa + a->len;
}

/* Acquire a C-contiguous buffer; turn the exporter's complaint (TypeError, or BufferError
 * for a read-only or strided one) into a TypeError that names the argument. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *func, const char *what)
{
    if (PyObject_GetBuffer(obj, view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s(): %s must be a %s bytes-like object, not %.100s", func, what,
                     writable ? "writable contiguous" : "contiguous", Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (!PyBuffer_IsContiguous(view, 'C')) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s(): %s must be a contiguous buffer", func, what);
        return -1;
    }
    return 0;
}

static int check_layout(const char *func, int width, int rotate)
{
    if (width != 2 && width != 4 && width != 8) {
        PyErr_Format(PyExc_ValueError, "%s(): width must be 2, 4 or 8, not %d", func, width);
        return -1;
    }
    if (rotate < 0 || rotate >= 16) {
        PyErr_Format(PyExc_ValueError, "%s(): rotate must be in [0, 16), not %d", func, rotate);
        return -1;
    }
    return 0;
}

/* Acquire the `width` plane buffers of a sequence; on error nothing stays acquired. */
static int get_planes(PyObject *seq, Py_buffer *views, int width, int writable, const char *func)
{
    PyObject *fast = PySequence_Fast(seq, "planes must be a sequence of buffers");
    if (fast == NULL)
        return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fast);
    if (count != width) {
        PyErr_Format(PyExc_ValueError, "%s(): expected %d planes for width %d, got %zd", func, width, width,
                     count);
        Py_DECREF(fast);
        return -1;
    }
    for (int k = 0; k < width; k++) {
        char what[32];
        PyOS_snprintf(what, sizeof what, "planes[%d]", k);
        if (get_buffer(PySequence_Fast_GET_ITEM(fast, k), &views[k], writable, func, what) < 0) {
            while (k--)
                PyBuffer_Release(&views[k]);
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

static void release_planes(Py_buffer *views, int width)
{
    for (int k = 0; k < width; k++)
        PyBuffer_Release(&views[k]);
}

/* Check the word buffer against the planes: whole words, n bytes per plane, and no
 * output overlapping anything else (the loops assume distinct memory). */
static int check_sizes(const char *func, const Py_buffer *words, const Py_buffer *planes, int width,
                       int planes_are_output)
{
    if (words->len % width) {
        PyErr_Format(PyExc_ValueError, "%s(): %zd bytes are not a whole number of %d-byte words", func,
                     words->len, width);
        return -1;
    }
    Py_ssize_t n = words->len / width;
    for (int k = 0; k < width; k++) {
        if (planes[k].len != n) {
            PyErr_Format(PyExc_ValueError, "%s(): planes[%d] has %zd bytes, expected %zd (one per word)", func,
                         k, planes[k].len, n);
            return -1;
        }
    }
    for (int k = 0; k < width; k++) {
        if (overlaps(&planes[k], words)) {
            PyErr_Format(PyExc_ValueError, "%s(): planes[%d] overlaps the word buffer", func, k);
            return -1;
        }
        for (int j = 0; planes_are_output && j < k; j++) {
            if (overlaps(&planes[k], &planes[j])) {
                PyErr_Format(PyExc_ValueError, "%s(): planes[%d] overlaps planes[%d]", func, k, j);
                return -1;
            }
        }
    }
    return 0;
}

/* The packed buffer must hold exactly the packed size of the n-byte plane, elsewhere. */
static int check_packing(const char *func, const char *what, const Py_buffer *packed, const Py_buffer *plane,
                         Py_ssize_t n)
{
    if (packed->len != packed_size(n)) {
        PyErr_Format(PyExc_ValueError, "%s(): %s has %zd bytes, a plane of %zd bytes packs into %zd", func,
                     what, packed->len, n, packed_size(n));
        return -1;
    }
    if (overlaps(packed, plane)) {
        PyErr_Format(PyExc_ValueError, "%s(): out overlaps the input", func);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(split_doc,
"split(src, width, rotate, planes, /)\n--\n\n"
"Cut the whole words in ``src`` (``n * width`` bytes) into ``width`` byte planes of ``n``\n"
"bytes each, written into the writable buffers ``planes`` in storage order: the low\n"
"``width - 2`` bytes of each word, then the low and the high byte of its top 16 bits\n"
"rotated left by ``rotate``.");

static PyObject *kernels_split(PyObject *self, PyObject *args)
{
    Py_buffer src, planes[MAX_PLANES];
    PyObject *obj, *seq;
    int width, rotate;
    (void)self;
    if (!PyArg_ParseTuple(args, "OiiO:split", &obj, &width, &rotate, &seq))
        return NULL;
    if (check_layout("split", width, rotate) < 0 || get_buffer(obj, &src, 0, "split", "src") < 0)
        return NULL;
    if (get_planes(seq, planes, width, 1, "split") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (check_sizes("split", &src, planes, width, 1) < 0) {
        release_planes(planes, width);
        PyBuffer_Release(&src);
        return NULL;
    }
    uint8_t *p[MAX_PLANES];
    for (int k = 0; k < width; k++)
        p[k] = (uint8_t *)planes[k].buf;
    size_t n = (size_t)(src.len / width);
    Py_BEGIN_ALLOW_THREADS
    split_words((const uint8_t *)src.buf, p, n, (unsigned)width, (unsigned)rotate);
    Py_END_ALLOW_THREADS
    release_planes(planes, width);
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(join_doc,
"join(planes, width, rotate, out, /)\n--\n\n"
"Inverse of ``split``: reassemble ``n`` words from ``width`` planes of ``n`` bytes into the\n"
"writable buffer ``out`` (``n * width`` bytes).");

static PyObject *kernels_join(PyObject *self, PyObject *args)
{
    Py_buffer out, planes[MAX_PLANES];
    PyObject *obj, *seq;
    int width, rotate;
    (void)self;
    if (!PyArg_ParseTuple(args, "OiiO:join", &seq, &width, &rotate, &obj))
        return NULL;
    if (check_layout("join", width, rotate) < 0 || get_buffer(obj, &out, 1, "join", "out") < 0)
        return NULL;
    if (get_planes(seq, planes, width, 0, "join") < 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    if (check_sizes("join", &out, planes, width, 0) < 0) {
        release_planes(planes, width);
        PyBuffer_Release(&out);
        return NULL;
    }
    const uint8_t *p[MAX_PLANES];
    for (int k = 0; k < width; k++)
        p[k] = (const uint8_t *)planes[k].buf;
    size_t n = (size_t)(out.len / width);
    Py_BEGIN_ALLOW_THREADS
    join_words(p, (uint8_t *)out.buf, n, (unsigned)width, (unsigned)rotate);
    Py_END_ALLOW_THREADS
    release_planes(planes, width);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(pack7_doc,
"pack7(plane, out, /)\n--\n\n"
"7-bit pack the ``n`` bytes of ``plane`` into the writable buffer ``out`` of\n"
"``7 * q + n - 8 * q`` bytes, ``q = 8 * (n // 64)``.  Lossless only if bit 0 of every\n"
"byte of ``plane`` is clear; the caller checks.");

/* pack7 and unpack7: the plane is the input of one and the output of the other; n is
 * always the plane's length. */
static PyObject *run_packing(PyObject *args, int unpacking)
{
    const char *func = unpacking ? "unpack7" : "pack7";
    Py_buffer in, out;
    PyObject *in_obj, *out_obj;
    if (!PyArg_ParseTuple(args, unpacking ? "OO:unpack7" : "OO:pack7", &in_obj, &out_obj)
        || get_buffer(in_obj, &in, 0, func, unpacking ? "packed" : "plane") < 0)
        return NULL;
    if (get_buffer(out_obj, &out, 1, func, "out") < 0) {
        PyBuffer_Release(&in);
        return NULL;
    }
    const Py_buffer *plane = unpacking ? &out : &in, *packed = unpacking ? &in : &out;
    Py_ssize_t n = plane->len, q = segment_size(n);
    if (check_packing(func, unpacking ? "packed" : "out", packed, plane, n) < 0) {
        PyBuffer_Release(&out);
        PyBuffer_Release(&in);
        return NULL;
    }
    uint8_t *s = (uint8_t *)plane->buf, *p = (uint8_t *)packed->buf;
    Py_BEGIN_ALLOW_THREADS
    if (unpacking) {
        unpack7_plane(p, s, (size_t)q);
        if (n > 8 * q)
            memcpy(s + 8 * q, p + 7 * q, (size_t)(n - 8 * q));
    } else {
        pack7_plane(s, p, (size_t)q);
        if (n > 8 * q)
            memcpy(p + 7 * q, s + 8 * q, (size_t)(n - 8 * q));
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    PyBuffer_Release(&in);
    Py_RETURN_NONE;
}

static PyObject *kernels_pack7(PyObject *self, PyObject *args)
{
    (void)self;
    return run_packing(args, 0);
}

PyDoc_STRVAR(unpack7_doc,
"unpack7(packed, out, /)\n--\n\n"
"Inverse of ``pack7``: unpack into the writable buffer ``out`` of ``n`` bytes; ``packed``\n"
"must hold exactly the packed size of ``n`` bytes.");

static PyObject *kernels_unpack7(PyObject *self, PyObject *args)
{
    (void)self;
    return run_packing(args, 1);
}

static PyMethodDef kernels_methods[] = {
    {"split", kernels_split, METH_VARARGS, split_doc},
    {"join", kernels_join, METH_VARARGS, join_doc},
    {"pack7", kernels_pack7, METH_VARARGS, pack7_doc},
    {"unpack7", kernels_unpack7, METH_VARARGS, unpack7_doc},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot kernels_slots[] = {
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#ifdef Py_GIL_DISABLED
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT,
    "dcpx_zstd._kernels",
    "Compiled byte grouping and 7-bit packing, byte for byte the same as the numpy code.",
    0,
    kernels_methods,
    kernels_slots,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__kernels(void)
{
    return PyModuleDef_Init(&kernels_module);
}
