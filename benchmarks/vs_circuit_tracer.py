"""sparsetrace vs circuit-tracer on the same model, transcoders, prompt and logit targets (issue 8, part 1).

Model: the embedded default SmolLM2-135M-Instruct (Llama architecture), as a local HF folder; circuit-tracer
runs its nnsight backend on that folder (no hub access). Transcoders: one random per-layer set (30 layers ×
2304 features, no skip) exported to circuit-tracer's layout. circuit-tracer's single-layer transcoders
know only ReLU and JumpReLU (its loader: threshold present → JumpReLU ``x·(x > θ)``, else ReLU; a TopK
``k`` would not load), so the set is JumpReLU for both tools, each feature's θ set to its
(1 − L0/F)-quantile of pre-activations on a calibration text (position 0 excluded), giving L0 ≈ 36 per
token per layer. Tokens: our tokenisation with the prepended ``<|im_start|>``; circuit-tracer keeps a
leading special token as its BOS, so both see the same ids. Logit targets: circuit-tracer picks (top
logits, cumulative p ≥ 0.95, at most 10; the same rule as ours); we pass its token ids to ours.

Each tool runs in its own subprocess (2 threads, fp32, CPU; circuit-tracer at batch 64, its fastest here,
ours at its automatic batch unless ``--our-batch-size``) that first traces the prompt's first
``--warmup-tokens`` (default 4) tokens untimed — both tools' one-time costs (lazy imports, nnsight's
tracing set-up, our numba kernels' cache load) then stay out of the timed call, as in a session that
traces many prompts; that call's seconds are reported as ``warmup_seconds``, and ``--warmup-tokens 0``
times a cold first call instead — and then reports seconds of
attribution (model loading excluded), its process's peak RSS (VmHWM: includes loading), pruning
seconds (node 0.8 / edge 0.98) and writes its dense adjacency in the common node order — features
sorted by (layer, pos, feature id) | errors layer-major L×T | tokens T | logits K (both tools already use
this order; logits are aligned by token id) — to a work folder; the parent compares them.

circuit-tracer lives in its own venv (it pins transformers ≤ 4.57.3):

    python -m venv benchmarks/_venvs/ct
    benchmarks/_venvs/ct/bin/pip install torch==2.13.0 circuit-tracer nnsight==0.7.0 'transformers<=4.57.3' gguf accelerate

Then, with our venv:

    .venv/bin/python benchmarks/vs_circuit_tracer.py --tokens 8 32
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CT_PYTHON = HERE / "_venvs" / "ct" / "bin" / "python"
RESULTS = HERE / "results" / "vs_circuit_tracer.json"

N_FEATURES, TARGET_L0, SEED = 2304, 36, 0
NODE_THRESHOLD, EDGE_THRESHOLD = 0.8, 0.98

# Prompt text (benchmarks/attribution.py's, continued to > 128 tokens); a prompt of n tokens is BOS + the first n−1.
TEXT = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange "
    "salt, grain and cloth. Over the centuries the town grew into a regional capital with a cathedral, "
    "a university and a busy port that connected it to the rest of the continent and beyond. In the "
    "nineteenth century the railway arrived, the old walls were torn down, and new factories along the "
    "canal drew workers from the surrounding villages. The population doubled in thirty years, and the "
    "council built schools, a hospital, public baths and a covered market that still opens every morning "
    "except Sunday, when the square fills instead with musicians and families walking by the water."
)
# Calibration text for the JumpReLU thresholds (not the prompt).
CALIBRATION = [
    "A transcoder is trained to reproduce the output of a multilayer perceptron from its input through a "
    "wide, sparsely active hidden layer. Each hidden unit is called a feature; its encoder row decides when "
    "it fires and its decoder row decides what it writes back into the residual stream of the model.",
    "def parse(line):\n    key, _, value = line.partition('=')\n    return key.strip(), value.strip()\n\n"
    "for line in open('settings.ini'):\n    if line and not line.startswith('#'):\n        print(parse(line))\n",
    "The river rises in the mountains to the north and flows for nearly four hundred kilometres before it "
    "reaches the sea. Fishing villages line its lower course, and in spring the meltwater floods the "
    "meadows, leaving behind a layer of fertile silt that farmers have relied upon for generations.",
    "Mary and John went to the market. John bought apples and pears, and Mary bought bread and cheese. "
    "When they got home, John gave a drink to Mary, and she thanked him and sat down by the window.",
    "In 1848 a wave of revolutions spread across Europe. Governments fell in Paris, Vienna and Berlin, "
    "constitutions were promised and withdrawn, and within two years most of the old order was restored.",
    "To install the package, run the installer as an administrator, accept the licence, choose a folder "
    "and press Next. The program checks for updates at start-up; you can turn this off in the settings.",
]


def _rss_mb() -> float:
    """This process's peak RSS in MB: Linux's VmHWM (the peak of its own address space; ru_maxrss would
    inherit the parent's peak across fork + exec, and the parent holds both dense matrices after a
    comparison), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB → MB on Linux


# ---------------------------------------------------------------- prepare (our venv) -------------
def child_prepare(args: argparse.Namespace) -> None:
    import torch

    from sparsetrace.models.loading import collect_mlp_io, fetch_default_model, load_model
    from sparsetrace.transcoders import TranscoderSet, TranscoderSetConfig, save_transcoders
    from sparsetrace.transcoders.formats import export_circuit_tracer

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    lm = load_model(None, device="cpu")
    cfg = TranscoderSetConfig(lm.model_id, lm.adapter.name, lm.n_layers, lm.d_model, N_FEATURES, "jumprelu", None, skip=False)
    ts = TranscoderSet.random(cfg, seed=SEED)
    q = 1.0 - TARGET_L0 / N_FEATURES
    with torch.no_grad():
        xs = []
        for text in CALIBRATION:
            x, _ = collect_mlp_io(lm, lm.tokenize(text)[None])  # [L, 1, T, d]
            xs.append(x[:, 0, 1:])  # drop position 0
        x = torch.cat(xs, dim=1)  # [L, N, d]
        l0 = []
        for i, tc in enumerate(ts):
            pre = tc.pre_activation(x[i]).double()  # [N, F]
            tc.threshold.copy_(torch.quantile(pre, q, dim=0).clamp_min(0))
            l0.append(float((tc.activate(pre.float()) != 0).sum(-1).double().mean()))
    save_transcoders(ts, work / "set_ours")
    ct_dir = export_circuit_tracer(ts, work / "set_ct")
    # circuit-tracer resolves the listed transcoder files relative to the working directory: make them
    # absolute (and add the `scan` key its loader reads), see _ct_config below.
    model_dir = _ct_model_folder(fetch_default_model(), work / "model_ct")
    ids = lm.tokenize(TEXT)
    prompts = {str(n): ids[:n].tolist() for n in args.tokens}
    for n in args.tokens:
        if len(prompts[str(n)]) != n:
            raise SystemExit(f"prompt text has only {ids.numel()} tokens; asked for {n}")
    meta = {
        "model_dir": str(model_dir),
        "model_id": lm.model_id,
        "ct_set": str(ct_dir.resolve()),
        "our_set": str((work / "set_ours").resolve()),
        "prompts": prompts,
        "calibration_tokens": int(x.shape[1]),
        "calibration_l0_per_layer": [round(v, 2) for v in l0],
    }
    (work / "prep.json").write_text(json.dumps(meta))
    print(json.dumps({"calibration_l0_mean": round(sum(l0) / len(l0), 2), "calibration_tokens": int(x.shape[1])}))


def _ct_model_folder(src: Path, dst: Path) -> Path:
    """The default model folder as transformers ≤ 4.57 (circuit-tracer's pin) reads it: our copy was
    written by transformers 5, whose config keeps RoPE's θ under ``rope_parameters`` (4.x would silently
    fall back to θ = 10000) and whose tokenizer_config names the class ``TokenizersBackend`` (unknown to
    4.x). Weights and tokenizer.json are linked, not copied."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    tok = json.loads((src / "tokenizer_config.json").read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=1))
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        link = dst / name
        if (src / name).exists() and not link.exists():
            link.symlink_to((src / name).resolve())
    return dst.resolve()


# ---------------------------------------------------------------- circuit-tracer (its venv) ------
def _ct_config(folder: Path) -> dict:
    import yaml

    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["transcoders"] = [str((folder / p).resolve()) for p in cfg["transcoders"]]
    cfg.setdefault("scan", "sparsetrace-random-jumprelu")
    cfg.setdefault("repo_id", "")
    return cfg


def child_ct(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import prune_graph
    from circuit_tracer.utils.hf_utils import load_transcoders

    work = Path(args.work)
    prep = json.loads((work / "prep.json").read_text())
    dev = torch.device("cpu")
    # the same defaults as ReplacementModel.from_pretrained (eager encoders, lazy decoders)
    transcoders = load_transcoders(_ct_config(Path(prep["ct_set"])), dev, torch.float32, lazy_encoder=False, lazy_decoder=True)
    model = ReplacementModel.from_pretrained_and_transcoders(
        prep["model_dir"], transcoders, backend="nnsight", device=dev, dtype=torch.float32
    )
    ids = torch.tensor(prep["prompts"][str(args.tokens)], dtype=torch.long)
    assert model.ensure_tokenized(ids).tolist() == ids.tolist(), "circuit-tracer changed the token ids"
    warm = None
    if args.warmup_tokens:  # one-time costs (lazy imports, tracing set-up, allocator) out of the timed call
        t0 = time.perf_counter()
        attribute(ids[: args.warmup_tokens], model, batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes)
        warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = attribute(ids, model, batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes)
    secs = time.perf_counter() - t0
    rss_attr = _rss_mb()
    feats = g.active_features[g.selected_features].numpy().astype(np.int64)  # [F, 3] (layer, pos, feature)
    tag = f"ct_{args.tokens}"
    if args.max_feature_nodes is None:
        np.save(work / f"{tag}_A.npy", g.adjacency_matrix.numpy().astype(np.float32, copy=False))
    np.save(work / f"{tag}_features.npy", feats)
    rec = {
        "tool": "circuit-tracer",
        "tokens": args.tokens,
        "active_features": int(g.active_features.shape[0]),
        "feature_nodes": int(len(g.selected_features)),
        "n_nodes": int(g.adjacency_matrix.shape[0]),
        "logit_tokens": [int(t.vocab_idx) for t in g.logit_targets],
        "logit_probabilities": [float(p) for p in g.logit_probabilities],
        "seconds": round(secs, 2),
        "warmup_seconds": None if warm is None else round(warm, 2),
        "peak_rss_after_attribution_mb": round(rss_attr, 1),
    }
    # printed before pruning: circuit-tracer's dense pruning can run out of memory (issue 8 saw it at
    # 32 tokens in 24 GB), and the attribution result must survive that
    print(json.dumps(rec), flush=True)
    t0 = time.perf_counter()
    pr = prune_graph(g, NODE_THRESHOLD, EDGE_THRESHOLD)
    prune_secs = time.perf_counter() - t0
    node_mask, edge_mask = pr[0], pr[1]
    rec.update(peak_rss_mb=round(_rss_mb(), 1), prune_seconds=round(prune_secs, 3),
               nodes_kept=int(node_mask.sum()), edges_kept=int(edge_mask.sum()))
    print(json.dumps(rec))


# ---------------------------------------------------------------- sparsetrace (our venv) --------
def child_ours(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from sparsetrace.graphs.prune import prune
    from sparsetrace.tracer.attribution import AttributionConfig, attribute
    from sparsetrace.models.loading import load_model
    from sparsetrace.transcoders import load_transcoders

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    prep = json.loads((work / "prep.json").read_text())
    lm = load_model(None, device="cpu")
    ts = load_transcoders(prep["our_set"])
    ids = prep["prompts"][str(args.tokens)]
    targets = json.loads(args.targets) if args.targets else None
    cfg = AttributionConfig(batch_size=args.our_batch_size or None, max_feature_nodes=args.max_feature_nodes, device="cpu")
    warm = None
    if args.warmup_tokens:  # the same warm-up as circuit-tracer's (numba kernels loaded, lazy imports)
        t0 = time.perf_counter()
        attribute(ids[: args.warmup_tokens], lm, ts, config=cfg)
        warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = attribute(ids, lm, ts, targets=targets, config=cfg)
    secs = time.perf_counter() - t0
    rss_attr = _rss_mb()
    # numba JIT: the first prune compiles; time a warm call as well
    t0 = time.perf_counter()
    pr = prune(g, NODE_THRESHOLD, EDGE_THRESHOLD)
    prune_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    pr = prune(g, NODE_THRESHOLD, EDGE_THRESHOLD)
    prune_warm = time.perf_counter() - t0
    lay = g.layout
    f = lay.features
    feats = np.stack([lay.layer[f], lay.pos[f], lay.feature[f]], axis=1).astype(np.int64)
    tag = f"ours_{args.tokens}"
    if args.save_dense:
        np.save(work / f"{tag}_A.npy", g.dense_adjacency().astype(np.float32, copy=False))
    np.save(work / f"{tag}_features.npy", feats)
    st = g.metadata["stats"]
    print(
        json.dumps(
            {
                "tool": "sparsetrace",
                "tokens": args.tokens,
                "active_features": int(st["active_features"]),
                "feature_nodes": int(st["feature_nodes"]),
                "n_nodes": int(lay.n_nodes),
                "logit_tokens": [int(t) for t in g.logit_token],
                "logit_probabilities": [float(p) for p in g.logit_probability],
                "seconds": round(secs, 2),
                "warmup_seconds": None if warm is None else round(warm, 2),
                "batch_size": int(st["batch_size"]),
                "peak_rss_mb": round(_rss_mb(), 1),
                "peak_rss_after_attribution_mb": round(rss_attr, 1),
                "prune_seconds": round(prune_warm, 3),
                "prune_seconds_incl_jit": round(prune_cold, 3),
                "nodes_kept": int(pr.n_nodes_kept),
                "edges_kept": int(pr.n_edges_kept),
            }
        )
    )


# ---------------------------------------------------------------- parent ------------------------
def _run(cmd: list[str], timeout: float | None, env: dict) -> tuple[dict | None, str]:
    """The child's last JSON line, and an error text if it failed. A child that printed a record and then
    died (e.g. killed for memory while pruning) returns that record with ``"failed_after"`` set."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        out, code, err = p.stdout, p.returncode, p.stderr
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        code, err = None, f"killed after {timeout:.0f} s (time limit)"
    lines = [l for l in out.strip().splitlines() if l.startswith("{")]
    last = json.loads(lines[-1]) if lines else None
    if code == 0:
        return last, ""
    why = err if code is None else f"exit {code}" + (" (killed: out of memory)" if code == -9 else "") + ":\n" + \
        "\n".join((err or out).strip().splitlines()[-15:])
    if last is not None:
        last["failed_after"] = why.splitlines()[0]
    return last, why


def compare(work: Path, n: int, ct: dict, ours: dict) -> dict:
    import numpy as np

    fc, fo = np.load(work / f"ct_{n}_features.npy"), np.load(work / f"ours_{n}_features.npy")
    out: dict = {"same_features": bool(fc.shape == fo.shape and (fc == fo).all())}
    if not out["same_features"]:
        sc, so = set(map(tuple, fc.tolist())), set(map(tuple, fo.tolist()))
        out.update(only_ct=len(sc - so), only_ours=len(so - sc))
        return out
    if ct["logit_tokens"] != ours["logit_tokens"]:
        out["same_logits"] = False
        return out
    # memory-mapped, compared in row blocks (at 32 tokens each matrix is ~5 GB of float32)
    A, B = np.load(work / f"ct_{n}_A.npy", mmap_mode="r"), np.load(work / f"ours_{n}_A.npy", mmap_mode="r")
    if A.shape != B.shape:
        out["shape"] = [list(A.shape), list(B.shape)]
        return out
    F, T = fc.shape[0], n
    L = int(A.shape[0] - F - T - len(ct["logit_tokens"])) // T
    tok0 = F + L * T  # column of the position-0 (BOS) token node
    keep = np.ones(A.shape[1], dtype=bool)
    keep[tok0] = False
    scale = dmax = dmax_nobos = bos_ct = bos_ours = 0.0
    nnz_ct = nnz_ours = 0
    for r in range(0, A.shape[0], 2048):
        a, b = np.asarray(A[r : r + 2048], dtype=np.float64), np.asarray(B[r : r + 2048], dtype=np.float64)
        d = np.abs(a - b)
        scale = max(scale, float(np.abs(a).max()))
        dmax, dmax_nobos = max(dmax, float(d.max())), max(dmax_nobos, float(d[:, keep].max()))
        bos_ct, bos_ours = max(bos_ct, float(np.abs(a[:, tok0]).max())), max(bos_ours, float(np.abs(b[:, tok0]).max()))
        nnz_ct, nnz_ours = nnz_ct + int((a != 0).sum()), nnz_ours + int((b != 0).sum())
    out.update(
        n_layers=L,
        max_abs_A=scale,
        max_abs_diff=dmax,
        max_rel_diff=dmax / scale,
        max_rel_diff_without_bos_token=dmax_nobos / scale,
        bos_token_column_max_abs_ct=bos_ct,
        bos_token_column_max_abs_ours=bos_ours,
        nnz_ct=nnz_ct,
        nnz_ours=nnz_ours,
    )
    out["agree_1e-4"] = out["max_rel_diff"] <= 1e-4
    return out


def _machine() -> dict:
    def sh(c: str) -> str:
        try:
            return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    return {"nproc": sh("nproc"), "lscpu": sh("lscpu | head -20"), "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--budget-tokens", type=int, nargs="*", default=[],
                    help="prompt lengths run with --max-feature-nodes for both tools (e.g. 128)")
    ap.add_argument("--max-feature-nodes", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="circuit-tracer's batch (64 was its fastest on CPU)")
    ap.add_argument("--our-batch-size", type=int, default=0, help="sparsetrace's batch (0: its automatic choice)")
    ap.add_argument("--warmup-tokens", type=int, default=4,
                    help="each tool first traces this many tokens of the prompt, untimed (0: time a cold first call)")
    ap.add_argument("--ct-python", default=str(CT_PYTHON))
    ap.add_argument("--ct-timeout", type=float, default=600, help="seconds before a circuit-tracer run is killed")
    ap.add_argument("--work", default=None, help="folder for sets and matrices (default: a temp folder)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--no-write", action="store_true", help="print only (validation runs)")
    ap.add_argument("--child", choices=["prepare", "ct", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--targets", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save-dense", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup_tokens < 0 or args.warmup_tokens == 1:
        ap.error(f"--warmup-tokens {args.warmup_tokens}; allowed: 0 (no warm-up) or ≥ 2 (a prompt needs 2 tokens)")
    if args.child:
        if args.child != "prepare":
            (args.tokens,) = args.tokens
        {"prepare": child_prepare, "ct": child_ct, "ours": child_ours}[args.child](args)
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="vs_ct_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               NUMBA_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--work", str(work), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
              "--warmup-tokens", str(args.warmup_tokens)]
    all_tokens = list(args.tokens) + list(args.budget_tokens)
    prep, err = _run(me + ["--child", "prepare", "--tokens", *map(str, all_tokens)] + common, None, env)
    if prep is None:
        raise SystemExit(f"prepare failed: {err}")
    print(f"work folder {work}; JumpReLU thresholds calibrated on {prep['calibration_tokens']} tokens, "
          f"L0 {prep['calibration_l0_mean']}/token/layer")
    cases = []
    for n in all_tokens:
        budget = args.max_feature_nodes if n in args.budget_tokens else None
        extra = ["--tokens", str(n)] + (["--max-feature-nodes", str(budget)] if budget else [])
        print(f"[{n} tokens] circuit-tracer …", flush=True)
        ct, ct_err = _run([args.ct_python, str(Path(__file__).resolve()), "--child", "ct"] + common + extra, args.ct_timeout, env)
        targets = json.dumps(ct["logit_tokens"]) if ct else None
        print(f"[{n} tokens] sparsetrace …", flush=True)
        ours, ours_err = _run(me + ["--child", "ours", "--our-batch-size", str(args.our_batch_size)] + common + extra
                              + (["--targets", targets, "--save-dense"] if targets else []), None, env)
        case = {"tokens": n, "max_feature_nodes": budget, "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "circuit_tracer": ct or {"error": ct_err},
                "sparsetrace": ours or {"error": ours_err}}
        if ct and ours and budget is None:
            case["agreement"] = compare(work, n, ct, ours)
        cases.append(case)
        _print_case(case)

    res = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([".venv/bin/python", "benchmarks/vs_circuit_tracer.py"] + sys.argv[1:]),
        "setup": {
            "model": prep.get("model_id", "SmolLM2-135M-Instruct"),
            "transcoders": f"random JumpReLU, 30 layers × {N_FEATURES}, no skip, θ = per-feature "
                           f"(1 − {TARGET_L0}/{N_FEATURES})-quantile on {prep['calibration_tokens']} calibration tokens",
            "calibration_l0": prep["calibration_l0_mean"],
            "threads": args.threads, "dtype": "float32", "device": "cpu", "batch_size": args.batch_size,
            "our_batch_size": args.our_batch_size or "auto",
            "warmup_tokens": args.warmup_tokens,
            "circuit_tracer": _ct_versions(args.ct_python, env),
            "prune": {"node_threshold": NODE_THRESHOLD, "edge_threshold": EDGE_THRESHOLD},
        },
        "machine": _machine(),
        "cases": cases,
    }
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():  # keep the earlier runs of cases not rerun now (each case records its own date)
            ran = {(c["tokens"], c["max_feature_nodes"]) for c in cases}
            old = json.loads(out.read_text())
            kept = [c | {"date_utc": c.get("date_utc", old.get("date_utc"))} for c in old.get("cases", [])
                    if (c["tokens"], c["max_feature_nodes"]) not in ran]
            res["cases"] = sorted(kept + cases, key=lambda c: (c["max_feature_nodes"] is not None, c["tokens"]))
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out)
        print(f"wrote {out}")


def _ct_versions(py: str, env: dict) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "['circuit-tracer','nnsight','transformers','torch']}))")
    try:
        p = subprocess.run([py, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        return json.loads(p.stdout)
    except Exception as exc:  # noqa: BLE001 - informational only
        return {"error": str(exc)}


def markdown_rows(c: dict) -> list[str]:
    """One table row per tool for a case (also used for docs/performance.md)."""
    rows = []
    a = c.get("agreement", {})
    agree = f"{a['max_rel_diff']:.1e}" if "max_rel_diff" in a else "—"
    for name, key in (("circuit-tracer 0.5.0", "circuit_tracer"), ("sparsetrace", "sparsetrace")):
        r = c[key]
        head = f"| {c['tokens']} | {c['max_feature_nodes'] or 'all'} | {name} |"
        if "error" in r:
            rows.append(head + f" not run: {r['error'].splitlines()[0]} | | | | | |")
            continue
        if "failed_after" in r:  # attribution finished, pruning did not
            tail = f" — | pruning failed: {r['failed_after']} |"
        else:
            tail = f" {r['peak_rss_mb'] / 1024:.2f} | {r['prune_seconds']:.3g} ({r['nodes_kept']} nodes, {r['edges_kept']} edges) |"
        rows.append(
            head + f" {r['active_features']} | {r['seconds']:.1f}"
            + (f" ({r['warmup_seconds']:.1f})" if r.get("warmup_seconds") is not None else "")
            + f" | {r['peak_rss_after_attribution_mb'] / 1024:.2f} |"
            + tail + f" {agree} |"
        )
    return rows


MD_HEADER = [
    "| tokens | feature rows | tool | active features | attribution s (warm-up call s) | peak RSS after attribution GB |"
    " process peak RSS GB | prune s (kept) | max rel. diff of A |",
    "|---|---|---|---|---|---|---|---|---|",
]


def _print_case(c: dict) -> None:
    print("\n".join(MD_HEADER + markdown_rows(c)))
    if "agreement" in c:
        print("agreement:", json.dumps(c["agreement"]))


if __name__ == "__main__":
    main()
