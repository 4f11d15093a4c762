"""The `neva-*` console commands (pyproject.toml's [project.scripts]); examples/*.py and scripts/*.py are thin
wrappers around the same modules so `neva-pretrain ...` keeps working in a checkout.

Each module runs as `neva-<name>`, `python -m nemo_neva.commands.<module>` or through its wrapper; the hydra
ones read their configs from nemo_neva/conf/ (cli.CONF_DIR), whatever the working directory.
"""
