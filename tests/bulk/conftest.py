from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose(tmp_path, *overrides):
    """The bulk job's config as `python -m pipelines.bulk_train <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import pipelines.bulk_train  # noqa: F401 - registers the schema

    base = ["model=tiny_random", "concepts=smoke", "trainer=smoke", "tracking=disabled", "eval=none",
            f"paths.root={tmp_path}", "progress=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=base + list(overrides))
