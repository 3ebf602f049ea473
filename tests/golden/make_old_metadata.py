"""Writes tests/golden/old-metadata.json: the metadata of the golden 12-node graph's pruned graph as the
code before graphs/records.py wrote it (made once with main at 5451482; kept to test that files written
before the records module load unchanged). Run with that version of sparsetrace importable:
``python tests/golden/make_old_metadata.py``."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _graph_fixtures import golden_graph  # noqa: E402

from sparsetrace.config import FigureConfig  # noqa: E402
from sparsetrace.graphs.card import add_validation  # noqa: E402
from sparsetrace.graphs.folder import prune_and_score, trace_figure  # noqa: E402

g = golden_graph()
g.metadata.update(model={"id": "tiny", "architecture": "llama", "n_layers": 2, "d_model": 8, "revision": "abc"},
                  transcoders={"model_id": "tiny", "n_features": 8, "activation": "topk", "k": 2, "skip": True},
                  attribution={"max_n_logits": 10, "desired_logit_prob": 0.95, "max_feature_nodes": None,
                               "store_threshold": 0.0, "dtype": "float64"},
                  stats={"active_features": 5, "feature_nodes": 5},
                  transcoder_source={"description": "RANDOM untrained TopK set random:8:2 (seed 0)", "random": True,
                                     "spec": "random:8:2", "seed": 0, "model_arg": None})
pruned, result = prune_and_score(g, 0.8, 0.98)
info = {(0, 3): {"short": "Paris / France", "label": "Paris / France — the capital → Paris", "source": "statistics",
                 "words": ["Paris", "France"], "contexts": ["the capital"], "precision": 0.75, "recall": 0.5,
                 "promoted": ["Paris"], "density": 0.01},
        (1, 0): {"short": "→ city", "label": "promotes city (token lens: no feature statistics)", "source": "token lens",
                 "words": [], "contexts": [], "precision": None, "recall": None, "promoted": ["city"], "density": None}}
source = {"source": "feature statistics", "statistics": "/stats", "sample": "corpus", "sample_tokens": 1000,
          "heldout": "held-out 10%", "heldout_tokens": 100}
for x in (g, pruned):  # as tracer.pipeline.label_graphs wrote them
    x.metadata["feature_info"] = {f"{l}.{f}": d for (l, f), d in info.items()}
    x.metadata["feature_labels"] = {f"{l}.{f}": d["short"] for (l, f), d in info.items()}
    x.metadata["feature_labels_source"] = source["source"]
    x.metadata["labels"] = source
    x.metadata["decoder_cosine"] = {"floor": 0.5, "pairs": [["0.3", "1.0", 0.61]]}
trace_figure(g, pruned, result, FigureConfig(max_nodes=6), "golden")
add_validation(pruned, {"kind": "ablate", "description": "ablate F0.3@0 → 'x'", "outcome": "constrained: supported",
                        "passed": True})
add_validation(pruned, {"kind": "verify", "description": "3 edges re-checked", "outcome": "PASS", "passed": True,
                        "predicted": 0.5, "measured": 0.49})
Path(__file__).with_name("old-metadata.json").write_text(json.dumps(pruned.metadata, indent=1) + "\n")
