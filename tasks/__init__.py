"""Prefect tasks: one thin wrapper per pipeline stage over `perp.pipeline`."""

from tasks.stages import calibrate, evaluate, mask, recover, register

__all__ = ["calibrate", "evaluate", "mask", "recover", "register"]
