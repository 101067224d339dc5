"""Layer-wise probing (docs/METHOD.md, "Probing"): how much of each teacher's target a layer holds.

The student is frozen. Per probed LLM layer and teacher, a fresh resampler probe (`ResamplerHead`,
by default the authors' shape) learns the teacher's cached target from that layer's hidden states
on smooth-L1; the score is the mean per-image cosine on a held-out split (by sha256 of the key).
The input is what the authors' probe reads: system prompt, image, task tokens when the checkpoint
has them, one fixed user prompt, no answer text. Design choice: all probes of a checkpoint train
together from one frozen LLM forward per batch, each from its own seed (`seeds` K repeats each
with K initialisations), so a score does not depend on which probes train beside it. Cost: every
probe is in memory at once. Resumable per (teacher, layer, seed) through probe.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from olavlm.schemas.cache import TargetCache
from olavlm.schemas.config import IMAGE_ASPECT_RATIOS, DataConfig
from olavlm.schemas.errors import ConfigError
from olavlm.trainer.checkpoint import CONFIG, TRAINER, find, model_dir
from olavlm.trainer.data.collate import to_device
from olavlm.trainer.data.images import ImageTransform, with_aspect_ratio
from olavlm.trainer.data.loader import build_loader
from olavlm.trainer.data.text import prompt_ids
from olavlm.trainer.eval.probe_report import plot_probe, plot_size, print_scores, write_csv
from olavlm.trainer.student.build import load_student
from olavlm.trainer.student.heads import ResamplerHead
from olavlm.trainer.student.losses import per_image_cosine, per_sample_smooth_l1
from olavlm.trainer.student.model import OlaVlm

__all__ = [
    "ProbeConfig",
    "is_heldout",
    "plot_probe",
    "plot_size",
    "print_scores",
    "probe_checkpoint",
    "run_probe",
    "score_probes",
    "train_probes",
]


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """Probe budget, input and split; identical for every compared checkpoint."""

    layers: tuple[int, ...] = ()
    """LLM layers to probe, paper numbering (layer i = hidden_states[i], 1..num_layers); () = all."""
    teachers: tuple[str, ...] = ()
    """Teachers to probe; () = every teacher in the cache."""
    steps: int = 150
    """Optimizer steps per checkpoint (all probes step together)."""
    batch_size: int = 8
    """Samples per step (training split only)."""
    lr: float = 1e-3
    """AdamW learning rate of the probes (no weight decay), as the authors'."""
    width: int = 0
    """Internal width of each probe head; 0 = the teacher's target width, as the authors' probe."""
    num_heads: int = 4
    """Attention heads per probe, as the authors'."""
    ffn_mult: int = 1
    """Feed-forward width of each probe as a multiple of its width, as the authors'."""
    heldout_percent: int = 25
    """Share of keys held out for scoring (by sha256 of the key)."""
    seed: int = 0
    """Data order, and the first probe initialisation."""
    seeds: int = 1
    """Probe initialisations per (teacher, layer): seed, seed + 1, ...; the report gives mean and std."""
    prompt: str = "Describe the image in two lines."
    """The fixed user prompt after the image (the authors' probe prompt); no answer text is read."""
    image_aspect_ratio: str = "pad"
    """'pad' (the authors' probing: pad to a square with the mean colour) or 'crop'."""
    num_workers: int = 0
    """DataLoader workers."""

    def __post_init__(self) -> None:
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ConfigError(f"image_aspect_ratio {self.image_aspect_ratio!r}: one of {IMAGE_ASPECT_RATIOS}")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds}")
        if self.width < 0 or self.ffn_mult < 1:
            raise ConfigError(f"width must be >= 0 and ffn_mult >= 1, got {self.width} and {self.ffn_mult}")

    @property
    def budget(self) -> dict:
        """What a kept score must share with a rerun (layers, teachers and the seed count may grow)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("layers", "teachers", "seeds")}


def is_heldout(key: str, percent: int) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100 < percent


def _rows(batch: dict, keep: list[bool]) -> dict:
    index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)
    out = {}
    for name, value in batch.items():
        if name == "targets":
            out[name] = {t: v[index] for t, v in value.items()}
        elif name == "keys":
            out[name] = [k for k, kk in zip(value, keep) if kk]
        else:
            out[name] = value[index]
    return out


def _probe_key(teacher: str, layer: int, seed: int) -> str:
    return f"{teacher}_l{layer}_s{seed}"


def _build_probes(todo, specs, llm_width: int, config: ProbeConfig, device) -> nn.ModuleDict:
    probes = {}
    for teacher, layer, seed in todo:
        torch.manual_seed(seed)  # per probe: its init does not depend on which others train beside it
        tokens, out_width = specs[teacher].shape
        width = config.width or out_width
        if width % config.num_heads:
            raise ConfigError(
                f"probe width {width} ({teacher}) is not divisible by num_heads {config.num_heads}"
            )
        probes[_probe_key(teacher, layer, seed)] = ResamplerHead(
            llm_width=llm_width,
            width=width,
            out_width=out_width,
            num_queries=tokens,
            learned_queries=True,
            num_heads=config.num_heads,
            ffn_mult=config.ffn_mult,
        )
    return nn.ModuleDict(probes).to(device)


def probe_checkpoint(
    model: OlaVlm,
    *,
    name: str,
    data: str,
    cache: str,
    config: ProbeConfig,
    done: set[tuple[str, int, int]] = frozenset(),
    device: str = "cpu",
    progress=None,
    storage_options: dict | None = None,
) -> list[dict]:
    """Train and score the (teacher, layer, seed) probes not in `done`; rows of the result table."""
    specs = TargetCache(cache, storage_options).specs()
    teachers = config.teachers or tuple(specs)
    missing = [t for t in teachers if t not in specs]
    if missing:
        raise ConfigError(f"{cache}: no targets for teachers {missing} (has {sorted(specs)})")
    layers = tuple(sorted(set(config.layers))) or tuple(range(1, model.num_layers + 1))
    bad = [layer for layer in layers if not 1 <= layer <= model.num_layers]
    if bad:
        raise ConfigError(f"layers {bad} outside the LLM's 1..{model.num_layers} (paper numbering)")
    seeds = range(config.seed, config.seed + config.seeds)
    todo = [(t, layer, s) for t in teachers for layer in layers for s in seeds if (t, layer, s) not in done]
    if not todo:
        return []
    model = model.to(device).eval().requires_grad_(False)
    probes = _build_probes(todo, specs, model.llava.config.text_config.hidden_size, config, device)
    capture = sorted({layer for _, layer, _ in todo})
    data_config = DataConfig(
        data=data,
        cache=cache,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        seed=config.seed,
        max_length=4096,
        storage_options=dict(storage_options or {}),
    )
    transform = ImageTransform.from_processor(
        with_aspect_ratio(model.image_processor, config.image_aspect_ratio)
    )
    prompt = torch.tensor(prompt_ids(model.tokenizer, model.layout, config.prompt), device=device)  # [L]

    def loader():
        return build_loader(
            data_config, tokenizer=model.tokenizer, layout=model.layout, transform=transform, tasks=teachers
        )

    def states_of(batch):
        # Every image gets the same text (the fixed prompt), so the rows need no padding.
        input_ids = prompt.expand(len(batch["keys"]), -1)  # [B, L]
        with torch.no_grad():
            return model.encode(input_ids, torch.ones_like(input_ids), batch["pixel_values"], capture).states

    def split(heldout: bool):
        """The loader's image batches of one split, on the device. Held out: one pass, then stop."""
        for batch, state in loader():
            # The loader runs epochs without end and its workers drift apart (one may hand out epoch 1
            # while another is still in epoch 0): the held-out pass takes epoch 0's batches only and ends
            # once every worker has handed out the whole of it.
            if heldout and state["epoch"] > 0:
                if state["epochs_done"] >= 1:
                    return
                continue
            keep = [
                bool(h) and is_heldout(k, config.heldout_percent) == heldout
                for k, h in zip(batch["keys"], batch["has_image"])
            ]  # text-only samples carry no target
            if any(keep):
                yield to_device(_rows(batch, keep), device)
            if heldout and state["epochs_done"] >= 1:
                return

    train_probes(
        probes, todo, split(heldout=False), states_of, steps=config.steps, lr=config.lr, progress=progress
    )
    scores, count = score_probes(probes, todo, split(heldout=True), states_of)
    if count == 0:
        raise ConfigError(f"no held-out images in {data} ({config.heldout_percent}% of keys): use more data")
    distilled = {t: set(model.layers.get(t, ())) for t in teachers}
    return [
        {
            "checkpoint": name,
            "teacher": t,
            "layer": layer,
            "seed": s,
            "score": scores[(t, layer, s)],
            "heldout_images": count,
            "distilled": layer in distilled[t],
        }
        for t, layer, s in todo
    ]


def train_probes(
    probes: nn.ModuleDict, todo, batches, states_of, *, steps: int, lr: float, progress=None
) -> int:
    """Train every (teacher, layer, seed) probe of `todo` for `steps` AdamW steps on smooth-L1.

    `batches` yields training batches (with "targets"); `states_of(batch)` -> {layer: [B, L, D]}
    (the frozen model's hidden states, or anything with that shape in tests). Returns the steps taken.
    """
    optimizer = torch.optim.AdamW(probes.parameters(), lr=lr, weight_decay=0.0)
    probes.train()
    step = 0
    for batch in batches:
        states = states_of(batch)
        loss = sum(
            per_sample_smooth_l1(
                probes[_probe_key(t, layer, s)](states[layer], _all(states[layer])), batch["targets"][t]
            ).mean()
            for t, layer, s in todo
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if progress is not None:
            progress(step, steps, float(loss.detach()) / len(todo))
        if step >= steps:
            break
    return step


def score_probes(
    probes: nn.ModuleDict, todo, batches, states_of
) -> tuple[dict[tuple[str, int, int], float], int]:
    """({(teacher, layer, seed): mean per-image cosine over `batches`}, images scored); {} when none."""
    probes.eval()
    sums = dict.fromkeys(todo, 0.0)
    count = 0
    for batch in batches:
        states = states_of(batch)
        with torch.no_grad():
            for t, layer, s in todo:
                pred = probes[_probe_key(t, layer, s)](states[layer], _all(states[layer]))
                sums[(t, layer, s)] += float(per_image_cosine(pred, batch["targets"][t]).sum())
        count += len(batch["keys"])
    return ({key: total / count for key, total in sums.items()} if count else {}), count


def _all(states: torch.Tensor) -> torch.Tensor:
    return torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)


def run_probe(
    checkpoints: list[str],
    *,
    data: str,
    cache: str,
    out: str,
    config: ProbeConfig,
    names: list[str] | None = None,
    device: str | None = None,
    progress=None,
    storage_options: dict | None = None,
) -> list[dict]:
    """Probe each checkpoint on the same split and budget; write probe.json, probe.csv and probe.png.

    `checkpoints`: model, checkpoint or run folders; `names` label them (default: folder names).
    Returns one row per (checkpoint, teacher, layer, seed).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(out, exist_ok=True)
    results_path = Path(out) / "probe.json"
    rows = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    names = list(names) if names else _names(checkpoints)
    if len(set(names)) != len(names):
        raise ConfigError(f"checkpoint names must differ: {names}")
    # A kept score must come from the same weights, data and probe budget; layers, teachers and the
    # number of seeds may differ (a rerun adds rows). Anything else under the same name is recomputed.
    for path, name in zip(checkpoints, names):
        folder = model_dir(path)
        identity = {
            "model": str(Path(folder).resolve()),
            "data": data,
            "cache": cache,
            "budget": config.budget,
        }
        rows = [r for r in rows if r["checkpoint"] != name or (r.get("identity") == identity and "seed" in r)]
        model = load_student(folder)
        done = {(r["teacher"], r["layer"], r["seed"]) for r in rows if r["checkpoint"] == name}
        start = time.perf_counter()
        new = probe_checkpoint(
            model,
            name=name,
            data=data,
            cache=cache,
            config=config,
            done=done,
            device=device,
            storage_options=storage_options,
            progress=(lambda s, n, loss, name=name: progress(name, s, n, loss)) if progress else None,
        )
        for row in new:
            row["seconds"] = time.perf_counter() - start
            row["identity"] = identity
        rows.extend(new)
        trained = distilled_layers(folder, model.layers)
        for r in rows:
            if r["checkpoint"] == name:
                r["distilled"] = r["layer"] in trained.get(r["teacher"], ())
        _write_json(
            results_path,
            {
                "config": dataclasses.asdict(config),
                "checkpoints": dict(zip(names, checkpoints)),
                "rows": rows,
            },
        )  # after each checkpoint: resumable
    seeds = set(range(config.seed, config.seed + config.seeds))
    layers, teachers = set(config.layers), set(config.teachers)
    rows = [
        r
        for r in rows
        if r["checkpoint"] in set(names)
        and r["seed"] in seeds
        and (not layers or r["layer"] in layers)
        and (not teachers or r["teacher"] in teachers)
    ]
    write_csv(rows, Path(out) / "probe.csv")
    plot_probe(rows, str(Path(out) / "probe.png"))
    return rows


def distilled_layers(folder: str | Path, layers: dict) -> dict[str, set[int]]:
    """The head layers `layers` ({task: layers}) of the model in `folder` that were trained against targets:
    none when its checkpoint, and every checkpoint its run started from (`init_from`), distilled nothing
    (no fingerprints: a --no-distill run, or IFT from one); all of them when that history is unknown (a
    bare model folder or an export)."""
    step = Path(folder).parent
    for _ in range(16):  # a chain of init_from runs (PT -> IFT -> ...)
        try:
            fingerprints = json.loads((step / TRAINER).read_text()).get("fingerprints")
            init_from = json.loads((step / CONFIG).read_text()).get("train", {}).get("init_from", "")
        except (OSError, json.JSONDecodeError):
            break
        if fingerprints:
            break
        if not init_from:
            return {t: set() for t in layers}
        try:
            step = find(init_from)
        except FileNotFoundError:
            break
    return {t: set(v) for t, v in layers.items()}


def _names(checkpoints: list[str]) -> list[str]:
    names = [Path(c).name or str(c) for c in checkpoints]
    return names if len(set(names)) == len(names) else [str(c) for c in checkpoints]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
