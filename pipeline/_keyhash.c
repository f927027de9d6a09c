/*
 * pipeline._keyhash: BLAKE2b (RFC 7693) of every string of an Arrow string array, in one call.
 *
 * The planner hashes every input's key (seeded order, val hold-out) and, for colliding names, its
 * source URI. hashlib does the same per Python string object: ~1 us and one object per row, 13 s and
 * gigabytes for the 13 M inputs of ImageNet-21K. Here the strings are read in place from the array's
 * offsets and data buffers and the GIL is released. The numbers are hashlib's exactly:
 * int.from_bytes(hashlib.blake2b(s, digest_size=8, salt=salt).digest(), "little")
 * (tests/test_listing_plan.py checks that). Written from the RFC's description of the algorithm.
 * Built by setup.py (no library needed); pipeline/hashing.py falls back to hashlib without it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

/* The message word schedule of each round (rounds 10 and 11 reuse rows 0 and 1). */
static const uint8_t SIGMA[10][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
};

static inline uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load_le64(const uint8_t *p) {
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--) x = (x << 8) | p[i];
    return x;
}

#define MIX(a, b, c, d, x, y)             \
    do {                                  \
        v[a] = v[a] + v[b] + (x);         \
        v[d] = rotr(v[d] ^ v[a], 32);     \
        v[c] = v[c] + v[d];               \
        v[b] = rotr(v[b] ^ v[c], 24);     \
        v[a] = v[a] + v[b] + (y);         \
        v[d] = rotr(v[d] ^ v[a], 16);     \
        v[c] = v[c] + v[d];               \
        v[b] = rotr(v[b] ^ v[c], 63);     \
    } while (0)

/* One 128-byte block into the state h; t counts the message bytes so far, including this block's. */
static void compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load_le64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= t; /* messages here are far below 2^64 bytes: the high word of the counter stays 0 */
    if (last) v[14] = ~v[14];
    for (int round = 0; round < 12; round++) {
        const uint8_t *s = SIGMA[round % 10];
        MIX(0, 4, 8, 12, m[s[0]], m[s[1]]);
        MIX(1, 5, 9, 13, m[s[2]], m[s[3]]);
        MIX(2, 6, 10, 14, m[s[4]], m[s[5]]);
        MIX(3, 7, 11, 15, m[s[6]], m[s[7]]);
        MIX(0, 5, 10, 15, m[s[8]], m[s[9]]);
        MIX(1, 6, 11, 12, m[s[10]], m[s[11]]);
        MIX(2, 7, 8, 13, m[s[12]], m[s[13]]);
        MIX(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* The first 8 bytes of the 8-byte BLAKE2b digest of data[0:length] (no key, 16-byte salt), little-endian. */
static uint64_t blake2b_64(const uint8_t *data, size_t length, const uint64_t salt[2]) {
    uint64_t h[8];
    memcpy(h, IV, sizeof h);
    h[0] ^= 0x01010000ULL ^ 8; /* digest length 8, no key, fanout 1, depth 1 */
    h[4] ^= salt[0];
    h[5] ^= salt[1];
    size_t done = 0;
    while (length - done > 128) {
        done += 128;
        compress(h, data + done - 128, done, 0);
    }
    uint8_t last[128] = {0};
    memcpy(last, data + done, length - done);
    compress(h, last, length, 1);
    return h[0];
}

static PyObject *blake2b64(PyObject *self, PyObject *args) {
    Py_buffer offsets, data, salt, out;
    int wide;
    if (!PyArg_ParseTuple(args, "y*y*y*w*p", &offsets, &data, &salt, &out, &wide)) return NULL;
    PyObject *result = NULL;
    size_t width = wide ? 8 : 4;
    Py_ssize_t count = out.len / 8;
    if (salt.len > 16) {
        PyErr_SetString(PyExc_ValueError, "blake2b64: the salt is at most 16 bytes");
    } else if (offsets.len != (Py_ssize_t)((count + 1) * width) || out.len % 8) {
        PyErr_SetString(PyExc_ValueError, "blake2b64: needs count + 1 offsets for count 8-byte outputs");
    } else {
        uint8_t padded[16] = {0};
        memcpy(padded, salt.buf, salt.len);
        uint64_t salt_words[2] = {load_le64(padded), load_le64(padded + 8)};
        const uint8_t *bytes = data.buf;
        uint64_t *hashes = out.buf;
        int bad = 0;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < count && !bad; i++) {
            int64_t start, end;
            if (wide) {
                start = ((const int64_t *)offsets.buf)[i];
                end = ((const int64_t *)offsets.buf)[i + 1];
            } else {
                start = ((const int32_t *)offsets.buf)[i];
                end = ((const int32_t *)offsets.buf)[i + 1];
            }
            if (start < 0 || end < start || end > data.len) {
                bad = 1;
                break;
            }
            hashes[i] = blake2b_64(bytes + start, (size_t)(end - start), salt_words);
        }
        Py_END_ALLOW_THREADS
        if (bad) PyErr_SetString(PyExc_ValueError, "blake2b64: an offset points outside the data");
        else result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&data);
    PyBuffer_Release(&salt);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"blake2b64", blake2b64, METH_VARARGS,
     "blake2b64(offsets, data, salt, out, wide) -> None\n\n"
     "String i is data[offsets[i]:offsets[i + 1]] (int32 offsets, int64 when wide); out (count 8-byte\n"
     "slots) receives int.from_bytes(blake2b(string, digest_size=8, salt=salt).digest(), 'little')."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_keyhash", "BLAKE2b of the strings of an Arrow string array, in one call.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__keyhash(void) { return PyModule_Create(&module_def); }
