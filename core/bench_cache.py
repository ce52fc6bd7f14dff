"""Trained reference models (Original, Retrain) of `uisps bench paper`, kept on disk by recipe.

Training them is most of a benchmark's time (a ResNet18 Original takes ~1,400 s on a 2-core
CPU), and separate runs train the same ones: `tune` then `main`, two row sets on one
architecture, a run continued with `--resume` after its time budget. A model is stored under the
hash of everything its weights depend on: what it is, its architecture, the whole TrainConfig
(seed included), the exact training samples, normalisation, the device, torch's version and the
source of the code that trains it. Any change is a new key, so a stale model is never reused;
nothing is ever evicted (`rm -r` the folder). Whoever can write the folder can change benchmark
results: keep it private to the user running them.

Files are safetensors (no pickle) written atomically; one that cannot be read back into the
architecture is reported and trained again, never trusted.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = 1
STALE_PART_S = 24 * 60 * 60


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME", "")
    # the XDG spec: a relative path is to be ignored
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "uisps" / "bench-models"


def samples_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 of the training samples, in order (the sampler's order depends on it)."""
    h = hashlib.sha256()
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def code_digest(*modules: ModuleType) -> str:
    """sha256 of the modules' code: a model trained by other training code is another model.
    Their syntax trees without docstrings are hashed, so an edit of a comment or a docstring
    changes nothing."""
    h = hashlib.sha256()
    for module in modules:
        tree = ast.parse(Path(inspect.getfile(module)).read_bytes())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
        h.update(module.__name__.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return h.hexdigest()


def cpu_name() -> str:
    """The CPU's model (Linux), else its architecture: CPU kernels differ in their last bits."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def recipe_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **recipe}, sort_keys=True).encode()).hexdigest()


class TrainedModels:
    """A folder of trained models, one safetensors file per recipe key."""

    def __init__(self, root: Path, log: Callable[[str], None] = print) -> None:
        self.root, self.log = Path(root), log
        self.hits = 0

    def path(self, recipe: dict) -> Path:
        return self.root / f"{recipe_key(recipe)}.safetensors"

    def load(self, recipe: dict, model: nn.Module) -> float | None:
        """Fill `model` (built, untrained) from the stored weights; their training seconds, or None."""
        path = self.path(recipe)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if json.loads(meta.get("recipe", "null")) != json.loads(json.dumps(recipe)):
                raise ValueError("its recipe differs from the one asked for")
            model.load_state_dict(load_file(str(path)), strict=True)
            seconds = float(meta["seconds"])
        except Exception as exc:  # a cut-short or foreign file: train again, say so
            self.log(f"model cache: {path.name} is unusable ({type(exc).__name__}: {exc}); training again")
            return None
        self.hits += 1
        return seconds

    def store(self, recipe: dict, model: nn.Module, seconds: float) -> None:
        """Keep `model`; a failure (a full disk, say) costs only the reuse, so it is reported, not raised."""
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale_parts()
            fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".part")
            os.close(fd)
            # safetensors wants contiguous tensors; a channels_last model's are not
            tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(tensors, tmp, metadata={"recipe": json.dumps(recipe, sort_keys=True), "seconds": repr(seconds)})
            os.replace(tmp, self.path(recipe))
        except Exception as exc:
            self.log(f"model cache: could not store a model in {self.root} ({type(exc).__name__}: {exc})")
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def _remove_stale_parts(self) -> None:
        """Half-written files of runs killed while storing (a day old: no live run writes that long)."""
        cutoff = time.time() - STALE_PART_S
        for part in self.root.glob("*.part"):
            try:
                if part.stat().st_mtime < cutoff:
                    part.unlink()
            except OSError:
                pass  # another run removed it first
