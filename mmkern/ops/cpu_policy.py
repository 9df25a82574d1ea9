"""Which path an op takes on CPU tensors by default: mmkern's native kernel where it measured faster than the PyTorch
path a user would otherwise write (torch's own SDPA, conv2d + add, the naive loss, F.gelu / F.layer_norm) for that
kind of call at the ISA level the kernels run at (mmkern.cpu_capability()), and that PyTorch path (the `torch`
backend) everywhere else. So swapping in an mmkern op never costs speed on any CPU.

Only the default changes: backend="cpu" (or use_backend / MMKERN_BACKEND) always runs the native kernel, and
calls that PyTorch has no path for (windowed or global-token attention, varlen, dropout that must match the other
backends' mask, causal combined with a mask) always run it.

The regions come from single-thread sweeps of each op against its PyTorch path on an AMD EPYC (Zen 4) with both
libraries held to each level (`--cpu-capability`; ATen, oneDNN and MKL limited alike), ratios torch time / mmkern
time, then checked with the benchmarks on two threads (README, "Measured so far"). A case within ~5% of 1.0 counts
as not faster.
"""

from __future__ import annotations

from mmkern import _native

AVX512 = ("avx512", "avx512_bf16")

# Above this many logits (B·K) the naive loss needs ≥ 0.5 GiB for its logits and their gradient, the memory the
# native loss exists to save: the native kernel runs there whatever the speed.
CONTRASTIVE_MEMORY_LOGITS = 1 << 26


def level() -> str:
    return _native.cpu_level


def patch_embed(dtype_is_bf16: bool) -> bool:
    """Native everywhere but fp32 / fp16 at the default level (ViT-B/16: 0.88x conv2d, whose oneDNN kernels use SSE4.1
    where the portable C++ has SSE2 and no FMA); bf16 7.5-14x at default and avx2, where torch's bf16 conv2d is slow."""
    return dtype_is_bf16 or level() != "default"


def patch_embed_packed(dtype_is_bf16: bool) -> bool:
    """Against conv2d + F.interpolate per image, fwd+bwd, 12 images of 64-304 px sides, ViT-B/16, one thread, ATen
    at its own best level: avx512 2.0-2.1x (fp32, bf16), avx512_bf16 1.6-2.0x, avx2 1.5x fp32 / 2.1x bf16;
    default 0.60x fp32 / 0.64x bf16 (ATen's oneDNN convolutions against the portable C++)."""
    return level() != "default"


def contrastive(rows_and_cols: bool, B: int, K: int, D: int) -> bool:
    """CLIP / SigLIP (rows_and_cols) and InfoNCE. The native loss wins where the B·K logits' exp and memory traffic
    outweigh its four B·K·D products (the naive loss makes three): large batches, narrow features.
    Measured (fwd+bwd, clip / infonce): avx512 B=1024: D=64 3.1 / 1.15x, D=512 1.06 / 0.85x; B=4096 D=512 1.63 /
    1.11x; B<=256 0.6-1.2x. avx2 B=1024: D=64 2.45 / 0.96x, D=512 1.16 / 0.99x; B=4096: D=64 4.5 / 2.15x, D=512
    1.51 / 1.00x. default: clip D=64 B>=256 1.2-2.0x, D=512 0.46-0.59x; infonce 0.35-0.94x."""
    logits = B * K
    if logits >= CONTRASTIVE_MEMORY_LOGITS:
        return True
    lv = level()
    if lv == "default":
        return rows_and_cols and D <= 128 and logits >= 1 << 16
    if rows_and_cols:
        return logits >= 1 << 18 and (D <= 128 or logits >= 1 << 20)
    if lv in AVX512:
        return logits >= 1 << 20 and (D <= 128 or logits >= 1 << 24)
    return logits >= 1 << 24 and D <= 128


def bias_gelu() -> bool:
    """1.27x (avx512), 1.52x (avx2), 1.28x (default) torch's GELU(x + b) at ViT-B widths, fwd+bwd."""
    return True


def add_layer_norm() -> bool:
    """0.96x (avx512) and 0.95x (avx2) torch's add + LayerNorm at ViT-B widths, fwd+bwd: level; 1.48x at default."""
    return level() == "default"


def attention(L: int, S: int, D: int, causal: bool, grad: bool) -> bool:
    """Dense attention (no window, no dropout) of L queries and S keys per head of width D.
    Measured (fwd+bwd / fwd only), single thread: avx512: ViT-B/16 (197) 1.26 / 1.23x, CLIP text (77, causal)
    1.34 / 1.31x, L=512 1.14 / 1.15x (causal 1.95 / 1.87x), L=1024 D=128 0.89 / 1.09x (causal 1.04 / 1.41x),
    L=2048 0.94 / 1.22x. avx2: L=50 D=64 0.94 / 0.86x, 197: 1.05-1.21 / 1.10-1.18x, 77 causal 1.24-2.04 / 1.04-1.81x,
    512: 0.96 / 1.05x (causal 1.73 / 1.61x), 1024 D=128 0.77 / 1.03x (causal 0.98 / 1.21x), 2048 0.73 / 0.98x.
    default: 0.27-0.92x from L=77 up. The demo's heads (L=17, D=16, many of them, strided q/k/v): 1.16-1.30x at
    default, 1.08-1.30x at avx2, 1.5-1.6x at avx512, where torch's per-head overhead dominates; with D=64 the same
    lengths favour torch below AVX-512."""
    lv = level()
    pairs = L * S
    if pairs < 1 << 12 and D <= 32:
        return True
    if lv in AVX512:
        return not grad or causal or pairs < 1 << 20
    if lv == "avx2":
        if pairs < 1 << 12:
            return False
        if grad:
            return pairs < (1 << 20 if causal else 1 << 17)
        return causal or pairs < 1 << 21
    return False
