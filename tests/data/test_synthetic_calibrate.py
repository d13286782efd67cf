"""The shifted sets' calibration: fresh renders only, and the real shifts' order checked."""
from common.data.synthetic.calibrate import CALIBRATION_SEED, order_ok


def test_the_real_shift_order_is_checked():
    rows = {"emb_objects_v2": {"ratio_to_source": 0.89}, "emb_objects_sketch": {"ratio_to_source": 0.53},
            "emb_objects_rendition": {"ratio_to_source": 0.96}, "emb_objects_hard": {"ratio_to_source": 0.39}}
    assert all(order_ok(rows).values())
    rows["emb_objects_sketch"]["ratio_to_source"] = 1.5        # sketches easier than the source: out of order
    bad = [k for k, v in order_ok(rows).items() if not v]
    assert bad == ["emb_objects_sketch < source", "emb_objects_v2 > emb_objects_sketch",
                   "emb_objects_rendition > emb_objects_sketch"]


def test_calibration_never_uses_the_suite_seed():
    from common.data.synthetic.suite import main  # noqa: F401  (the suite's default seed is params.yaml's 2024)
    assert CALIBRATION_SEED != 2024
