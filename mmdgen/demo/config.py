"""The demo's configuration (``DemoConfig``: what a run does and where each stage keeps its output) and the
held-out clips whose captions it generates from (``test_captions``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mmdgen.files import read_jsonl


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    hours: float = 0.5
    codec_steps: int = 700
    mmd_weight: float = 3.0
    mmd_every: int = 8
    lm_steps: int = 600
    lm_crop_frames: int = 150
    clips: int = 6  # generated per LM
    duration: float = 10.0
    seed: int = 0
    device: str = "cpu"

    def check(self) -> None:
        problems = [f"{name} must be positive, got {getattr(self, name)}"
                    for name in ("hours", "codec_steps", "mmd_weight", "mmd_every", "lm_steps", "lm_crop_frames",
                                 "clips", "duration") if not getattr(self, name) > 0]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def codecs(self) -> dict[str, float]:
        """Run name -> MMD weight: the codec without and with the independence loss."""
        return {"mmd0": 0.0, f"mmd{self.mmd_weight:g}": self.mmd_weight}

    def path(self, stage: str, name: str = "") -> Path:
        """Where a stage keeps its output: corpus (the manifest), codec, tokens, lm (their exported models or
        folders, per codec name), generated (per codec name)."""
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
        except (json.JSONDecodeError, TypeError) as error:
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
