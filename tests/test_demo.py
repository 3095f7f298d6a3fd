"""The main job (`make demo`) end to end in a smoke size: trains, encodes, reports, draws."""
import json

import numpy as np

from pyvae.demo import run_demo


def test_demo_pipeline_smoke(tmp_path):
    summary = run_demo(tmp_path / "demo", steps=3, batch_size=16, latent_dim=4, progress=False)
    store = tmp_path / "demo" / "features"
    features = np.load(store / "features.npy", mmap_mode="r")
    manifest = json.loads((store / "manifest.json").read_text())
    assert features.shape == (120, 4, 56, 56) and manifest["complete"]
    assert np.isfinite(np.asarray(features)).all()
    assert summary["speedup_over_per_patch"] > 0 and summary["stored_rate_bits_per_patch"] >= 0
    for path in summary["pictures"].values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == summary
    # Running again resumes the finished training and rebuilds the store.
    again = run_demo(tmp_path / "demo", steps=3, batch_size=16, latent_dim=4, progress=False)
    assert again["store_shape"] == summary["store_shape"]
