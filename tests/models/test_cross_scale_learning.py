"""The multi-scale models learn the ``cross-scale`` synthetic scenario (risk = event density inside tumour: events
are clear at 20x, tumour at 5x), trained by the engine on a small cohort written by the generator.

The oracle C on these patients is about 0.7 (0.69-0.73 over generator seeds; the models reached 0.63-0.68
at seeds 3 and 4, so the bound below leaves room for platform differences). The ablation that drops 5x and 10x
(``crossfusion_single``) is compared with CrossFusion in the synthetic benchmark over 3 seeds x 5 folds
(leaderboards/synthetic/README.md); on this scenario it does not do worse there, so no ordering is asserted here.
"""

from __future__ import annotations

import numpy as np
import pytest
from sksurv.metrics import concordance_index_censored

from milbench.config.run import make_config
from milbench.training.fold import fit_fold
from milbench.tasks.synthetic import generate_cohort
from milbench.tasks.cohort import resolve_cohort

FOLDS = 3
MODELS = {"crossfusion": {"embed_dim": 64, "n_heads": 2}, "zoommil": {}, "csmil": {}}


@pytest.fixture(scope="module")
def cross_scale(tmp_path_factory):
    out = generate_cohort(tmp_path_factory.mktemp("cross_scale"), "cross-scale", patients=150, seed=3, size=0.25,
                          in_dim=16, censoring=0.3, folds=FOLDS)
    return resolve_cohort(out / "cohort.csv", splits=out / "splits", features=out / "features")


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODELS))
def test_multi_scale_models_learn_the_cross_scale_scenario(cross_scale, model):
    frames = [fit_fold(cross_scale, make_config(model, cross_scale.name, "small", {"epochs": 6, **MODELS[model]}),
                       k, device="cpu").predictions for k in range(FOLDS)]
    event = np.concatenate([f.event.to_numpy(bool) for f in frames])
    time = np.concatenate([f.time.to_numpy(float) for f in frames])
    risk = np.concatenate([f.risk.to_numpy(float) for f in frames])
    oracle = cross_scale.oracle_risk.loc[np.concatenate([f.case_id.to_numpy() for f in frames])].to_numpy()
    c = concordance_index_censored(event, time, risk)[0]
    c_oracle = concordance_index_censored(event, time, oracle)[0]
    print(f"{model}: pooled C {c:.3f}, oracle {c_oracle:.3f}")
    assert c > 0.58 and c_oracle > c
