"""Helper process for the transcoder training tests (not a test module): trains on a tiny random Llama.

usage: python _transcoder_job.py OUT_DIR CORPUS_DIR N_TOKENS [--resume] [--rank R --world W --init FILE]
"""

import argparse
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _transcoder_fixtures import tiny_lm  # noqa: E402

from sparsetrace.transcoders.training import train_transcoders  # noqa: E402
from sparsetrace.transcoders.data import open_corpus  # noqa: E402
from sparsetrace.transcoders.train import TrainConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("corpus")
    ap.add_argument("n_tokens", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--init", default=None)
    ap.add_argument("--slow", type=float, default=0.0, help="sleep per buffer read, so a kill lands mid-run")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{a.init}", rank=a.rank, world_size=a.world)
    lm = tiny_lm()
    cfg = job_config(a.n_tokens)
    if a.slow:
        import time

        from sparsetrace.transcoders import training

        orig = training.ModelActivationSource.read

        def slow_read(self, n):
            time.sleep(a.slow)
            return orig(self, n)

        training.ModelActivationSource.read = slow_read
    train_transcoders(lm, open_corpus(a.corpus), cfg, a.out, resume=a.resume)
    if a.world > 1:
        dist.destroy_process_group()


def job_config(n_tokens: int) -> TrainConfig:
    return TrainConfig(
        n_features=64, k=4, n_tokens=n_tokens, batch_tokens=128, shuffle_buffer_tokens=512, ctx_len=32,
        model_batch=4, checkpoint_every_tokens=512, dead_tokens=1024, warmup_steps=5, log_every_steps=2,
        progress=False,
    )


if __name__ == "__main__":
    main()
