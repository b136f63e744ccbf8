"""Training-loss benchmarks (CPU-friendly; run on a GPU box for GPU numbers).

1. step time: the DeRTa loss (MLE + RTO, chunked head, one forward) vs plain SFT cross-entropy
   (HF `model(input_ids, labels=...)`, full logits) on the same batch and model.
2. peak memory: chunked vs naive (full [B, L, V] float32 logits) at vocab 128,256, length
   1,024, small hidden size; each variant in a fresh subprocess, peak RSS growth measured
   as the kernel's peak-RSS mark (VmHWM, reset just before the step; torch's CPU allocator is
   invisible to tracemalloc).
3. packed vs padded rows: real (non-pad) tokens per second on the demo data.

    python benchmarks/train/bench_losses.py [--quick]

Prints a Markdown table; results are recorded in benchmarks/train/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _llama(vocab: int, hidden: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
                      max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().train()


def _batch(vocab: int, B: int, L: int, seed: int = 0, dense: bool = False) -> dict[str, torch.Tensor]:
    """Half the rows helpful (MLE), half RTO (refusal target), on the second half of each row
    (a prompt, then a response), or on every position when dense."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    labels = torch.full((B, L), -100)
    rto = torch.zeros(B, L, dtype=torch.bool)
    start = 1 if dense else L // 2
    for b in range(B):
        if b % 2 == 0:
            labels[b, start:] = ids[b, start:]
        else:
            rto[b, start:] = True
    return {"input_ids": ids, "labels": labels, "rto_mask": rto, "position_ids": torch.arange(L).repeat(B, 1)}


def _compare(fns: dict, warmup: int, iters: int) -> dict[str, float]:
    """Seconds per call of each fn: round-robin (A, B, C, A, B, C, ...) and the minimum per fn,
    so load from other processes on a shared machine hits every variant alike and mostly
    drops out."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: min(v) for k, v in ts.items()}


# --------------------------------------------------------------------------- 1. step time
def bench_step_time(quick: bool) -> dict:
    from derta.train.losses import derta_loss

    vocab, hidden, layers, B, L = (32000, 256, 4, 4, 512) if not quick else (8000, 128, 2, 2, 256)
    model = _llama(vocab, hidden, layers)
    w, n = (2, 5) if quick else (3, 8)
    res = {"shape": f"vocab {vocab}, hidden {hidden}, {layers} layers, batch {B}x{L}"}
    for dense in (False, True):
        batch = _batch(vocab, B, L, dense=dense)
        sft_labels = batch["labels"].clone()
        sft_labels[batch["rto_mask"]] = 7  # the same target positions, as one plain CE

        def sft():
            out = model(input_ids=batch["input_ids"], labels=sft_labels, use_cache=False)
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        def derta(chunk):
            def f():
                derta_loss(model, batch, refusal_id=7, chunk_size=chunk).loss.backward()
                model.zero_grad(set_to_none=True)
            return f

        tag = "dense" if dense else "responses"
        times = _compare({"sft_s": sft, "derta_chunk256_s": derta(256), "derta_chunk1024_s": derta(1024)}, w, n)
        res.update({f"{tag}.{k}": v for k, v in times.items()})
    return res


# --------------------------------------------------------------------------- 2. memory
def _memory_child(variant: str, vocab: int, L: int, hidden: int, chunk: int) -> None:
    torch.set_num_threads(1)
    from derta.train.losses import build_targets, derta_loss, naive_loss

    model = _llama(vocab, hidden, 1)
    batch = _batch(vocab, 2, L)
    t = build_targets(batch)
    # Warm up allocator and kernels on a tiny slice so one-off costs do not count.
    small = {k: v[:, :8] for k, v in batch.items()}
    derta_loss(model, small, refusal_id=7, chunk_size=4).loss.backward()
    model.zero_grad(set_to_none=True)
    before = _reset_peak_rss_kib()
    if variant == "naive":
        loss = naive_loss(model, batch, refusal_id=7, targets=t).loss
    else:
        loss = derta_loss(model, batch, refusal_id=7, targets=t, chunk_size=chunk).loss
    loss.backward()
    after = _status_kib("VmHWM")
    print(json.dumps({"peak_growth_mib": (after - before) / 1024.0}))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss_kib() -> int:
    """Reset the kernel's peak-RSS mark (Linux: clear_refs 5) and return the current RSS, so
    VmHWM afterwards is the peak of this computation alone."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def bench_memory(quick: bool) -> dict:
    vocab, L, hidden = (128256, 1024, 64) if not quick else (32000, 512, 64)
    out = {"shape": f"vocab {vocab}, length {L}, batch 2, hidden {hidden}, 1 layer, float32"}
    for variant, chunk in [("naive", 0), ("chunked", 1024), ("chunked", 256), ("chunked", 64)]:
        cmd = [sys.executable, __file__, "--memory-child", variant, str(vocab), str(L), str(hidden), str(chunk)]
        # Large blocks straight from mmap, so RSS follows live memory (glibc would otherwise
        # keep freed ~32 MB chunks in its heap and the peak would measure fragmentation).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        text = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout.strip().splitlines()[-1]
        out[f"{variant}{chunk or ''}_mib"] = json.loads(text)["peak_growth_mib"]
    out["fp32_logits_one_copy_mib"] = 2 * L * vocab * 4 / 2**20
    return out


# --------------------------------------------------------------------------- 3. packing
def bench_packing(quick: bool) -> dict:
    sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
    from _train_rows import demo_samples, to_rows

    from derta.models import build_tiny_model, refusal_token_id
    from derta.train.losses import derta_loss
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import tempfile

    d = build_tiny_model(os.path.join(tempfile.mkdtemp(), "tiny"))
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).train()
    sorry = refusal_token_id(tok)
    samples = demo_samples(tok, 48, 48)
    res, fns = {}, {}
    for packing in (False, True):
        rows = to_rows(samples, 512, tok.pad_token_id, packing=packing)
        ids = torch.tensor([r["input_ids"] for r in rows])
        name = "packed" if packing else "padded"
        res[name] = {"rows": len(rows), "real_tokens": int((ids != tok.pad_token_id).sum())}
        batches = [{k: torch.tensor([r[k] for r in rows[i:i + 8]]) for k in rows[0]} for i in range(0, len(rows), 8)]

        def epoch(batches=batches):
            for b in batches:
                derta_loss(model, b, refusal_id=sorry, chunk_size=1024).loss.backward()
                model.zero_grad(set_to_none=True)
        fns[name] = epoch
    for name, dt in _compare(fns, 1, 2 if quick else 4).items():
        res[name].update(epoch_s=dt, real_tokens_per_s=res[name]["real_tokens"] / dt)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--memory-child", nargs=5)
    args = ap.parse_args()
    if args.memory_child:
        v, vocab, L, hidden, chunk = args.memory_child
        _memory_child(v, int(vocab), int(L), int(hidden), int(chunk))
        return
    info = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
            "threads": torch.get_num_threads()}
    results = {"info": info, "step_time": bench_step_time(args.quick), "memory": bench_memory(args.quick),
               "packing": bench_packing(args.quick)}
    print(json.dumps(results, indent=2))
    st, mem, pk = results["step_time"], results["memory"], results["packing"]
    print("\n| benchmark | result |\n|---|---|")
    for k, v in st.items():
        if k.endswith("_s") and ".derta" in k:
            base = st[k.split(".")[0] + ".sft_s"]
            print(f"| step time {k} vs SFT CE ({st['shape']}) | {v:.3f}s / {base:.3f}s = {v / base:.3f} |")
    for k, v in mem.items():
        if k.endswith("_mib"):
            print(f"| peak memory {k} ({mem['shape']}) | {v:.0f} MiB |")
    print(f"| packed vs padded real tokens/s | {pk['packed']['real_tokens_per_s']:.0f} vs {pk['padded']['real_tokens_per_s']:.0f} "
          f"= {pk['packed']['real_tokens_per_s'] / pk['padded']['real_tokens_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
