/*
 * pipeline._splitjpeg: the N polyphase components of an S×S image, each encoded as a JPEG, in one call.
 *
 * Same bytes as decompose() followed by one simplejpeg.encode_jpeg(part, quality, colorspace, "420") per
 * component (tests/test_splitjpeg.py checks that), but about a third cheaper per image: one libjpeg
 * compressor serves all N encodes instead of one TurboJPEG handle per call, the pixels are gathered
 * straight from the S×S buffer (a numpy array, or a Pillow image read in place through its Arrow export), the
 * JPEGs land in one growing buffer, and the GIL is released meanwhile.
 * Built by setup.py against the system libjpeg-turbo when its headers are present; encode.py falls back
 * to simplejpeg otherwise.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdint.h>
#include <stdio.h> /* jpeglib.h needs FILE */
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#ifndef JCS_EXTENSIONS
#error "pipeline._splitjpeg needs libjpeg-turbo (JCS_EXT_RGBX)"
#endif

typedef struct {
    struct jpeg_error_mgr manager;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} ErrorState;

static void raise_to_caller(j_common_ptr cinfo) {
    ErrorState *state = (ErrorState *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, state->message);
    longjmp(state->jump, 1);
}

static void keep_quiet(j_common_ptr cinfo, int level) {
    (void)cinfo;
    (void)level;
}

/* The Arrow C data interface (https://arrow.apache.org/docs/format/CDataInterface.html), a stable ABI: Pillow
 * exports its images through it, so their pixels can be read in place without pyarrow or numpy. */
#ifndef ARROW_C_DATA_INTERFACE
#define ARROW_C_DATA_INTERFACE
struct ArrowSchema {
    const char *format;
    const char *name;
    const char *metadata;
    int64_t flags;
    int64_t n_children;
    struct ArrowSchema **children;
    struct ArrowSchema *dictionary;
    void (*release)(struct ArrowSchema *);
    void *private_data;
};
struct ArrowArray {
    int64_t length;
    int64_t null_count;
    int64_t offset;
    int64_t n_buffers;
    int64_t n_children;
    const void **buffers;
    struct ArrowArray **children;
    struct ArrowArray *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};
#endif

/* A destination that appends every JPEG to one buffer; offsets[k] is where JPEG k starts. */
typedef struct {
    struct jpeg_destination_mgr manager;
    JOCTET *data;
    size_t capacity;
    size_t used;
    int out_of_memory;
} GrowingDestination;

static void start_member(j_compress_ptr cinfo) {
    GrowingDestination *dest = (GrowingDestination *)cinfo->dest;
    dest->manager.next_output_byte = dest->data + dest->used;
    dest->manager.free_in_buffer = dest->capacity - dest->used;
}

static boolean grow(j_compress_ptr cinfo) {
    /* Called when the buffer is full: the whole remainder was written. */
    GrowingDestination *dest = (GrowingDestination *)cinfo->dest;
    size_t capacity = dest->capacity * 2;
    JOCTET *data = realloc(dest->data, capacity);
    if (data == NULL) {
        dest->out_of_memory = 1;
        ERREXIT(cinfo, JERR_OUT_OF_MEMORY);
    }
    dest->data = data;
    dest->used = dest->capacity;
    dest->capacity = capacity;
    start_member(cinfo);
    return TRUE;
}

static void end_member(j_compress_ptr cinfo) {
    GrowingDestination *dest = (GrowingDestination *)cinfo->dest;
    dest->used = dest->capacity - dest->manager.free_in_buffer;
}

/* Copy component k = a·r + b, i.e. pixels[a::r, b::r], into a contiguous s×s image. */
static void gather(const unsigned char *pixels, Py_ssize_t size, int channels, int r, int a, int b,
                   unsigned char *out) {
    Py_ssize_t s = size / r;
    if (channels == 4) { /* a constant size: each pixel moves as one 32-bit word */
        for (Py_ssize_t y = 0; y < s; y++) {
            const unsigned char *row = pixels + ((y * r + a) * size + b) * 4;
            for (Py_ssize_t x = 0; x < s; x++, out += 4) memcpy(out, row + x * r * 4, 4);
        }
    } else {
        for (Py_ssize_t y = 0; y < s; y++) {
            const unsigned char *row = pixels + ((y * r + a) * size + b) * channels;
            for (Py_ssize_t x = 0; x < s; x++, out += channels) memcpy(out, row + x * r * channels, channels);
        }
    }
}

/* The r*r JPEGs of a size x size image at `pixels`, as a list of bytes; NULL with an exception on failure. */
static PyObject *encode_pixels(const unsigned char *pixels, Py_ssize_t size, int channels, int r, int quality) {
    Py_ssize_t s = size / r, n = (Py_ssize_t)r * r;
    unsigned char *component = malloc((size_t)(s * s * channels));
    JSAMPROW *rows = malloc(sizeof(JSAMPROW) * (size_t)s);
    size_t *offsets = malloc(sizeof(size_t) * (size_t)(n + 1));
    GrowingDestination dest = {.capacity = (size_t)(n * s * s * channels / 2 + 4096)};
    dest.data = malloc(dest.capacity);
    if (!component || !rows || !offsets || !dest.data) {
        free(component), free(rows), free(offsets), free(dest.data);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t y = 0; y < s; y++) rows[y] = component + y * s * channels;

    struct jpeg_compress_struct cinfo = {0}; /* mem stays NULL if creation fails: destroy is then a no-op */
    ErrorState error;
    volatile int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    cinfo.err = jpeg_std_error(&error.manager);
    error.manager.error_exit = raise_to_caller;
    error.manager.emit_message = keep_quiet;
    if (setjmp(error.jump)) {
        failed = 1;
    } else {
        jpeg_create_compress(&cinfo);
        dest.manager.init_destination = start_member;
        dest.manager.empty_output_buffer = grow;
        dest.manager.term_destination = end_member;
        cinfo.dest = &dest.manager;
        cinfo.image_width = cinfo.image_height = (JDIMENSION)s;
        cinfo.input_components = channels;
        cinfo.in_color_space = channels == 4 ? JCS_EXT_RGBX : JCS_EXT_RGB;
        jpeg_set_defaults(&cinfo); /* YCbCr, 4:2:0, standard Huffman tables, baseline */
        jpeg_set_quality(&cinfo, quality, TRUE);
        /* TurboJPEG's rule, which simplejpeg inherits: the fast integer DCT below quality 96. */
        cinfo.dct_method = quality >= 96 ? JDCT_ISLOW : JDCT_IFAST;
        for (Py_ssize_t k = 0; k < n; k++) {
            gather(pixels, size, channels, r, (int)(k / r), (int)(k % r), component);
            offsets[k] = dest.used;
            jpeg_start_compress(&cinfo, TRUE);
            jpeg_write_scanlines(&cinfo, rows, (JDIMENSION)s);
            jpeg_finish_compress(&cinfo);
        }
        offsets[n] = dest.used;
    }
    jpeg_destroy_compress(&cinfo);
    Py_END_ALLOW_THREADS

    PyObject *result = NULL;
    if (failed) {
        if (dest.out_of_memory) PyErr_NoMemory();
        else PyErr_Format(PyExc_RuntimeError, "libjpeg: %s", error.message);
    } else if ((result = PyList_New(n)) != NULL) {
        for (Py_ssize_t k = 0; k < n; k++) {
            PyObject *jpeg = PyBytes_FromStringAndSize((const char *)dest.data + offsets[k],
                                                       (Py_ssize_t)(offsets[k + 1] - offsets[k]));
            if (jpeg == NULL) {
                Py_CLEAR(result);
                break;
            }
            PyList_SET_ITEM(result, k, jpeg);
        }
    }
    free(component), free(rows), free(offsets), free(dest.data);
    return result;
}

static int check_geometry(Py_ssize_t size, int channels, int r, int quality, Py_ssize_t length, const char *what) {
    if ((channels != 3 && channels != 4) || r < 1 || size < r || size % r || quality < 1 || quality > 100 ||
        length != size * size * channels) {
        PyErr_Format(PyExc_ValueError,
                     "%s: pixels must be size*size*channels bytes, channels 3 or 4, size a multiple of the grid, "
                     "quality 1-100",
                     what);
        return -1;
    }
    return 0;
}

static PyObject *encode_components(PyObject *module, PyObject *args) {
    Py_buffer view;
    Py_ssize_t size;
    int channels, r, quality;
    (void)module;
    if (!PyArg_ParseTuple(args, "y*niii", &view, &size, &channels, &r, &quality)) return NULL;
    PyObject *result = NULL;
    if (check_geometry(size, channels, r, quality, view.len, "encode_components") == 0)
        result = encode_pixels(view.buf, size, channels, r, quality);
    PyBuffer_Release(&view);
    return result;
}

/* Pixels of an exported 4-byte Pillow image (RGB, RGBX, RGBA: fixed_size_list<uint8>[4]), read in place. */
static PyObject *encode_image_components(PyObject *module, PyObject *args) {
    PyObject *schema_capsule, *array_capsule;
    Py_ssize_t size;
    int r, quality;
    (void)module;
    if (!PyArg_ParseTuple(args, "OOnii", &schema_capsule, &array_capsule, &size, &r, &quality)) return NULL;
    struct ArrowSchema *schema = PyCapsule_GetPointer(schema_capsule, "arrow_schema");
    struct ArrowArray *array = schema ? PyCapsule_GetPointer(array_capsule, "arrow_array") : NULL;
    if (array == NULL) return NULL;
    const struct ArrowArray *values = array->n_children == 1 ? array->children[0] : NULL;
    if (schema->format == NULL || strcmp(schema->format, "+w:4") != 0 || schema->n_children != 1 ||
        schema->children[0]->format == NULL || strcmp(schema->children[0]->format, "C") != 0 || values == NULL ||
        array->offset != 0 || array->null_count != 0 || values->offset != 0 || values->n_buffers != 2 ||
        values->buffers[1] == NULL || values->length != array->length * 4) {
        PyErr_SetString(PyExc_ValueError,
                        "encode_image_components: not an image exported as fixed_size_list<uint8>[4] in one block");
        return NULL;
    }
    if (check_geometry(size, 4, r, quality, (Py_ssize_t)values->length, "encode_image_components") < 0) return NULL;
    return encode_pixels(values->buffers[1], size, 4, r, quality);
}

static PyMethodDef methods[] = {
    {"encode_components", encode_components, METH_VARARGS,
     "encode_components(pixels, size, channels, grid, quality) -> list[bytes]\n\n"
     "pixels: C-contiguous uint8 bytes of a size x size image with 3 (RGB) or 4 (RGBX) channels.\n"
     "Returns the grid*grid JPEGs (4:2:0) of component k = a*grid + b = pixels[a::grid, b::grid]."},
    {"encode_image_components", encode_image_components, METH_VARARGS,
     "encode_image_components(schema_capsule, array_capsule, size, grid, quality) -> list[bytes]\n\n"
     "The same for a size x size 4-byte Pillow image (RGB, RGBX, RGBA; the 4th byte is ignored), read in\n"
     "place through its Arrow export: image.__arrow_c_array__()."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_splitjpeg", "Polyphase components of an image, JPEG-encoded in one call.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__splitjpeg(void) {
    PyObject *module = PyModule_Create(&module_def);
    if (module != NULL && PyModule_AddIntConstant(module, "LIBJPEG_VERSION", JPEG_LIB_VERSION) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
