"""The latency benchmark's typed records (the worker spec, rows, passes, the result), each refusing to be built wrong;
`dataclasses.asdict` of them is the JSON (schema SCHEMA), `from_dict` reads it back. Then comparisons and the table."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..eval.agreement import Agreement
from ..eval.validate import Accuracy
from ..io import atomic_write_bytes, write_json
from .measure import AA_TOLERANCE, CI_LEVEL, Latency, Memory, ratios, within_band

SCHEMA = "yolo-tq/latency/4"  # 2: rows hold typed parts (agreement, latency, memory, accuracy) instead of flat keys;
# 3: per target an A/A check and the A/B pass (`interleaved`: Interleaved), ratios per rotation cycle with an interval;
# 4: file sizes in bytes (file_bytes, file_gz_bytes; 3 held file_mb in MiB), the table's MB are 10^6 bytes
STATUSES = ("ok", "refused", "failed")
CI_TEXT = f"{CI_LEVEL:.0%} bootstrap interval"
LATENCY_FIGURES = ("mean_ms", "median_ms", "p95_ms", "throughput_ips")


def save_arrays(path: str | Path, arrays: list[np.ndarray]) -> Path:
    """np.savez through the one atomic writer."""
    buf = io.BytesIO()
    np.savez(buf, *arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load_arrays(path: str | Path) -> list[np.ndarray]:
    with np.load(path) as f:
        return [f[k] for k in f.files]


def save_record(record, path: str | Path) -> str:
    """A spec, row or result as JSON, written atomically."""
    return write_json(asdict(record), path)


def _need(ok: bool, row, what: str) -> None:
    if not ok:
        raise ValueError(f"{type(row).__name__} {getattr(row, 'model', '')} {row.target} ({row.status}): {what}")


def _need_status(row, statuses: tuple = STATUSES) -> None:
    """A known status, and a reason exactly when it is not ok."""
    _need(row.status in statuses, row, f"status must be one of {', '.join(statuses)}")
    _need((row.status == "ok") != bool(row.reason), row, "a reason is given exactly when the status is not ok")


@dataclass(frozen=True)
class WorkerSpec:
    """One worker job on `target` with the check inputs (.npz; the first is the timed one). kind "row": the one model
    in `models` ((model, artifact) pairs), checked against PyTorch's outputs in `refs` (.npz), then timed; "A/A" or
    "A/B": `models` timed in alternation, the first the ratios' reference."""

    target: str
    models: tuple
    inputs: str
    batch: int
    num_runs: int
    warmup: int
    openvino_int8_hint: str | None = None
    kind: str = "row"  # row | A/A | A/B
    refs: str = ""
    min_agreement: float = 0.0
    activation_rounding: bool = False  # the model rounds activations (BitLinear): judged by detections


@dataclass(frozen=True)
class TargetRow:
    """One model on one target. ok: agreed with PyTorch, timed; refused: disagreed, not timed; failed: see reason."""

    model: str
    target: str
    family: str
    device: str
    precision: str
    status: str
    reason: str = ""
    artifact: str = ""
    export_s: float | None = None
    file_bytes: int | None = None
    file_gz_bytes: int | None = None  # after zlib (measure.file_bytes)
    load_s: float | None = None
    inference_precision: str = ""
    notes: str = ""
    clock: str = ""
    agreement: Agreement | None = None
    latency: Latency | None = None
    memory: Memory | None = None
    accuracy: Accuracy | None = None
    map_error: str = ""
    map_skipped: str = ""
    traceback: str = ""

    def __post_init__(self):
        _need_status(self)
        ok = self.status == "ok"
        _need(ok == (self.latency is not None), self, "latency is measured exactly when the status is ok")
        if ok:
            _need(self.memory is not None and bool(self.clock), self, "an ok row has memory and its clock")
            _need(self.agreement is not None and self.agreement.passed, self, "an ok row agreed with PyTorch")
        if self.status == "refused":
            _need(self.agreement is not None and not self.agreement.passed, self, "a refused row failed agreement")
        _need(ok or self.accuracy is None, self, "only an ok row is validated")

    @classmethod
    def of(cls, t, model: str, **kw) -> TargetRow:  # t: backends.Target
        return cls(model=model, target=t.name, family=t.family, device=t.device, precision=t.precision, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> TargetRow:
        parts = {"agreement": Agreement, "latency": Latency, "memory": Memory, "accuracy": Accuracy}
        return cls(**{k: parts[k](**v) if k in parts and v is not None else v for k, v in d.items()})

    @property
    def memory_mb(self) -> float | None:
        """The memory figure shown: on CUDA the device memory added, else the peak RSS."""
        if self.memory is None:
            return None
        return self.memory.gpu_mem_mb if self.device == "cuda" else self.memory.peak_rss_mb

    @property
    def file_mb(self) -> float | None:
        """The file's size in MB of 10^6 bytes, as every size in this project is given."""
        return None if self.file_bytes is None else self.file_bytes / 1e6

    @property
    def file_gz_mb(self) -> float | None:
        return None if self.file_gz_bytes is None else self.file_gz_bytes / 1e6

    def figures(self) -> dict[str, float | None]:
        """Figure -> value (latency, memory, file size), for ratios."""
        parts = [asdict(p) for p in (self.latency, self.memory) if p is not None]
        return {**{k: v for p in parts for k, v in p.items()}, "file_bytes": self.file_bytes,
                "file_gz_bytes": self.file_gz_bytes}


@dataclass(frozen=True)
class ABResult:
    """One interleaved pass on one target: per model its latency and its paired median ratio to the first model
    over rotation cycles (measure.cycle_ratios) with the bootstrap interval."""

    target: str
    status: str
    reason: str = ""
    clock: str = ""
    stats: dict = field(default_factory=dict)  # model -> Latency
    paired_median_ratio: dict = field(default_factory=dict)  # model -> float
    ratio_interval: dict = field(default_factory=dict)  # model -> [lower, upper]
    kind: str = "A/B"

    def __post_init__(self):
        _need_status(self, ("ok", "failed"))
        _need(self.kind in ("A/A", "A/B"), self, "kind must be A/A or A/B")
        _need(self.status != "ok" or (self.stats and set(self.stats) == set(self.paired_median_ratio)
                                      == set(self.ratio_interval) and self.clock), self,
              "an ok pass has latency, a paired ratio and its interval for every model, and its clock")

    @classmethod
    def from_dict(cls, d: dict) -> ABResult:
        return cls(**{**d, "stats": {m: Latency(**s) for m, s in d["stats"].items()}})

    def ratio(self, model: str) -> tuple[float, float, float] | None:
        """(paired median, lower, upper) of `model` against the first model, or None."""
        if self.status != "ok" or model not in self.paired_median_ratio:
            return None
        return (self.paired_median_ratio[model], *self.ratio_interval[model])


@dataclass(frozen=True)
class Interleaved:
    """A target's A/A check and A/B pass; the A/B counts (ok) only where the A/A read 1.00 ± the tolerance."""

    target: str
    status: str
    reason: str = ""
    aa: ABResult | None = None
    ab: ABResult | None = None

    def __post_init__(self):
        _need_status(self)
        _need(self.status != "ok" or (self.aa is not None and self.aa.status == "ok" and self.ab is not None
                                      and self.ab.status == "ok"), self, "an ok target has both passes ok")

    @classmethod
    def judged(cls, target: str, aa: ABResult, ab: ABResult, tolerance: float) -> Interleaved:
        """The A/B pass counts only when both passes ran and the A/A reads 1.00 ± tolerance."""
        failed = "; ".join(f"{p.kind} pass failed: {p.reason}" for p in (aa, ab) if p.status != "ok")
        if failed:
            return cls(target, "failed", failed, aa, ab)
        if not within_band(aa.ratio("baseline-copy")[0], tolerance):
            return cls(target, "refused", f"A/A check read {ratio_text(aa.ratio('baseline-copy'))}, outside 1.00 ± "
                                          f"{tolerance:g}: this target's timing is biased here", aa, ab)
        return cls(target, "ok", "", aa, ab)

    @classmethod
    def from_dict(cls, d: dict) -> Interleaved:
        return cls(**{**d, **{k: ABResult.from_dict(d[k]) for k in ("aa", "ab") if d.get(k)}})

    def ratio(self) -> tuple[float, float, float] | None:
        """The accepted A/B ratio (quantized / baseline), None unless ok."""
        return self.ab.ratio("quantized") if self.status == "ok" else None

    def aa_ratio(self) -> tuple[float, float, float] | None:
        return self.aa.ratio("baseline-copy") if self.aa is not None else None


@dataclass(frozen=True)
class Skip:
    """A target that cannot run here, and why (one line, with how to enable it)."""

    target: str
    reason: str

    def __post_init__(self):
        if not self.reason:
            raise ValueError(f"skipped target {self.target} without a reason")

    def line(self) -> str:
        return f"skip {self.target}: {self.reason}"


@dataclass(frozen=True)
class Comparison:
    """Quantized vs baseline: ratios of the separate runs, of the accepted A/B pass, and the mAP50-95 difference."""

    kind: str
    quantized: str
    baseline: str
    ratios: dict
    interleaved_ratios: dict | None = None
    delta_map50_95: float | None = None


@dataclass(frozen=True)
class Environment:
    """The machine, the package versions, and the load average (1, 5, 15 min) before and after."""

    python: str
    machine: str
    cpu_count: int | None
    cpu_features: dict
    versions: dict
    loadavg_before: list
    loadavg_after_timing: list | None = None  # after timing, before the mAP validation's own load
    loadavg_after: list | None = None


@dataclass(frozen=True)
class BenchResult:
    """Everything one benchmark run measured (--json writes its asdict)."""

    schema: str = field(default=SCHEMA, init=False)
    created: str
    options: dict
    environment: Environment
    models: dict  # baseline | quantized -> deployable.PreparedModel
    skipped: list  # Skip
    rows: list  # TargetRow
    interleaved: list  # Interleaved
    comparisons: list  # Comparison
    workdir: str

    def ok_row(self, model: str, target: str) -> TargetRow | None:
        return next((r for r in self.rows if r.model == model and r.target == target and r.status == "ok"), None)


def interleaved_ratios(i: Interleaved) -> dict:
    """An accepted A/B pass's figures: latency ratios, the paired median ratio with its interval, and its A/A."""
    s, (med, lo, hi), (aa, aa_lo, aa_hi) = i.ab, i.ratio(), i.aa_ratio()
    return {**ratios(asdict(s.stats["quantized"]), asdict(s.stats["baseline"]), LATENCY_FIGURES),
            "paired_median": med, "paired_median_lo": lo, "paired_median_hi": hi, "aa_paired_median": aa,
            "aa_lo": aa_lo, "aa_hi": aa_hi}


def comparisons(rows: list[TargetRow], interleaved: list[Interleaved] = ()) -> list[Comparison]:
    """Quantized vs baseline on each target, then every quantized INT8 row vs each other baseline row on its device
    (the ternary model's INT8 deployment against the FP baseline and against the baseline's own INT8)."""
    ok = {(r.model, r.target): r for r in rows if r.status == "ok"}
    ab = {a.target: a for a in interleaved if a.status == "ok"}

    def pair(q: TargetRow, b: TargetRow, kind: str) -> Comparison:
        inter = interleaved_ratios(ab[q.target]) if q.target == b.target and q.target in ab else None
        dmap = q.accuracy.map50_95 - b.accuracy.map50_95 if q.accuracy and b.accuracy else None
        return Comparison(kind, q.target, b.target, ratios(q.figures(), b.figures()), inter, dmap)

    out = [pair(q, ok["baseline", t], "same target") for (m, t), q in ok.items() if m == "quantized"
           and ("baseline", t) in ok]
    return out + [pair(q, b, f"quantized int8 vs baseline {b.precision}") for (m, name), q in ok.items()
                  if m == "quantized" and q.precision == "int8" for (m2, name2), b in ok.items()
                  if m2 == "baseline" and name2 != name and b.device == q.device]


def ratio_text(r: tuple[float, float, float] | None) -> str:
    return "-" if r is None else f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"


def fmt_cell(v, spec):
    return "-" if v is None else format(v, spec)


# the table's sections: per column (header, width, number format or "" for text, value: an attribute / key path
# "a.b" of the row, or a function of it)
ROW_COLUMNS = (("model", 9, "", "model"), ("target", 17, "", "target"), ("prec", 5, "", "precision"),
               ("status", 8, "", "status"), ("max|Δ|", 8, ".3g", "agreement.max_abs"),
               ("agree", 5, ".2f", "agreement.det_agreement"), ("mean ms", 8, ".2f", "latency.mean_ms"),
               ("median", 8, ".2f", "latency.median_ms"), ("p95", 8, ".2f", "latency.p95_ms"),
               ("img/s", 7, ".1f", "latency.throughput_ips"), ("mem MiB", 7, ".0f", "memory_mb"),
               ("file MB", 7, ".2f", "file_mb"), ("gz MB", 6, ".2f", "file_gz_mb"),
               ("mAP", 6, ".4f", "accuracy.map50_95"))
INTERLEAVED_COLUMNS = (("interleaved", 17, "", "target"),
                       ("A/A copy / baseline", 22, "", lambda i: ratio_text(i.aa_ratio())),
                       ("A/B quantized / base", 22, "", lambda i: ratio_text(i.ab and i.ab.ratio("quantized"))),
                       ("status", 0, "", lambda i: i.status if i.status == "ok" else f"{i.status}: {i.reason}"))
COMPARISON_COLUMNS = (("quantized / baseline, separate runs", 36, "", lambda c: f"{c.quantized} / {c.baseline}"),
                      ("mean", 6, ".3f", "ratios.mean_ms"), ("median", 6, ".3f", "ratios.median_ms"),
                      ("p95", 6, ".3f", "ratios.p95_ms"), ("img/s", 6, ".3f", "ratios.throughput_ips"),
                      ("mem", 6, ".3f", lambda c: c.ratios.get("gpu_mem_mb", c.ratios.get("peak_rss_mb"))),
                      ("file", 6, ".3f", "ratios.file_bytes"), ("gz", 6, ".3f", "ratios.file_gz_bytes"),
                      ("ΔmAP", 7, "+.4f", "delta_map50_95"))


def _value(item, path):
    """path(item), or the attribute / key path "a.b" of item (None where a part is missing)."""
    if callable(path):
        return path(item)
    for name in path.split("."):
        item = item.get(name) if isinstance(item, dict) else getattr(item, name, None)
    return item


def _section(columns: tuple, items: list) -> list[str]:
    """Header, rule and one line per item: text left-aligned, numbers right-aligned ("-" where missing)."""
    head = " ".join(f"{h:{'>' if f else '<'}{w}}" for h, w, f, _ in columns)
    lines = [" ".join(f"{fmt_cell(_value(x, v), f) if f else _value(x, v):{'>' if f else '<'}{w}}"
                      for _, w, f, v in columns) for x in items]
    return [head, "-" * len(head), *lines]


def progress_line(item: TargetRow | Interleaved) -> str:
    """One row's or target's figures as the benchmark goes: its table cells after their headers, then why it is not
    ok."""
    row = isinstance(item, TargetRow)
    columns = ROW_COLUMNS[2:] if row else INTERLEAVED_COLUMNS[1:-1]
    cells = [f"{h} {fmt_cell(_value(item, v), f) if f else _value(item, v)}" for h, _, f, v in columns]
    head = f"{item.model if row else 'A/A, A/B':<9} {item.target:<17}"
    return f"{head} {'  '.join(cells)}" + ("" if item.status == "ok" else f"; {item.status}: {item.reason}")


def format_table(r: BenchResult) -> str:
    """The on-screen table: rows, interleaved ratios, ratios of the separate runs, then refusals and skips."""
    lines = _section(ROW_COLUMNS, r.rows)
    if r.interleaved:
        lines += ["", f"paired median ratio [{CI_TEXT}]; the A/B counts only where the A/A reads 1.00 ± "
                      f"{r.options.get('aa_tolerance', AA_TOLERANCE):g}", *_section(INTERLEAVED_COLUMNS, r.interleaved)]
    if r.comparisons:
        lines += ["", *_section(COMPARISON_COLUMNS, r.comparisons)]
    notes = [f"{x.status} {x.model} {x.target}: {x.reason}" for x in r.rows if x.status != "ok"]
    return "\n".join(lines + [""] + notes + [s.line() for s in r.skipped])
