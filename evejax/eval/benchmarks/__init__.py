"""The benchmarks of the EVE and HoVLE papers, one module each, read from their official file layouts.

Every module has NAME (the --bench name), COLUMN (the paper's column), MAX_NEW_TOKENS per protocol,
`load(root, protocol) -> [common.Item]` (common.MissingFile names the path a file was expected at),
`score(items, answers) -> {metric: percent}` ({} without local ground truth) and
`write(items, answers, out_dir) -> [paths]` (the official submission/scorer input). HEADLINE gives the
metric shown in the table; PAPER the published numbers (reference/eve.md §4, hovle.md §3).
"""
from __future__ import annotations

from evejax.eval.benchmarks import gqa, mmbench, mme, mmvet, pope, scienceqa, seed, textvqa, vizwiz, vqav2

BENCHMARKS = {m.NAME: m for m in (vqav2, gqa, vizwiz, scienceqa, textvqa, pope, mme, mmbench, seed, mmvet)}

# metric shown per benchmark; None: scored elsewhere (the printed cell says where the answers went)
HEADLINE = {"vqav2": "val_accuracy", "gqa": "accuracy", "vizwiz": "val_accuracy", "scienceqa": "img_accuracy",
            "textvqa": "accuracy", "pope": "f1", "mme": "perception", "mmbench": "circular_accuracy",
            "seed": "accuracy", "mmvet": None}

# The paper's column order per protocol: EVE Table 3; HoVLE as quoted by mmMamba Table 1 (MMMU is not
# built here), then the benchmarks that table lacks.
ORDER = {"llava": ("vqav2", "gqa", "vizwiz", "scienceqa", "textvqa", "pope", "mme", "mmbench", "seed", "mmvet"),
         "internvl": ("mme", "mmbench", "pope", "seed", "mmvet", "textvqa", "scienceqa", "gqa", "vqav2", "vizwiz")}

# Published numbers. EVE: VQAv2 test-dev, VizWiz test, MMBench dev, MME perception (eve.md §4).
# HoVLE: mmMamba Table 1 (MME perception) and NEO Tables 1-2 for HoVLE-HD (hovle.md §3).
PAPER = {
    "llava": {
        "EVE-7B": dict(vqav2=75.4, gqa=60.8, vizwiz=41.8, scienceqa=63.0, textvqa=51.9, pope=83.6, mme=1217.3,
                       mmbench=49.5, seed=54.3, mmvet=25.6),
        "EVE-7B (HD)": dict(vqav2=78.6, gqa=62.6, vizwiz=51.1, scienceqa=64.9, textvqa=56.8, pope=85.0,
                            mme=1305.7, mmbench=52.3, seed=56.8, mmvet=25.7),
    },
    "internvl": {
        "HoVLE": dict(mme=1433.5, mmbench=71.9, pope=87.6, seed=70.7, mmvet=44.3, textvqa=66.0, scienceqa=94.8,
                      gqa=60.9),
        "HoVLE (HD)": dict(mmbench=73.3, pope=87.4, seed=70.9, mmvet=43.8, textvqa=70.9),
    },
}
