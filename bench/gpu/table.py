"""The human table: the figures as aligned text (what `ola bench gpu` prints without --json)."""

from __future__ import annotations

from olavlm.bench.gpu.config import TEACHERS
from olavlm.bench.gpu.pipeline import DEVICE_RESIZE_ARM, OVERLAP_ARM

ARM_NAMES = {
    "all": "all three",
    DEVICE_RESIZE_ARM: "all three, device resize",
    OVERLAP_ARM: "all three, actor concurrency 2",
}


def format_table(data: dict) -> str:
    """The figures as aligned text tables (what `ola bench gpu` prints without --json)."""
    lines = [
        f"device: {data.get('device')} | torch {data.get('torch')} | transformers {data.get('transformers')}"
        f" | smoke={data.get('smoke')} | complete={data.get('complete')}"
    ]
    inputs = data.get("inputs")
    if inputs:
        lines.append(
            f"corpus: {inputs['images']} images, batch {inputs['batch_size']}, {inputs['shards']} shards; "
            f"host preprocessing {inputs['host_preprocess_images_per_s_per_core']} images/s per core "
            f"(pipeline host ceiling ~{inputs['pipeline_host_ceiling_images_per_s']} images/s "
            f"with {inputs['pipeline_shards_in_flight']} shards in flight)"
        )

    def gb(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = []
    for dtype, bare in data.get("bare", {}).items():
        pipe = data.get("pipeline", {}).get(dtype, {})
        for label in (*ARM_NAMES, *TEACHERS):
            p = pipe.get(label, {})
            if label in (DEVICE_RESIZE_ARM, OVERLAP_ARM) and not p:
                continue  # the arms run at the first dtype only, when asked
            three = label in ARM_NAMES
            b = bare["all_images_per_s"] if three else bare["per_teacher"][label]["images_per_s"]
            peak = bare["peak_memory_gb"] if three else bare["per_teacher"][label]["peak_memory_gb"]
            name = ARM_NAMES.get(label, label)
            rows.append(
                (
                    dtype,
                    name,
                    f"{b:.1f}",
                    f"{p['images_per_s']:.1f}" if p else "-",
                    str(p.get("busy_fraction", "-")),
                    str(p.get("actor_compute_share", "-")),
                    gb(peak),
                    gb(p.get("peak_device_memory_gb")),
                )
            )
    if rows:
        lines += [
            "",
            _table(
                (
                    "compute",
                    "teachers",
                    "bare img/s",
                    "pipeline img/s",
                    "busy",
                    "actor share",
                    "bare peak GB",
                    "job peak GB",
                ),
                rows,
            ),
        ]
    levers = data.get("levers")
    if levers:
        rows = [
            (
                r["lever"],
                *(f"{r['per_teacher'][n]['images_per_s']:.1f}" for n in TEACHERS),
                f"{r['all_images_per_s']:.1f}",
                f"{r['speedup_vs_baseline']:.2f}x",
                _lever_note(r),
            )
            if "error" not in r
            else (r["lever"], "-", "-", "-", "-", "-", r["error"][:80])
            for r in levers["rows"]
        ]
        lines += [
            "",
            f"levers ({levers['dtype']}, bare loop, images/s):",
            _table(("lever", *TEACHERS, "all three", "vs baseline", "note"), rows),
        ]
    lines += _seg_lines(data.get("seg"))
    train = data.get("train")
    if train:
        lines += [
            "",
            f"training step ({train['student']}, batch {train['batch_size']}, {train['autocast']}, "
            f"{train['backend']} x{train['world_size']}):",
            _table(
                (
                    "loader s/step",
                    "in-memory s/step",
                    "cached / in-memory",
                    "online s/step",
                    "online / cached",
                    "peak GB",
                ),
                [
                    (
                        train["step_s_loader"],
                        train["step_s_in_memory"],
                        train["cached_over_in_memory"],
                        train["step_s_online_teachers"],
                        train["online_over_cached"],
                        gb(train["peak_memory_gb"]),
                    )
                ],
            ),
        ]
    summary = data.get("summary")
    if summary:
        shown = {k: v for k, v in summary.items() if k not in ("device", "met", "seg_best_lever")}
        lines += ["", "summary: " + ", ".join(f"{k} {v}" for k, v in shown.items())]
        lines.append("goals met: " + ", ".join(f"{k} {v}" for k, v in summary["met"].items()))
    return "\n".join(lines)


def _seg_lines(seg: dict | None) -> list[str]:
    """The seg section's rows: images/s (and TFLOP/s) per lever, cosine against float32 eager."""
    if not seg:
        return []
    rows = [
        (
            r["attention"],
            r["compile"],
            r["dtype"],
            r["batch_size"],
            f"{r['images_per_s']:.1f}" if "error" not in r else "-",
            r.get("tflop_per_s") or "-",
            r.get("cosine_min_vs_float32", "-"),
            r.get("first_batch_s", "-"),
            r.get("error", "")[:80],
        )
        for r in seg["rows"]
    ]
    header = (
        "attention",
        "compile",
        "dtype",
        "batch",
        "img/s",
        "TFLOP/s",
        "cos vs fp32",
        "first batch s",
        "error",
    )
    return [
        "",
        f"seg levers ({seg['images']} images; {seg['tflop_per_image']} TFLOP per image; reference {seg['reference']}):",
        _table(header, rows),
    ]


def _lever_note(row: dict) -> str:
    if row["lever"] == "compile":
        return f"compile {row['compile_s']} s ({row['compile_backend']})"
    if row["lever"] == "gpu_preprocess":
        return (
            f"host {row['host_decode_only_ms_per_image']} ms/img decode only vs "
            f"{row['host_cpu_path_ms_per_image']} ms/img today"
        )
    if "attn_implementation" in row:
        return ",".join(f"{n}={v}" for n, v in row["attn_implementation"].items())
    return ""


def _table(header: tuple, rows: list[tuple]) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    text = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([text[0], "  ".join("-" * w for w in widths), *text[1:]])
