"""Run by tests/test_sampling.py under torchrun: sampling.run_sampling on a toy one-step generator
with the real Qwen tokenizer, on every rank, writing one merged file."""
import sys

from coupling_dist.components.assets import load_tokenizer
from coupling_dist.components import dist as D
from coupling_dist.stages.sample.entry import run_sampling
from coupling_dist.sampling.onestep import SampleSettings
from toy_generators import OneStepToy, onestep_meta

QWEN_V, QWEN_EOS = 151936, 151643


def main(out: str, num_samples: int, batch_size: int) -> None:
    D.init_distributed()
    tok = load_tokenizer("asset:qwen2.5-tokenizer")
    meta = onestep_meta(QWEN_V, 12, 8, QWEN_EOS, "asset:qwen2.5-tokenizer")
    model = OneStepToy(QWEN_V, 12, 8, eos_id=QWEN_EOS, sharpness=12.0)
    run_sampling(model, meta, tok, out, SampleSettings(temperature=0.7, top_p=0.9, latent_scale=0.85, seed=3),
                 num_samples, batch_size)
    D.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
