"""`python -m ddist` (or `ddist`): the Hydra entry point over conf/config.yaml."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ddist import CONF_DIR
from ddist.errors import DdistError


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> None:
    from ddist import pipeline  # after Hydra has parsed the command line: `--help` stays fast

    try:
        pipeline.run(cfg)
    except DdistError as err:
        # a user-fixable problem: one paragraph, no traceback, non-zero exit
        print(f"ddist: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OmegaConfBaseException as err:  # e.g. a missing key or a bad interpolation in an override
        print(f"ddist: config error: {err}\nCheck the overrides and the config files under conf/.", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
