"""A required package missing from the install: one sentence naming it, exit 2, no traceback."""

from __future__ import annotations

import argparse

import pytest

from wanfit import cli


def _parser_raising(err: BaseException):
    def build():
        parser = argparse.ArgumentParser()

        def func(args):
            raise err

        parser.set_defaults(func=func)
        return parser

    return build


def test_a_missing_required_package_is_one_sentence_naming_it(monkeypatch, capsys):
    if cli.required_package(ModuleNotFoundError("x", name="diffusers")) is None:
        pytest.skip("wanfit is run from a checkout without its metadata")
    # What the GPU machine of 2026-12-02 printed as a traceback: diffusers (the samplers) absent.
    err = ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
    monkeypatch.setattr(cli, "build_parser", _parser_raising(err))
    assert cli.main([]) == 2
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and "needs the diffusers package" in out[0] and "pip install diffusers" in out[0]
    assert cli.required_package(ModuleNotFoundError("x", name="imageio_ffmpeg")) == "imageio-ffmpeg"


def test_another_missing_module_is_not_blamed_on_the_install(monkeypatch):
    err = ModuleNotFoundError("No module named 'not_a_wanfit_dependency'", name="not_a_wanfit_dependency")
    monkeypatch.setattr(cli, "build_parser", _parser_raising(err))
    with pytest.raises(ModuleNotFoundError):
        cli.main([])  # a bug, not the user's install: the traceback stays
