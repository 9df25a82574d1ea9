// Torch-free basics shared by every mmkern kernel, host and device: the tensor view that Python fills
// in, dtype codes, fp16/bf16 conversion and precondition checks.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define MMK_HD __host__ __device__ __forceinline__
#else
#define MMK_HD inline
#endif

#if defined(__F16C__) && !defined(__CUDA_ARCH__)
#include <immintrin.h>
#endif

namespace mmkern {

// Must match mmkern/_native.py DTYPE_CODES.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3, i32 = 4, i64 = 5, b8 = 6, u8 = 7 };

constexpr int kMaxDims = 8;

// x rounded up to a multiple of m.
MMK_HD int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A strided view of memory that Python allocated with torch. `present` is false for an absent optional
// argument (a null data pointer cannot mark that: an empty tensor may have one).
struct Tensor {
  void* data = nullptr;
  DType dtype = DType::f32;
  int ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};
  int device = -1;  // -1: host memory, else the CUDA device index
  bool present = false;

  MMK_HD int64_t size(int d) const { return sizes[d < 0 ? d + ndim : d]; }
  MMK_HD int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  MMK_HD int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= sizes[i];
    return n;
  }
  template <typename T>
  MMK_HD T* ptr() const { return static_cast<T*>(data); }
};

// 16-bit float storage types. Arithmetic always happens in fp32 after `to_float`.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

MMK_HD float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
MMK_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

MMK_HD float to_float(float x) { return x; }
MMK_HD float to_float(double x) { return static_cast<float>(x); }
MMK_HD float to_float(BFloat16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
MMK_HD float to_float(Half x) {
#if defined(__F16C__) && !defined(__CUDA_ARCH__)
  return _cvtsh_ss(x.bits);
#else
  // IEEE binary16 -> binary32, handling subnormals, infinities and NaN.
  uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  uint32_t exp = (x.bits >> 10) & 0x1fu;
  uint32_t mant = x.bits & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    float f = static_cast<float>(mant) * 5.9604644775390625e-08f;  // mant * 2^-24
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

template <typename T>
MMK_HD T from_float(float x);
template <>
MMK_HD float from_float<float>(float x) { return x; }
template <>
MMK_HD double from_float<double>(float x) { return x; }
template <>
MMK_HD BFloat16 from_float<BFloat16>(float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}
template <>
MMK_HD Half from_float<Half>(float x) {
#if defined(__F16C__) && !defined(__CUDA_ARCH__)
  return Half{static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT))};
#else
  uint32_t u = float_to_bits(x);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {                                                      // subnormal or zero
    float f = bits_to_float(abs) * 16777216.0f;                                // scale by 2^24, round
    uint32_t m = static_cast<uint32_t>(f);
    float rem = f - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return Half{static_cast<uint16_t>(sign | m)};
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return Half{static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
#endif
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<storage type>{}) for a floating dtype (fp32, fp16, bf16). In f:
//   using scalar_t = typename decltype(tag)::type;
// (A function, not a macro, so OpenMP pragmas may appear in the body.)
template <class F>
auto dispatch_float(DType dtype, const char* name, F&& f) {
  switch (dtype) {
    case DType::f32:
      return f(TypeTag<float>{});
    case DType::f16:
      return f(TypeTag<Half>{});
    case DType::bf16:
      return f(TypeTag<BFloat16>{});
    default:
      throw std::invalid_argument(std::string(name) + ": unsupported dtype (expected float32, float16 or bfloat16)");
  }
}

// Precondition checks raise ValueError in Python (pybind11 maps std::invalid_argument to ValueError).
inline void check(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

inline void check_float_dtype(const Tensor& t, const char* name) {
  check(t.dtype == DType::f32 || t.dtype == DType::f16 || t.dtype == DType::bf16,
        std::string(name) + ": expected float32, float16 or bfloat16");
}

inline void check_dims(const Tensor& t, int ndim, const char* name) {
  check(t.present, std::string(name) + ": required tensor is missing");
  check(t.ndim == ndim, std::string(name) + ": expected " + std::to_string(ndim) + " dimensions, got " +
                            std::to_string(t.ndim));
}

inline void check_contiguous(const Tensor& t, const char* name) {
  int64_t expected = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.sizes[d] != 1) check(t.strides[d] == expected, std::string(name) + ": expected a contiguous tensor");
    expected *= t.sizes[d];
  }
}

}  // namespace mmkern

// In the CPU sources, which setup.py builds once per ISA level with MMKERN_CPU_NS=cpu_<level> (see
// mmkern/cpu_kernels.h): that level's code, the op headers' declarations of the CPU entry points included, goes
// between MMKERN_CPU_BEGIN and MMKERN_CPU_END, into the inline namespace mmkern::cpu_<level>.
#if defined(MMKERN_CPU_NS)
#define MMKERN_CPU_BEGIN \
  namespace mmkern {     \
  inline namespace MMKERN_CPU_NS {
#define MMKERN_CPU_END \
  }                    \
  }
#endif
