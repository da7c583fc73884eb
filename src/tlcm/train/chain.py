"""Chains: several distillation phases run one after another, each starting from the previous phase's LoRA.

The TLCM paper trains in four phases (stage 1 -> stage 2 -> preference learning -> DMD + GAN). A chain file
(``src/tlcm/configs/chains/NAME.yaml``, or any YAML path) lists them::

    phases:
      - name: stage1
        preset: toy-mlcd          # a single-run preset (src/tlcm/configs/)
        set: {max_steps: 800}     # keys applied after the preset
      - name: stage2
        preset: toy-tlcm
      ...

``tlcm distill --preset NAME --data D --output-dir OUT`` runs a chain: phase ``i`` writes ``OUT/<i>-<name>/``, and
phase ``i > 1`` starts from phase ``i - 1``'s output (``init_lora``). Config layers per phase, later wins: the phase's
preset -> its ``set:`` -> ``--config`` -> flags -> ``--set KEY=V`` (every phase) -> ``--set NAME.KEY=V`` (that phase).

Re-running the command resumes where it stopped: a finished phase is skipped, an interrupted one resumes from its
latest checkpoint (one killed before its first checkpoint starts again), the rest start. The config each phase was
asked for is recorded in ``OUT/chain.json``; a phase that has started (checkpoints or output) must be asked for the
same config again, or the chain stops with the keys that differ (a changed earlier phase would silently invalidate
every later one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tlcm.errors import TLCMError
from tlcm.train.config import (
    DistillConfig,
    apply_mapping,
    apply_overrides,
    load_yaml,
    preset_names,
    preset_path,
    validate_config,
)

CHAIN_FILE = "chain.json"
# keys that do not change what a phase computes: they may differ on a re-run
IDENTITY_FREE = {"output_dir", "init_lora", "device", "logging_steps", "checkpointing_steps", "checkpoints_total_limit",
                 "validation_steps", "validation_prompts", "validation_num_steps"}


@dataclass(frozen=True)
class ChainPhase:
    name: str
    preset: str
    settings: dict[str, Any] = field(default_factory=dict)


def chain_names() -> list[str]:
    root = resources.files("tlcm") / "configs" / "chains"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")) if root.is_dir() else []


def is_chain(name: str | None) -> bool:
    """A shipped chain name, or a YAML file with a ``phases:`` list."""
    if not name:
        return False
    if name in chain_names():
        return True
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        data = yaml.safe_load(p.read_text()) or {}
        return isinstance(data, dict) and "phases" in data
    return False


def load_chain(name: str) -> list[ChainPhase]:
    path = Path(str(resources.files("tlcm") / "configs" / "chains" / f"{name}.yaml")) \
        if name in chain_names() else Path(name)
    data = load_yaml(path)
    phases = data.get("phases") if isinstance(data, dict) else None
    if not isinstance(phases, list) or not phases:
        raise TLCMError(f"chain {name!r} has no 'phases:' list", "list phases as - {name: N, preset: P, set: {...}}")
    out, seen = [], set()
    for i, item in enumerate(phases):
        if not isinstance(item, dict) or not item.get("name") or not item.get("preset"):
            raise TLCMError(f"chain {name!r}: phase {i + 1} needs a name and a preset", "write - {name: N, preset: P}")
        pname = str(item["name"])
        if pname in seen or "." in pname:
            raise TLCMError(f"chain {name!r}: phase name {pname!r} is repeated or contains '.'", "rename the phase")
        seen.add(pname)
        if item["preset"] not in preset_names():
            raise TLCMError(f"chain {name!r}: phase {pname!r} names unknown preset {item['preset']!r}",
                            f"use one of: {', '.join(preset_names())}")
        unknown = set(item) - {"name", "preset", "set"}
        if unknown:
            raise TLCMError(f"chain {name!r}: phase {pname!r} has unknown keys {sorted(unknown)}",
                            "a phase has name, preset and set")
        out.append(ChainPhase(pname, str(item["preset"]), dict(item.get("set") or {})))
    return out


def phase_dir(root: str | Path, index: int, phase: ChainPhase) -> Path:
    return Path(root) / f"{index + 1}-{phase.name}"


def resolve_chain(name: str, config_file: str | None = None, flags: dict[str, Any] | None = None,
                  overrides: list[str] | None = None) -> list[tuple[ChainPhase, DistillConfig]]:
    """Every phase's config (see the module docstring for the layers); ``flags["output_dir"]`` is the chain's root."""
    phases = load_chain(name)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    root = flags.pop("output_dir", None)
    if not root:
        raise TLCMError("no output directory given", "pass --output-dir DIR (each phase writes DIR/<n>-<name>)")
    names = {p.name for p in phases}
    common, per_phase = [], {n: [] for n in names}
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        head = key.split(".", 1)[0]
        if head in names and "." in key:
            per_phase[head].append(item[len(head) + 1:].lstrip())
        else:
            common.append(item)
    out = []
    for i, phase in enumerate(phases):
        cfg = DistillConfig()
        apply_mapping(cfg, load_yaml(preset_path(phase.preset)), f"preset {phase.preset}")
        apply_mapping(cfg, phase.settings, f"chain phase {phase.name}")
        if config_file:
            apply_mapping(cfg, load_yaml(config_file), config_file)
        apply_mapping(cfg, flags, "command-line flags")
        apply_overrides(cfg, common)
        apply_overrides(cfg, per_phase[phase.name])
        cfg.output_dir = str(phase_dir(root, i, phase))
        if i > 0:
            cfg.init_lora = str(phase_dir(root, i - 1, phases[i - 1]))
        out.append((phase, cfg))
    return out


def _identity(cfg: DistillConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in IDENTITY_FREE}


def phase_status(cfg: DistillConfig) -> str:
    """``done`` (output written at ``max_steps``), ``partial`` (checkpoints, no output) or ``new``."""
    from tlcm.train.loop import latest_checkpoint

    out = Path(cfg.output_dir)
    summary = out / "train_summary.json"
    if summary.is_file() and (out / "adapter" / "adapter_config.json").is_file():
        steps = json.loads(summary.read_text()).get("steps")
        if steps == cfg.max_steps:
            return "done"
    return "partial" if latest_checkpoint(out) is not None or summary.is_file() else "new"


def check_chain(root: str | Path, plan: list[tuple[ChainPhase, DistillConfig]]) -> list[str]:
    """Each phase's status; raises :class:`TLCMError` when a started phase is now asked for another config."""
    recorded = {}
    record = Path(root) / CHAIN_FILE
    if record.is_file():
        recorded = {p["name"]: p for p in json.loads(record.read_text()).get("phases", [])}
    statuses = []
    for i, (phase, cfg) in enumerate(plan):
        status = phase_status(cfg)
        if status != "new" and any(s != "done" for s in statuses):
            raise TLCMError(f"{cfg.output_dir} holds a started phase {phase.name}, but an earlier phase is not "
                            "finished: it would start from a LoRA that is about to change",
                            f"delete {cfg.output_dir} (and the phases after it) and run the chain again")
        old = recorded.get(phase.name)
        if status != "new":
            if old is None or old.get("index") != i:
                raise TLCMError(f"{cfg.output_dir} holds a started run that {record} does not describe as phase "
                                f"{i + 1} ({phase.name})", "use a new --output-dir, or delete that folder")
            new = _identity(cfg)
            diff = sorted(k for k in set(new) | set(old["config"]) if new.get(k) != old["config"].get(k))
            if diff:
                changes = ", ".join(f"{k}: {old['config'].get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
                raise TLCMError(f"chain phase {phase.name} ({cfg.output_dir}) was started with another config "
                                f"({changes})", f"run it with the recorded settings, use a new --output-dir, or "
                                f"delete {cfg.output_dir} and the phases after it to retrain from there")
        statuses.append(status)
    return statuses


def write_record(root: str | Path, name: str, plan: list[tuple[ChainPhase, DistillConfig]]) -> None:
    from tlcm.data.shards import atomic_write_bytes

    data = {"chain": name, "phases": [{"index": i, "name": phase.name, "preset": phase.preset,
                                       "output_dir": cfg.output_dir, "config": _identity(cfg)}
                                      for i, (phase, cfg) in enumerate(plan)]}
    atomic_write_bytes(Path(root) / CHAIN_FILE, json.dumps(data, indent=1, default=str).encode())


def chain_plan_text(name: str, plan: list[tuple[ChainPhase, DistillConfig]]) -> str:
    from tlcm.train.loop import plan_text

    blocks = [f"chain {name}: {len(plan)} phases, each from the previous one's LoRA"]
    for i, (phase, cfg) in enumerate(plan):
        blocks.append(f"\n== phase {i + 1}: {phase.name} (preset {phase.preset}) -> {cfg.output_dir}\n"
                      + plan_text(cfg))
    return "\n".join(blocks)


def run_chain(name: str, config_file: str | None = None, flags: dict[str, Any] | None = None,
              overrides: list[str] | None = None, progress: bool = True, log_with: str | None = "tensorboard",
              dry_run: bool = False) -> Path:
    """Run (or resume) every phase of the chain; return the last phase's output folder."""
    import os

    from tlcm.train.loop import distill

    plan = resolve_chain(name, config_file, flags, overrides)
    root = Path(plan[0][1].output_dir).parent
    for i, (_, cfg) in enumerate(plan):  # every phase's config is checked before the first one runs
        validate_config(cfg, need_data=not dry_run, need_output=True, check_init=i == 0)
    if dry_run:
        print(chain_plan_text(name, plan))
        return Path(plan[-1][1].output_dir)
    statuses = check_chain(root, plan)
    main = os.environ.get("RANK", "0") == "0"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        write_record(root, name, plan)
    for (phase, cfg), status in zip(plan, statuses):
        if status == "done":
            if main:
                print(f"chain {name}: phase {phase.name} already done ({cfg.output_dir}), skipped")
            continue
        resume = "latest" if status == "partial" and _has_checkpoint(cfg) else None
        if main:
            print(f"chain {name}: phase {phase.name} ({phase.preset}, {cfg.max_steps} steps)"
                  + (", resuming" if resume else ""))
        # without a checkpoint there is nothing to continue: a phase killed before its first checkpoint starts anew
        # (overwrite: the folder is this chain's own, and check_chain compared a started phase's config)
        distill(cfg, resume=resume, overwrite=resume is None, progress=progress, log_with=log_with)
    return Path(plan[-1][1].output_dir)


def _has_checkpoint(cfg: DistillConfig) -> bool:
    from tlcm.train.loop import latest_checkpoint

    return latest_checkpoint(cfg.output_dir) is not None


__all__ = ["ChainPhase", "chain_names", "check_chain", "is_chain", "load_chain", "phase_status", "resolve_chain",
           "run_chain"]
