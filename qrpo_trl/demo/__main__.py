"""`python -m qrpo_trl.demo [--quick] [--compare | --frontier] [--config demo.yaml] [--field value ...]`: see
`DemoConfig`."""

import argparse
import os
import sys

# No network: a Hub lookup of a missing file hangs before failing without this
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trl import TrlParser  # noqa: E402

from .config import QUICK_DEFAULTS, DemoConfig  # noqa: E402


def parse_config(args: list[str] | None = None) -> DemoConfig:
    """Defaults of the main demo, or of the quick variant with `--quick`; then `--config` YAML; then flags."""
    args = sys.argv[1:] if args is None else args
    quick = argparse.ArgumentParser(add_help=False)
    quick.add_argument("--quick", nargs="?", const="true", default="false")
    parser = TrlParser(DemoConfig)
    if quick.parse_known_args(args)[0].quick.lower() in ("true", "1", "yes"):
        parser.set_defaults_with_config(**QUICK_DEFAULTS)
    (config,) = parser.parse_args_and_config(args)
    return config


def main(args: list[str] | None = None) -> dict:
    config = parse_config(args)
    if config.compare:
        from .compare import run_comparison

        return run_comparison(config)
    if config.frontier:
        from .frontier import run_frontier

        return run_frontier(config)
    from .pipeline import run

    return run(config)


if __name__ == "__main__":
    main()
