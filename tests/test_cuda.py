"""CUDA-only checks: the Triton kernels in bf16/fp16 on the GPU (plain, and with the masks of packed rows and
sliding windows), packed pairs equal to unpacked ones, the compiled decode step, a compiled train.py run.

Skipped without a CUDA device (the CI machine). Each check runs in a fresh Python process with
TRITON_INTERPRET unset: conftest.py sets it and imports Triton, and a Triton imported in interpreter
mode cannot compile for the GPU (its own helpers were built for the interpreter), so in the pytest
process spin_kernels/__init__.py:launch would refuse to run the kernels. Every check also asserts that its
fast path really ran, compiled.

On a GPU: python -m pytest tests/test_cuda.py   (bench/gpu_check.sh runs it with the benchmarks)
"""

import json
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_check(name: str, timeout: int = 300) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), name], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"check '{name}' failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"


def test_attention_kernels_bf16_fp16():
    run_check("attention")


def test_masked_attention_kernels_bf16_fp16():
    run_check("masked_attention")


def test_packed_pairs_equal_unpacked_on_cuda():
    run_check("packed_pairs")


def test_logprob_kernels_bf16():
    run_check("logprob")


def test_model_triton_attention_matches_sdpa():
    run_check("model_attention")


def test_compiled_decode_equals_eager():
    run_check("compiled_decode")


def test_train_py_compiled_on_cuda():
    run_check("train_compile", timeout=420)


# ----------------------------------------------------------------------------------------------
# the checks (run as `python tests/test_cuda.py <name>`, in a process where Triton compiles for the GPU)


def relative_error(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref| (absolute where ref is all zeros)."""
    scale = ref.abs().max().item()
    return (actual.double() - ref.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def record_launches(kernel_module) -> list:
    """The names of the Triton kernels kernel_module launches from now on, compiled for the GPU."""
    import spin_kernels
    assert not spin_kernels.triton_interprets(), "triton was imported in interpreter mode"
    launched = []
    real_launch = kernel_module.launch

    def recording_launch(kernel, *args, **meta):
        launched.append(kernel.__name__)
        real_launch(kernel, *args, **meta)  # refuses to run a kernel in another mode than compiled
    kernel_module.launch = recording_launch
    return launched


def check_attention() -> None:
    """Forward and backward of spin_kernels/attention.py against the float64 spec, with PyTorch SDPA in the
    same dtype as the yardstick: the kernel may be at most twice as far off as SDPA (or within a floor)."""
    import torch.nn.functional as F

    import spin_kernels.attention as attention_module
    from spin_kernels.attention import attention, attention_ref, uses_triton
    launched = record_launches(attention_module)
    shapes = [(2, 8, 8, 256, 64, True), (1, 8, 2, 333, 128, True), (2, 4, 4, 130, 32, False), (1, 4, 1, 1, 16, True),
              (1, 16, 4, 1000, 64, True)]  # (B, Hq, Hkv, T, D, causal): ragged tails, GQA, one token
    for dtype, floor in ((torch.bfloat16, 2e-2), (torch.float16, 5e-3)):
        for B, Hq, Hkv, T, D, causal in shapes:
            gen = torch.Generator(device="cuda").manual_seed(T + D)
            q, grad_out = (torch.randn(B, Hq, T, D, device="cuda", generator=gen).to(dtype) for _ in range(2))
            k, v = (torch.randn(B, Hkv, T, D, device="cuda", generator=gen).to(dtype) for _ in range(2))
            assert uses_triton(q)
            results = {}
            for name, fn, as_dtype in (
                    ("triton", attention, dtype), ("ref", attention_ref, torch.float64),
                    ("sdpa", lambda q, k, v, causal: F.scaled_dot_product_attention(
                        q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1]), dtype)):
                leaves = [t.detach().to(as_dtype).requires_grad_() for t in (q, k, v)]
                out = fn(*leaves, causal=causal)
                out.backward(grad_out.to(as_dtype))
                results[name] = [out.detach()] + [t.grad for t in leaves]
            for i, part in enumerate(("out", "dq", "dk", "dv")):
                ours = relative_error(results["triton"][i], results["ref"][i])
                sdpa = relative_error(results["sdpa"][i], results["ref"][i])
                print(f"{dtype} B{B} H{Hq}:{Hkv} T{T} D{D} causal={causal} {part}: triton {ours:.1e}, sdpa {sdpa:.1e}")
                assert results["triton"][i].dtype == dtype
                assert ours <= max(2 * sdpa, floor), f"{part}: triton {ours:.2e} vs sdpa {sdpa:.2e}"
    assert {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_kernel"} <= set(launched), launched


def check_masked_attention() -> None:
    """The document mask of packed rows (packing.py), sliding windows and both, forward and backward, against the
    float64 spec with the same mask, with SDPA given that mask in the same dtype as the yardstick."""
    import torch.nn.functional as F

    import spin_kernels.attention as attention_module
    from spin_kernels.attention import attention, attention_ref
    from packing import RowLayout, pack_documents, visible_mask
    launched = record_launches(attention_module)
    gen = torch.Generator().manual_seed(0)

    def spin_layout(B: int, T: int):
        """Rows of SPIN pairs of random lengths (prompt 1-200, responses 1-300 tokens), packed into T tokens."""
        def tokens(hi: int) -> list[int]:
            return [0] * int(torch.randint(1, hi + 1, (1,), generator=gen))
        documents = [(tokens(200), [tokens(300), tokens(300)]) for _ in range(4 * B * T // 600)]
        layout = pack_documents(documents, pad_id=0, row_len=T).layout  # about 3B rows: keep the first B
        return RowLayout(*(t[:B] for t in (layout.positions, layout.doc_starts, layout.doc_ends, layout.segments)))

    cases = [(2, 8, 2, 1000, 64, True, None), (1, 8, 8, 777, 128, True, 96), (2, 4, 1, 1500, 64, False, 256),
             (1, 4, 4, 333, 128, False, 1)]  # (B, Hq, Hkv, T, D, packed, window)
    for dtype, floor in ((torch.bfloat16, 2e-2), (torch.float16, 5e-3)):
        for B, Hq, Hkv, T, D, packed, window in cases:
            layout = spin_layout(B, T) if packed else None
            T = layout.positions.shape[1] if packed else T
            layout = layout.to(torch.device("cuda")) if packed else None
            mask = visible_mask(layout, T, window, torch.device("cuda"))
            g = torch.Generator(device="cuda").manual_seed(T + D)
            q, grad_out = (torch.randn(B, Hq, T, D, device="cuda", generator=g).to(dtype) for _ in range(2))
            k, v = (torch.randn(B, Hkv, T, D, device="cuda", generator=g).to(dtype) for _ in range(2))
            results, before = {}, len(launched)
            for name, fn, as_dtype in (
                    ("triton", lambda q, k, v: attention(q, k, v, layout=layout, window=window), dtype),
                    ("ref", lambda q, k, v: attention_ref(q, k, v, mask=mask), torch.float64),
                    ("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                            enable_gqa=Hq != Hkv), dtype)):
                leaves = [t.detach().to(as_dtype).requires_grad_() for t in (q, k, v)]
                out = fn(*leaves)
                out.backward(grad_out.to(as_dtype))
                results[name] = [out.detach()] + [t.grad for t in leaves]
            # every case runs the kernels itself (no case may fall back to SDPA while another launches them)
            assert {"_attn_fwd_kernel", "_attn_bwd_kernel"} <= set(launched[before:]), (B, T, packed, window)
            for i, part in enumerate(("out", "dq", "dk", "dv")):
                ours = relative_error(results["triton"][i], results["ref"][i])
                sdpa = relative_error(results["sdpa"][i], results["ref"][i])
                print(f"{dtype} B{B} H{Hq}:{Hkv} T{T} D{D} packed={packed} window={window} {part}: triton {ours:.1e}, "
                      f"sdpa {sdpa:.1e}")
                assert ours <= max(2 * sdpa, floor), f"{part}: triton {ours:.2e} vs sdpa {sdpa:.2e}"
    assert {"_attn_fwd_kernel", "_attn_bwd_kernel"} <= set(launched), launched


def check_packed_pairs() -> None:
    """SPIN pairs scored packed (one row per pair, several pairs a row) and unpacked, on the GPU: log-probs and
    every parameter gradient, with attention='triton' (the packed kernels must run) and 'sdpa'; in fp32 tightly,
    and under bf16 autocast within bf16 noise."""
    import spin_kernels.attention as attention_module
    from model import GPT, GPTConfig
    from spin import pair_logps
    launched = record_launches(attention_module)
    packed_launches = []
    recording_launch = attention_module.launch

    def note_packed(kernel, *args, **meta):
        packed_launches.append(meta.get("PACKED"))
        recording_launch(kernel, *args, **meta)
    attention_module.launch = note_packed
    gen = torch.Generator().manual_seed(0)

    def tokens(hi: int) -> list[int]:
        return torch.randint(0, 1000, (int(torch.randint(1, hi + 1, (1,), generator=gen)),), generator=gen).tolist()
    prompts, real, generated = ([tokens(hi) for _ in range(24)] for hi in (60, 100, 100))
    device = torch.device("cuda")
    for impl in ("triton", "sdpa"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(model_type="llama", vocab_size=1000, block_size=256, n_layer=2, n_head=8, n_kv_head=2,
                              n_embd=512, attention=impl)).to(device)
        for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
            outputs = {}
            for pack in (True, False):
                model.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    real_logps, generated_logps = pair_logps(model, prompts, real, generated, 0, device, pack)
                (real_logps.sum() - 0.5 * generated_logps.sum()).backward()
                grads = torch.cat([p.grad.flatten().float() for p in model.parameters()])
                outputs[pack] = (torch.cat([real_logps, generated_logps]).detach(), grads)
            logp_err = relative_error(outputs[True][0], outputs[False][0])
            grad_err = relative_error(outputs[True][1], outputs[False][1])
            print(f"{impl} {dtype}: packed vs unpacked log-probs {logp_err:.1e}, gradients {grad_err:.1e}")
            assert logp_err < tolerance and grad_err < tolerance * 10
    assert {"_attn_fwd_kernel", "_attn_bwd_kernel"} <= set(launched) and True in packed_launches, \
        "the packed Triton path did not run"


def check_logprob() -> None:
    """token_logprobs in bf16 (several vocabulary slices) against the float64 spec, with the naive path in
    bf16 as the yardstick, forward and both gradients; the Triton kernels must have been compiled."""
    import spin_kernels.logprob as logprob_module
    from spin_kernels.logprob import token_logprobs, token_logprobs_ref, uses_triton
    launched = record_launches(logprob_module)
    N, C, V = 3000, 512, 50304
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(N, C, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.randn(V, C, device="cuda", generator=gen) * C ** -0.5).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda", generator=gen)
    targets[::7] = -100  # prompt and padding positions
    upstream = torch.rand(N, device="cuda", generator=gen)  # per-token weights, as SPIN's loss gives
    assert uses_triton(hidden)
    results = {}
    for name, fn, dtype, chunk in (("fused", token_logprobs, torch.bfloat16, 8 << 20),
                                   ("naive", token_logprobs_ref, torch.bfloat16, None),
                                   ("ref", token_logprobs_ref, torch.float64, None)):
        h, w = (t.detach().to(dtype).requires_grad_() for t in (hidden, weight))
        logp = fn(h, w, targets, chunk) if chunk else fn(h, w, targets)
        (logp.double() * upstream.double()).sum().backward()
        results[name] = [logp.detach(), h.grad, w.grad]
    assert {"_lse_target_kernel", "_dlogits_kernel"} <= set(launched), "the Triton log-prob kernels were not launched"
    for i, part in enumerate(("logp", "grad_hidden", "grad_weight")):
        ours = relative_error(results["fused"][i], results["ref"][i])
        naive = relative_error(results["naive"][i], results["ref"][i])
        print(f"bf16 N{N} C{C} V{V} {part}: fused {ours:.1e}, naive {naive:.1e}")
        assert ours <= max(2 * naive, 1e-2), f"{part}: fused {ours:.2e} vs naive {naive:.2e}"
    assert bool((results["fused"][0][::7] == 0).all()), "ignored targets must give 0"


def check_model_attention() -> None:
    """The model in bf16 with attention='triton' against attention='sdpa', same weights: loss and gradients."""
    import spin_kernels.attention as attention_module
    from model import GPT, GPTConfig
    launched = record_launches(attention_module)
    torch.manual_seed(0)
    cfg = dict(model_type="llama", vocab_size=1000, block_size=256, n_layer=2, n_head=8, n_kv_head=2, n_embd=512)
    models = {impl: GPT(GPTConfig(**cfg, attention=impl)).cuda() for impl in ("sdpa", "triton")}
    models["triton"].load_state_dict(models["sdpa"].state_dict())
    idx = torch.randint(0, 1000, (4, 200), device="cuda")
    targets = torch.randint(0, 1000, (4, 200), device="cuda")
    outputs = {}
    for impl, model in models.items():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = -model.token_logprobs(idx, targets).mean()  # every target kept: the mean NLL
        loss.backward()
        outputs[impl] = (loss.item(), torch.cat([p.grad.flatten().float() for p in model.parameters()]))
    assert "_attn_fwd_kernel" in launched, "the model did not use Triton"
    (loss_sdpa, grad_sdpa), (loss_triton, grad_triton) = outputs["sdpa"], outputs["triton"]
    grad_err = relative_error(grad_triton, grad_sdpa)
    print(f"loss sdpa {loss_sdpa:.5f} triton {loss_triton:.5f}; gradient relative difference {grad_err:.1e}")
    assert math.isclose(loss_sdpa, loss_triton, rel_tol=1e-2) and grad_err < 5e-2


def check_compiled_decode() -> None:
    """generate(compile=True) on the GPU (torch.compile, CUDA graphs) gives eager's greedy tokens: exactly in
    fp32, with continuous batching too, and in bf16 the same first tokens and log-probs within bf16 noise;
    compiled sampling is reproducible for a seed."""
    import generate as gen
    from generate import GREEDY, Sampling, generate, generate_ref
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(model_type="llama", vocab_size=500, block_size=256, n_layer=2, n_head=4, n_kv_head=2,
                          n_embd=128))
    with torch.no_grad():  # larger weights: peaked logits, so greedy ties (a rounding coin flip) are rare
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model = model.cuda().eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2, 3], [42], [7, 7, 7, 60, 61]]
    eager = generate(model, prompts, 40, sampling=GREEDY)
    assert eager == generate_ref(model, prompts, 40)
    caches_in_use = []  # held, so a freed cache's memory cannot come back as a "reused" one

    def record_cache(token):
        caches_in_use.append(model.kv_caches[0])

    assert generate(model, prompts, 40, sampling=GREEDY, compile=True, on_step=record_cache) == eager
    assert gen.compiled_decode.cache_info().currsize >= 1
    others = [p[::-1] for p in prompts]  # same shapes: replays the captured graph on new inputs
    compiled = generate(model, others, 40, sampling=GREEDY, compile=True, on_step=record_cache)
    assert compiled == generate(model, others, 40, sampling=GREEDY)
    assert all(cache is caches_in_use[0] for cache in caches_in_use)
    # continuous batching: 2 cache rows for 4 prompts, each refill an eager prefill into the rows the captured
    # graph replays on; the step's shapes never change
    assert generate(model, prompts, 40, sampling=GREEDY, compile=True, batch_size=2) == eager
    sampled = dict(sampling=Sampling(temperature=1.0, top_k=50), seed=3, batch_size=3, max_len=64, compile=True)
    assert generate(model, prompts, 24, **sampled) == generate(model, prompts, 24, **sampled)
    # bf16: rounding may flip a near-tie, after which the rows rightly differ; up to the first difference
    # the compiled step must give eager's log-probs, and most rows must agree for a good while
    model = model.to(torch.bfloat16)
    eager, eager_lp = generate(model, prompts, 16, sampling=GREEDY, return_logprobs=True)
    compiled, compiled_lp = generate(model, prompts, 16, sampling=GREEDY, compile=True, return_logprobs=True)
    common = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(eager, compiled)]
    for row, n in enumerate(common):
        assert all(abs(a - b) < 0.1 for a, b in zip(eager_lp[row][:n], compiled_lp[row][:n])), f"row {row}"
    print(f"bf16: tokens agree for {common} of 16 steps per row")
    assert sum(common) >= 8 * len(prompts)


def check_train_compile() -> None:
    """A short quick.py run (SFT, one SPIN iteration) on the GPU with compile=True: it finishes, losses are
    finite, the metrics carry tokens/s (and MFU on a known card), and the model is exported."""
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, "train.py", "config/quick.py", f"--out_dir={out_dir}", "--device=cuda",
               "--compile=True", "--sft_steps=20", "--max_iterations=1", "--baseline_sft=False",
               "--synthetic_train=256", "--synthetic_val=32", "--prompts_per_iteration=128", "--eval_samples=32",
               "--log_interval=5"]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        print(out.stdout[-2000:])
        assert out.returncode == 0, out.stderr[-5000:]
        records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
        steps = [r for r in records if "loss" in r]
        assert any(r["phase"] == "spin" for r in steps) and all(math.isfinite(r["loss"]) for r in steps)
        assert all(r["tokens_per_sec"] > 0 for r in steps)
        from fsdp import peak_flops
        if peak_flops(torch.device("cuda")):  # a card whose peak FLOP/s train.py knows
            assert all(0 < r["mfu"] < 1 for r in steps)
        assert os.path.isfile(os.path.join(out_dir, "final", "config.json"))


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    globals()[f"check_{sys.argv[1]}"]()
