"""apply-calibration: take the ranges and corrected biases a saved calibration record holds
(``--save-ranges``) instead of measuring them: range-analysis and bias-correction without the
data. The record must have been measured on this very float graph (its digest is checked), so
the result is the graph those two passes would have produced."""
from __future__ import annotations

from dataclasses import dataclass

from qcompiler.calibration_record import CalibrationRecord
from qcompiler.ir import Graph
from qcompiler.pipeline import Pass, PassContext, PipelineError, register


@register
@dataclass(frozen=True)
class ApplyCalibration(Pass):
    name = "apply-calibration"
    summary = "set ranges and corrected biases from a saved calibration record (--save-ranges), not from data"
    path: str = ""

    def run(self, graph: Graph, ctx: PassContext) -> bool:
        if not self.path:
            raise PipelineError("apply-calibration needs path=FILE (a record written by --save-ranges)")
        record = CalibrationRecord.load(self.path)
        record.apply(graph, where=self.path)
        ctx.report["calibration"] = {"method": record.calibration, "from": self.path}
        return True
