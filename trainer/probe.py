"""Layer-wise probing (method.md, "Probing"): how much of each teacher's target a layer holds.

The student is frozen. For every probed LLM layer and every teacher, a fresh
single-block resampler probe (`ResamplerHead`, the same architecture as the
predictor heads) learns to predict the teacher's cached target from that
layer's hidden states; the score is the mean per-image cosine similarity of the
flattened prediction and target on a held-out split.

Design choices and their cost:
- All probes of a checkpoint train together: one frozen LLM forward per batch
  captures every probed layer, and each probe steps on its own layer. A layer
  costs one head's forward/backward, not one LLM pass.
- Probes use learnable queries for every teacher (also T = 1), keys = all
  non-padding tokens, so the same probe fits a baseline without task tokens and
  an OLA checkpoint: the comparison is on equal terms.
- The split is a pure function of the key (sha256(key) mod 100 < heldout_percent),
  so every checkpoint and rerun sees the same held-out images.
- Resumable per layer: finished (checkpoint, teacher, layer) scores are kept in
  `probe.json`; a rerun trains only the missing layers.
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
import torch.nn.functional as F
from torch import nn

from olavlm.schemas.cache import TargetCache
from olavlm.schemas.config import DataConfig

from .checkpoint import model_dir
from .collate import to_device
from .heads import ResamplerHead
from .images import ImageTransform
from .loader import build_loader
from .model import OlaVlm


@dataclass(frozen=True, kw_only=True)
class ProbeConfig:
    """Probe budget and split; identical for every compared checkpoint."""

    layers: tuple[int, ...] = ()
    """LLM layers (0-based block outputs) to probe; () = all."""
    teachers: tuple[str, ...] = ()
    """Teachers to probe; () = every teacher in the cache."""
    steps: int = 200
    """Optimizer steps per checkpoint (all probes step together)."""
    batch_size: int = 8
    """Samples per step (training split only)."""
    lr: float = 1e-3
    """AdamW learning rate of the probes."""
    width: int = 256
    """Internal width of each probe head."""
    num_heads: int = 4
    """Attention heads per probe."""
    heldout_percent: int = 20
    """Share of keys held out for scoring (by sha256 of the key)."""
    seed: int = 0
    """Probe initialisation and data order."""
    num_workers: int = 0
    """DataLoader workers."""


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


def _per_image_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(pred.flatten(1).float(), target.flatten(1).float(), dim=1)


def probe_checkpoint(model: OlaVlm, *, name: str, data: str, cache: str, config: ProbeConfig,
                     done: set[tuple[str, int]] = frozenset(), device: str = "cpu",
                     progress=None) -> list[dict]:
    """Train and score probes for the (teacher, layer) pairs not in `done`; rows of the result table."""
    specs = TargetCache(cache).specs()
    teachers = config.teachers or tuple(specs)
    missing = [t for t in teachers if t not in specs]
    if missing:
        raise ValueError(f"{cache}: no targets for teachers {missing} (has {sorted(specs)})")
    text = model.llava.config.text_config
    layers = tuple(sorted(set(config.layers))) or tuple(range(text.num_hidden_layers))
    bad = [layer for layer in layers if not 0 <= layer < text.num_hidden_layers]
    if bad:
        raise ValueError(f"layers {bad} outside the LLM's 0..{text.num_hidden_layers - 1}")
    todo = [(t, layer) for t in teachers for layer in layers if (t, layer) not in done]
    if not todo:
        return []
    model = model.to(device).eval().requires_grad_(False)
    torch.manual_seed(config.seed)
    probes = nn.ModuleDict({
        f"{t}_l{layer}": ResamplerHead(llm_width=text.hidden_size, width=config.width, out_width=specs[t].shape[1],
                                       num_queries=specs[t].shape[0], learned_queries=True,
                                       num_heads=config.num_heads, ffn_mult=2)
        for t, layer in todo
    }).to(device)
    optimizer = torch.optim.AdamW(probes.parameters(), lr=config.lr, weight_decay=0.0)
    capture = sorted({layer for _, layer in todo})
    data_config = DataConfig(data=data, cache=cache, batch_size=config.batch_size, num_workers=config.num_workers,
                             seed=config.seed, max_length=4096)
    transform = ImageTransform.from_processor(model.image_processor)

    def loader():
        return build_loader(data_config, tokenizer=model.tokenizer, layout=model.layout, transform=transform,
                            tasks=teachers)

    def states_of(batch):
        image_mask, _ = model.layout.locate(batch["input_ids"])
        with torch.no_grad():
            embeds = model.embed(batch["input_ids"], batch["pixel_values"], image_mask)
            _, states = model.run_llm(embeds, batch["attention_mask"], capture)
        return states

    # Train: held-in images only; text-only samples carry no target.
    probes.train()
    step = 0
    for batch, _state in loader():
        keep = [bool(h) and not is_heldout(k, config.heldout_percent) for k, h in zip(batch["keys"], batch["has_image"])]
        if not any(keep):
            continue
        batch = to_device(_rows(batch, keep), device)
        states = states_of(batch)
        mask = batch["attention_mask"].bool()
        loss = 0.0
        for t, layer in todo:
            pred = probes[f"{t}_l{layer}"](states[layer], mask)  # [B, T, D]
            target = batch["targets"][t]
            loss = loss + F.smooth_l1_loss(pred, target) + (1 - _per_image_cosine(pred, target)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if progress is not None:
            progress(step, config.steps, float(loss))
        if step >= config.steps:
            break

    # Score: one pass over the held-out images. The loader runs epochs without end; within an
    # epoch every key comes once, so the first repeated key means the pass is complete.
    probes.eval()
    sums = {pair: 0.0 for pair in todo}
    count, seen = 0, set()
    for batch, _state in loader():
        if any(k in seen for k in batch["keys"]):
            break
        seen.update(batch["keys"])
        keep = [bool(h) and is_heldout(k, config.heldout_percent) for k, h in zip(batch["keys"], batch["has_image"])]
        if any(keep):
            batch = to_device(_rows(batch, keep), device)
            states = states_of(batch)
            with torch.no_grad():
                for t, layer in todo:
                    pred = probes[f"{t}_l{layer}"](states[layer], batch["attention_mask"].bool())
                    sums[(t, layer)] += float(_per_image_cosine(pred, batch["targets"][t]).sum())
            count += sum(keep)
    if count == 0:
        raise ValueError(f"no held-out images in {data} ({config.heldout_percent}% of keys): use more data")
    distilled = {t: set(model.layers.get(t, ())) for t in teachers}
    return [{"checkpoint": name, "teacher": t, "layer": layer, "score": sums[(t, layer)] / count,
             "heldout_images": count, "distilled": layer in distilled[t]} for t, layer in todo]


def run_probe(checkpoints: list[str], *, data: str, cache: str, out: str, config: ProbeConfig,
              names: list[str] | None = None, device: str | None = None, progress=None) -> list[dict]:
    """Probe each checkpoint on the same split and budget; write probe.json, probe.csv and probe.png.

    `checkpoints`: model, checkpoint or run folders; `names` label them (default: folder names).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(out, exist_ok=True)
    results_path = Path(out) / "probe.json"
    rows = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    names = list(names) if names else _names(checkpoints)
    if len(set(names)) != len(names):
        raise ValueError(f"checkpoint names must differ: {names}")
    # A kept score must come from the same weights, data and probe budget; layers and teachers may differ
    # (a rerun with more layers adds rows). Anything else under the same name is stale and recomputed.
    budget = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("layers", "teachers")}
    for path, name in zip(checkpoints, names):
        folder = model_dir(path)
        identity = {"model": str(Path(folder).resolve()), "data": data, "cache": cache, "budget": budget}
        rows = [r for r in rows if r["checkpoint"] != name or r.get("identity") == identity]
        model = OlaVlm.from_pretrained(folder)
        done = {(r["teacher"], r["layer"]) for r in rows if r["checkpoint"] == name}
        start = time.perf_counter()
        new = probe_checkpoint(model, name=name, data=data, cache=cache, config=config, done=done, device=device,
                               progress=(lambda s, n, loss, name=name: progress(name, s, n, loss)) if progress else None)
        for row in new:
            row["seconds"] = time.perf_counter() - start
            row["identity"] = identity
        rows.extend(new)
        _write_json(results_path, {"config": dataclasses.asdict(config), "checkpoints": dict(zip(names, checkpoints)),
                                   "rows": rows})  # after each checkpoint: resumable
    wanted = set(names)
    rows = [r for r in rows if r["checkpoint"] in wanted]
    with open(Path(out) / "probe.csv", "w") as f:
        f.write("checkpoint,teacher,layer,score,distilled\n")
        for r in sorted(rows, key=lambda r: (r["checkpoint"], r["teacher"], r["layer"])):
            f.write(f"{r['checkpoint']},{r['teacher']},{r['layer']},{r['score']:.6f},{int(r['distilled'])}\n")
    plot_probe(rows, str(Path(out) / "probe.png"))
    return rows


def _names(checkpoints: list[str]) -> list[str]:
    names = [Path(c).name or str(c) for c in checkpoints]
    return names if len(set(names)) == len(names) else [str(c) for c in checkpoints]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


PANEL_INCHES = (4.2, 3.4)
"""Size of one teacher's panel; the PNG is (teachers x 4.2 in) x 3.4 in at `dpi`."""


def plot_size(teachers: int, dpi: int = 100) -> tuple[int, int]:
    """Pixel size (width, height) of the probe plot for this many teachers."""
    return round(PANEL_INCHES[0] * teachers * dpi), round(PANEL_INCHES[1] * dpi)


def plot_probe(rows: list[dict], out: str, dpi: int = 100) -> tuple[int, int]:
    """Score against layer, one panel per teacher, one line per checkpoint; distilled layers marked.

    Returns the PNG's pixel size, `plot_size(len(teachers), dpi)`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = sorted({r["teacher"] for r in rows})
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in rows))
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(teachers), figsize=(PANEL_INCHES[0] * len(teachers), PANEL_INCHES[1]), dpi=dpi,
                             squeeze=False)
    for ax, teacher in zip(axes[0], teachers):
        for checkpoint in checkpoints:
            mine = sorted((r for r in rows if r["teacher"] == teacher and r["checkpoint"] == checkpoint),
                          key=lambda r: r["layer"])
            if not mine:
                continue
            line, = ax.plot([r["layer"] for r in mine], [r["score"] for r in mine], marker=".", label=checkpoint)
            marked = [r for r in mine if r["distilled"]]
            ax.scatter([r["layer"] for r in marked], [r["score"] for r in marked], s=90, facecolors="none",
                       edgecolors=line.get_color(), linewidths=1.5)
        ax.set_title(f"{teacher} (o = distilled layer)", fontsize=9)
        ax.set_xlabel("LLM layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("probe cosine (held-out)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)  # no bbox_inches="tight": the pixel size stays exactly plot_size()
    plt.close(fig)
    return plot_size(len(teachers), dpi)
