"""`evejax bench`: speed benchmarks. `lm` is here; `data` is evejax/data/bench.py.

  evejax bench lm [--steps 2] [--repeats 5] [--size llama_110m] [--batch 4] [--seq-len 512]
                  [--variant remat=full,scan_unroll=1 ...] [--threads N]

`lm` times one training step (forward + backward + clipped AdamW update) of an
evejax CausalLM against transformers' LlamaForCausalLM built with the same
shapes (eager PyTorch, float32, `torch.optim.AdamW`, global-norm clipping at
1.0, the same token batch [B, T] int32 and next-token targets). Both run on
this machine's CPU with one thread per core, each run in its own worker
process that sets up host memory first (`evejax.hostmem`: freed memory stays
in the process, so steps after the first take no page faults; set
EVEJAX_MALLOC=system to measure without). After warm-up the runs are measured
alternately, evejax then PyTorch, `--repeats` times, each measurement
`--steps` steps, so drifting background load hits both alike; medians are
reported, with the minor page faults per step.

Peak FLOP/s: a 2048 x 2048 x 2048 float32 matmul in both frameworks, timed
inside every repeat (medians); the higher of the two is the machine's peak.
Model FLOPs per step are `llm.training_flops_per_step` (MaxText's count).

The evejax side uses `BENCH_OPTIONS`, ordinary TransformerConfig fields a
training config can set too; `--variant` adds evejax runs with other options
to the same alternation, to measure a choice.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

# The evejax step's options on CPU, chosen by alternating measurements of the
# 110M step on 2 cores (CPU seconds per step, medians):
#   matmul_2d        one 2-D matmul per projection: the weight gradients need no
#                    transposing copies of the activations (-20% step time).
#   remat            "save_dots_no_batch" keeps the projections' outputs and
#                    recomputes attention: 10.7 s against 11.6 "none", 12.0
#                    "full", 11.6 "minimal", 10.8 "save_dots" (measured with
#                    the system allocator, when every touched page of the
#                    temporaries was a page fault). With evejax.hostmem's kept
#                    memory the three leading choices are within noise:
#                    5.95 s against 6.10 "none" and 5.91 "save_dots".
#   scan_unroll      1: unrolling the 12 layers gave 11.4 s against 10.7.
#   attention_impl   "xla" (4-D einsum softmax); "dot" 12.9 s.
# XLA:CPU flags tried and left at their defaults: YNNPACK fusions limited to
# dots or disabled (11.6 s against 11.1), --xla_cpu_use_onednn, single-threaded
# Eigen; glibc huge pages for the temporaries (GLIBC_TUNABLES=glibc.malloc.hugetlb=1,
# 14.8 s). Fusing q/k/v or gate/up kernels into one matmul was 3-7% slower.
# Host memory: evejax.hostmem (used by both workers) took the step from 8.14 to
# 5.95 s and PyTorch's from 10.82 to 9.46 (against an EVEJAX_MALLOC=system run).
BENCH_OPTIONS = dict(matmul_2d=True, remat="save_dots_no_batch", scan_unroll=1, attention_impl="xla")


def parse_options(text: str) -> dict:
    """"remat=full,scan_unroll=1" -> {"remat": "full", "scan_unroll": 1}."""
    import ast

    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"variant item {item!r} must look like key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _seconds_per_call(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


class JaxLM:
    """The evejax train step on one CPU device; `step()` runs and waits for one step."""

    def __init__(self, size: str, batch: int, seq_len: int, options: dict, seed: int = 0):
        import jax
        import jax.numpy as jnp

        from evejax import sharding
        from evejax.models import llm
        from evejax.models import losses
        from evejax.train import step

        self.config = llm.get_config(size, **options)
        module = llm.CausalLM(self.config)
        optimizer = step.adamw(1e-4)
        mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
        init_args = (jnp.zeros((1, 8), jnp.int32),)
        _, shardings = step.abstract_state(module, init_args, {}, optimizer, mesh)
        host_batch = losses.dummy_lm_batch(batch, seq_len, self.config.vocab_size, seed)
        batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in host_batch.items()}
        with sharding.rules_context(mesh):
            self.state = step.init_state(module, init_args, {}, optimizer, shardings, jax.random.PRNGKey(seed))
            self.train_step = step.make_train_step(losses.lm_loss_fn(module), optimizer, shardings, batch_sh)
        self.batch = jax.device_put(host_batch, batch_sh)
        self.loss = None

    def step(self):
        import jax

        self.state, metrics = self.train_step(self.state, self.batch)
        self.loss = float(jax.block_until_ready(metrics["loss"]))


class TorchLM:
    """transformers' LlamaForCausalLM with the same shapes, eager, and its AdamW step."""

    def __init__(self, config, batch: int, seq_len: int, seed: int = 0):
        import torch
        import transformers

        from evejax.models import losses

        t = config.transformer
        hf = transformers.LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=t.embed_dim, intermediate_size=t.mlp_dim,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
            num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, rms_norm_eps=t.norm_eps,
            max_position_embeddings=max(t.max_position_embeddings, seq_len), rope_theta=t.rope_base,
            tie_word_embeddings=False, attention_dropout=0.0)
        torch.manual_seed(seed)
        self.model = transformers.LlamaForCausalLM(hf).float().train()
        self.attention = self.model.config._attn_implementation
        try:  # the fused CPU kernel where this torch has it: the strongest eager baseline
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
            self.optimizer_kind = "fused"
        except (RuntimeError, TypeError):
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
            self.optimizer_kind = "foreach"
        b = losses.dummy_lm_batch(batch, seq_len, config.vocab_size, seed)
        self.tokens = torch.from_numpy(b["tokens"]).long()
        self.targets = torch.from_numpy(b["targets"]).long()
        self.mask = torch.from_numpy(b["loss_mask"])
        self.loss = None

    def step(self):
        import torch
        import torch.nn.functional as F

        logits = self.model(input_ids=self.tokens).logits
        nll = F.cross_entropy(logits.flatten(0, 1), self.targets.flatten(), reduction="none")
        loss = (nll * self.mask.flatten()).sum() / self.mask.sum().clamp(min=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())


def matmul_timer(kind: str, n: int) -> Callable[[], object]:
    """Runs one n x n x n float32 matmul to completion in "jax" or "torch"."""
    import numpy as np

    a, b = (np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) for _ in range(2))
    if kind == "jax":
        import jax
        import jax.numpy as jnp

        matmul, ja, jb = jax.jit(jnp.matmul), jnp.asarray(a), jnp.asarray(b)
        return lambda: matmul(ja, jb).block_until_ready()
    import torch

    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return lambda: torch.mm(ta, tb)


@dataclasses.dataclass
class LMResult:
    size: str
    batch: int
    seq_len: int
    steps: int
    repeats: int
    threads: int
    xla_flags: str
    torch_attention: str
    torch_optimizer: str
    allocator: str                 # host malloc mode of the workers (evejax.hostmem)
    flops_per_step: float
    matmul_size: int
    jax_matmul_flops: float        # median FLOP/s of the matmul, per framework
    torch_matmul_flops: float
    peak_flops: float              # the higher of the two
    variants: list                 # [options dict] per evejax run, the first is BENCH_OPTIONS
    jax_step_s: list               # [median step seconds] per variant
    jax_samples: list              # [[seconds per step, one per repeat]] per variant
    torch_step_s: float
    torch_samples: list
    jax_faults: list               # median minor page faults per step, per variant
    torch_faults: float
    jax_loss: list                 # last loss per variant (all start at ~log(vocab))
    torch_loss: float

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def tokens_per_s(self, seconds: float) -> float:
        return self.tokens / seconds

    def fraction_of_peak(self, seconds: float) -> float:
        return self.flops_per_step / seconds / self.peak_flops


def _worker(conn, kind: str, size: str, batch: int, seq_len: int, option_sets: list,
            threads: int, matmul_size: int, warmup: int) -> None:
    """One framework in its own process: builds and warms up its runs (one per
    evejax option set), then answers ("step", run, n) and ("matmul", n) with
    (seconds per call, minor page faults per call) until ("stop",). Own processes
    keep the frameworks' heaps and thread pools apart; both set up host memory
    the same way, first."""
    from evejax import hostmem

    try:
        allocator = hostmem.keep_freed_memory()
        info = dict(allocator=allocator, setup_s=[])
        if kind == "jax":
            make = lambda options: JaxLM(size, batch, seq_len, options)  # noqa: E731
        else:
            import torch

            from evejax.models import llm

            torch.set_num_threads(threads)
            make = lambda options: TorchLM(llm.get_config(size), batch, seq_len)  # noqa: E731
        runs = []
        for options in option_sets:
            start = time.perf_counter()
            runs.append(make(options))
            for _ in range(warmup):
                runs[-1].step()
            info["setup_s"].append(time.perf_counter() - start)
        if kind == "jax":
            info["config"] = runs[0].config
        else:
            info.update(attention=str(runs[0].attention), optimizer=runs[0].optimizer_kind)
        matmul = matmul_timer(kind, matmul_size)
        matmul()
        conn.send(info)
        while True:
            cmd, *arg = conn.recv()
            if cmd == "stop":
                conn.send([run.loss for run in runs])
                return
            fn, n = (runs[arg[0]].step, arg[1]) if cmd == "step" else (matmul, arg[0])
            faults = hostmem.minor_page_faults()
            seconds = _seconds_per_call(fn, n)
            conn.send((seconds, (hostmem.minor_page_faults() - faults) / n))
    except BaseException:  # reported by the parent with the worker's traceback
        import traceback

        conn.send(("error", traceback.format_exc()))


class _Worker:
    def __init__(self, ctx, name: str, *args):
        self.name = name
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, *args), daemon=True)
        self.process.start()
        child.close()
        self.info = self.ask()  # waits for the build and warm-up

    def ask(self, *cmd):
        try:
            if cmd:
                self.conn.send(cmd)
            reply = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            raise RuntimeError(f"bench worker {self.name} died (exit code {self.process.exitcode}; "
                               "a negative code is the signal, -9 often the out-of-memory killer)")
        if isinstance(reply, tuple) and reply and reply[0] == "error":
            raise RuntimeError(f"bench worker {self.name} failed:\n{reply[1]}")
        return reply


def run_lm(size: str = "llama_110m", batch: int = 4, seq_len: int = 512, steps: int = 2, repeats: int = 5,
           variants: Sequence[dict] = (), matmul_size: int = 2048, threads: Optional[int] = None,
           warmup: int = 3, log: Callable[[str], None] = lambda s: None) -> LMResult:
    """Measures evejax (BENCH_OPTIONS, then each variant's options on top) and PyTorch
    alternately: all evejax runs in one worker process, PyTorch in another. Three
    warm-up steps: with kept host memory the heap settles within them (a 110M
    run grew once, at its third step, then ran 22 steps at a flat 5.66 GiB)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    threads = threads or os.cpu_count() or 1
    option_sets = [dict(BENCH_OPTIONS)] + [dict(BENCH_OPTIONS, **v) for v in variants]
    names = [f"evejax {o}" for o in option_sets] + ["torch"]
    workers = []
    try:
        # One after the other: a worker's set-up (compiles, warm-up) must not overlap another's.
        for kind, sets in (("jax", option_sets), ("torch", [None])):
            workers.append(_Worker(ctx, kind, kind, size, batch, seq_len, sets, threads, matmul_size, warmup))
        jax_worker, torch_worker = workers
        for name, t in zip(names, jax_worker.info["setup_s"] + torch_worker.info["setup_s"]):
            log(f"{name}: build + {warmup} warm-up steps {t:.1f} s")
        runs = [(jax_worker, i) for i in range(len(option_sets))] + [(torch_worker, 0)]
        samples = [[] for _ in runs]
        faults = [[] for _ in runs]
        jax_mm_s, torch_mm_s = [], []
        for r in range(repeats):
            jax_mm_s.append(jax_worker.ask("matmul", 3)[0])
            torch_mm_s.append(torch_worker.ask("matmul", 3)[0])
            for i, (w, k) in enumerate(runs):
                seconds, n = w.ask("step", k, steps)
                samples[i].append(seconds)
                faults[i].append(n)
            log(f"repeat {r + 1}/{repeats}: evejax " + " ".join(f"{s[-1]:.3f}" for s in samples[:-1])
                + f" s/step, torch {samples[-1][-1]:.3f} s/step")
        losses = jax_worker.ask("stop") + torch_worker.ask("stop")
    finally:
        for w in workers:
            w.process.join(30)
            if w.process.is_alive():
                w.process.kill()

    mm_flops = 2.0 * matmul_size ** 3
    jax_mm_flops = mm_flops / statistics.median(jax_mm_s)
    torch_mm_flops = mm_flops / statistics.median(torch_mm_s)
    from evejax.models import llm

    config = jax_worker.info["config"]
    return LMResult(
        size=size, batch=batch, seq_len=seq_len, steps=steps, repeats=repeats, threads=threads,
        xla_flags=os.environ.get("XLA_FLAGS", ""), torch_attention=torch_worker.info["attention"],
        torch_optimizer=torch_worker.info["optimizer"], allocator=torch_worker.info["allocator"],
        flops_per_step=llm.training_flops_per_step(config, batch, seq_len),
        matmul_size=matmul_size, jax_matmul_flops=jax_mm_flops, torch_matmul_flops=torch_mm_flops,
        peak_flops=max(jax_mm_flops, torch_mm_flops), variants=option_sets,
        jax_step_s=[statistics.median(s) for s in samples[:-1]], jax_samples=samples[:-1],
        torch_step_s=statistics.median(samples[-1]), torch_samples=samples[-1],
        jax_faults=[statistics.median(f) for f in faults[:-1]], torch_faults=statistics.median(faults[-1]),
        jax_loss=losses[:-1], torch_loss=losses[-1])


def format_lm(res: LMResult) -> str:
    from importlib.metadata import version

    from evejax.models import llm

    t = llm.get_config(res.size).transformer
    lines = [
        f"evejax bench lm: {res.size} (d {t.embed_dim}, {t.num_layers} layers, {t.num_heads} heads, "
        f"SwiGLU {t.mlp_dim}, vocab {llm.get_config(res.size).vocab_size}), batch {res.batch} x {res.seq_len}, "
        "float32, forward + backward + AdamW",
        f"machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}); "
        f"torch {version('torch')} threads {res.threads}; jax {version('jax')}; "
        f"transformers {version('transformers')}",
        f"host memory: {res.allocator}, in each framework's worker process",
        f"XLA_FLAGS: {res.xla_flags or '(none)'}",
        f"torch: LlamaForCausalLM eager, attention {res.torch_attention}, AdamW {res.torch_optimizer}",
        f"{res.repeats} alternating repeats of {res.steps} steps each; medians",
        "",
    ]
    names = ["evejax" if i == 0 else f"variant {i}" for i in range(len(res.variants))]
    head = ["", *names, "torch"]
    rows = [
        ["s/step", *(f"{s:.3f}" for s in res.jax_step_s), f"{res.torch_step_s:.3f}"],
        ["tokens/s", *(f"{res.tokens_per_s(s):,.0f}" for s in res.jax_step_s),
         f"{res.tokens_per_s(res.torch_step_s):,.0f}"],
        ["x torch tokens/s", *(f"{res.torch_step_s / s:.2f}" for s in res.jax_step_s), "1.00"],
        ["GFLOP/s (model)", *(f"{res.flops_per_step / s / 1e9:.1f}" for s in res.jax_step_s),
         f"{res.flops_per_step / res.torch_step_s / 1e9:.1f}"],
        ["fraction of peak", *(f"{res.fraction_of_peak(s):.1%}" for s in res.jax_step_s),
         f"{res.fraction_of_peak(res.torch_step_s):.1%}"],
        ["min..max s/step", *(f"{min(s):.3f}..{max(s):.3f}" for s in res.jax_samples),
         f"{min(res.torch_samples):.3f}..{max(res.torch_samples):.3f}"],
        ["page faults/step", *(f"{x:,.0f}" for x in res.jax_faults), f"{res.torch_faults:,.0f}"],
        ["last loss", *(f"{x:.3f}" for x in res.jax_loss), f"{res.torch_loss:.3f}"],
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines += [
        "",
        f"model FLOPs per step: {res.flops_per_step:.4g} (training_flops_per_step, MaxText's count)",
        f"peak: {res.matmul_size}^3 float32 matmul, jax {res.jax_matmul_flops / 1e9:.1f} GFLOP/s, "
        f"torch {res.torch_matmul_flops / 1e9:.1f} GFLOP/s -> peak {res.peak_flops / 1e9:.1f} GFLOP/s",
    ]
    for name, options in zip(names, res.variants):
        lines.append(f"{name} options: " + ", ".join(f"{k}={v}" for k, v in options.items()))
    return "\n".join(lines)


def _lm_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evejax bench lm", description="evejax vs PyTorch eager LM train step")
    p.add_argument("--size", default="llama_110m", help="an evejax.models.llm size")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="steps per measurement")
    p.add_argument("--repeats", type=int, default=5, help="alternating measurements per framework")
    p.add_argument("--variant", action="append", default=[],
                   help="extra evejax run with these options on top of BENCH_OPTIONS, e.g. remat=full")
    p.add_argument("--threads", type=int, help="torch threads (default: CPU cores)")
    p.add_argument("--matmul-size", type=int, default=2048)
    return p


def bench_lm(argv: Sequence[str]) -> int:
    args = _lm_parser().parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a TPU VM's chips are not what this measures
    res = run_lm(args.size, args.batch, args.seq_len, args.steps, args.repeats,
                 [parse_options(v) for v in args.variant], args.matmul_size, args.threads,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    print(format_lm(res))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("lm", "data"):
        print("usage: evejax bench lm|data [args]  (evejax bench lm --help)", file=sys.stderr)
        return 2
    if argv[0] == "data":
        from evejax.data.bench import bench_data

        return int(bench_data(argv[1:]) or 0)
    return bench_lm(argv[1:])
