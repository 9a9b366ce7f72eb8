"""Study files: what to train, under which execution configs, with which seeds.

A study is a TOML file (or a built-in preset). Parsing is strict: an unknown
key, a wrong type or an inconsistent matrix raises ``StudyError`` naming the
field and the fix, before anything touches the store.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from devicediff.errors import StudyError, did_you_mean
from devicediff.frameworks import FRAMEWORKS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib




# Named random streams, each with its own seed: weight init, batch order, in-training draws
# (portable dropout, devicediff.portable) and injected gradient noise (a config's grad_noise).
NOISE_SOURCES = ("init", "data", "dropout", "noise")
PRECISIONS = ("fp32", "bf16-autocast", "fp16-autocast")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class ExecConfig:
    """How the arithmetic is done. Never *what* is computed, except through
    ``params`` (per-config workload overrides, e.g. a planted fault), which the
    report always shows."""

    name: str
    framework: str = "torch"
    device: str = "cpu"
    threads: int | None = None
    cudnn: bool = True
    deterministic: bool = False
    tf32: bool | None = None  # None: the framework's default (PyTorch: on for cuDNN conv)
    cudnn_benchmark: bool = False
    matmul_precision: str | None = None  # torch.set_float32_matmul_precision
    compile: bool | str = False  # True = "default"; or "reduce-overhead", "max-autotune"
    channels_last: bool = False
    precision: str = "fp32"  # or "bf16-autocast", "fp16-autocast" (with dynamic gradient scaling)
    cuda_graphs: bool = False  # capture the training step in a CUDA graph
    grad_noise: dict[str, float] = field(default_factory=dict)  # {relative = 1e-7}: seeded noise on every gradient
    packages: tuple[str, ...] = ()  # e.g. ("torch==2.4.1", "numpy<2"): run in an environment of this package set
    env: dict[str, str] = field(default_factory=dict)
    python: str | None = None  # interpreter for this config's worker (another venv)
    params: dict[str, Any] = field(default_factory=dict)
    ray_resources: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def compile_mode(self) -> str | None:
        """None (eager) or the torch.compile mode."""
        return "default" if self.compile is True else (self.compile or None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["packages"] = list(self.packages)
        return d


@dataclass(frozen=True)
class Budget:
    epochs: int | None = None
    steps: int | None = None
    metric_every: int = 10
    eval_every_steps: int | None = None  # default: once per epoch and at the end
    checkpoint_every: int | None = None  # steps; None: every epoch for multi-epoch runs


@dataclass(frozen=True)
class Cell:
    """One run of the matrix: config × seed × repeat, with each noise source's seed."""

    config: ExecConfig
    seed: int
    init_seed: int
    data_seed: int
    repeat: int = 0
    dropout_seed: int = 0
    noise_seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.config.name}|seed={self.seed}|rep={self.repeat}"


@dataclass(frozen=True)
class Study:
    name: str
    workload: str
    workload_params: dict[str, Any]
    configs: tuple[ExecConfig, ...]
    reference: str
    seeds: tuple[int, ...]
    vary: tuple[str, ...]
    base_seed: int
    repeats: int
    budget: Budget
    description: str = ""
    margin: float | None = None  # equivalence margin (absolute) for verdicts
    margin_fraction: float = 0.5  # default margin as a fraction of the seed-noise sd
    primary: tuple[str, ...] = ()  # metrics the confirmatory verdict answers (default: the workload's)
    portable_random: bool = False  # swap the model's dropout for devicediff.portable's (same bits on every device)
    snapshots: bool = True  # keep a flat copy of the weights at every evaluation (the report's weight curves)
    source: str = ""  # file path or "preset:NAME"

    # -- identity ----------------------------------------------------------------
    def definition(self) -> dict[str, Any]:
        """What makes two studies the same study (no source path, no notes). Options added
        after the first release appear only when set, so older studies keep their ids."""
        d = {
            "workload": self.workload,
            "workload_params": self.workload_params,
            "configs": [
                {k: v for k, v in c.to_dict().items()
                 if k not in ("note", "ray_resources", "python") and not (k in _LATER and v == _LATER[k])}
                for c in self.configs
            ],
            "reference": self.reference,
            "vary": list(self.vary),
            "base_seed": self.base_seed,
            "budget": asdict(self.budget),
        }
        if self.portable_random:
            d["portable_random"] = True
        return d

    @property
    def study_id(self) -> str:
        blob = json.dumps({"name": self.name, **self.definition()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def directory(self) -> Path | None:
        """The study file's folder (``file.py:function`` workloads are relative to it);
        None for presets and stored studies."""
        return _source_dir(self.source)

    def config(self, name: str) -> ExecConfig:
        for c in self.configs:
            if c.name == name:
                return c
        names = [c.name for c in self.configs]
        raise StudyError(f"configs: no config named {name!r}{did_you_mean(name, names)}; choose one of {names}")

    def cell(self, config: ExecConfig, seed: int, repeat: int = 0) -> Cell:
        """The run of ``config`` at ``seed``: each noise source in ``vary`` takes the seed, the others ``base``."""
        s = {src: seed if src in self.vary else self.base_seed for src in NOISE_SOURCES}
        return Cell(config, seed, s["init"], s["data"], repeat, dropout_seed=s["dropout"], noise_seed=s["noise"])

    def cells(self) -> list[Cell]:
        """Seed-major order, so a partial study already has complete seed groups."""
        return [self.cell(cfg, seed, rep) for seed in self.seeds for rep in range(self.repeats) for cfg in self.configs]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "seeds": list(self.seeds),
            "repeats": self.repeats,
            "margin": self.margin,
            "margin_fraction": self.margin_fraction,
            "primary": list(self.primary),
            "snapshots": self.snapshots,
            **self.definition(),
        }


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------

_TOP_KEYS = {"name", "description", "workload", "configs", "reference", "seeds", "budget", "verdict", "portable_random",
             "snapshots"}
_WORKLOAD_KEYS = {"name"}  # plus arbitrary params
_SEEDS_KEYS = {"count", "list", "vary", "base", "repeats"}
_BUDGET_KEYS = {"epochs", "steps", "metric_every", "eval_every_steps", "checkpoint_every"}
_VERDICT_KEYS = {"margin", "margin_fraction", "primary"}
# ExecConfig fields added after the first release, with their defaults (see Study.definition).
_LATER = {"precision": "fp32", "cuda_graphs": False, "grad_noise": {}, "packages": []}
_CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "framework": (str,),
    "device": (str,),
    "threads": (int,),
    "cudnn": (bool,),
    "deterministic": (bool,),
    "tf32": (bool,),
    "cudnn_benchmark": (bool,),
    "matmul_precision": (str,),
    "compile": (bool, str),
    "channels_last": (bool,),
    "precision": (str,),
    "cuda_graphs": (bool,),
    "grad_noise": (dict,),
    "packages": (list,),
    "env": (dict,),
    "python": (str,),
    "params": (dict,),
    "ray_resources": (dict,),
    "note": (str,),
    "reference": (bool,),
}


def _check_keys(where: str, table: dict, allowed: set[str]) -> None:
    for k in table:
        if k not in allowed:
            raise StudyError(f"{where}: unknown key {k!r}{did_you_mean(k, allowed)}; allowed keys are {sorted(allowed)}")



def _want(where: str, value: Any, types: tuple[type, ...], hint: str = "") -> Any:
    ok = isinstance(value, types) and not (bool not in types and isinstance(value, bool))
    if not ok:
        names = " or ".join(t.__name__ for t in types)
        raise StudyError(f"{where}: expected {names}, got {type(value).__name__} {value!r}{hint}")
    return value


def _parse_config(i: int, raw: Any) -> tuple[ExecConfig, bool]:
    where = f"configs[{i}]"
    _want(where, raw, (dict,), "; write each config as a [[configs]] table")
    _check_keys(where, raw, set(_CONFIG_TYPES))
    for k, v in raw.items():
        _want(f"{where}.{k}", v, _CONFIG_TYPES[k])
    if "name" not in raw or not raw["name"].strip():
        raise StudyError(f"{where}.name: missing; give every config a unique name, e.g. name = \"cpu-4t\"")
    name = raw["name"]
    where = f"configs[{name!r}]"
    fw = raw.get("framework", "torch")
    if fw not in FRAMEWORKS:
        raise StudyError(f"{where}.framework: unknown framework {fw!r}; use one of {list(FRAMEWORKS)}")
    bad = FRAMEWORKS[fw].unsupported(raw)
    if bad:
        raise StudyError(f"{where}.{bad[0]}: the {fw} framework has no {bad[0]} option; remove it from this config")
    for pk, pv in raw.get("params", {}).items():
        allowed = FRAMEWORKS[fw].parameters.get(pk)
        if allowed is not None and pv not in allowed:
            raise StudyError(f"{where}.params.{pk}: {pv!r} unknown; use one of {list(allowed)}")
        if allowed is None and any(pk in f.parameters for f in FRAMEWORKS.values()):
            raise StudyError(f"{where}.params.{pk}: only {[f.name for f in FRAMEWORKS.values() if pk in f.parameters]} "
                             "configs read it; remove it from this config")
    dev = raw.get("device", "cpu")
    if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise StudyError(f"{where}.device: {dev!r} is not a device; use \"cpu\", \"cuda\" or \"cuda:N\"")
    threads = raw.get("threads")
    if threads is not None and threads < 1:
        raise StudyError(f"{where}.threads: must be >= 1, got {threads}")
    if dev == "cpu":
        for k in ("tf32", "cudnn_benchmark"):
            if raw.get(k):
                raise StudyError(f"{where}.{k}: only meaningful on a GPU; remove it or set device = \"cuda\"")
    for k in ("env",):
        for ek, ev in raw.get(k, {}).items():
            _want(f"{where}.env.{ek}", ev, (str,), "; environment values are strings")
    for rk, rv in raw.get("ray_resources", {}).items():
        _want(f"{where}.ray_resources.{rk}", rv, (int, float))
    mp = raw.get("matmul_precision")
    if mp is not None and mp not in ("highest", "high", "medium"):
        raise StudyError(f"{where}.matmul_precision: {mp!r}; use \"highest\", \"high\" or \"medium\"")
    _check_axes(where, raw, dev)
    kwargs = {k: v for k, v in raw.items() if k != "reference"}
    if "packages" in kwargs:
        kwargs["packages"] = tuple(kwargs["packages"])
    return ExecConfig(**kwargs), bool(raw.get("reference", False))


def _check_axes(where: str, raw: dict, device: str) -> None:
    """precision, compile modes, CUDA graphs, gradient noise and package sets."""
    prec = raw.get("precision", "fp32")
    if prec not in PRECISIONS:
        raise StudyError(f"{where}.precision: {prec!r} unknown; use one of {list(PRECISIONS)}")
    if prec == "fp16-autocast" and device == "cpu":
        raise StudyError(f"{where}.precision: fp16-autocast needs a GPU (PyTorch's CPU autocast is bfloat16); "
                         "use \"bf16-autocast\" on the CPU")
    comp = raw.get("compile", False)
    if isinstance(comp, str) and comp not in COMPILE_MODES:
        raise StudyError(f"{where}.compile: {comp!r} unknown; use true or one of {list(COMPILE_MODES)}")
    if raw.get("cuda_graphs") and device == "cpu":
        raise StudyError(f"{where}.cuda_graphs: only meaningful on a GPU; remove it or set device = \"cuda\"")
    noise = raw.get("grad_noise", {})
    for k, v in noise.items():
        if k != "relative":
            raise StudyError(f"{where}.grad_noise.{k}: unknown key; write grad_noise = {{ relative = 1e-7 }}")
        _want(f"{where}.grad_noise.relative", v, (int, float))
        if not 0 < v < 1:
            raise StudyError(f"{where}.grad_noise.relative: must be in (0, 1), got {v}")
    for p in raw.get("packages", []):
        _want(f"{where}.packages[]", p, (str,), "; write requirement strings, e.g. packages = [\"torch==2.4.1\"]")
        if not p.strip() or p.strip().startswith("-"):
            raise StudyError(f"{where}.packages: {p!r} is not a requirement; write e.g. \"torch==2.4.1\"")
    if raw.get("packages") and raw.get("python"):
        raise StudyError(f"{where}: give either python (an environment you made) or packages (one devicediff makes), not both")


def parse_study(doc: dict[str, Any], *, source: str = "") -> Study:
    """Validate a parsed TOML document and return a ``Study``."""
    _check_keys("study", doc, _TOP_KEYS)
    name = _want("name", doc.get("name", Path(source).stem if source else "study"), (str,))
    wname, wparams = _parse_workload(doc.get("workload"))
    configs, ref = _parse_configs(doc.get("configs"), doc.get("reference"))
    seeds, vary, base, repeats = _parse_seeds(doc.get("seeds", {"count": 3}))
    study = Study(
        name=name,
        workload=wname,
        workload_params=wparams,
        configs=configs,
        reference=ref,
        seeds=seeds,
        vary=vary,
        base_seed=base,
        repeats=repeats,
        budget=_parse_budget(doc.get("budget", {"epochs": 1})),
        description=_want("description", doc.get("description", ""), (str,)),
        **_parse_verdict(doc.get("verdict", {})),
        portable_random=_want("portable_random", doc.get("portable_random", False), (bool,)),
        snapshots=_want("snapshots", doc.get("snapshots", True), (bool,)),
        source=source,
    )
    # The workload must exist: resolve it now so a typo fails before any run.
    from devicediff.workloads import check_workload_name, resolve_workload_name

    check_workload_name(resolve_workload_name(study.workload, study.directory))
    return study


def _parse_workload(wl: Any) -> tuple[str, dict[str, Any]]:
    if wl is None:
        raise StudyError("workload: missing; add a [workload] table with name = \"autoencoder\" (or module:function)")
    if isinstance(wl, str):
        wl = {"name": wl}
    _want("workload", wl, (dict,))
    if "name" not in wl:
        raise StudyError("workload.name: missing; e.g. name = \"autoencoder\", \"prednet\" or \"mypkg.mod:make\"")
    wname = _want("workload.name", wl["name"], (str,))
    wparams = {k: v for k, v in wl.items() if k != "name"}
    for k in wparams:
        owners = [f.name for f in FRAMEWORKS.values() if k in f.parameters]
        if owners:
            raise StudyError(f"workload.{k}: only {owners} configs read it; set it in those configs' params, "
                             f"e.g. params = {{ {k} = {FRAMEWORKS[owners[0]].parameters[k][0]!r} }}")
    return wname, wparams


def _parse_configs(raw_configs: Any, ref: Any) -> tuple[tuple[ExecConfig, ...], str]:
    """The configs and the reference's name (``reference = "NAME"`` or one ``reference = true``)."""
    if not raw_configs:
        raise StudyError("configs: missing or empty; add at least two [[configs]] tables, one with reference = true")
    _want("configs", raw_configs, (list,))
    parsed = [_parse_config(i, c) for i, c in enumerate(raw_configs)]
    configs = tuple(c for c, _ in parsed)
    names = [c.name for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StudyError(f"configs: duplicate config name(s) {dup}; every config needs a unique name")
    flagged = [c.name for c, is_ref in parsed if is_ref]
    if ref is not None:
        _want("reference", ref, (str,))
        if ref not in names:
            raise StudyError(f"reference: {ref!r} is not a config name{did_you_mean(ref, names)}; use one of {names}")
        if flagged and flagged != [ref]:
            raise StudyError(f"reference: {ref!r} disagrees with configs marked reference = true {flagged}; keep one")
        return configs, ref
    if len(flagged) > 1:
        raise StudyError(f"configs: {flagged} are all marked reference = true; mark exactly one")
    if not flagged:
        raise StudyError("reference: no reference config; set reference = \"NAME\" or reference = true in one [[configs]]")
    return configs, flagged[0]


def _parse_seeds(seeds_raw: Any) -> tuple[tuple[int, ...], tuple[str, ...], int, int]:
    """``(seeds, vary, base, repeats)`` from ``seeds = 5``, ``seeds = [0, 1]`` or a ``[seeds]`` table."""
    if isinstance(seeds_raw, int) and not isinstance(seeds_raw, bool):
        seeds_raw = {"count": seeds_raw}
    elif isinstance(seeds_raw, list):
        seeds_raw = {"list": seeds_raw}
    _want("seeds", seeds_raw, (dict,), "; use seeds = 5, seeds = [0, 1, 2] or a [seeds] table")
    _check_keys("seeds", seeds_raw, _SEEDS_KEYS)
    base = _want("seeds.base", seeds_raw.get("base", 0), (int,))
    if "list" in seeds_raw and "count" in seeds_raw:
        raise StudyError("seeds: give either count or list, not both")
    if "list" in seeds_raw:
        seeds = _want("seeds.list", seeds_raw["list"], (list,))
        for s in seeds:
            _want("seeds.list[]", s, (int,))
        if len(seeds) < 1:
            raise StudyError("seeds.list: must hold at least one seed, e.g. [0, 1, 2]")
        if len(set(seeds)) != len(seeds):
            raise StudyError("seeds.list: seeds must be distinct")
        seeds = tuple(seeds)
    else:
        count = _want("seeds.count", seeds_raw.get("count", 3), (int,))
        if count < 1:
            raise StudyError(f"seeds.count: must be >= 1, got {count}")
        seeds = tuple(range(base, base + count))
    vary = seeds_raw.get("vary", ["init", "data"])
    vary = [vary] if isinstance(vary, str) else vary
    _want("seeds.vary", vary, (list,))
    for v in vary:
        if v not in NOISE_SOURCES:
            raise StudyError(f"seeds.vary: unknown noise source {v!r}; use any of {list(NOISE_SOURCES)}")
    repeats = _want("seeds.repeats", seeds_raw.get("repeats", 1), (int,))
    if repeats < 1:
        raise StudyError(f"seeds.repeats: must be >= 1, got {repeats}")
    return seeds, tuple(vary), base, repeats


def _parse_budget(b: Any) -> Budget:
    _want("budget", b, (dict,))
    _check_keys("budget", b, _BUDGET_KEYS)
    for k in b:
        _want(f"budget.{k}", b[k], (int,))
        if b[k] < 1:
            raise StudyError(f"budget.{k}: must be >= 1, got {b[k]}")
    if "epochs" in b and "steps" in b:
        raise StudyError("budget: give either epochs or steps, not both")
    if "epochs" not in b and "steps" not in b:
        raise StudyError("budget: give epochs = N or steps = N")
    return Budget(**b)


def _parse_verdict(verdict: Any) -> dict[str, Any]:
    """``margin``, ``margin_fraction`` and ``primary`` of the ``[verdict]`` table."""
    _want("verdict", verdict, (dict,))
    _check_keys("verdict", verdict, _VERDICT_KEYS)
    margin = verdict.get("margin")
    if margin is not None:
        _want("verdict.margin", margin, (int, float))
        if margin <= 0:
            raise StudyError("verdict.margin: must be > 0")
    mf = _want("verdict.margin_fraction", verdict.get("margin_fraction", 0.5), (int, float))
    if mf <= 0:
        raise StudyError("verdict.margin_fraction: must be > 0")
    primary = verdict.get("primary", [])
    primary = [primary] if isinstance(primary, str) else primary
    _want("verdict.primary", primary, (list,), "; e.g. primary = [\"eval_mse\"]")
    for m in primary:
        _want("verdict.primary[]", m, (str,))
    return {"margin": float(margin) if margin is not None else None, "margin_fraction": float(mf),
            "primary": tuple(primary)}


def _source_dir(source: str) -> Path | None:
    return Path(source).parent if source and not source.startswith(("preset:", "store")) else None


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as workload overrides; a VALUE that parses as JSON
    (``3``, ``1e-3``, ``[1, 16]``, ``true``, ``"text"``) is taken as such, else as a string."""
    out: dict[str, Any] = {}
    for kv in pairs or []:
        if "=" not in kv:
            raise StudyError(f"--set {kv!r}: write KEY=VALUE, e.g. --set train_size=1000")
        k, v = kv.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("devicediff.presets").iterdir() if p.name.endswith(".toml"))


def preset_text(name: str) -> str:
    return resources.files("devicediff.presets").joinpath(f"{name}.toml").read_text()


def load_study(spec: str | Path, *, overrides: dict[str, Any] | None = None) -> Study:
    """Load a study from a TOML path or a built-in preset name."""
    spec = str(spec)
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise StudyError(f"study: file {spec!r} not found; give a .toml path or one of the presets {preset_names()}")
        text, source = path.read_text(), str(path)
    elif spec in preset_names():
        text, source = preset_text(spec), f"preset:{spec}"
    else:
        raise StudyError(f"study: {spec!r} is neither a file nor a preset{did_you_mean(spec, preset_names())}; "
                         f"presets are {preset_names()}")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"study {source}: not valid TOML ({e})") from None
    if overrides:
        doc.setdefault("workload", {}).update(overrides)
    return parse_study(doc, source=source)


def study_from_definition(name: str, d: dict[str, Any]) -> Study:
    """Rebuild a ``Study`` from the definition stored with its runs (``Study.to_dict``)."""
    configs = []
    for c in d["configs"]:
        c = {k: v for k, v in c.items() if v is not None and k not in ("ray_resources", "python")}
        configs.append(c)
    doc = {
        "name": name,
        "description": d.get("description", ""),
        "workload": {"name": d["workload"], **d.get("workload_params", {})},
        "configs": configs,
        "reference": d["reference"],
        "seeds": {"list": list(d["seeds"]), "vary": list(d["vary"]), "repeats": d.get("repeats", 1),
                  "base": d.get("base_seed", 0)},
        "budget": {k: v for k, v in d["budget"].items() if v is not None},
        "verdict": {k: d[k] for k in ("margin", "margin_fraction", "primary") if d.get(k) is not None},
        **({"portable_random": True} if d.get("portable_random") else {}),
        **({"snapshots": False} if d.get("snapshots") is False else {}),
    }
    study = parse_study(doc, source="store")
    return study
