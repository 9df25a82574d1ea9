// The table of the CPU kernels' entry points (each declared once, in its op's header mmkern/<op>.h), compiled
// once per ISA level into one module and chosen at run time.
//
// setup.py builds every csrc/cpu/*.cpp once per level of the target architecture (x86-64: default, avx2,
// avx512, avx512_bf16; elsewhere: default), each with that level's compiler flags and MMKERN_CPU_NS set to
// cpu_<level>. Everything those files define lives in the inline namespace mmkern::cpu_<level>, so the four
// builds of one kernel never share a symbol: an AVX-512 copy of a helper cannot stand in for the AVX2 copy that
// an AVX2 machine calls. (Inline functions of the shared headers and of the C++ library are emitted in every
// object that uses them, and the linker keeps the first copy it sees; setup.py links the levels in ascending
// order after bindings.cpp, so that copy is always one that every caller can run.) Each level exports one
// CpuKernels table (csrc/cpu/kernels.cpp); csrc/bindings.cpp picks the table of the best level this CPU
// supports, or the one MMKERN_CPU_CAPABILITY names.
#pragma once

#include <cstdint>

#include "mmkern/attention.h"
#include "mmkern/common.h"
#include "mmkern/contrastive.h"
#include "mmkern/fused.h"
#include "mmkern/patch_embed.h"
#include "mmkern/rms_norm.h"

namespace mmkern {

// A CPU entry point: the op's parameter struct (declared in its header, mmkern/<op>.h) and a thread count.
template <class P>
using CpuEntry = void(const P& p, int num_threads);

// One ISA level's build of every CPU kernel.
struct CpuKernels {
  const char* level;  // "default", "avx2", "avx512", "avx512_bf16"
  CpuEntry<ContrastiveFwdParams>* contrastive_fwd;
  CpuEntry<ContrastiveBwdParams>* contrastive_bwd;
  CpuEntry<ContrastiveFusedParams>* contrastive_fused;
  CpuEntry<BiasGeluFwdParams>* bias_gelu_fwd;
  CpuEntry<BiasGeluBwdParams>* bias_gelu_bwd;
  CpuEntry<AddLayerNormFwdParams>* add_layer_norm_fwd;
  CpuEntry<AddLayerNormBwdParams>* add_layer_norm_bwd;
  CpuEntry<PatchEmbedFwdParams>* patch_embed_fwd;
  CpuEntry<PatchEmbedBwdParams>* patch_embed_bwd;
  CpuEntry<PatchEmbedPackedFwdParams>* patch_embed_packed_fwd;
  CpuEntry<AttentionFwdParams>* attention_fwd;
  CpuEntry<AttentionBwdParams>* attention_bwd;
  CpuEntry<AttentionDropoutMaskParams>* attention_dropout_mask;
  CpuEntry<RmsNormFwdParams>* rms_norm_fwd;
  CpuEntry<RmsNormBwdParams>* rms_norm_bwd;
};

// The tables compiled in, lowest level first.
extern const CpuKernels cpu_kernels_default;
#if defined(__x86_64__)
extern const CpuKernels cpu_kernels_avx2;
extern const CpuKernels cpu_kernels_avx512;
extern const CpuKernels cpu_kernels_avx512_bf16;
#endif

}  // namespace mmkern
