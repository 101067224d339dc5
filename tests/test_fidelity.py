"""`ola bench fidelity`'s statistics on rows whose answer is known by construction."""

from __future__ import annotations

import math
import statistics

import pytest

from olavlm.bench.fidelity import FidelityConfig, describe, summarise, summarise_widths
from olavlm.schemas.errors import ConfigError
from olavlm.trainer.eval.probe import ProbeConfig


def _rows():
    """Two training seeds; OLA beats the baseline by 0.03 / 0.01 at the distilled layer 2 and by 0 at layer 1;
    probe seeds add +-0.002 noise around each (run, layer) mean."""
    rows = []
    for seed, gain in ((0, 0.03), (1, 0.01)):
        for arm in ("ola", "baseline"):
            for layer, base in ((1, 0.50), (2, 0.60)):
                mean = base + (gain if arm == "ola" and layer == 2 else 0.0)
                for probe_seed, noise in enumerate((-0.002, 0.002)):
                    rows.append(
                        {
                            "train_seed": seed,
                            "checkpoint": arm,
                            "teacher": "depth",
                            "layer": layer,
                            "seed": probe_seed,
                            "score": mean + noise,
                            "distilled": arm == "ola" and layer == 2,
                        }
                    )
    return rows


def test_paired_differences_and_noise_floor_by_hand():
    result = summarise(_rows())["depth"]
    assert result["distilled_layers"] == [2]
    at = result["at_distilled"]
    assert at["diffs"] == pytest.approx([0.03, 0.01]) and at["mean"] == pytest.approx(0.02)
    assert at["std"] == pytest.approx(statistics.stdev([0.03, 0.01]))
    assert at["t"] == pytest.approx(0.02 / (at["std"] / math.sqrt(2)))
    # over layers 1 and 2 the gain halves
    assert result["all_layers"]["diffs"] == pytest.approx([0.015, 0.005])
    assert result["probe_noise_std"] == pytest.approx(statistics.stdev([-0.002, 0.002]))
    assert result["baseline_at_distilled"] == pytest.approx(0.60)


def test_each_probe_width_is_summarised_on_its_own_rows():
    """The same trained runs probed at two widths: a wider probe that closes the gap (gain 0) must not
    dilute the narrow probe's figures, and the table names the default width 'target'."""
    narrow = [{**r, "probe_width": 0} for r in _rows()]
    wide = [{**r, "probe_width": 256, "score": 0.7 + 0.001 * r["seed"]} for r in _rows()]
    widths = summarise_widths(narrow + wide)
    assert list(widths) == ["target", "256"]
    assert widths["target"]["depth"]["at_distilled"]["mean"] == pytest.approx(0.02)
    assert widths["256"]["depth"]["at_distilled"]["diffs"] == pytest.approx([0.0, 0.0])
    config = {
        "train_seeds": 2,
        "steps": 1,
        "images": 1,
        "probe_seeds": 2,
        "probe_steps": 1,
        "heldout_percent": 25,
    }
    text = describe({"config": config, "widths": widths})
    assert "+0.0200 ± 0.0141" in text and text.count("depth") == 2


def test_the_bench_probes_with_ola_probes_defaults():
    """One configuration: at a given width, the bench's probe is `ola probe`'s default probe."""
    assert FidelityConfig().probe(0) == ProbeConfig(seeds=FidelityConfig().probe_seeds)
    assert FidelityConfig().probe(64).width == 64
    with pytest.raises(ConfigError, match="probe_widths"):
        FidelityConfig(probe_widths=())
