// The CPU kernels' entry points, compiled once per ISA level into one module and chosen at run time.
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

#include "mmkern/common.h"
#include "mmkern/fused.h"
#include "mmkern/rms_norm.h"

namespace mmkern {

// A CPU entry point: the op's parameter struct (declared in its header, mmkern/<op>.h) and a thread count.
template <class P>
using CpuEntry = void(const P& p, int num_threads);

// Entry-point signatures (the definitions are in csrc/cpu/<op>.cpp). `num_threads` OpenMP threads each.
namespace cpu_entry {
using ContrastiveFwd = void(const Tensor& x, const Tensor& y, double scale, double bias, int mode, bool diagonal,
                            const Tensor& row_stats, const Tensor& col_stats, int num_threads);
using ContrastiveBwd = void(const Tensor& x, const Tensor& y, double scale, double bias, int mode, bool diagonal,
                            const Tensor& row_lse, const Tensor& col_lse, const Tensor& gr, const Tensor& gc,
                            const Tensor& dx, const Tensor& dy, int num_threads);
using ContrastiveFused = void(const Tensor& x, const Tensor& y, double scale, double bias, int mode, bool diagonal,
                              const Tensor& row_stats, const Tensor& col_stats, const Tensor& dx, const Tensor& dy,
                              int num_threads);
using PatchEmbedFwd = void(const Tensor& images, const Tensor& weight, const Tensor& bias, const Tensor& pos_embed,
                           const Tensor& prefix_tokens, const Tensor& out, int num_threads);
using PatchEmbedBwd = void(const Tensor& grad_out, const Tensor& images, const Tensor& weight,
                           const Tensor& grad_images, const Tensor& grad_weight, int64_t num_prefix, int num_threads);
using PatchEmbedPackedFwd = void(const Tensor& patches, const Tensor& weight, const Tensor& bias,
                                 const Tensor& pos_grid, const Tensor& tap_ptr, const Tensor& tap_index,
                                 const Tensor& tap_weight, const Tensor& out_rows, const Tensor& out, int num_threads);
using AttentionFwd = void(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Tensor& cu_q,
                          const Tensor& cu_k, const Tensor& out, const Tensor& lse, int64_t max_len_q,
                          int64_t max_len_k, double scale, bool causal, bool windowed, int64_t left, int64_t right,
                          int64_t num_global, double dropout_p, int64_t seed, int num_threads);
using AttentionBwd = void(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, const Tensor& cu_q,
                          const Tensor& cu_k, const Tensor& out, const Tensor& grad_out, const Tensor& lse,
                          const Tensor& dq, const Tensor& dk, const Tensor& dv, const Tensor& dmask,
                          int64_t max_len_q, int64_t max_len_k, double scale, bool causal, bool windowed, int64_t left,
                          int64_t right, int64_t num_global, double dropout_p, int64_t seed, int num_threads);
using AttentionDropoutMask = void(const Tensor& keep, double dropout_p, int64_t seed, int num_threads);
}  // namespace cpu_entry

// One ISA level's build of every CPU kernel.
struct CpuKernels {
  const char* level;  // "default", "avx2", "avx512", "avx512_bf16"
  cpu_entry::ContrastiveFwd* contrastive_fwd;
  cpu_entry::ContrastiveBwd* contrastive_bwd;
  cpu_entry::ContrastiveFused* contrastive_fused;
  CpuEntry<BiasGeluFwdParams>* bias_gelu_fwd;
  CpuEntry<BiasGeluBwdParams>* bias_gelu_bwd;
  CpuEntry<AddLayerNormFwdParams>* add_layer_norm_fwd;
  CpuEntry<AddLayerNormBwdParams>* add_layer_norm_bwd;
  cpu_entry::PatchEmbedFwd* patch_embed_fwd;
  cpu_entry::PatchEmbedBwd* patch_embed_bwd;
  cpu_entry::PatchEmbedPackedFwd* patch_embed_packed_fwd;
  cpu_entry::AttentionFwd* attention_fwd;
  cpu_entry::AttentionBwd* attention_bwd;
  cpu_entry::AttentionDropoutMask* attention_dropout_mask;
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

#if defined(MMKERN_CPU_NS)
MMKERN_CPU_BEGIN
cpu_entry::ContrastiveFwd contrastive_fwd_cpu;
cpu_entry::ContrastiveBwd contrastive_bwd_cpu;
cpu_entry::ContrastiveFused contrastive_fused_cpu;
cpu_entry::PatchEmbedFwd patch_embed_fwd_cpu;
cpu_entry::PatchEmbedBwd patch_embed_bwd_cpu;
cpu_entry::PatchEmbedPackedFwd patch_embed_packed_fwd_cpu;
cpu_entry::AttentionFwd attention_fwd_cpu;
cpu_entry::AttentionBwd attention_bwd_cpu;
cpu_entry::AttentionDropoutMask attention_dropout_mask_cpu;
MMKERN_CPU_END
#endif
