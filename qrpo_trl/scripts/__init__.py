"""Command-line scripts, shaped like TRL's `trl/scripts`: each has `make_parser()` and `main(*dataclasses)`."""
