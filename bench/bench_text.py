"""Text benchmark: our runtime vs transformers on the same checkpoint, each engine in its own process.

    python bench/bench_text.py --checkpoint /work/ckpt/e2b-l10 --quick
    python bench/bench_text.py --checkpoint /work/ckpt/e2b --engines ours,ours-noskip,hf-bf16

Per engine (a fresh subprocess, so peak RSS is that engine's alone): load time, prefill tok/s and time to
first token at each prompt length, greedy decode tok/s over `--decode` tokens after the shortest prompt,
peak RSS (VmHWM), CUDA peak allocation when on a GPU. Then the machine's read bandwidth, the decode bound
it implies (weight bytes read per token / bandwidth, docs/text-decoder.md#parameter-counts) and each engine's decode
as a fraction of that bound. A markdown table goes to stdout, everything to bench/out/bench_text-*.json.

Engines:
- ``ours``: ``gemma3n.load(dir)`` + ``generate(..., temperature=0)`` with the prefill skip
  (docs/text-decoder.md#prefill-skip).
- ``ours-noskip``: the same with the prefill skip off.
- ``ours-fp32`` / ``ours-noskip-fp32``: the same, loaded with ``dtype=torch.float32`` (``ours`` /
  ``ours-noskip`` use ``--ours-dtype``, default: the checkpoint's bf16).
- ``hf-bf16`` / ``hf-fp32``: transformers ``Gemma3nForCausalLM`` (``dtype=`` bf16 / fp32, ``--hf-attn``
  attention), a manual greedy loop over ``model(input_ids, cache=..., logits_to_keep=1)``, which is what
  ``generate`` runs minus its bookkeeping.

"pf N by CPU time" = N / (process CPU seconds / threads): what the prefill would reach with its threads
alone on their cores. It is a second opinion for shared machines (wall-clock figures there depend on the
neighbours); it is optimistic where an engine's threads sit idle (Python overhead, single-threaded ops).

Prompts are random token ids (seed 1234) in [1000, 200000), or the vocabulary's upper 3/4 when it is
smaller (the embedded tiny model: `--checkpoint gemma3n/data/tiny`): no tokenizer is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (HERE, ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402

ENGINES = ("ours", "ours-noskip", "ours-fp32", "ours-noskip-fp32", "hf-bf16", "hf-fp32")
# Bytes per stored parameter, for the memory pre-check and the decode bound.
ENGINE_WEIGHT_BYTES = {"hf-bf16": 2, "hf-fp32": 4, "ours-fp32": 4, "ours-noskip-fp32": 4}


# --- engines (run inside the worker subprocess) -------------------------------------------------------

# A generate function: (prompt ids, n tokens) -> {"tokens": [...], "ttft_s": float, "total_s": float}
GenFn = Callable[[list[int], int], dict[str, Any]]


def load_hf(ckpt: str, engine: str, device: str, attn: str) -> tuple[GenFn, dict]:
    import torch
    from transformers import Gemma3nForCausalLM

    dtype = torch.bfloat16 if engine == "hf-bf16" else torch.float32
    model = Gemma3nForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation=attn)
    model.to(device).eval()

    @torch.inference_mode()
    def gen(prompt: list[int], n: int) -> dict[str, Any]:
        ids = torch.tensor([prompt], device=device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        tok = int(out.logits[0, -1].argmax())
        _sync(device)
        ttft = time.perf_counter() - t0
        toks = [tok]
        cache = out.cache
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[tok]], device=device), cache=cache, use_cache=True)
            cache = out.cache
            tok = int(out.logits[0, -1].argmax())
            toks.append(tok)
        _sync(device)
        return {"tokens": toks, "ttft_s": ttft, "total_s": time.perf_counter() - t0}

    info = {"weight_dtype": str(dtype).replace("torch.", ""), "attn": attn}
    return gen, info


def load_ours(ckpt: str, engine: str, device: str, dtype: str | None) -> tuple[GenFn, dict]:
    """Our runtime. Adapter kept small on purpose: the public API is `gemma3n.load` + `generate`."""
    import inspect

    import torch

    import gemma3n

    if engine.endswith("-fp32"):
        dtype = "fp32"
    tdtype = {None: None, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    model = gemma3n.load(ckpt, device=device, dtype=tdtype)
    skip = "noskip" not in engine
    gen_kwargs: dict[str, Any] = {}
    params = set(inspect.signature(model.generate).parameters)
    if hasattr(model, "stream"):  # generate(prompt, **kwargs) forwards to stream(...)
        params |= set(inspect.signature(model.stream).parameters)
    if "prefill_skip" in params:
        gen_kwargs["prefill_skip"] = skip
    elif hasattr(model, "prefill_skip"):
        model.prefill_skip = skip
    elif not skip:
        raise SystemExit("our runtime exposes no way to turn the prefill skip off (prefill_skip=)")

    def gen(prompt: list[int], n: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = model.generate(prompt=prompt, max_tokens=n, temperature=0, **gen_kwargs)
        _sync(device)
        total = time.perf_counter() - t0
        stats = dict(getattr(res, "stats", {}) or {})
        toks = list(res.token_ids)
        ttft = stats.get("ttft_s")
        if ttft is None or n == 1:
            ttft = total if n == 1 else ttft
        return {"tokens": toks, "ttft_s": ttft, "total_s": total, "stats": _jsonable(stats)}

    wdtype = getattr(model, "dtype", None) or getattr(getattr(model, "decoder", None), "dtype", None)
    cdtype = getattr(getattr(model, "decoder", None), "compute_dtype", None) or wdtype
    info = {
        "weight_dtype": str(wdtype).replace("torch.", "") if wdtype is not None else None,
        "compute_dtype": str(cdtype).replace("torch.", "") if cdtype is not None else None,
    }
    return gen, info


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = str(v)
    return out


def make_prompt(n: int, seed: int = 1234, vocab: int = 262_144) -> list[int]:
    """n random ids in [1000, 200000), scaled down for small vocabularies (the embedded tiny model)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    low, high = min(1000, vocab // 4), min(200_000, vocab)
    return torch.randint(low, high, (n,), generator=g).tolist()


def vocab_size(checkpoint: str) -> int:
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    return config.get("text_config", config)["vocab_size"]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {"engine": args.worker, "threads": args.threads}
    t = time.perf_counter()
    if args.worker.startswith("hf-"):
        gen, info = load_hf(args.checkpoint, args.worker, args.device, args.hf_attn)
    else:
        gen, info = load_ours(args.checkpoint, args.worker, args.device, args.ours_dtype)
    res.update(info)
    res["load_s"] = time.perf_counter() - t
    res["rss_after_load_gb"] = common.rss_gb()
    print(f"[{args.worker}] loaded in {res['load_s']:.1f}s, RSS {res['rss_after_load_gb']:.2f} GB")

    vocab = vocab_size(args.checkpoint)
    gen(make_prompt(8, seed=7, vocab=vocab), 2)  # warm-up (allocator, kernels, lazy init)
    prompts = [int(x) for x in args.prompts.split(",") if x]
    res["prefill"] = {}
    for n in prompts:
        r = cpu = None
        for _ in range(args.repeats):  # best of --repeats: neighbours only ever slow a run down
            c0 = time.process_time()  # CPU seconds of all threads: a contention-robust second opinion
            ri = gen(make_prompt(n, vocab=vocab), 1)
            ci = time.process_time() - c0
            if r is None or ri["ttft_s"] < r["ttft_s"]:
                r, cpu = ri, ci
        res["prefill"][str(n)] = {
            "ttft_s": r["ttft_s"],
            "tps": n / r["ttft_s"],
            "cpu_s": cpu,
            "cpu_tps": n / (cpu / args.threads),
            "stats": r.get("stats"),
        }
        print(f"[{args.worker}] prompt {n}: TTFT {r['ttft_s']:.2f}s = {n / r['ttft_s']:.1f} tok/s")
    if args.decode > 0:
        dp = min(prompts)
        c0 = time.process_time()
        r = gen(make_prompt(dp, vocab=vocab), args.decode + 1)
        cpu = time.process_time() - c0
        dec_s = r["total_s"] - r["ttft_s"]
        n_dec = len(r["tokens"]) - 1  # an engine that honours EOS may stop early
        res["decode"] = {
            "prompt": dp,
            "tokens": n_dec,
            "seconds": dec_s,
            "tps": n_dec / dec_s,
            "cpu_s_total": cpu,
            "token_ids": r["tokens"],
            "stats": r.get("stats"),
        }
        print(f"[{args.worker}] decode {n_dec} tok: {n_dec / dec_s:.2f} tok/s", flush=True)
    res["peak_rss_gb"] = common.peak_rss_gb()
    res["cuda_peak_gb"] = common.cuda_peak_gb()
    return res


# --- driver ------------------------------------------------------------------------------------------


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("inf")


def run_engine(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = f.name
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        engine,
        "--result",
        result_path,
        "--checkpoint",
        args.checkpoint,
        "--prompts",
        args.prompts,
        "--decode",
        str(args.decode),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--hf-attn",
        args.hf_attn,
        "--repeats",
        str(args.repeats),
    ]
    if args.ours_dtype:
        cmd += ["--ours-dtype", args.ours_dtype]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    load_before = os.getloadavg()
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.engine_timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - t
    try:
        with open(result_path) as f:
            res = json.load(f)
    except (OSError, json.JSONDecodeError):
        res = {"engine": engine, "error": f"worker failed (rc={rc})"}
    finally:
        if os.path.exists(result_path):
            os.unlink(result_path)
    res["wall_s"] = wall
    res["loadavg_before"], res["loadavg_after"] = load_before, os.getloadavg()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="HF-layout checkpoint dir")
    ap.add_argument("--prompts", default="128,512,1024", help="prompt lengths (comma separated)")
    ap.add_argument("--decode", type=int, default=64, help="decoded tokens (after the shortest prompt)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--quick", action="store_true", help="prompts 128,512 and 32 decode tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention")
    ap.add_argument("--ours-dtype", default=None, choices=["bf16", "fp32"], help="our runtime's dtype")
    ap.add_argument("--engine-timeout", type=float, default=3600, help="seconds per engine")
    ap.add_argument("--repeats", type=int, default=1, help="best of N for each prompt length")
    ap.add_argument("--tag", default="", help="free text stored in the JSON")
    ap.add_argument("--bandwidth", type=float, default=None, help="pin the read bandwidth (GB/s) for the bound")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.decode = "128,512", min(args.decode, 32)

    if args.worker:
        res = worker(args)
        with open(args.result, "w") as f:
            json.dump(res, f)
        return 0

    with open(os.path.join(args.checkpoint, "config.json")) as f:
        tc = common.text_config_of(json.load(f))
    engines = [e for e in args.engines.split(",") if e]
    for e in engines:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    decode_params = common.decode_weight_params(tc)
    stored_params = _stored_params(args.checkpoint)
    print(
        f"checkpoint {args.checkpoint}: L={tc['num_hidden_layers']} I={tc['intermediate_size'][0]} "
        f"shared={tc['num_kv_shared_layers']}, {stored_params / 1e9:.2f} B params stored, "
        f"{decode_params['total'] / 1e9:.3f} B read per decoded token",
        flush=True,
    )
    bw = common.measure_bandwidth(args.threads)
    if args.bandwidth:
        bw = {"read_gbps": args.bandwidth, "copy_gbps": None, "measured": bw, "pinned": True}
    print(
        f"memory bandwidth ({args.threads} threads): read {bw['read_gbps']:.1f} GB/s, "
        f"copy {common.fmt(bw['copy_gbps'], 1)} GB/s"
    )

    results = []
    for e in engines:
        # transformers converts bf16 -> fp32 through a transient copy (peak ~1.6x the fp32 weights).
        need = stored_params * ENGINE_WEIGHT_BYTES.get(e, 2) * (1.6 if e == "hf-fp32" else 1.0) / 1e9
        avail = mem_available_gb()
        if args.device == "cpu" and need > avail - 1.5:
            print(f"[{e}] skipped: needs ~{need:.1f} GB of weights, {avail:.1f} GB available", flush=True)
            results.append({"engine": e, "error": f"skipped: needs ~{need:.1f} GB, {avail:.1f} GB available"})
            continue
        print(f"[{e}] running ...", flush=True)
        results.append(run_engine(e, args))

    if not args.bandwidth:
        # Others may share the machine: measure again after the engines and keep the best of both.
        bw_end = common.measure_bandwidth(args.threads)
        print(f"memory bandwidth after the engines: read {bw_end['read_gbps']:.1f} GB/s")
        bw = dict(bw_end if bw_end["read_gbps"] > bw["read_gbps"] else bw, start=bw, end=bw_end)
    prompts = [int(x) for x in args.prompts.split(",") if x]
    rows = summarize(results, prompts, decode_params, bw)
    cols = [("engine", "engine"), ("weight_dtype", "dtype")]
    cols += [(f"pf{n}", f"prefill {n} tok/s") for n in prompts]
    cols += [(f"ttft{n}", f"TTFT {n} (s)") for n in prompts]
    cols += [(f"cpf{n}", f"pf {n} by CPU time") for n in prompts]
    cols += [
        ("decode_tps", f"decode tok/s ({args.decode})"),
        ("bound_tps", "bound tok/s"),
        ("bound_frac", "of bound"),
        ("peak_rss_gb", "peak RSS GB"),
        ("load_s", "load s"),
        ("agree", "tokens = hf-fp32"),
        ("agree_bf16", "tokens = hf-bf16"),
        ("loadavg", "load avg"),
    ]
    if any(r.get("cuda_peak_gb") for r in results):
        cols.append(("cuda_peak_gb", "CUDA peak GB"))
    print()
    table = common.print_table(rows, cols)
    ratios = _ratios(rows, prompts)
    for line in ratios:
        print(line)
    print(
        f"decode bound: {decode_params['total'] / 1e9:.3f} B params/token "
        f"= {decode_params['total'] * 2 / 1e9:.2f} GB in bf16 / {bw['read_gbps']:.1f} GB/s "
        f"= {bw['read_gbps'] * 1e9 / (decode_params['total'] * 2):.2f} tok/s"
    )
    data = {
        "args": vars(args),
        "machine": common.machine_info(),
        "bandwidth": bw,
        "text_config": {k: tc[k] for k in ("num_hidden_layers", "num_kv_shared_layers", "intermediate_size")},
        "decode_weight_params": decode_params,
        "stored_params": stored_params,
        "results": results,
        "rows": rows,
        "ratios": ratios,
        "table": table,
    }
    path = common.write_json("bench_text", data)
    print(f"wrote {path}")
    return 0


def _stored_params(ckpt: str) -> int:
    idx = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            return json.load(f)["metadata"]["total_size"] // 2
    return 0


def summarize(results: list[dict], prompts: list[int], dp: dict, bw: dict) -> list[dict]:
    from gemma3n.cache import common_prefix

    refs = {
        key: next((r for r in results if r.get("engine") == eng and "decode" in r), None)
        for key, eng in (("agree", "hf-fp32"), ("agree_bf16", "hf-bf16"))
    }
    rows = []
    for r in results:
        row: dict[str, Any] = {"engine": r["engine"]}
        if "error" in r:
            row["weight_dtype"] = r["error"]
            rows.append(row)
            continue
        row["weight_dtype"] = r.get("weight_dtype")
        if r.get("compute_dtype") and r["compute_dtype"] != r.get("weight_dtype"):
            row["weight_dtype"] = f"{r['weight_dtype']} (compute {r['compute_dtype']})"
        for n in prompts:
            p = r.get("prefill", {}).get(str(n))
            if p:
                row[f"pf{n}"] = p["tps"]
                row[f"ttft{n}"] = p["ttft_s"]
                row[f"cpf{n}"] = p.get("cpu_tps")
        nbytes = 4 if r.get("weight_dtype") == "float32" else 2  # bytes as the weights are held
        row["bound_tps"] = bw["read_gbps"] * 1e9 / (dp["total"] * nbytes)
        if "decode" in r:
            row["decode_tps"] = r["decode"]["tps"]
            row["bound_frac"] = row["decode_tps"] / row["bound_tps"]
            for key, ref in refs.items():
                if ref is not None:
                    same = common_prefix(r["decode"]["token_ids"], ref["decode"]["token_ids"])
                    row[key] = f"{same}/{len(ref['decode']['token_ids'])}"  # greedy tokens equal to the reference's
        row["peak_rss_gb"] = r.get("peak_rss_gb")
        row["loadavg"] = (r.get("loadavg_before") or [None])[0]
        row["load_s"] = r.get("load_s")
        row["cuda_peak_gb"] = r.get("cuda_peak_gb")
        rows.append(row)
    return rows


def _ratios(rows: list[dict], prompts: list[int]) -> list[str]:
    by = {r["engine"]: r for r in rows}
    out = []
    pairs = (
        ("ours", "ours-noskip"),
        ("ours-fp32", "ours-noskip-fp32"),
        ("ours", "hf-bf16"),
        ("ours-fp32", "hf-fp32"),
        ("hf-fp32", "hf-bf16"),
    )
    for a, b in pairs:
        if a in by and b in by:
            parts = [
                f"{n}: {by[a][f'pf{n}'] / by[b][f'pf{n}']:.2f}x"
                for n in prompts
                if by[a].get(f"pf{n}") and by[b].get(f"pf{n}")
            ]
            parts += [
                f"{n} by CPU time: {by[a][f'cpf{n}'] / by[b][f'cpf{n}']:.2f}x"
                for n in prompts
                if by[a].get(f"cpf{n}") and by[b].get(f"cpf{n}")
            ]
            if by[a].get("decode_tps") and by[b].get("decode_tps"):
                parts.append(f"decode: {by[a]['decode_tps'] / by[b]['decode_tps']:.2f}x")
            if parts:
                out.append(f"{a} vs {b}: prefill " + ", ".join(parts))
    return out


if __name__ == "__main__":
    sys.exit(main())
