"""`ola bench heads`: what the distillation heads and task tokens cost.

1. Parameter counts and multiply-accumulates per sample of the paper's students, built on the meta
   device: exact, no memory, no download.
2. Forward+backward time of one PT step with the heads against the same step without them, on
   this machine's CPU at a tiny and a mid size (minimum of a few repeats after a warm-up).
"""

from __future__ import annotations

import tempfile
import time

import torch

from olavlm.schemas.config import ModelConfig
from olavlm.trainer.freeze import apply_stage, parts
from olavlm.trainer.student.build import build_student
from olavlm.trainer.student.model import OlaVlm
from olavlm.trainer.student.tokens import TokenLayout

PAPER_TARGETS = {"gen": (1, 1024), "depth": (576, 1024), "seg": (576, 1536)}


def _paper_llms() -> dict:
    from transformers import LlamaConfig, Phi3Config

    return {
        "llama3_8b": LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=False,
        ),
        "phi3_mini": Phi3Config(
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            tie_word_embeddings=False,
        ),
    }


PAPER_SEQ_LEN = 640
"""A LLaVA-1.5 sample: 576 image + 24 task tokens + ~40 text tokens."""


def head_macs_per_sample(config: ModelConfig, llm_width: int, target: tuple[int, int], seq_len: int) -> int:
    """Multiply-accumulates of one ResamplerHead forward for one sample (backward ~2x more)."""
    t, out = target
    w, keys = config.head_width, seq_len + target[0]
    return (
        seq_len * llm_width * w  # kv_proj
        + t * w * w  # to_q
        + keys * w * 2 * w  # to_kv
        + 2 * t * keys * w  # scores + weighted sum
        + t * w * w  # to_out
        + 2 * t * w * config.head_ffn_mult * w  # feed-forward
        + t * w * out  # out_proj
    )


def paper_param_counts(config: ModelConfig | None = None) -> dict[str, dict[str, int | float]]:
    """Parameters per part of the paper's students, built on the meta device."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    config = config or ModelConfig()
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    out = {}
    for name, text in _paper_llms().items():
        vocab = text.vocab_size
        text.vocab_size = vocab + 1 + 3 * config.tokens_per_task  # + <image> + task tokens
        ids = iter(range(vocab + 1, text.vocab_size))
        layout = TokenLayout(
            image_token_id=vocab,
            num_image_tokens=576,
            task_token_ids={
                t: tuple(next(ids) for _ in range(config.tokens_per_task)) for t in ("gen", "depth", "seg")
            },
            pad_token_id=0,
        )
        with torch.device("meta"):
            llava = LlavaForConditionalGeneration(
                LlavaConfig(vision_config=vision, text_config=text, image_seq_length=576)
            )
            model = OlaVlm(llava, config=config, target_shapes=PAPER_TARGETS, layout=layout)
        counts = {part: sum(p.numel() for _, p in params) for part, params in parts(model).items()}
        head_macs = sum(
            head_macs_per_sample(config, text.hidden_size, PAPER_TARGETS[key.split("_l")[0]], PAPER_SEQ_LEN)
            for key in model.heads
        )
        # Dense student: every non-embedding weight is used once per token (attention scores ignored).
        student_macs = (counts["llm"] - 2 * text.vocab_size * text.hidden_size) * PAPER_SEQ_LEN + (
            counts["vision"] * 577 + counts["projector"] * 576
        )
        student = counts["vision"] + counts["projector"] + counts["llm"]
        added = counts["heads"] + counts["task_tokens"] + counts["logit_scales"]
        out[name] = {
            **counts,
            "per_head": {k: sum(p.numel() for p in h.parameters()) for k, h in model.heads.items()},
            "student": student,
            "heads_and_tokens": added,
            "added_fraction": added / student,
            "pt_trainable": added + counts["projector"],
            "seq_len": PAPER_SEQ_LEN,
            "heads_gmac_per_sample": head_macs / 1e9,
            "student_gmac_per_sample": student_macs / 1e9,
            "heads_compute_fraction": head_macs / student_macs,
        }
    return out


SIZES = {
    "tiny": dict(
        student=dict(
            image_size=32,
            patch_size=4,
            vision_hidden=64,
            vision_layers=2,
            llm_hidden=64,
            llm_layers=4,
            llm_heads=4,
        ),
        targets={"gen": (1, 32), "depth": (64, 32), "seg": (64, 48)},
        head=dict(head_width=64, head_num_heads=4, head_ffn_mult=4),
        batch=4,
    ),
    "mid": dict(
        student=dict(
            image_size=336,
            patch_size=14,
            vision_hidden=256,
            vision_layers=4,
            llm_hidden=512,
            llm_layers=8,
            llm_heads=8,
        ),
        targets=PAPER_TARGETS,
        head=dict(head_width=1024, head_num_heads=16, head_ffn_mult=4),
        batch=2,
    ),
}


def head_overhead(size: str, *, repeats: int = 3, text_tokens: int = 48) -> dict[str, float | int | str]:
    """Minimum fwd+bwd seconds of a PT step with and without the heads, and their ratio."""
    from olavlm.trainer.student.presets import build_tiny_student

    spec = SIZES[size]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folders = build_tiny_student(tmp, **spec["student"])
        config = ModelConfig(vision_model=folders.vision_model, llm=folders.llm, **spec["head"])
        model = build_student(config, spec["targets"])
    apply_stage(model, "pt")
    b, n = spec["batch"], folders.num_image_tokens
    ids = [model.layout.image_token_id] + torch.randint(10, 400, (text_tokens,)).tolist()
    input_ids = torch.tensor([model.layout.expand(ids)] * b)
    size_px = spec["student"]["image_size"]
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
        "pixel_values": torch.randn(b, 3, size_px, size_px),
        "has_image": torch.ones(b, dtype=torch.bool),
        "targets": {t: torch.randn(b, *s) for t, s in spec["targets"].items()},
    }

    def step(distill: bool) -> float:
        start = time.perf_counter()
        model(batch, distill=distill)["loss"].backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(False), step(True)  # warm-up
    runs = {False: [], True: []}
    for _ in range(repeats):  # interleaved, so that load changes hit both variants alike
        for distill in (False, True):
            runs[distill].append(step(distill))
    times = {distill: min(r) for distill, r in runs.items()}
    return {
        "size": size,
        "batch": b,
        "seq_len": input_ids.shape[1],
        "image_tokens": n,
        "llm_hidden": spec["student"]["llm_hidden"],
        "llm_layers": spec["student"]["llm_layers"],
        "head_width": spec["head"]["head_width"],
        "heads": len(model.heads),
        "bare_s": times[False],
        "with_heads_s": times[True],
        "overhead": times[True] / times[False] - 1.0,
        "threads": torch.get_num_threads(),
    }
