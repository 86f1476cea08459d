"""How much image information leaks through a `zero`-mode knockout, measured on the tests' tiny models.

For each family: two different images, one prompt; the largest difference of the text positions'
log-probabilities between the two images, with no knockout, with image -> (eoi, text) knocked out in
`zero` mode (the paper's) and in `mask` mode. `mask` is exactly 0; `zero` is not, because each text
row's softmax normaliser still holds how strongly it attended to the (different) image.

    python benchmarks/zero_leak.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from narrowgate import threads

threads.configure()  # before torch loads: idle OpenMP threads sleep (narrowgate.threads)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import narrowgate as ng  # noqa: E402
from tests.conftest import FAMILIES  # noqa: E402
from tests.fixtures.common import images  # noqa: E402


def leak(vlm) -> dict[str, float]:
    prompt = "Provide a one-sentence caption for the provided image."
    batch = vlm.prepare(images(2, seed=2), [prompt, prompt])
    eoi = int(batch.index("eoi")[0])
    out = {}
    for name, kos in [
        ("none", []),
        ("zero", [ng.Knockout("image", ("eoi", "text"))]),
        ("mask", [ng.Knockout("image", ("eoi", "text"), mode="mask")]),
    ]:
        logp = torch.log_softmax(vlm.forward(batch, knockouts=kos).logits[:, eoi:].float(), -1)
        out[name] = float((logp[0] - logp[1]).abs().max())
    return out


def main():
    import importlib

    print(f"{'family':<16} {'no knockout':>12} {'zero mode':>12} {'mask mode':>12}")
    for family in FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            importlib.import_module(f"tests.fixtures.{family}").build(tmp)
            r = leak(ng.load(tmp, dtype="float32"))
        print(f"{family:<16} {r['none']:12.2e} {r['zero']:12.2e} {r['mask']:12.2e}")


if __name__ == "__main__":
    main()
