"""The search's choice rule and Pareto front, on hand-made points (the measured ones come from
``test_cli.test_search_scores_points_and_chooses_a_stable_one``)."""

from engine.study.sweep import choose, pareto_front


def point(hidden, rounding, score, agreement, latency_ms):
    return {"hidden": [hidden], "bits": 2, "act_bits": 2, "input_bits": 3, "input_pool": 3, "max_active_inputs": 0,
            "rounding_bits": rounding, "p_error": 1e-5, "simulate_accuracy": score, "simulate_balanced_accuracy": score,
            "simulate_agreement": agreement, "fhe_latency_median_s": latency_ms / 1000, "pbs_count": hidden,
            "config": {"model": {"hidden": [hidden]}, "train": {"class_weighting": True},
                       "compile": {"rounding_threshold_bits": rounding}}}


def test_unstable_points_never_win_and_compile_settings_follow_the_model():
    fast_noisy = point(16, 5, 0.94, 0.990, 135)
    slow_stable = point(16, 6, 0.93, 0.999, 290)
    other_model = point(24, 6, 0.925, 1.0, 380)
    rows = [fast_noisy, slow_stable, other_model]
    # Nothing stable within 150 ms: the fastest stable point within one point of the best stable score.
    assert choose(rows, 0.150, 0.995) is slow_stable
    # A looser bar admits the fast point.
    assert choose(rows, 0.150, 0.99) is fast_noisy
    # Within the target, two compile settings of one model: the more stable one, not the noisier higher score.
    a, b = point(12, 5, 0.934, 0.996, 120), point(12, 6, 0.930, 0.999, 140)
    assert choose([a, b, point(8, 5, 0.90, 1.0, 100)], 0.150, 0.995) is b
    # Speed never buys more than one point of validation score: a fast point two points below the
    # best loses even within the target; one within a point wins over the slower best.
    best, fast_weak, fast_close = point(16, 6, 0.934, 0.999, 290), point(8, 6, 0.914, 1.0, 120), point(14, 6, 0.929, 0.999, 153)
    assert choose([best, fast_weak], 0.150, 0.995) is best
    assert choose([best, fast_weak, fast_close], 0.150, 0.995) is fast_close
    # The Pareto front over stable points skips the unstable fast one.
    assert pareto_front(rows, min_agreement=0.995) == [slow_stable]
    assert pareto_front(rows)[0] is fast_noisy


def test_points_differing_only_in_compile_settings_share_one_trained_model(data_dir, tmp_path):
    import dataclasses

    from conftest import tiny_config

    from engine.study.sweep import trained

    cfg = tiny_config(data_dir, epochs=1, limit_train=128)
    a = trained(cfg, tmp_path)
    b = trained(cfg.replace(compile=dataclasses.replace(cfg.compile, p_error=0.01)), tmp_path)
    assert a.path == b.path and a.hash == b.hash
    c = trained(cfg.replace(train=dataclasses.replace(cfg.train, seed=3)), tmp_path)
    assert c.path != a.path
    # Noise-aware training depends on the rounding bits: those points train their own model.
    noisy = cfg.replace(train=dataclasses.replace(cfg.train, rounding_noise=0.5))
    d = trained(noisy, tmp_path)
    e = trained(noisy.replace(compile=dataclasses.replace(cfg.compile, rounding_threshold_bits=5)), tmp_path)
    assert d.path != e.path


def test_framing_shift_scores_every_point_on_the_same_moved_validation_images(data_dir, tmp_path):
    import numpy as np
    from conftest import tiny_config

    from engine.learn.data import load_split
    from engine.study.sweep import SHIFT_COPIES, add_shifted, score, shifted_validation

    cfg = tiny_config(data_dir, epochs=1, limit_train=256)
    a, la, _ = shifted_validation(cfg.data)
    b, _, _ = shifted_validation(cfg.data)
    val = load_split(cfg.data, "val")
    assert a.dtype == np.uint8 and len(a) == SHIFT_COPIES * len(val) and np.array_equal(a, b)  # same images each time
    assert not np.array_equal(a[: len(val)], val.images) and np.array_equal(la[: len(val)], val.labels)
    row = {"config": cfg.to_dict(), "simulate_accuracy": 0.9, "simulate_balanced_accuracy": 0.9}
    add_shifted([row], tmp_path)
    shifted = row["shifted_balanced_accuracy"]
    assert 0.5 < shifted <= 1 and 0 < row["shifted_accuracy"] <= 1
    assert score(row) == (0.9 + shifted) / 2
