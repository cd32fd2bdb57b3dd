"""What a benchmark is to ``onegen eval``: a list of generations (:class:`Case`), each with
its inputs and its scorer, and the paper's figures to report beside ours."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Case:
    """One generation of a benchmark: ``inputs()`` gives the sampler's keyword arguments
    (``cond_pixels``, ``cond_mask``, optionally ``cond_rays``), ``score(out)`` the metrics of
    what the sampler returned."""

    id: str
    task: str
    prompt: str
    inputs: Callable[[], dict[str, Any]]
    score: Callable[[Any, dict[str, Any]], dict[str, float]]
    has_target: bool = True  # the condition pixels hold the ground-truth target view(s)
    row: str = ""  # the report row it counts in (default: its task), e.g. nvs_2view_known


@dataclass
class Bench:
    name: str
    cases: list[Case]
    paper: dict[str, float] = field(default_factory=dict)
    paper_source: str = ""
    # results computed over every finished case at report time: {task: {metric: value}}
    finish: Callable[[], dict[str, dict[str, float]]] | None = None
