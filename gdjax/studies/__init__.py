"""The paper's studies, one command each (launch/study.py, configs/studies.py).

`run(study, config_for, root)` runs the study named `study.name` from run configs
`config_for(variant)` (the `--config` file's variants with the command line's overrides)
into `root`, resumably, and returns the paths of its report (report.md, CSVs, PNGs).
"""

from __future__ import annotations


def run(study, config_for, root: str, **kwargs) -> dict[str, str]:
    from gdjax.studies import iid, lambdas, replay_steps, sampling
    if study.name == "iid_distillation":
        return iid.run_study(study, config_for("naive"), root, **kwargs)
    if study.name == "sampling_cost":
        return sampling.run_study(study, config_for("naive"), root, **kwargs)
    if study.name == "lambda":
        return lambdas.run_study(study, config_for, root, **kwargs)
    if study.name == "replay_steps":
        return replay_steps.run_study(study, config_for, root, **kwargs)
    raise ValueError(f"unknown study {study.name!r}: see configs/studies.py")
