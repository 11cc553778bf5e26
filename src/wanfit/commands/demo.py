"""`wanfit demo prompts`: what the built-in model (generate without --model) can draw."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="about the built-in model", description=__doc__)
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    prompts = what.add_parser("prompts", help="list what the built-in model can draw")
    prompts.set_defaults(func=run_prompts)


def run_prompts(args: argparse.Namespace) -> int:
    from wanfit.builtin.language import Scene, prompt, vocabulary_text

    print("The built-in model draws one shape moving over a plain background.")
    for line in vocabulary_text().splitlines():
        print(f"  {line}")
    print("Try:")
    for scene in (Scene("circle", "red", "right"), Scene("triangle", "yellow", "up", "gray"),
                  Scene("square", "blue", "still")):  # fmt: skip
        print(f'  wanfit generate --prompt "{prompt(scene)}"')
    return 0
