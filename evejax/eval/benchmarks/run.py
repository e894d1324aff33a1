"""`evejax eval CKPT --bench vqav2,gqa,pope,... --data-root DIR [--out DIR]`: the papers' benchmarks.

Runs the chosen benchmarks (evejax.eval.benchmarks.BENCHMARKS) on the files under DIR, laid out as the
official releases are (each module's docstring), with a progress bar of answered questions; prints one
table in the paper's column order, the measured headline figure above the published ones; writes the
prediction files of every benchmark (the official server's or script's input) and results.json (every
metric) into --out, each through evejax.atomic. A benchmark whose files are missing is reported with
the path where they were expected; the others still run.

The protocol follows the model: EVE answers as LLaVA-1.5 asks (vicuna_v1, greedy), HoVLE as InternVL's
chat() (internlm2-chat); --protocol overrides. --temperature/--top-p/--top-k/--seed sample instead of
greedy decoding (evejax.eval.generate.Sampling); the papers' figures are greedy. The model is
`answer([(PIL image, prompt), ...]) -> [text, ...]`, so `run` scores any callable; `evejax eval`
builds it from generate.load_answerer (EVE: 16 questions a call, HoVLE: 8), on --mesh when given (as
`evejax eval`'s shapes questions: each call padded to the mesh's data-parallel devices).

--prompt-style (common.PROMPT_STYLES): "protocol" (default) asks with the protocol's prompt, the
instruction appended ("Answer the question using a single word or phrase." and the like), as the
papers' numbers were measured; "question" asks with the benchmark's question text alone, as `evejax
eval` asks the shapes questions and `evejax demo` scores them, so a model trained on bare questions
is asked as it was trained (e.g. the demo's EVE on a shapes benchmark written in the VQAv2 and POPE
layouts gives the demo's exact-match figures). Benchmarks whose prompt lists options (ScienceQA,
MMBench, SEED) have no "question" style and report an error under it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

from evejax import atomic
from evejax.eval import benchmarks as registry
from evejax.eval.benchmarks import common


class ModelAnswer:
    """`answer` over an answerer of generate.load_answerer (`.answer(pictures, questions)`)."""

    def __init__(self, answerer, max_new_tokens: int | None = None):
        self.answerer, self.fixed_max_new = answerer, max_new_tokens
        # the answerer's own batch (EVE 16, HoVLE 8): the runner hands it one batch per call
        self.batch_size = answerer.batch_size

    @property
    def protocol(self) -> str:
        from evejax.eval.generate import HoVLEAnswerer

        return "internvl" if isinstance(self.answerer, HoVLEAnswerer) else "llava"

    def prepare(self, module, protocol: str) -> None:
        self.answerer.max_new_tokens = self.fixed_max_new or module.MAX_NEW_TOKENS[protocol]

    def __call__(self, pairs):
        return self.answerer.answer([p for p, _ in pairs], [t for _, t in pairs])


def parse_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry.BENCHMARKS]
    if unknown or not names:
        raise ValueError(f"unknown benchmark(s) {unknown or text!r}; choose from {', '.join(registry.BENCHMARKS)}")
    return names


def run_one(module, answer: common.Answer, data_root, out_dir, protocol: str, limit: int | None = None,
            batch_size: int | None = None, progress: bool = True, prompt_style: str = "protocol") -> dict:
    """{"questions", "scores", "files"} of one benchmark, or {"missing": message} / {"error": message}."""
    from tqdm import tqdm

    try:
        items = module.load(data_root, protocol)
    except common.MissingFile as e:
        return {"missing": str(e)}
    items = items[:limit] if limit else items
    if prompt_style == "question":
        if any(i.question is None for i in items):
            return {"error": f"{module.NAME} prompts list options; it has no --prompt-style question"}
        items = [dataclasses.replace(i, prompt=i.question) for i in items]
    if hasattr(answer, "prepare"):
        answer.prepare(module, protocol)
    batch_size = batch_size or getattr(answer, "batch_size", 8)
    answers: list[str] = []
    with tqdm(total=len(items), desc=module.NAME, unit="question", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            try:
                pairs = [(i.picture(), i.prompt) for i in batch]
            except OSError as e:  # a missing or unreadable image: the benchmark cannot be scored whole
                return {"error": f"question {batch[0].qid}..: {e}"}
            answers += answer(pairs)
            bar.update(len(batch))
    return {"questions": len(items), "scores": module.score(items, answers),
            "files": [str(p) for p in module.write(items, answers, out_dir)]}


def run(names: Sequence[str], answer: common.Answer, data_root, out_dir, protocol: str, limit: int | None = None,
        batch_size: int | None = None, progress: bool = True, prompt_style: str = "protocol") -> dict:
    """{name: run_one(...)} for the chosen benchmarks; results.json is written into out_dir."""
    common.check_protocol(protocol)
    if prompt_style not in common.PROMPT_STYLES:
        raise ValueError(f"prompt style {prompt_style!r} is not one of {common.PROMPT_STYLES}")
    results = {}
    for name in names:
        results[name] = run_one(registry.BENCHMARKS[name], answer, data_root, out_dir, protocol, limit, batch_size,
                                progress, prompt_style)
        if "missing" in results[name] or "error" in results[name]:
            print(f"evejax eval: {name}: {results[name].get('missing') or results[name]['error']}", file=sys.stderr)
    atomic.write_text(Path(out_dir) / "results.json", json.dumps(
        {"protocol": protocol, "prompt_style": prompt_style, "results": results}, indent=2) + "\n")
    return results


def _cell(name: str, result: dict | None) -> str:
    if result is None:
        return ""
    if "missing" in result:
        return "missing"
    if "error" in result:
        return "error"
    metric = registry.HEADLINE[name]
    return f"{result['scores'][metric]:.1f}" if metric in result["scores"] else "submit"


def table(results: dict, protocol: str) -> str:
    """Benchmarks as columns in the paper's order: the measured row, then the paper's rows."""
    names = [n for n in registry.ORDER[protocol] if n in results]
    rows = [("measured", [_cell(n, results[n]) for n in names])]
    rows += [(model, [f"{paper[n]:.1f}" if n in paper else "–" for n in names])
             for model, paper in registry.PAPER[protocol].items()]
    header = [""] + [registry.BENCHMARKS[n].COLUMN for n in names]
    width = [max(len(r) for r in [header[0]] + [label for label, _ in rows])]
    width += [max(len(header[k + 1]), *(len(cells[k]) for _, cells in rows)) for k in range(len(names))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, width))]
    lines += ["  ".join(c.rjust(w) for c, w in zip([label] + cells, width)) for label, cells in rows]
    notes = {"vqav2": "VQAv2 measured on val (paper: test-dev, answers written for the server)",
             "vizwiz": "VizWiz measured on val (paper: test, answers written for the server)",
             "mme": "MME: perception score", "pope": "POPE: F1 averaged over the three splits",
             "mmvet": "MM-Vet: answers written for its GPT-4 grader"}
    lines += [f"  {notes[n]}" for n in names if n in notes]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="evejax eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="EVE or HoVLE checkpoint directory or training workdir")
    p.add_argument("--bench", required=True, help=f"comma-separated: {','.join(registry.BENCHMARKS)}")
    p.add_argument("--data-root", required=True, help="directory holding the benchmarks' release folders")
    p.add_argument("--out", default="benchmark_results", help="prediction files and results.json go here")
    p.add_argument("--protocol", choices=common.PROTOCOLS, help="default: llava for EVE, internvl for HoVLE")
    p.add_argument("--prompt-style", choices=common.PROMPT_STYLES, default="protocol",
                   help="protocol: the protocol's prompt (the papers'); question: the question text alone, as "
                   "evejax eval and the demo ask the shapes questions (open and yes/no benchmarks)")
    p.add_argument("--tokenizer", help="tokenizer.model or 'shapes' (EVE; HoVLE defaults to the checkpoint's)")
    p.add_argument("--limit", type=int, help="only the first N questions of each benchmark (a smoke run)")
    p.add_argument("--max-new", type=int, help="new-token limit (default: the protocol's, per benchmark)")
    from evejax.eval import generate

    generate.add_sampling_args(p)
    generate.add_mesh_arg(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    sampling = generate.sampling_from_args(p, args)
    try:
        mesh = generate.mesh_from_arg(args.mesh)
    except ValueError as e:
        print(f"evejax eval: error: --mesh: {e}", file=sys.stderr)
        return 1
    try:
        names = parse_names(args.bench)
        if not Path(args.data_root).is_dir():
            raise FileNotFoundError(f"--data-root {args.data_root} is not a directory")
        answer = ModelAnswer(generate.load_answerer(args.checkpoint, args.tokenizer, sampling=sampling,
                                                    seed=args.sample_seed, mesh=mesh), args.max_new)
    except (FileNotFoundError, ValueError) as e:
        print(f"evejax eval: error: {e}", file=sys.stderr)
        return 1
    protocol = args.protocol or answer.protocol
    results = run(names, answer, args.data_root, args.out, protocol, args.limit, prompt_style=args.prompt_style)
    print(table(results, protocol))
    print(f"results and prediction files: {Path(args.out).absolute()}")
    return 0
