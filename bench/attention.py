"""Benchmark spin_kernels/attention.py against PyTorch SDPA's flash backend: causal, bf16, B=4, H=16; and packed rows
(the document mask of packing.py, SPIN-shaped documents) against SDPA with the same boolean mask.

Usage: python bench/attention.py [--quick] [--compile-check] [--heads=H] [--head_dim=D]  (a model's shapes: SmolLM2-135M
is --heads=9 --head_dim=64, its 3 KV heads repeated, as the kernel's GROUP=1 path sees them)
FLOPs are counted the usual way: forward = 4*B*H*T^2*D (two matmuls), halved for the causal mask;
forward+backward = 2.5x forward (the backward does five matmuls to the forward's two); packed rows count
only the (query, key) pairs the mask lets through. Each time is the median over several runs timed with
CUDA events. Without CUDA it says so, runs a tiny check of the same kernels (plain and packed) in the
Triton interpreter, and exits 0. --compile-check needs no GPU: it compiles the bf16 kernels, in every mask
variant, for an H100 (sm_90) and prints shared memory, tensor-core use and register spills.
"""

import argparse
import inspect
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

import torch
import torch.nn.functional as F

# spin_kernels.attention is imported inside the functions: TRITON_INTERPRET must be settled (in main)
# before triton is first imported, since triton builds its own helpers for one mode at import.

BATCH, HEADS = 4, 16
HEAD_DIMS = (64, 128)  # --heads and --head_dim replace these for one model's shapes


def causal_flops(B: int, H: int, T: int, D: int, backward: bool) -> float:
    forward = 4 * B * H * T * T * D / 2  # QK^T and PV, half the score matrix is masked
    return forward * (2.5 if backward else 1.0)


def sdpa_flash(q, k, v, causal=True):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # fail loudly rather than time another backend
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def median_ms(run, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_impl(impl, q, k, v, grad_out, backward: bool, reps: int) -> float:
    if not backward:
        def run():
            with torch.no_grad():
                impl(q, k, v, causal=True)
    else:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def run():
            for t in leaves:
                t.grad = None
            impl(*leaves, causal=True).backward(grad_out)
    return median_ms(run, reps)


def max_difference(q, k, v, grad_out) -> float:
    """Largest max|triton - sdpa| / max|sdpa| over the output and the three gradients (bf16: ~1e-2)."""
    from spin_kernels.attention import attention
    results = []
    for impl in (attention, sdpa_flash):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = impl(*leaves, causal=True)
        out.backward(grad_out)
        results.append([out.detach()] + [t.grad for t in leaves])
    return max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(*results))


def bench_gpu(quick: bool) -> None:
    import triton
    from spin_kernels.attention import attention, uses_triton
    head_dims = HEAD_DIMS
    lengths = (1024, 4096) if quick else (512, 1024, 2048, 4096, 8192)
    reps = 5 if quick else 20
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"causal bf16, B={BATCH}, H={HEADS} (no GQA); TFLOP/s with causal FLOPs halved: "
          f"fwd = 4*B*H*T^2*D/2, fwd+bwd = 2.5 x fwd; median of {reps} runs (CUDA events)")
    print("| D | T | fwd triton | fwd sdpa-flash | fwd ratio | fwd+bwd triton | fwd+bwd sdpa-flash | "
          "fwd+bwd ratio | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for D in head_dims:
        for T in lengths:
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, grad_out = (torch.randn(BATCH, HEADS, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                                 for _ in range(4))  # (B, H, T, D)
            assert uses_triton(q)
            diff = max_difference(q, k, v, grad_out)
            row = [str(D), str(T)]
            for backward in (False, True):
                flops = causal_flops(BATCH, HEADS, T, D, backward)
                ours = flops / time_impl(attention, q, k, v, grad_out, backward, reps) / 1e9  # TFLOP/s
                theirs = flops / time_impl(sdpa_flash, q, k, v, grad_out, backward, reps) / 1e9
                row += [f"{ours:.0f}", f"{theirs:.0f}", f"{ours / theirs:.2f}x"]
            row.append(f"{diff:.1e}")
            print("| " + " | ".join(row) + " |", flush=True)


def spin_rows(B: int, T: int, doc_len: int):
    """The layout of B rows of T tokens packed with SPIN-shaped documents of doc_len tokens: a prompt of a quarter,
    then a real and a generated response of three eighths each."""
    from packing import pack_documents
    prompt, response = doc_len // 4 + 1, (doc_len - doc_len // 4) // 2
    documents = [(list(range(prompt)), [list(range(response))] * 2) for _ in range(B * T // doc_len)]
    return pack_documents(documents, pad_id=0, row_len=T).layout


def bench_packed_gpu(quick: bool, doc_len: int = 512) -> None:
    """Packed rows: the Triton kernels (document mask, blocks outside a query block's document skipped) against
    SDPA with the same boolean mask (what model.py's attention='sdpa' runs; PyTorch picks the backend that takes
    a mask), and the plain causal kernel over the whole row (the work the mask saves)."""
    from spin_kernels.attention import attention
    from packing import visible_mask
    lengths = (2048, 8192) if quick else (1024, 2048, 4096, 8192)
    reps = 5 if quick else 20
    print(f"\npacked rows: bf16, B={BATCH}, H={HEADS}, documents of {doc_len} tokens (prompt, real, generated); "
          f"TFLOP/s over the visible (query, key) pairs only; ms = median of {reps} runs")
    print("| D | T | fwd triton ms | fwd sdpa-masked ms | fwd ratio | fwd+bwd triton ms | fwd+bwd sdpa-masked ms | "
          "fwd+bwd ratio | fwd+bwd TFLOP/s | causal whole-row fwd+bwd ms | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for D in HEAD_DIMS:
        for T in lengths:
            layout = spin_rows(BATCH, T, doc_len).to(torch.device("cuda"))
            mask = visible_mask(layout, T, None, torch.device("cuda"))  # (B, 1, T, T)
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v, grad_out = (torch.randn(BATCH, HEADS, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                                 for _ in range(4))  # (B, H, T, D)

            def packed(q, k, v, causal=True):
                return attention(q, k, v, layout=layout)

            def sdpa_masked(q, k, v, causal=True):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

            results = []
            for impl in (packed, sdpa_masked):
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                out = impl(*leaves)
                out.backward(grad_out)
                results.append([out.detach()] + [t.grad for t in leaves])
            diff = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(*results))
            times = {(name, backward): time_impl(impl, q, k, v, grad_out, backward, reps)
                     for name, impl in (("triton", packed), ("sdpa", sdpa_masked), ("causal", attention))
                     for backward in (False, True)}
            flops = 4 * HEADS * D * mask.sum().item() * 2.5  # forward + backward over the visible pairs
            row = [str(D), str(T)]
            for backward in (False, True):
                ours, theirs = times["triton", backward], times["sdpa", backward]
                row += [f"{ours:.2f}", f"{theirs:.2f}", f"{theirs / ours:.2f}x"]
            row += [f"{flops / times['triton', True] / 1e9:.0f}", f"{times['causal', True]:.2f}", f"{diff:.1e}"]
            print("| " + " | ".join(row) + " |", flush=True)


def check_interpreter() -> None:
    """No GPU: run the kernels once in the Triton interpreter on a tiny shape, compared with the spec."""
    from spin_kernels.attention import attention, attention_ref, uses_triton
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 45, 32, generator=gen, requires_grad=True)  # (B, Hq, T, D)
    k, v = (torch.randn(1, 2, 45, 32, generator=gen, requires_grad=True) for _ in range(2))  # (B, Hkv, T, D)
    assert uses_triton(q)
    out = attention(q, k, v, causal=True)
    out.sum().backward()
    got = [out.detach(), q.grad, k.grad, v.grad]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*leaves, causal=True)
    ref.sum().backward()
    want = [ref.detach()] + [t.grad for t in leaves]
    err = max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
    print(f"interpreter check (fp32, T=45, D=32, GQA 2:1, fwd+bwd): max relative error {err:.1e} vs float64")
    if err > 1e-4:
        raise SystemExit("interpreter check failed: the kernels disagree with attention_ref")
    from packing import visible_mask
    layout = spin_rows(1, 45, doc_len=15)
    packed = attention(q.detach(), k.detach(), v.detach(), layout=layout)
    want = attention_ref(*(t.detach().double() for t in (q, k, v)), mask=visible_mask(layout, 45, None, q.device))
    err = ((packed.double() - want).abs().max() / want.abs().max()).item()
    print(f"interpreter check, packed rows (3 documents of 15 tokens): max relative error {err:.1e} vs float64")
    if err > 1e-4:
        raise SystemExit("interpreter check failed: the packed kernels disagree with attention_ref")


def compile_for_h100(kernel, dtype: str, constants: dict, num_warps: int, num_stages: int) -> str:
    """Compile one @jit kernel for sm_90 as the launcher would (16-byte aligned pointers), no GPU needed."""
    import triton
    import triton.knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    params = inspect.signature(kernel.fn).parameters
    signature, pointers = {}, []
    for i, (name, param) in enumerate(params.items()):
        if name in constants:
            signature[name] = "constexpr"
        elif name.isupper():  # Q, K, ..., LSE, DELTA, IDS: pointers
            signature[name] = {"LSE": "*fp32", "DELTA": "*fp32", "IDS": "*i32"}.get(name, f"*{dtype}")
            pointers.append(i)
        else:
            signature[name] = "fp32" if name.endswith("scale") else "i32"
    source = ASTSource(kernel, signature, constexprs=constants,
                       attrs={(i,): [["tt.divisibility", 16]] for i in pointers})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    tensor_core = "wgmma" if "wgmma.mma_async" in compiled.asm["ptx"] else "none"
    usage = ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", cubin.name],
                                capture_output=True, text=True).stdout
        found = re.search(r"REG:(\d+).*LOCAL:(\d+)", report)
        if found:
            usage = f"| {found.group(1)} | {found.group(2)} B"
    return f"| {compiled.metadata.shared} B | {tensor_core} {usage}"


MASKS = {"causal": dict(CAUSAL=True, PACKED=False, WINDOWED=False),  # the kernels' mask variants, as compiled
         "full": dict(CAUSAL=False, PACKED=False, WINDOWED=False),
         "packed": dict(CAUSAL=True, PACKED=True, WINDOWED=False),
         "window": dict(CAUSAL=True, PACKED=False, WINDOWED=True)}


def compile_check() -> None:
    import spin_kernels.attention as attention_module
    print("bf16 kernels compiled for sm_90 (no GPU needed); spills = local memory per thread")
    print("| kernel | D | mask | shared memory | tensor cores | registers | spills |")
    print("|---|---|---|---|---|---|---|")
    for D in (64, 128):
        tiles = attention_module._block_sizes(D, torch.bfloat16)
        for mask, flags in MASKS.items():
            for name, kernel, side in (("fwd", attention_module._attn_fwd_kernel, {}),
                                       ("dkdv", attention_module._attn_bwd_kernel, dict(KEY_BLOCKS=True)),
                                       ("dq", attention_module._attn_bwd_kernel, dict(KEY_BLOCKS=False))):
                tile = dict(tiles[name])
                warps, stages = tile.pop("num_warps"), tile.pop("num_stages")
                constants = dict(GROUP=1, HEAD_DIM=D, DOT_PRECISION="tf32", **flags, **side, **tile)
                print(f"| {name} | {D} | {mask} " + compile_for_h100(kernel, "bf16", constants, warps, stages) + " |",
                      flush=True)


def main() -> None:
    global HEADS, HEAD_DIMS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sequence lengths, fewer runs")
    parser.add_argument("--compile-check", action="store_true",
                        help="compile the kernels for sm_90 without a GPU and report their resources")
    parser.add_argument("--heads", type=int, default=HEADS, help=f"attention heads (default {HEADS})")
    parser.add_argument("--head_dim", type=int, default=None, help="one head size (default: 64 and 128)")
    args = parser.parse_args()
    if args.heads < 1 or (args.head_dim is not None and args.head_dim not in (64, 128)):
        parser.error(f"--heads={args.heads} --head_dim={args.head_dim}: heads >= 1, head_dim 64 or 128")
    HEADS, HEAD_DIMS = args.heads, (args.head_dim,) if args.head_dim else HEAD_DIMS
    if args.compile_check:
        os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU even where the interpreter is on
        compile_check()
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark (TFLOP/s need a GPU); checking the kernels in the "
              "Triton interpreter instead")
        os.environ["TRITON_INTERPRET"] = "1"
        check_interpreter()
    else:
        bench_gpu(args.quick)
        bench_packed_gpu(args.quick)


if __name__ == "__main__":
    main()
