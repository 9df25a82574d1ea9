// The only native file that knows about Python.
//
// How an entry point crosses the boundary (follow this for a new op):
//  1. csrc/include/mmkern/<op>.h declares it, once: a parameter struct per entry point, `<Op>FwdParams`,
//     `<Op>BwdParams`, ... (Tensor fields, an absent optional tensor being !present; scalars in their C++ types),
//     whose `fields(f)` member names every field; then the entry points, `int <op>_fwd_cuda(const P&, uintptr_t
//     stream)` (a cudaError_t) and, in the per-level CPU namespace (MMKERN_CPU_BEGIN), `void <op>_fwd_cpu(const
//     P&, int num_threads)`. The CPU and CUDA sources include that header, so the compiler holds each definition
//     to it. A CPU entry point also gets its slot in CpuKernels (mmkern/cpu_kernels.h, csrc/cpu/kernels.cpp).
//  2. Here, one line each: def_cpu(m, "<op>_fwd_cpu", &CpuKernels::<op>_fwd) and def_cuda(m, "<op>_fwd_cuda",
//     &mmkern::<op>_fwd_cuda).
//  3. Python calls mmkern._native.launch("<op>_fwd", device, {tensor fields by name}, {scalar fields by name}):
//     two dict displays with every field, tensors as torch tensors or None. launch turns each tensor into the
//     tuple that to_tensor reads (_native.tensor_args: (data_ptr, dtype_code, sizes, strides, device_index), None
//     for an absent one) and adds num_threads or the stream. A missing, unknown or mistyped field is a TypeError
//     that names it: nothing is matched by position. (Dicts, not **kwargs: a call with 24 keyword arguments
//     builds a new dict at every Python level it passes, microseconds per call; a dict display is built once.)
// Every kernel runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "mmkern/attention.h"
#include "mmkern/common.h"
#include "mmkern/contrastive.h"
#include "mmkern/cpu_kernels.h"
#include "mmkern/fused.h"
#include "mmkern/patch_embed.h"
#include "mmkern/rms_norm.h"

#ifdef MMKERN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;
using mmkern::Tensor;


namespace {

// Why a tensor tuple is malformed; params_from names the entry point and the field.
struct BadTensorTuple {
  std::string why;
};

// An int field of a tensor tuple; -1 with a Python error set is how the C API reports a failed conversion.
long long tuple_int(PyObject* item, const char* what) {
  const long long v = PyLong_AsLongLong(item);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    throw BadTensorTuple{std::string(what) + (PyLong_Check(item) ? ": out of the int64 range"
                                                                 : std::string(": expected an int, got ") +
                                                                       Py_TYPE(item)->tp_name)};
  }
  return v;
}

// The tuple _native.tensor_args builds, (data_ptr, dtype_code, sizes, strides, device_index), or None, read with the
// C API straight into the fixed arrays: this runs for every tensor of every native call, and pybind11's casts (a
// tuple object, two std::vectors) cost about as much as a small kernel. Anything but a tuple is a py::cast_error
// (params_from: "has the wrong type"); a tuple that is not one of tensor_args' is a BadTensorTuple.
Tensor to_tensor(PyObject* obj) {
  Tensor t;
  if (obj == Py_None) return t;
  if (!PyTuple_Check(obj)) throw py::cast_error();
  if (PyTuple_GET_SIZE(obj) != 5)
    throw BadTensorTuple{"expected (data_ptr, dtype_code, sizes, strides, device_index), a tuple of " +
                         std::to_string(PyTuple_GET_SIZE(obj))};
  PyObject* ptr = PyTuple_GET_ITEM(obj, 0);
  if (!PyLong_Check(ptr)) throw BadTensorTuple{std::string("data_ptr: expected an int, got ") + Py_TYPE(ptr)->tp_name};
  t.data = PyLong_AsVoidPtr(ptr);
  if (!t.data && PyErr_Occurred()) {
    PyErr_Clear();
    throw BadTensorTuple{"data_ptr: not an address"};
  }
  const long long code = tuple_int(PyTuple_GET_ITEM(obj, 1), "dtype_code");
  if (code < 0 || code > static_cast<long long>(mmkern::DType::u8))
    throw BadTensorTuple{"dtype_code: unknown code " + std::to_string(code)};
  t.dtype = static_cast<mmkern::DType>(code);
  PyObject* sizes = PyTuple_GET_ITEM(obj, 2);
  PyObject* strides = PyTuple_GET_ITEM(obj, 3);
  if (!PyTuple_Check(sizes) || !PyTuple_Check(strides)) throw BadTensorTuple{"sizes, strides: expected tuples"};
  const Py_ssize_t ndim = PyTuple_GET_SIZE(sizes);
  if (ndim > mmkern::kMaxDims)
    throw BadTensorTuple{std::to_string(ndim) + " dimensions, more than the " + std::to_string(mmkern::kMaxDims) +
                         " native code takes"};
  if (PyTuple_GET_SIZE(strides) != ndim) throw BadTensorTuple{"sizes and strides differ in length"};
  t.ndim = static_cast<int>(ndim);
  for (int i = 0; i < t.ndim; ++i) {
    t.sizes[i] = tuple_int(PyTuple_GET_ITEM(sizes, i), "sizes");
    t.strides[i] = tuple_int(PyTuple_GET_ITEM(strides, i), "strides");
  }
  const long long device = tuple_int(PyTuple_GET_ITEM(obj, 4), "device_index");
  if (device < -1 || device > INT32_MAX) throw BadTensorTuple{"device_index: " + std::to_string(device)};
  t.device = static_cast<int>(device);
  t.present = true;
  return t;
}


std::string cpu_features() {
  std::string out;
#if defined(__x86_64__)
  auto add = [&](bool has, const char* name) {
    if (has) out += (out.empty() ? "" : " ") + std::string(name);
  };
  __builtin_cpu_init();
  add(__builtin_cpu_supports("avx2"), "avx2");
  add(__builtin_cpu_supports("fma"), "fma");
  add(__builtin_cpu_supports("f16c"), "f16c");
  add(__builtin_cpu_supports("avx512f"), "avx512f");
  add(__builtin_cpu_supports("avx512bw"), "avx512bw");
  add(__builtin_cpu_supports("avx512vl"), "avx512vl");
  add(__builtin_cpu_supports("avx512dq"), "avx512dq");
  add(__builtin_cpu_supports("avx512bf16"), "avx512bf16");
  add(__builtin_cpu_supports("avx512fp16"), "avx512fp16");
  add(__builtin_cpu_supports("amx-bf16"), "amx-bf16");
#endif
  return out;
}

// Whether this CPU (and its OS: libgcc's checks include the vector registers' state in XCR0) has the instructions
// that setup.py enables for a level.
#if defined(__x86_64__)
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
bool has_avx512_bf16() { return has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#endif

// The CPU kernel levels compiled in, best first.
struct Level {
  const mmkern::CpuKernels* kernels;
  bool (*supported)();
};

const std::vector<Level>& levels() {
  static const std::vector<Level> all = {
#if defined(__x86_64__)
      {&mmkern::cpu_kernels_avx512_bf16, has_avx512_bf16},
      {&mmkern::cpu_kernels_avx512, has_avx512},
      {&mmkern::cpu_kernels_avx2, has_avx2},
#endif
      {&mmkern::cpu_kernels_default, [] { return true; }},
  };
  return all;
}

std::vector<std::string> level_names(bool supported_only) {
  std::vector<std::string> out;
  for (const Level& l : levels())
    if (!supported_only || l.supported()) out.push_back(l.kernels->level);
  return out;
}

// The level the CPU kernels run at: the best this CPU supports, until set_cpu_capability chooses another.
const mmkern::CpuKernels* g_cpu = nullptr;

const mmkern::CpuKernels& cpu() { return *g_cpu; }

void set_cpu_capability(const std::string& name) {
  std::string known;
  for (const Level& l : levels()) {
    known += (known.empty() ? "" : ", ") + std::string(l.kernels->level);
    if (name != l.kernels->level) continue;
    if (!l.supported()) {
      std::string have;
      for (const std::string& s : level_names(true)) have += (have.empty() ? "" : ", ") + s;
      throw std::invalid_argument("cpu capability " + name + " needs instructions this CPU lacks (it runs: " + have +
                                  ")");
    }
    g_cpu = l.kernels;
    return;
  }
  throw std::invalid_argument("cpu capability: unknown level '" + name + "' (compiled in: " + known + ")");
}

#ifdef MMKERN_WITH_CUDA
void check_cuda(int err, const char* what) {
  if (err != 0)
    throw std::runtime_error(std::string(what) + ": CUDA error: " + cudaGetErrorString(static_cast<cudaError_t>(err)));
}
#endif

// ---- Parameter structs from Python, by name ----

void from_py(py::handle value, Tensor& field) { field = to_tensor(value.ptr()); }
template <class T>
void from_py(py::handle value, T& field) {
  field = value.cast<T>();
}

// The names of P's tensor fields and of its scalar fields, interned once (so is a dict display's constant key,
// so a lookup compares pointers). Kept for the life of the process.
template <class P>
struct FieldNames {
  std::vector<PyObject*> tensors, scalars;
  std::string list;  // "tensors q, k; scalars scale, causal", for the docstring and errors
};
template <class P>
const FieldNames<P>& field_names() {
  static const FieldNames<P> names = [] {
    FieldNames<P> out;
    std::string t, s;
    P p{};
    p.fields([&](const char* name, auto& field) {
      const bool tensor = std::is_same_v<std::decay_t<decltype(field)>, Tensor>;
      (tensor ? out.tensors : out.scalars).push_back(PyUnicode_InternFromString(name));
      std::string& list = tensor ? t : s;
      list += (list.empty() ? "" : ", ") + std::string(name);
    });
    out.list = "tensors {" + t + "}, scalars {" + s + "}";
    return out;
  }();
  return names;
}

// Raises TypeError for the first key of `given` that is not in `known`.
void reject_unknown(const char* entry, const char* what, const py::dict& given, const std::vector<PyObject*>& known) {
  for (auto item : given)
    if (std::find(known.begin(), known.end(), item.first.ptr()) == known.end())
      throw py::type_error(std::string(entry) + ": unknown " + what + " '" + std::string(py::str(item.first)) + "'");
}

// P with every tensor field taken from `tensors` and every scalar field from `scalars`, by name: each must be
// there, and nothing else may.
template <class P>
P params_from(const char* entry, const py::dict& tensors, const py::dict& scalars) {
  const FieldNames<P>& names = field_names<P>();
  P p{};
  size_t t = 0, s = 0;
  p.fields([&](const char* name, auto& field) {
    const bool tensor = std::is_same_v<std::decay_t<decltype(field)>, Tensor>;
    PyObject* key = tensor ? names.tensors[t++] : names.scalars[s++];
    PyObject* value = PyDict_GetItem((tensor ? tensors : scalars).ptr(), key);
    if (!value)
      throw py::type_error(std::string(entry) + ": missing " + (tensor ? "tensor" : "scalar") + " '" + name + "'");
    try {
      from_py(value, field);
    } catch (const py::cast_error&) {
      throw py::type_error(std::string(entry) + ": '" + name + "' has the wrong type " +
                           std::string(py::str(py::type::handle_of(value))));
    } catch (const BadTensorTuple& bad) {
      throw py::type_error(std::string(entry) + ": tensor '" + name + "': " + bad.why);
    }
  });
  // Every field was found, so any further key is unknown.
  if (tensors.size() != names.tensors.size()) reject_unknown(entry, "tensor", tensors, names.tensors);
  if (scalars.size() != names.scalars.size()) reject_unknown(entry, "scalar", scalars, names.scalars);
  return p;
}

// `name`(tensors, scalars, num_threads): the CPU entry point at the selected ISA level.
template <class P>
void def_cpu(py::module_& m, const char* name, mmkern::CpuEntry<P>* mmkern::CpuKernels::*entry) {
  m.def(
      name,
      [name, entry](const py::dict& tensors, const py::dict& scalars, int num_threads) {
        const P p = params_from<P>(name, tensors, scalars);
        py::gil_scoped_release release;
        (cpu().*entry)(p, num_threads);
      },
      py::arg("tensors"), py::arg("scalars"), py::arg("num_threads"), field_names<P>().list.c_str());
}

#ifdef MMKERN_WITH_CUDA
// `name`(tensors, scalars, stream): the CUDA entry point launched on `stream`; a CUDA error raises RuntimeError.
template <class P>
void def_cuda(py::module_& m, const char* name, int (*entry)(const P&, uintptr_t)) {
  m.def(
      name,
      [name, entry](const py::dict& tensors, const py::dict& scalars, uintptr_t stream) {
        const P p = params_from<P>(name, tensors, scalars);
        int err;
        {
          py::gil_scoped_release release;
          err = entry(p, stream);
        }
        check_cuda(err, name);
      },
      py::arg("tensors"), py::arg("scalars"), py::arg("stream"), field_names<P>().list.c_str());
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mmkern native kernels (torch-free; see mmkern/_native.py)";

#if defined(__x86_64__)
  __builtin_cpu_init();
#endif
  for (const Level& l : levels())
    if (!g_cpu && l.supported()) g_cpu = l.kernels;
  m.def("cpu_features", &cpu_features, "ISA extensions this CPU supports");
  m.def("cpu_capabilities", [] { return level_names(false); }, "CPU kernel levels compiled in, best first");
  m.def("supported_cpu_capabilities", [] { return level_names(true); },
        "CPU kernel levels this CPU can run, best first");
  m.def("cpu_capability", [] { return std::string(cpu().level); }, "the level the CPU kernels run at");
  m.def("set_cpu_capability", &set_cpu_capability, py::arg("level"),
        "runs the CPU kernels at `level` (ValueError if it is not compiled in or this CPU lacks its instructions)");
  m.def("cuda_archs", [] { return std::string(MMKERN_CUDA_ARCHS); }, "CUDA archs compiled in ('' if none)");
  m.def("with_cuda", [] {
#ifdef MMKERN_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_device_count", [] {
#ifdef MMKERN_WITH_CUDA
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
#else
    return 0;
#endif
  });

  using mmkern::CpuKernels;

  // ---- fused ----
  def_cpu(m, "bias_gelu_fwd_cpu", &CpuKernels::bias_gelu_fwd);
  def_cpu(m, "bias_gelu_bwd_cpu", &CpuKernels::bias_gelu_bwd);
  def_cpu(m, "add_layer_norm_fwd_cpu", &CpuKernels::add_layer_norm_fwd);
  def_cpu(m, "add_layer_norm_bwd_cpu", &CpuKernels::add_layer_norm_bwd);
#ifdef MMKERN_WITH_CUDA
  def_cuda(m, "bias_gelu_fwd_cuda", &mmkern::bias_gelu_fwd_cuda);
  def_cuda(m, "bias_gelu_bwd_cuda", &mmkern::bias_gelu_bwd_cuda);
  def_cuda(m, "add_layer_norm_fwd_cuda", &mmkern::add_layer_norm_fwd_cuda);
  def_cuda(m, "add_layer_norm_bwd_cuda", &mmkern::add_layer_norm_bwd_cuda);
#endif

  // ---- patch_embed, patch_embed_packed (whose backward is patch_embed's, over the patches as 1-patch images) ----
  def_cpu(m, "patch_embed_fwd_cpu", &CpuKernels::patch_embed_fwd);
  def_cpu(m, "patch_embed_bwd_cpu", &CpuKernels::patch_embed_bwd);
  def_cpu(m, "patch_embed_packed_fwd_cpu", &CpuKernels::patch_embed_packed_fwd);
#ifdef MMKERN_WITH_CUDA
  def_cuda(m, "patch_embed_fwd_cuda", &mmkern::patch_embed_fwd_cuda);
  def_cuda(m, "patch_embed_bwd_cuda", &mmkern::patch_embed_bwd_cuda);
  def_cuda(m, "patch_embed_packed_fwd_cuda", &mmkern::patch_embed_packed_fwd_cuda);
#endif

  // ---- attention ----
  def_cpu(m, "attention_fwd_cpu", &CpuKernels::attention_fwd);
  def_cpu(m, "attention_bwd_cpu", &CpuKernels::attention_bwd);
  def_cpu(m, "attention_dropout_mask_cpu", &CpuKernels::attention_dropout_mask);
#ifdef MMKERN_WITH_CUDA
  def_cuda(m, "attention_fwd_cuda", &mmkern::attention_fwd_cuda);
  def_cuda(m, "attention_bwd_cuda", &mmkern::attention_bwd_cuda);
#endif

  // ---- contrastive ----
  def_cpu(m, "contrastive_fwd_cpu", &CpuKernels::contrastive_fwd);
  def_cpu(m, "contrastive_bwd_cpu", &CpuKernels::contrastive_bwd);
  def_cpu(m, "contrastive_fused_cpu", &CpuKernels::contrastive_fused);
#ifdef MMKERN_WITH_CUDA
  def_cuda(m, "contrastive_fwd_cuda", &mmkern::contrastive_fwd_cuda);
  def_cuda(m, "contrastive_bwd_cuda", &mmkern::contrastive_bwd_cuda);
#endif

  // ---- rms_norm ----
  def_cpu(m, "rms_norm_fwd_cpu", &CpuKernels::rms_norm_fwd);
  def_cpu(m, "rms_norm_bwd_cpu", &CpuKernels::rms_norm_bwd);
#ifdef MMKERN_WITH_CUDA
  def_cuda(m, "rms_norm_fwd_cuda", &mmkern::rms_norm_fwd_cuda);
  def_cuda(m, "rms_norm_bwd_cuda", &mmkern::rms_norm_bwd_cuda);
#endif
}
