"""Subcommands of the `wanfit` CLI: each module has add_parser(subparsers) and sets args.func."""
