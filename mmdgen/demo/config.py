"""The demo's configuration (``DemoConfig``: what a run does and where each stage keeps its output) and the
held-out clips whose captions it generates from (``test_captions``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mmdgen.files import read_jsonl
from mmdgen.validation import INT64_MAX, MAX_SECONDS, check_fields, option


@dataclass
class DemoConfig:
    out: str = option("runs/demo", "the demo's folder (a rerun reuses what is there)", required=True,
                      path="new_folder")
    hours: float = option(0.5, "hours of corpus to render", above=0, at_most=10000)
    codec_steps: int = option(700, "training steps of each codec", at_least=1)
    mmd_weight: float = option(3.0, "the second codec's independence-loss weight (the first has none)", above=0)
    mmd_every: int = option(8, "steps between the second codec's independence losses", at_least=1)
    lm_steps: int = option(600, "training steps of each LM", at_least=1)
    lm_crop_frames: int = option(150, "frames per LM training crop", at_least=1)
    clips: int = option(6, "clips generated per LM", at_least=1)
    duration: float = option(10.0, "seconds per generated clip", above=0, at_most=MAX_SECONDS)
    seed: int = option(0, "seed of every stage", at_least=0, at_most=INT64_MAX)
    device: str = option("cpu", "cpu or cuda", required=True)

    def __post_init__(self):
        check_fields(self)

    @property
    def codecs(self) -> dict[str, float]:
        """Run name -> MMD weight: the codec without and with the independence loss."""
        return {"mmd0": 0.0, f"mmd{self.mmd_weight:g}": self.mmd_weight}

    @property
    def int8_lm(self) -> str:
        """The LM that generates its clips again with int8 weights: the one on the MMD codec's codes."""
        return f"mmd{self.mmd_weight:g}"

    def path(self, stage: str, name: str = "") -> Path:
        """Where a stage keeps its output: corpus (the manifest), codec, tokens, lm (their exported models or
        folders, per codec name), generated (per codec name, ``<name>-int8`` for the int8 LM's clips)."""
        out = Path(self.out)
        return {"corpus": out / "corpus" / "manifest.jsonl", "codec": out / f"codec-{name}" / "model",
                "codec_run": out / f"codec-{name}", "tokens": out / f"tokens-{name}",
                "lm": out / f"lm-{name}" / "model", "lm_run": out / f"lm-{name}",
                "generated": out / f"generated-{name}"}[stage]

    @classmethod
    def load(cls, run_dir: str | Path) -> "DemoConfig":
        """The configuration a demo run recorded in ``run_dir/demo_config.json``."""
        path = Path(run_dir) / "demo_config.json"
        if not path.exists():
            raise ValueError(f"{path}: missing; expected the folder of a `mmdgen demo` run")
        try:
            return cls(**json.loads(path.read_text()))
        except (TypeError, ValueError) as error:  # not JSON, unknown fields, values out of range
            raise ValueError(f"{path}: not a demo configuration ({error})") from error


def test_captions(manifest: Path, count: int, seed: int) -> list[dict]:
    """``count`` held-out clips' records (caption, instrument, key, tempo), spread over the test split and then
    the validation split (a small slice has few test clips)."""
    records = read_jsonl(manifest)
    held_out = [r for r in records if r.get("split") == "test"] + [r for r in records if r.get("split") == "valid"]
    if not held_out:
        raise ValueError(f"{manifest}: no test or validation clips to take captions from")
    step = max(len(held_out) // count, 1)
    return held_out[(seed % step)::step][:count]
