// sona_plugin._native: float32 kernels for SONA (MicroLoRA forward, REINFORCE
// gradient accumulation, the fused MicroLoRA update step, cosine top-k, k-means
// assignment).
//
// * SIMD level chosen at import time from the CPU (__builtin_cpu_supports), not
//   from build flags: kernels_impl.inc is compiled once per level with
//   __attribute__((target(...))) and called through a table of function
//   pointers.  $SONA_SIMD caps the level; set_simd_level() switches it.
// * Arrays arrive as Python objects.  Exact numpy.ndarray instances are read
//   straight from NumPy's (ABI-stable) array struct, which is what keeps a
//   256-d micro_lora_forward call at a few hundred ns; anything else (CPU torch
//   tensors, other DLPack / buffer-protocol producers) goes through nanobind's
//   ndarray import.  Either way nothing is copied: wrong dtype / layout /
//   device raises InvalidValue instead of converting.
// * Errors are the package's own classes, registered by sona_plugin.kernels
//   through set_error_types().
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define SONA_X86 1
// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined
// placeholders (GCC bug 105593, fixed in 13); silence it for the header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace nb = nanobind;

namespace sona {

// Work below this many float multiply-adds runs with the GIL held.  Releasing
// and re-acquiring the GIL costs roughly 100-200 ns, about as much as the whole
// kernel for a single 256-d vector (~0.5k flops), so small calls keep it; from
// ~16k floats of input (e.g. 64 x 256) the kernel takes microseconds and letting
// other Python threads run is worth the switch.
constexpr int64_t kReleaseGilMinWork = 16384;

// ------------------------------------------------------------ kernel table --

struct Status {
    int which;    // 0: fine; otherwise which input held a non-finite value
    int64_t row;  // first bad element: (row, col), or index row if col < 0
    int64_t col;
    static Status ok() { return {0, 0, 0}; }
    static Status at(int which, int64_t row, int64_t col) { return {which, row, col}; }
};

static int64_t first_nonfinite(const float *p, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(p[i]))
            return i;
    return -1;
}

// micro_update: inputs (float32, C-contiguous, validated by the binding), outputs, result.
struct MicroArgs {
    const float *H, *G, *adv, *A, *B, *B0, *v;  // [T, d], [T, d], [T], [r, d], [d, r], [d, r], [2rd]
    int64_t T, d, r, t, max_halvings;
    double scale, lr, beta2, decay, grad_clip, norm_cap, trust_region;
    float *A_out, *B_out, *v_out;
};
struct MicroResult {
    bool accepted;
    double frac, div, gnorm, delta_norm;
};
constexpr int64_t kMicroMaxRank = 8;

struct Table {
    const char *name;
    Status (*lora_forward)(const float *, int64_t, int64_t, const float *, const float *, int64_t,
                           float, float *);
    Status (*reinforce)(const float *, const float *, const float *, int64_t, int64_t,
                        const float *, const float *, int64_t, float, float *, float *);
    void (*row_norms)(const float *, int64_t, int64_t, float *);
    bool (*sq_norm_checked)(const float *, int64_t, float *);
    void (*cos_sims)(const float *, int64_t, int64_t, const float *, float, const float *,
                     float *);
    Status (*kmeans)(const float *, int64_t, int64_t, const float *, int64_t, int64_t *, float *);
    Status (*micro_update)(const MicroArgs &, MicroResult *);  // which: 1 H, 2 G, 3 adv, 4 gradient
};

#if SONA_X86
namespace isa_avx512 {
#define SONA_TARGET __attribute__((target("avx512f")))
#define SONA_INL SONA_TARGET inline __attribute__((always_inline))
#define SONA_LEVEL "avx512"
struct Ops {
    using V = __m512;
    static constexpr int64_t W = 16;
    static constexpr int RX = 4;  // k-means rows per block: 4x4 accumulators of 32 zmm
    static SONA_INL __mmask16 mask(int64_t n) { return (__mmask16) ((1u << n) - 1u); }
    static SONA_INL V zero() { return _mm512_setzero_ps(); }
    static SONA_INL V load(const float *p) { return _mm512_loadu_ps(p); }
    static SONA_INL V load_tail(const float *p, int64_t n) {
        return _mm512_maskz_loadu_ps(mask(n), p);
    }
    static SONA_INL void store(float *p, V v) { _mm512_storeu_ps(p, v); }
    static SONA_INL void store_tail(float *p, V v, int64_t n) {
        _mm512_mask_storeu_ps(p, mask(n), v);
    }
    static SONA_INL V set1(float a) { return _mm512_set1_ps(a); }
    static SONA_INL V add(V a, V b) { return _mm512_add_ps(a, b); }
    static SONA_INL V sub(V a, V b) { return _mm512_sub_ps(a, b); }
    static SONA_INL V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static SONA_INL float hsum(V v) {  // (not _mm512_reduce_add_ps: GCC 12 warns inside it)
        V t = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
        t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
        __m128 s = _mm512_castps512_ps128(t);
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
};
#include "kernels_impl.inc"
#undef SONA_TARGET
#undef SONA_INL
#undef SONA_LEVEL
}  // namespace isa_avx512

namespace isa_avx2 {
#define SONA_TARGET __attribute__((target("avx2,fma")))
#define SONA_INL SONA_TARGET inline __attribute__((always_inline))
#define SONA_LEVEL "avx2"
struct Ops {
    using V = __m256;
    static constexpr int64_t W = 8;
    static constexpr int RX = 2;  // k-means rows per block: 2x4 accumulators of 16 ymm
    static SONA_INL __m256i mask(int64_t n) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32((int) n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static SONA_INL V zero() { return _mm256_setzero_ps(); }
    static SONA_INL V load(const float *p) { return _mm256_loadu_ps(p); }
    static SONA_INL V load_tail(const float *p, int64_t n) { return _mm256_maskload_ps(p, mask(n)); }
    static SONA_INL void store(float *p, V v) { _mm256_storeu_ps(p, v); }
    static SONA_INL void store_tail(float *p, V v, int64_t n) { _mm256_maskstore_ps(p, mask(n), v); }
    static SONA_INL V set1(float a) { return _mm256_set1_ps(a); }
    static SONA_INL V add(V a, V b) { return _mm256_add_ps(a, b); }
    static SONA_INL V sub(V a, V b) { return _mm256_sub_ps(a, b); }
    static SONA_INL V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static SONA_INL float hsum(V v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
};
#include "kernels_impl.inc"
#undef SONA_TARGET
#undef SONA_INL
#undef SONA_LEVEL
}  // namespace isa_avx2
#endif  // SONA_X86

// Portable baseline: plain C++ (the compiler may still auto-vectorise the
// element-wise loops with the baseline ISA: SSE2 on x86-64, NEON on aarch64,
// which is why this level is reported as "neon" there).
namespace isa_base {
#define SONA_TARGET
#define SONA_INL inline __attribute__((always_inline))
#if defined(__aarch64__) || defined(__ARM_NEON)
#define SONA_LEVEL "neon"
#else
#define SONA_LEVEL "scalar"
#endif
struct Ops {
    using V = float;
    static constexpr int64_t W = 1;
    static constexpr int RX = 2;
    static SONA_INL V zero() { return 0.0f; }
    static SONA_INL V load(const float *p) { return *p; }
    static SONA_INL V load_tail(const float *p, int64_t) { return *p; }  // unreachable, W == 1
    static SONA_INL void store(float *p, V v) { *p = v; }
    static SONA_INL void store_tail(float *p, V v, int64_t) { *p = v; }
    static SONA_INL V set1(float a) { return a; }
    static SONA_INL V add(V a, V b) { return a + b; }
    static SONA_INL V sub(V a, V b) { return a - b; }
    static SONA_INL V fmadd(V a, V b, V c) { return a * b + c; }
    static SONA_INL float hsum(V v) { return v; }
};
#include "kernels_impl.inc"
#undef SONA_TARGET
#undef SONA_INL
#undef SONA_LEVEL
}  // namespace isa_base

// Levels from lowest to highest; "scalar" and "neon" both name the baseline.
static bool cpu_supports(const std::string &level) {
    if (level == "scalar")
        return true;
#if SONA_X86
    __builtin_cpu_init();
    if (level == "avx2")
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (level == "avx512")
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma");
#endif
    if (level == "neon")
        return std::strcmp(isa_base::table.name, "neon") == 0;
    return false;
}

static const Table *table_for(const std::string &level) {
#if SONA_X86
    if (level == "avx512")
        return &isa_avx512::table;
    if (level == "avx2")
        return &isa_avx2::table;
#endif
    if (level == "scalar" || level == "neon")
        return &isa_base::table;
    return nullptr;
}

static std::vector<std::string> supported_levels() {
    std::vector<std::string> out;
    for (const char *l : {"avx512", "avx2", "neon", "scalar"})
        if (cpu_supports(l))
            out.emplace_back(l);
    return out;
}

// Set once at import (and by set_simd_level); read with one relaxed load per call.
static std::atomic<const Table *> g_table{&isa_base::table};
static std::string g_level = "scalar";  // name reported by simd_level()

static const Table &T() { return *g_table.load(std::memory_order_relaxed); }

// ---------------------------------------------------------------- errors --

static PyObject *g_dimension_mismatch = nullptr;  // strong refs (replaced by set_error_types)
static PyObject *g_invalid_value = nullptr;
static PyObject *g_alloc = nullptr;  // allocator for non-NumPy outputs

static void ensure_error_types() {
    if (g_invalid_value)
        return;
    // set_error_types() was not called: try the package's classes directly.
    PyObject *mod = PyImport_ImportModule("sona_plugin.errors");
    if (mod) {
        g_dimension_mismatch = PyObject_GetAttrString(mod, "DimensionMismatch");
        g_invalid_value = PyObject_GetAttrString(mod, "InvalidValue");
        Py_DECREF(mod);
    }
    PyErr_Clear();
    if (!g_dimension_mismatch || !g_invalid_value) {
        Py_XDECREF(g_dimension_mismatch);
        Py_XDECREF(g_invalid_value);
        Py_INCREF(PyExc_ValueError);
        Py_INCREF(PyExc_ValueError);
        g_dimension_mismatch = g_invalid_value = PyExc_ValueError;
    }
}

[[noreturn]] static void raise_invalid(const std::string &msg) {
    ensure_error_types();
    PyErr_SetString(g_invalid_value, msg.c_str());
    throw nb::python_error();
}

// DimensionMismatch(message, expected, actual); negative ints mean None.
[[noreturn]] static void raise_dim(const std::string &msg, int64_t expected, int64_t actual) {
    ensure_error_types();
    PyObject *e = expected < 0 ? (Py_INCREF(Py_None), Py_None) : PyLong_FromLongLong(expected);
    PyObject *a = actual < 0 ? (Py_INCREF(Py_None), Py_None) : PyLong_FromLongLong(actual);
    PyObject *inst = nullptr;
    if (g_dimension_mismatch == PyExc_ValueError)
        inst = PyObject_CallFunction(g_dimension_mismatch, "s", msg.c_str());
    else if (e && a)
        inst = PyObject_CallFunction(g_dimension_mismatch, "sOO", msg.c_str(), e, a);
    Py_XDECREF(e);
    Py_XDECREF(a);
    if (inst) {
        PyErr_SetObject((PyObject *) Py_TYPE(inst), inst);
        Py_DECREF(inst);
    }
    throw nb::python_error();
}

static std::string S(int64_t v) { return std::to_string(v); }

static std::string shape_str(int ndim, const int64_t *shape) {
    if (ndim == 1)
        return "(" + S(shape[0]) + ",)";
    std::string s = "(";
    for (int i = 0; i < ndim && i < 8; ++i)
        s += (i ? ", " : "") + S(shape[i]);
    return s + ")";
}

[[noreturn]] static void raise_nonfinite(const char *name, int64_t row, int64_t col) {
    std::string idx = col < 0 ? S(row) : "(" + S(row) + ", " + S(col) + ")";
    raise_invalid(std::string(name) + " contains a non-finite value at index " + idx);
}

// --------------------------------------------------------- array access --

enum class DT { F32, I64 };

static const char *dt_name(DT dt) { return dt == DT::F32 ? "float32" : "int64"; }

// Mirror of the leading fields of NumPy's PyArrayObject_fields / PyArray_Descr.
// These offsets are part of NumPy's C ABI (identical in NumPy 1.x and 2.x);
// init_numpy() still verifies them against the Python-level attributes of
// test arrays and disables this fast path if anything disagrees.
struct NpyDescrHead {
    PyObject_HEAD
    PyTypeObject *typeobj;
    char kind, type, byteorder, flags_or_unused;
    int type_num;
};
struct NpyArrayHead {
    PyObject_HEAD
    char *data;
    int nd;
    Py_ssize_t *dimensions;
    Py_ssize_t *strides;
    PyObject *base;
    NpyDescrHead *descr;
    int flags;
};
constexpr int kNpyCContiguous = 0x0001, kNpyAligned = 0x0100, kNpyWriteable = 0x0400;

struct NumPy {
    PyTypeObject *ndarray = nullptr;
    PyObject *empty = nullptr;      // numpy.empty
    PyObject *f32 = nullptr, *i64 = nullptr;  // numpy.dtype objects
    int f32_num = -1, i64_num_a = -1, i64_num_b = -1;
    bool fast = false;  // struct layout verified
};
static NumPy g_np;

struct Arr {
    char *data = nullptr;
    int ndim = 0;
    int64_t shape[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // first 8 dims (kernels use <= 2)
    int64_t size = 0;
    int64_t nbytes = 0;
    nb::ndarray<nb::ro> keep;  // holds DLPack imports alive (empty on the NumPy fast path)

    const float *f() const { return (const float *) data; }
    float *fw() const { return (float *) data; }
    int64_t *iw() const { return (int64_t *) data; }
};

static bool np_fast(PyObject *o, DT dt, bool writable, Arr &a) {
    if (Py_TYPE(o) != g_np.ndarray || !g_np.fast)
        return false;
    const NpyArrayHead *h = (const NpyArrayHead *) o;
    const int need = kNpyCContiguous | kNpyAligned | (writable ? kNpyWriteable : 0);
    if ((h->flags & need) != need || h->nd > 2 || h->descr->byteorder != '=')
        return false;
    const int tn = h->descr->type_num;
    if (dt == DT::F32 ? tn != g_np.f32_num : (tn != g_np.i64_num_a && tn != g_np.i64_num_b))
        return false;
    a.data = h->data;
    a.ndim = h->nd;
    a.size = 1;
    for (int i = 0; i < h->nd; ++i) {
        a.shape[i] = h->dimensions[i];
        a.size *= a.shape[i];
    }
    a.nbytes = a.size * (dt == DT::F32 ? 4 : 8);
    return true;
}

// str(obj.dtype) without a "torch." prefix, or "" if obj has no dtype.
static std::string obj_dtype_name(nb::handle h) {
    PyObject *dt = PyObject_GetAttrString(h.ptr(), "dtype");
    if (!dt) {
        PyErr_Clear();
        return "";
    }
    PyObject *s = PyObject_Str(dt);
    Py_DECREF(dt);
    if (!s) {
        PyErr_Clear();
        return "";
    }
    const char *c = PyUnicode_AsUTF8(s);
    std::string out = c ? c : "";
    Py_DECREF(s);
    PyErr_Clear();
    if (out.rfind("torch.", 0) == 0)
        out = out.substr(6);
    return out;
}

static bool truthy_attr(nb::handle h, const char *attr) {
    PyObject *v = PyObject_GetAttrString(h.ptr(), attr);
    if (!v) {
        PyErr_Clear();
        return false;
    }
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    if (t < 0)
        PyErr_Clear();
    return t == 1;
}

[[noreturn]] static void raise_layout(const char *name, DT dt, const std::string &got) {
    raise_invalid(std::string(name) + " must be a C-contiguous " + dt_name(dt) + " array, got " + got);
}

// Generic path: DLPack / buffer protocol through nanobind, no conversion.
static void parse_slow(nb::handle h, const char *name, DT dt, bool writable, Arr &a) {
    nb::ndarray<nb::ro> nd;
    if (!nb::try_cast(h, nd, false)) {
        if (truthy_attr(h, "requires_grad"))
            raise_invalid(std::string(name) + " requires grad; pass " + name + ".detach()");
        std::string got = obj_dtype_name(h);
        if (!got.empty())
            raise_layout(name, dt, got);
        raise_invalid(std::string(name) + " must be a C-contiguous " + dt_name(dt) +
                      " array (NumPy array or CPU torch tensor), got " + Py_TYPE(h.ptr())->tp_name);
    }
    // Autograd would not see what the kernel reads or writes: refuse rather than
    // silently detaching (torch exports such tensors through DLPack).
    if (truthy_attr(h, "requires_grad"))
        raise_invalid(std::string(name) + " requires grad; pass " + name + ".detach()");
    if (nd.device_type() != nb::device::cpu::value) {
        std::string dev = "type " + S(nd.device_type());
        PyObject *d = PyObject_GetAttrString(h.ptr(), "device");
        if (d) {
            PyObject *s = PyObject_Str(d);
            if (s && PyUnicode_AsUTF8(s))
                dev = PyUnicode_AsUTF8(s);
            Py_XDECREF(s);
            Py_DECREF(d);
        }
        PyErr_Clear();
        raise_invalid(std::string(name) + " must be on the CPU, got device " + dev);
    }
    const nb::dlpack::dtype want = dt == DT::F32 ? nb::dtype<float>() : nb::dtype<int64_t>();
    if (nd.dtype() != want) {
        std::string got = obj_dtype_name(h);
        if (got.empty())
            got = "dtype code " + S(nd.dtype().code) + " bits " + S(nd.dtype().bits);
        raise_layout(name, dt, got);
    }
    // C-contiguity as NumPy defines it: dims of extent 1 may have any stride,
    // and an empty array is contiguous.
    const int ndim = (int) nd.ndim();
    int64_t size = 1, expect = 1;
    bool contig = true;
    for (int i = 0; i < ndim; ++i)
        size *= (int64_t) nd.shape(i);
    if (size != 0)
        for (int i = ndim - 1; i >= 0; --i) {
            const int64_t n = (int64_t) nd.shape(i);
            if (n != 1 && nd.stride(i) != expect)
                contig = false;
            expect *= n;
        }
    if (!contig)
        raise_layout(name, dt, "a non-contiguous array");
    const size_t align = dt == DT::F32 ? alignof(float) : alignof(int64_t);
    if ((uintptr_t) nd.data() % align != 0)
        raise_layout(name, dt, "an unaligned array");
    if (writable) {
        nb::ndarray<> rw;
        if (!nb::try_cast(h, rw, false))
            raise_invalid(std::string(name) + " is read-only");
    }
    a.data = (char *) nd.data();
    a.ndim = ndim;
    a.size = size;
    a.nbytes = size * (dt == DT::F32 ? 4 : 8);
    for (int i = 0; i < ndim && i < 8; ++i)
        a.shape[i] = (int64_t) nd.shape(i);
    a.keep = std::move(nd);
}

static inline void parse(nb::handle h, const char *name, DT dt, bool writable, Arr &a) {
    if (!np_fast(h.ptr(), dt, writable, a))
        parse_slow(h, name, dt, writable, a);
}

static void require_ndim(const Arr &a, const char *name, int ndim, const char *layout) {
    if (a.ndim != ndim)
        raise_invalid(std::string(name) + " must be " + S(ndim) + "-D " + layout + ", got " +
                      S(a.ndim) + "-D");
}

static bool overlaps(const Arr &a, const Arr &b) {
    if (a.nbytes == 0 || b.nbytes == 0)
        return false;
    return a.data < b.data + b.nbytes && b.data < a.data + a.nbytes;
}

// A fresh C-contiguous output of the same array type as `like` (exact NumPy
// arrays: numpy.empty; anything else: the allocator sona_plugin.kernels
// registers, e.g. torch.empty on like.device).
static nb::object alloc_like(nb::handle like, DT dt, int ndim, const int64_t *shape) {
    PyObject *shp = ndim == 1 ? PyLong_FromLongLong(shape[0])
                              : Py_BuildValue("(LL)", (long long) shape[0], (long long) shape[1]);
    if (!shp)
        throw nb::python_error();
    PyObject *res;
    if (!like.ptr() || Py_TYPE(like.ptr()) == g_np.ndarray || !g_alloc) {
        PyObject *args[2] = {shp, dt == DT::F32 ? g_np.f32 : g_np.i64};
        res = PyObject_Vectorcall(g_np.empty, args, 2, nullptr);
    } else {
        PyObject *dtn = PyUnicode_FromString(dt_name(dt));
        PyObject *args[3] = {like.ptr(), shp, dtn};
        res = dtn ? PyObject_Vectorcall(g_alloc, args, 3, nullptr) : nullptr;
        Py_XDECREF(dtn);
    }
    Py_DECREF(shp);
    if (!res)
        throw nb::python_error();
    return nb::steal(res);
}

// -------------------------------------------------------- argument checks --
//
// Every check the bindings make on their arguments, each written once here.  The
// messages (and DimensionMismatch's expected / actual) are _kernels_numpy's, which
// the tests compare with these.

static std::string fmt_g(double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%g", v);
    return buf;
}

// h as a C-contiguous dt array of ndim dimensions; layout names them ("[T, d]").
static void parse_nd(nb::handle h, const char *name, int ndim, const char *layout, Arr &a,
                     bool writable = false, DT dt = DT::F32) {
    parse(h, name, dt, writable, a);
    require_ndim(a, name, ndim, layout);
}

// How an extent reads in "<name> has ..., expected <n>".
enum class Extent { Dimension, Rows, Columns, Length };

static void require_extent(const Arr &a, const char *name, int axis, int64_t want, Extent what) {
    const int64_t got = a.shape[axis];
    if (got == want)
        return;
    const std::string n = S(got);
    const std::string has = what == Extent::Dimension ? "dimension " + n
                            : what == Extent::Rows    ? n + " rows"
                            : what == Extent::Columns ? n + " columns"
                                                      : "length " + n;
    raise_dim(std::string(name) + " has " + has + ", expected " + S(want), want, got);
}

// A [r, d] with r >= 1.
static void require_rank(const Arr &A) {
    if (A.shape[0] == 0)
        raise_invalid("A has 0 rows; the rank r must be >= 1");
}

// A factor shaped like B, [d, r].
static void require_factor(const Arr &B, const char *name, int64_t d, int64_t r) {
    require_extent(B, name, 0, d, Extent::Rows);
    require_extent(B, name, 1, r, Extent::Columns);
}

// The recorded steps H [T, d], their upstream gradients G [T, d] and advantages adv [T].
static void require_steps(const Arr &H, const Arr &G, const Arr &adv, int64_t Tn, int64_t d) {
    require_extent(H, "H", 1, d, Extent::Dimension);
    require_extent(G, "G", 0, Tn, Extent::Rows);
    require_extent(G, "G", 1, d, Extent::Dimension);
    require_extent(adv, "adv", 0, Tn, Extent::Length);
}

// An output of like's shape.  DimensionMismatch carries the first differing extent
// when the ranks agree and with_extents is set, else (None, None).
static void require_shape_of(const Arr &o, const char *name, const Arr &like, bool with_extents) {
    int i = o.ndim == like.ndim ? 0 : -1;
    while (i >= 0 && i < o.ndim && o.shape[i] == like.shape[i])
        ++i;
    if (i == o.ndim)
        return;
    const bool ext = with_extents && i >= 0;
    raise_dim(std::string(name) + " has shape " + shape_str(o.ndim, o.shape) + ", expected " +
                  shape_str(like.ndim, like.shape),
              ext ? like.shape[i] : -1, ext ? o.shape[i] : -1);
}

// Outputs overlap no input (else in_msg) and no other output (else each_msg).
static void require_disjoint(std::initializer_list<const Arr *> outs,
                             std::initializer_list<const Arr *> ins, const char *in_msg,
                             const char *each_msg = "") {
    for (const Arr *o : outs)
        for (const Arr *in : ins)
            if (overlaps(*o, *in))
                raise_invalid(in_msg);
    for (auto a = outs.begin(); a != outs.end(); ++a)
        for (auto b = a + 1; b != outs.end(); ++b)
            if (overlaps(**a, **b))
                raise_invalid(each_msg);
}

static void require_at_least(const char *name, int64_t v, int64_t lo) {
    if (v < lo)
        raise_invalid(std::string(name) + " must be >= " + S(lo) + ", got " + S(v));
}

static float checked_scale(double scale) {
    const float s = (float) scale;
    if (!std::isfinite(s))
        raise_invalid("scale must be finite (as float32), got " + fmt_g(scale));
    return s;
}

// A kernel's Status: inputs[which - 1] held the first non-finite value.
static void check_status(const Status &st, std::initializer_list<const char *> inputs) {
    if (st.which)
        raise_nonfinite(inputs.begin()[st.which - 1], st.row, st.col);
}

// --------------------------------------------------------------- kernels --

static nb::object micro_lora_forward(nb::handle x_h, nb::handle A_h, nb::handle B_h, double scale,
                                     nb::handle out_h) {
    Arr x, A, B, out;
    parse(x_h, "x", DT::F32, false, x);
    if (x.ndim != 1 && x.ndim != 2)
        raise_invalid("x must be 1-D [d] or 2-D [n, d], got " + S(x.ndim) + "-D");
    if (x.size == 0)
        raise_invalid("x is empty, shape " + shape_str(x.ndim, x.shape));
    parse_nd(A_h, "A", 2, "[r, d]", A);
    const int64_t r = A.shape[0], d = A.shape[1];
    require_rank(A);
    require_extent(x, "x", x.ndim - 1, d, Extent::Dimension);
    parse_nd(B_h, "B", 2, "[d, r]", B);
    require_factor(B, "B", d, r);
    const float s = checked_scale(scale);
    nb::object result;
    if (out_h.is_none()) {
        result = alloc_like(x_h, DT::F32, x.ndim, x.shape);
        out_h = result;
    } else {
        result = nb::borrow(out_h);
    }
    parse(out_h, "out", DT::F32, true, out);
    require_shape_of(out, "out", x, true);
    require_disjoint({&out}, {&x, &A, &B}, "out must not share memory with x, A or B");

    const int64_t n = x.ndim == 2 ? x.shape[0] : 1;
    const Table &t = T();
    Status st;
    if (n * d >= kReleaseGilMinWork) {
        nb::gil_scoped_release nogil;
        st = t.lora_forward(x.f(), n, d, A.f(), B.f(), r, s, out.fw());
    } else {
        st = t.lora_forward(x.f(), n, d, A.f(), B.f(), r, s, out.fw());
    }
    check_status(x.ndim == 1 ? Status::at(st.which, st.col, -1) : st, {"x"});
    return result;
}

static void reinforce_accumulate(nb::handle H_h, nb::handle G_h, nb::handle adv_h, nb::handle A_h,
                                 nb::handle B_h, double scale, nb::handle gA_h, nb::handle gB_h) {
    Arr H, G, adv, A, B, gA, gB;
    parse_nd(H_h, "H", 2, "[T, d]", H);
    parse_nd(G_h, "G", 2, "[T, d]", G);
    parse_nd(adv_h, "adv", 1, "[T]", adv);
    parse_nd(A_h, "A", 2, "[r, d]", A);
    parse_nd(B_h, "B", 2, "[d, r]", B);
    const int64_t Tn = H.shape[0], r = A.shape[0], d = A.shape[1];
    require_rank(A);
    require_steps(H, G, adv, Tn, d);
    require_factor(B, "B", d, r);
    const float s = checked_scale(scale);
    parse_nd(gA_h, "grad_A", 2, "[r, d]", gA, true);
    require_shape_of(gA, "grad_A", A, false);
    parse_nd(gB_h, "grad_B", 2, "[d, r]", gB, true);
    require_shape_of(gB, "grad_B", B, false);
    require_disjoint({&gA, &gB}, {&H, &G, &adv, &A, &B},
                     "grad_A and grad_B must not share memory with H, G, adv, A or B",
                     "grad_A and grad_B must not share memory with each other");

    const Table &t = T();
    Status st;
    if (Tn * d >= kReleaseGilMinWork) {
        nb::gil_scoped_release nogil;
        st = t.reinforce(H.f(), G.f(), adv.f(), Tn, d, A.f(), B.f(), r, s, gA.fw(), gB.fw());
    } else {
        st = t.reinforce(H.f(), G.f(), adv.f(), Tn, d, A.f(), B.f(), r, s, gA.fw(), gB.fw());
    }
    check_status(st, {"H", "G", "adv"});
}

static nb::tuple cosine_topk(nb::handle P_h, nb::handle q_h, int64_t k, nb::handle pn_h) {
    Arr P, q, pn;
    parse_nd(P_h, "P", 2, "[m, d]", P);
    parse_nd(q_h, "q", 1, "[d]", q);
    const int64_t m = P.shape[0], d = P.shape[1];
    require_extent(q, "q", 0, d, Extent::Dimension);
    if (k <= 0)
        raise_invalid("k must be > 0, got " + S(k));
    const bool have_norms = !pn_h.is_none();
    if (have_norms) {
        parse_nd(pn_h, "P_norms", 1, "[m]", pn);
        require_extent(pn, "P_norms", 0, m, Extent::Length);
    }
    const Table &t = T();
    float qsq;
    if (!t.sq_norm_checked(q.f(), d, &qsq))
        raise_nonfinite("q", first_nonfinite(q.f(), d), -1);
    const float qn = std::sqrt(qsq);
    const int64_t kk = std::min<int64_t>(k, m);

    nb::object idx_o = alloc_like(nb::handle(), DT::I64, 1, &kk);
    nb::object sims_o = alloc_like(nb::handle(), DT::F32, 1, &kk);
    Arr idx_a, sims_a;
    parse(idx_o, "idx", DT::I64, true, idx_a);
    parse(sims_o, "sims", DT::F32, true, sims_a);
    if (kk > 0) {
        int64_t *idx_out = idx_a.iw();
        float *sims_out = sims_a.fw();
        const float *P_ = P.f(), *q_ = q.f(), *pn_ = have_norms ? pn.f() : nullptr;
        auto work = [&]() {
            std::vector<float> sims((size_t) m), norms;
            if (!pn_) {
                norms.resize((size_t) m);
                t.row_norms(P_, m, d, norms.data());
                pn_ = norms.data();
            }
            t.cos_sims(P_, m, d, q_, qn, pn_, sims.data());
            // Ranking key: NaN (only from non-finite P) sorts last.
            std::vector<float> key(sims);
            for (float &v : key)
                if (std::isnan(v))
                    v = -std::numeric_limits<float>::infinity();
            std::vector<int64_t> order((size_t) m);
            std::iota(order.begin(), order.end(), int64_t(0));
            auto better = [&](int64_t a, int64_t b) {
                const float ka = key[(size_t) a], kb = key[(size_t) b];
                return ka > kb || (ka == kb && a < b);
            };
            // Partial selection: O(m) nth_element, then sort only the top kk.
            if (kk < m)
                std::nth_element(order.begin(), order.begin() + kk, order.end(), better);
            std::sort(order.begin(), order.begin() + kk, better);
            for (int64_t i = 0; i < kk; ++i) {
                idx_out[i] = order[(size_t) i];
                sims_out[i] = sims[(size_t) order[(size_t) i]];
            }
        };
        if (m * d >= kReleaseGilMinWork) {
            nb::gil_scoped_release nogil;
            work();
        } else {
            work();
        }
    }
    return nb::make_tuple(idx_o, sims_o);
}

static nb::tuple kmeans_assign(nb::handle X_h, nb::handle C_h, nb::handle lab_h, nb::handle dist_h) {
    Arr X, C, lab, dist;
    parse_nd(X_h, "X", 2, "[n, d]", X);
    parse_nd(C_h, "C", 2, "[k, d]", C);
    const int64_t n = X.shape[0], d = X.shape[1], k = C.shape[0];
    require_extent(C, "C", 1, d, Extent::Dimension);
    if (k == 0)
        raise_invalid("C has no centroids (k = 0)");
    nb::object lab_o = lab_h.is_none() ? alloc_like(X_h, DT::I64, 1, &n) : nb::borrow(lab_h);
    parse_nd(lab_o, "labels", 1, "[n]", lab, true, DT::I64);
    require_extent(lab, "labels", 0, n, Extent::Length);
    nb::object dist_o = dist_h.is_none() ? alloc_like(X_h, DT::F32, 1, &n) : nb::borrow(dist_h);
    parse_nd(dist_o, "sq_dists", 1, "[n]", dist, true);
    require_extent(dist, "sq_dists", 0, n, Extent::Length);
    require_disjoint({&lab, &dist}, {&X, &C},
                     "labels and sq_dists must not share memory with X or C",
                     "labels and sq_dists must not share memory with each other");

    const Table &t = T();
    Status st;
    if (n * k * d >= kReleaseGilMinWork) {
        nb::gil_scoped_release nogil;
        st = t.kmeans(X.f(), n, d, C.f(), k, lab.iw(), dist.fw());
    } else {
        st = t.kmeans(X.f(), n, d, C.f(), k, lab.iw(), dist.fw());
    }
    check_status(st, {"X", "C"});
    return nb::make_tuple(lab_o, dist_o);
}

static nb::tuple micro_update(nb::handle H_h, nb::handle G_h, nb::handle adv_h, nb::handle A_h,
                              nb::handle B_h, nb::handle B0_h, nb::handle v_h, int64_t t,
                              double scale, double lr, double beta2, double decay,
                              double grad_clip, double norm_cap, double trust_region,
                              int64_t max_halvings, nb::handle Ao_h, nb::handle Bo_h,
                              nb::handle vo_h) {
    Arr H, G, adv, A, B, B0, v, Ao, Bo, vo;
    parse_nd(H_h, "H", 2, "[T, d]", H);
    parse_nd(G_h, "G", 2, "[T, d]", G);
    parse_nd(adv_h, "adv", 1, "[T]", adv);
    parse_nd(A_h, "A", 2, "[r, d]", A);
    parse_nd(B_h, "B", 2, "[d, r]", B);
    parse_nd(B0_h, "B0", 2, "[d, r]", B0);
    parse_nd(v_h, "v", 1, "[2*r*d]", v);
    const int64_t Tn = H.shape[0], r = A.shape[0], d = A.shape[1], n = 2 * r * d;
    require_rank(A);
    if (r > kMicroMaxRank)
        raise_invalid("the rank r must be <= " + S(kMicroMaxRank) + ", got " + S(r));
    if (Tn == 0)
        raise_invalid("H has no rows; T must be >= 1");
    require_steps(H, G, adv, Tn, d);
    require_factor(B, "B", d, r);
    require_factor(B0, "B0", d, r);
    require_extent(v, "v", 0, n, Extent::Length);
    const float s = checked_scale(scale);
    require_at_least("t", t, 1);
    require_at_least("max_halvings", max_halvings, 0);
    if (!(beta2 >= 0.0 && beta2 < 1.0))
        raise_invalid("beta2 must be in [0, 1), got " + fmt_g(beta2));
    for (const auto &[name, val] : {std::pair<const char *, double>{"lr", lr}, {"decay", decay},
                                    {"grad_clip", grad_clip}, {"norm_cap", norm_cap},
                                    {"trust_region", trust_region}})
        if (std::isnan(val))
            raise_invalid(std::string(name) + " must not be NaN");
    struct Out {
        nb::handle h;
        const char *name, *layout;
        Arr *a;
        const Arr *like;
    };
    for (const Out &o : {Out{Ao_h, "A_out", "[r, d]", &Ao, &A}, Out{Bo_h, "B_out", "[d, r]", &Bo, &B},
                         Out{vo_h, "v_out", "[2*r*d]", &vo, &v}}) {
        parse_nd(o.h, o.name, o.like->ndim, o.layout, *o.a, true);
        require_shape_of(*o.a, o.name, *o.like, true);
    }
    require_disjoint({&Ao, &Bo, &vo}, {&H, &G, &adv, &A, &B, &B0, &v},
                     "A_out, B_out and v_out must not share memory with the inputs",
                     "A_out, B_out and v_out must not share memory with each other");

    const MicroArgs args{H.f(),  G.f(),     adv.f(), A.f(),     B.f(),         B0.f(),
                         v.f(),  Tn,        d,       r,         t,             max_halvings,
                         (double) s, lr,    beta2,   decay,     grad_clip,     norm_cap,
                         trust_region, Ao.fw(), Bo.fw(), vo.fw()};
    MicroResult res{};
    const Table &tab = T();
    Status st;
    if (Tn * d >= kReleaseGilMinWork) {
        nb::gil_scoped_release nogil;
        st = tab.micro_update(args, &res);
    } else {
        st = tab.micro_update(args, &res);
    }
    if (st.which == 4)
        raise_invalid("gradient is not finite");
    check_status(st, {"H", "G", "adv"});
    return nb::make_tuple(res.accepted, res.frac, res.div, res.gnorm, res.delta_norm);
}

// ---------------------------------------------------------- SIMD control --

static void set_simd_level(const std::string &level) {
    const Table *tab = table_for(level);
    if (!tab)
        raise_invalid("unknown SIMD level '" + level + "'; expected one of avx512, avx2, neon, scalar");
    if (!cpu_supports(level)) {
        std::string have;
        for (const auto &l : supported_levels())
            have += (have.empty() ? "" : ", ") + l;
        raise_invalid("this CPU does not support SIMD level '" + level + "' (supported: " + have + ")");
    }
    g_table.store(tab, std::memory_order_relaxed);
    g_level = level;
}

static int level_rank(const std::string &l) {
    if (l == "scalar") return 0;
    if (l == "avx2" || l == "neon") return 1;
    if (l == "avx512") return 2;
    return -1;
}

// Highest supported level, capped by $SONA_SIMD (unknown values warn and are ignored).
static void init_simd() {
    int cap = 99;
    if (const char *env = std::getenv("SONA_SIMD"); env && *env) {
        cap = level_rank(env);
        if (cap < 0) {
            std::string msg = std::string("ignoring SONA_SIMD=") + env +
                              " (expected scalar, avx2 or avx512)";
            if (PyErr_WarnEx(PyExc_RuntimeWarning, msg.c_str(), 1) < 0)
                throw nb::python_error();
            cap = 99;
        }
    }
    for (const auto &l : supported_levels())  // highest first
        if (level_rank(l) <= cap) {
            set_simd_level(l);
            return;
        }
}

// Import NumPy, cache numpy.empty and the dtypes, and verify the struct mirror.
static void init_numpy() {
    nb::module_ np = nb::module_::import_("numpy");
    g_np.ndarray = (PyTypeObject *) nb::object(np.attr("ndarray")).release().ptr();
    g_np.empty = nb::object(np.attr("empty")).release().ptr();
    nb::object dtype = np.attr("dtype");
    nb::object f32 = dtype("float32"), i64 = dtype("int64"), ll = dtype("longlong");
    g_np.f32_num = nb::cast<int>(f32.attr("num"));
    g_np.i64_num_a = nb::cast<int>(i64.attr("num"));
    g_np.i64_num_b = nb::cast<int>(ll.attr("itemsize")) == 8 ? nb::cast<int>(ll.attr("num")) : -1;
    g_np.f32 = f32.release().ptr();
    g_np.i64 = i64.release().ptr();

    // Layout self-test: compare what the mirror reads with NumPy's own answers.
    bool ok = true;
    auto check = [&](nb::object arr) {
        const NpyArrayHead *h = (const NpyArrayHead *) arr.ptr();
        nb::object iface = arr.attr("__array_interface__");
        nb::tuple shape = nb::cast<nb::tuple>(arr.attr("shape"));
        nb::tuple strides = nb::cast<nb::tuple>(arr.attr("strides"));
        nb::object flags = arr.attr("flags");
        ok = ok && (uintptr_t) h->data == nb::cast<uintptr_t>(iface["data"][0]);
        ok = ok && h->nd == (int) nb::len(shape);
        for (size_t i = 0; ok && i < nb::len(shape); ++i)
            ok = h->dimensions[i] == nb::cast<Py_ssize_t>(shape[i]) &&
                 h->strides[i] == nb::cast<Py_ssize_t>(strides[i]);
        ok = ok && h->descr->type_num == nb::cast<int>(arr.attr("dtype").attr("num"));
        ok = ok && ((h->flags & kNpyCContiguous) != 0) == nb::cast<bool>(flags.attr("c_contiguous"));
        ok = ok && ((h->flags & kNpyWriteable) != 0) == nb::cast<bool>(flags.attr("writeable"));
        ok = ok && ((h->flags & kNpyAligned) != 0) == nb::cast<bool>(flags.attr("aligned"));
    };
    nb::object a = np.attr("zeros")(nb::make_tuple(3, 5), "float32");
    check(a);
    check(a[nb::make_tuple(nb::slice(nb::none(), nb::none(), nb::none()),
                           nb::slice(nb::none(), nb::none(), nb::int_(2)))]);
    check(a.attr("T"));
    nb::object ro = np.attr("zeros")(7, "int64");
    ro.attr("flags").attr("writeable") = false;
    check(ro);
    ok = ok && ((const NpyArrayHead *) a.ptr())->descr->byteorder == '=';
    g_np.fast = ok;
}

}  // namespace sona

NB_MODULE(_native, m) {
    using namespace sona;
    m.doc() = "float32 SIMD kernels of sona_plugin (use sona_plugin.kernels, not this module)";
    init_numpy();
    init_simd();

    m.def("micro_lora_forward", &micro_lora_forward, nb::arg("x"), nb::arg("A"), nb::arg("B"),
          nb::arg("scale"), nb::arg("out") = nb::none(),
          "out = x + scale * B @ (A @ x), per row of x; allocates out if None; returns out.");
    m.def("reinforce_accumulate", &reinforce_accumulate, nb::arg("H"), nb::arg("G"),
          nb::arg("adv"), nb::arg("A"), nb::arg("B"), nb::arg("scale"), nb::arg("grad_A"),
          nb::arg("grad_B"),
          "grad_B += s sum_t adv_t g_t (A h_t)^T; grad_A += s sum_t adv_t (B^T g_t) h_t^T, in place.");
    m.def("cosine_topk", &cosine_topk, nb::arg("P"), nb::arg("q"), nb::arg("k"),
          nb::arg("P_norms") = nb::none(),
          "Top-k rows of P by cosine similarity to q: (idx int64[k'], sims float32[k']).");
    m.def("kmeans_assign", &kmeans_assign, nb::arg("X"), nb::arg("C"),
          nb::arg("labels") = nb::none(), nb::arg("sq_dists") = nb::none(),
          "Nearest centroid (squared L2) per row of X: (labels int64[n], sq_dists float32[n]).");
    m.def("micro_update", &micro_update, nb::arg("H"), nb::arg("G"), nb::arg("adv"), nb::arg("A"),
          nb::arg("B"), nb::arg("B0"), nb::arg("v"), nb::arg("t"), nb::arg("scale"), nb::arg("lr"),
          nb::arg("beta2"), nb::arg("decay"), nb::arg("grad_clip"), nb::arg("norm_cap"),
          nb::arg("trust_region"), nb::arg("max_halvings"), nb::arg("A_out"), nb::arg("B_out"),
          nb::arg("v_out"),
          "One stabilised Adam step of the MicroLoRA y = h + s B A h (decay, gradient of "
          "sum_t adv_t G_t . y_t, clipping, Adam, norm cap, trust region by step halving); writes "
          "A_out, B_out, v_out; returns (accepted, frac, div, gnorm, delta_norm).");
    m.def("simd_level", []() { return g_level; }, "Active SIMD level: avx512, avx2, neon or scalar.");
    m.def("supported_simd_levels", &supported_levels, "SIMD levels this CPU can run, highest first.");
    m.def("set_simd_level", &set_simd_level, nb::arg("name"),
          "Switch the kernels to a SIMD level this CPU supports (not thread-safe w.r.t. running calls' level name).");
    m.def(
        "set_error_types",
        [](nb::handle dim_cls, nb::handle inv_cls) {
            if (!PyType_Check(dim_cls.ptr()) || !PyType_Check(inv_cls.ptr()))
                throw nb::type_error("set_error_types expects two exception classes");
            PyObject *old_d = g_dimension_mismatch, *old_i = g_invalid_value;
            g_dimension_mismatch = Py_NewRef(dim_cls.ptr());
            g_invalid_value = Py_NewRef(inv_cls.ptr());
            Py_XDECREF(old_d);
            Py_XDECREF(old_i);
        },
        nb::arg("dimension_mismatch"), nb::arg("invalid_value"),
        "Exception classes raised for shape errors and for invalid values.");
    m.def(
        "set_allocator",
        [](nb::handle fn) {
            PyObject *old = g_alloc;
            g_alloc = fn.is_none() ? nullptr : Py_NewRef(fn.ptr());
            Py_XDECREF(old);
        },
        nb::arg("fn").none(),
        "fn(like, shape, dtype_name) -> new C-contiguous array of like's type; used for omitted "
        "outputs when the input is not a numpy.ndarray.");
    m.attr("GIL_RELEASE_MIN_WORK") = kReleaseGilMinWork;
    m.def("numpy_fast_path", []() { return g_np.fast; },
          "Whether exact numpy.ndarray arguments are read directly (layout self-test passed).");
}
