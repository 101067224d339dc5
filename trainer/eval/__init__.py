"""Users of a trained student: layer probes, multiple-choice benchmarks, generation."""
