"""``--help`` of the Hydra apps: the config groups a user can choose from, and which one is chosen.

Hydra's own group list (``$APP_CONFIG_GROUPS``) also shows the typed schema nodes this project keeps
in Hydra's config store (``model: schema, ...``), which are not choices. The apps' help templates call
the ``spm_config_groups`` resolver instead: it lists the option files of each group folder in ``conf/``
and marks the option this command line selects.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
NOT_GROUPS = ("hydra",)  # folders of conf/ that are not the app's choices


def config_groups(conf: str = CONF) -> str:
    """One line per group: ``group: option, *chosen, ...`` (the chosen one as Hydra resolved it)."""
    from hydra.core.hydra_config import HydraConfig

    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    lines = []
    for group in sorted(os.listdir(conf)):
        folder = os.path.join(conf, group)
        if not os.path.isdir(folder) or group in NOT_GROUPS:
            continue
        options = sorted(name[:-5] for name in os.listdir(folder) if name.endswith(".yaml"))
        if not options:
            continue  # e.g. conf/deepspeed holds JSON files named by cluster.deepspeed, not a group
        marked = [f"*{o}" if choices.get(group) == o else o for o in options]
        lines.append(f"  {group}: {', '.join(marked)}")
    return "\n".join(lines)


def register_help() -> None:
    OmegaConf.register_new_resolver("spm_config_groups", config_groups, replace=True)
