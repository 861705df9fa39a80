"""The parity check: the exported artifact, loaded back, against the checkpoint on the same inputs.

Passes only when every case agrees on the top-1 class for every sample and the probabilities differ
by at most PROBS_ATOL (fp32). An embedding (the autoencoder) passes when every value is within
EMBEDDING_TOL times the larger of 1 and the reference's largest magnitude.
"""

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from transfer_cli.export.deploy import reference
from transfer_cli.export.samples import Case
from transfer_cli.export.source import Source

PROBS_ATOL = 1e-4
EMBEDDING_TOL = 1e-4

Runner = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class CaseResult:
    case: str
    batch: int
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float | None  # None for embeddings
    passed: bool


@dataclass
class ParityReport:
    format: str
    output: str
    samples: str
    tolerance: dict[str, float]
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def lines(self) -> list[str]:
        lines = [f"parity ({self.format}, samples from {self.samples}):"]
        for c in self.cases:
            top1 = "" if c.top1_agreement is None else f"  top-1 agreement {c.top1_agreement:.0%}"
            verdict = "ok" if c.passed else "FAILED"
            lines.append(
                f"  {c.case:<24} max abs diff {c.max_abs_diff:.2e}  max rel diff {c.max_rel_diff:.2e}{top1}  {verdict}"
            )
        return lines


def check(source: Source, run: Runner, cases: list[Case], fmt: str, output: str, samples: str) -> ParityReport:
    name = "embedding" if source.embeds else "probs"
    tolerance = (
        {"embedding_rel": EMBEDDING_TOL} if source.embeds else {"max_abs_diff": PROBS_ATOL, "top1_agreement": 1.0}
    )
    report = ParityReport(format=fmt, output=output, samples=samples, tolerance=tolerance)
    for case in cases:
        expected = reference(source, case.inputs)[name].double()
        got = torch.as_tensor(run(case.inputs)[name]).double()
        report.cases.append(_compare(case.name, expected, got, embeds=source.embeds))
    return report


def _compare(name: str, expected: torch.Tensor, got: torch.Tensor, embeds: bool) -> CaseResult:
    if got.shape != expected.shape:
        return CaseResult(name, len(expected), float("inf"), float("inf"), 0.0 if not embeds else None, False)
    diff = (got - expected).abs()
    max_abs = float(diff.max())
    max_rel = float((diff / expected.abs().clamp(min=1e-6)).max())
    if embeds:
        scale = max(1.0, float(expected.abs().max()))
        passed = bool(torch.isfinite(got).all()) and max_abs <= EMBEDDING_TOL * scale
        return CaseResult(name, len(expected), max_abs, max_rel, None, passed)
    agreement = float((got.argmax(-1) == expected.argmax(-1)).double().mean())
    passed = bool(torch.isfinite(got).all()) and agreement == 1.0 and max_abs <= PROBS_ATOL
    return CaseResult(name, len(expected), max_abs, max_rel, agreement, passed)


def print_report(report: ParityReport) -> None:
    for line in report.lines():
        print(line, file=sys.stderr)
