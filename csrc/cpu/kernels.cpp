// This level's table of CPU kernels (the file is built once per ISA level, see mmkern/cpu_kernels.h).
#include "mmkern/cpu_kernels.h"

#define MMKERN_CAT_(a, b) a##b
#define MMKERN_CAT(a, b) MMKERN_CAT_(a, b)
#define MMKERN_STR_(a) #a
#define MMKERN_STR(a) MMKERN_STR_(a)

namespace mmkern {

// Constant-initialised (no code runs at load time, which matters: this object may hold instructions that the
// CPU importing the module lacks). In the order of CpuKernels; every slot has its own parameter struct, so an
// entry point in the wrong slot does not compile.
extern const CpuKernels MMKERN_CAT(cpu_kernels_, MMKERN_CPU_LEVEL);
const CpuKernels MMKERN_CAT(cpu_kernels_, MMKERN_CPU_LEVEL) = {
    MMKERN_STR(MMKERN_CPU_LEVEL), &contrastive_fwd_cpu,   &contrastive_bwd_cpu,    &contrastive_fused_cpu,
    &bias_gelu_fwd_cpu,           &bias_gelu_bwd_cpu,     &add_layer_norm_fwd_cpu, &add_layer_norm_bwd_cpu,
    &patch_embed_fwd_cpu,         &patch_embed_bwd_cpu,   &patch_embed_packed_fwd_cpu, &attention_fwd_cpu,
    &attention_bwd_cpu,           &attention_dropout_mask_cpu,  &rms_norm_fwd_cpu,       &rms_norm_bwd_cpu,
};

}  // namespace mmkern
