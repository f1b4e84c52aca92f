"""Any PEFT tuner from its own config file, run through the same loop, records and analysis as every method.

    python -m bench method=peft method.config=path/to/adapter_config.json
    python -m bench method=peft method.config=path/to/experiment_folder   # PEFT's method-comparison layout

A folder holds `adapter_config.json` and optionally `training_params.json` (PEFT's method comparison; its README
calls it `training_parameters.json`, both are read). The training parameters that have a deltabench key are
mapped onto it by bench/run.py (TRAINING_KEYS below); a key given on the command line wins over the file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from methods.base import WrapContext, head_parameter_count
from methods.peft_tuners import PeftTuner

REPO = Path(__file__).resolve().parents[1]
ADAPTER_FILE = "adapter_config.json"
TRAINING_FILES = ("training_params.json", "training_parameters.json")

#: PEFT method-comparison training parameter -> deltabench config key (dotted); the rest are the task's, model's
#: or protocol's business and are reported as ignored.
TRAINING_KEYS = {
    "optimizer_kwargs.lr": "method.lr",
    "optimizer_kwargs.weight_decay": "train.weight_decay",
    "max_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "batch_size_eval": "train.eval_batch_size",
    "eval_steps": "train.eval_every",
    "grad_norm_clip": "train.max_grad_norm",
    "lr_scheduler": "train.lr_schedule",  # "cosine"; PEFT's null (a constant lr) keeps the protocol's schedule
    "seed": "seed",
}


def resolve_path(path: str | Path) -> Path:
    """A config path as typed: relative to the working directory, else to the deltabench checkout (whose
    examples/peft/ holds the shipped experiment folders)."""
    p = Path(path).expanduser()
    for candidate in (p, REPO / p) if not p.is_absolute() else (p,):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"method.config={path}: no such file or folder (looked in {Path.cwd()} and {REPO}); "
                            f"give an adapter_config.json or a folder holding one, e.g. examples/peft/loha/rank8")


def adapter_config_file(path: str | Path) -> Path:
    p = resolve_path(path)
    if p.is_dir():
        if not (p / ADAPTER_FILE).exists():
            raise FileNotFoundError(f"method.config={path}: the folder has no {ADAPTER_FILE} (PEFT's full-finetuning "
                                    f"experiments have none: run method=full with their training_params.json)")
        return p / ADAPTER_FILE
    return p


def experiment_name(path: str | Path) -> str:
    """`<tuner>/<variant>` as PEFT's method comparison names an experiment (the folder and its parent), or the
    file's stem for a config file that sits outside such a folder."""
    p = Path(path)
    folder = p if p.suffix != ".json" else p.parent
    if p.suffix == ".json" and p.name != ADAPTER_FILE:
        return p.stem
    parts = [x for x in folder.parts[-2:] if x not in ("", ".", "/")]
    return "/".join(parts) or p.stem


def training_file(path: str | Path) -> Path | None:
    """The experiment folder's training parameters file, if any (for a folder or its adapter_config.json)."""
    p = resolve_path(path)
    if not (p.is_dir() or p.name == ADAPTER_FILE):
        return None  # a config file on its own has no experiment folder
    folder = p if p.is_dir() else p.parent
    return next((folder / n for n in TRAINING_FILES if (folder / n).exists()), None)


def training_params(path: str | Path) -> dict[str, Any]:
    """The experiment folder's training parameters ({} for a bare config file or a folder without them)."""
    file = training_file(path)
    return json.loads(file.read_text()) if file else {}


def training_overrides(params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Map PEFT training parameters onto deltabench keys: ({dotted key: value}, [ignored parameter names])."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict) and key == "optimizer_kwargs":
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    if flat.get("optimizer_type", "AdamW") != "AdamW":
        raise ValueError(f"optimizer_type={flat['optimizer_type']!r}: deltabench trains PEFT configs with AdamW; "
                         f"remove the key or use the method whose optimizer it is (e.g. method=lora_pro)")
    flat.pop("optimizer_type", None)
    mapped = {TRAINING_KEYS[k]: v for k, v in flat.items() if k in TRAINING_KEYS and v is not None}
    return mapped, sorted(k for k in flat if k not in TRAINING_KEYS)


def config_digest(path: str | Path) -> str:
    """A hash of the files a config path stands for, so that an edited file is a new cell, not a skipped one."""
    files = [adapter_config_file(path), *filter(None, [training_file(path)])]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def load_peft_config(path: str | Path) -> PeftConfig:
    """PEFT's own config class for the file's peft_type; PEFT's complaint is passed on with the path."""
    file = adapter_config_file(path)
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not JSON ({e})") from e
    kind = raw.get("peft_type")
    if kind not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"{file}: peft_type={kind!r} is not a tuner of this PEFT; "
                         f"known: {', '.join(sorted(map(str, PEFT_TYPE_TO_CONFIG_MAPPING)))}")
    try:
        return PeftConfig.from_pretrained(str(file.parent)) if file.name == ADAPTER_FILE \
            else PEFT_TYPE_TO_CONFIG_MAPPING[kind](**{k: v for k, v in raw.items() if k != "peft_type"})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: PEFT rejected the config: {e}") from e


class PeftConfigMethod(PeftTuner):
    """A PEFT tuner exactly as its `adapter_config.json` says: `get_peft_model(model, config)`, with the task head
    added to `modules_to_save` (every method trains it) and nothing else changed. ΔW is PEFT's own merge, run on a
    float64 copy of each layer; prompt-learning configs (prompt/prefix/P-tuning) have no ΔW.

    Mangrulkar et al., "PEFT: State-of-the-art Parameter-Efficient Fine-Tuning methods" (huggingface/peft, used at
    the installed version; its method comparison's experiment layout: huggingface/peft @
    5d602fdbff04c33c1c4de55cda9d4ae1d7cb7e40, method_comparison/MetaMathQA/experiments).

    Args:
        lr: learning rate (AdamW); a folder's training_params.json sets it through bench/run.py.
        config: an adapter_config.json, or a folder holding one (and optionally training_params.json).
        target_modules: overrides the config's target_modules; null keeps them (and where the config has none,
            PEFT picks its default for the architecture, as get_peft_model does).
        fallback_target_modules: where neither the config nor PEFT names any (PEFT has no default for ViT or a
            UNet), these: the model's own default (model.target_modules).
    """

    family = "peft config"

    def __init__(self, lr: float, config: str, target_modules: Sequence[str] | None = None,
                 fallback_target_modules: Sequence[str] | None = None) -> None:
        self.config = load_peft_config(config)
        self.config_path = str(config)
        if target_modules is not None:
            self.config.target_modules = list(target_modules)
        super().__init__(lr=lr, target_modules=list(getattr(self.config, "target_modules", None) or []))
        self.fallback = list(fallback_target_modules) if fallback_target_modules else None
        self.prompt_learning = bool(self.config.is_prompt_learning)
        self.mergeable = not self.prompt_learning  # virtual tokens are not a weight update
        init = next((getattr(self.config, k) for k in ("init_weights", "init_lora_weights", "init_ia3_weights")
                     if hasattr(self.config, k)), True)
        self.init_equals_base = not self.prompt_learning and init is not False  # False: random init (FourierFT)
        # inits that rewrite the base weight (PiSSA, OLoRA, LoftQ, ...): W0 must be read before PEFT wraps
        self.rewrites_base = isinstance(getattr(self.config, "init_lora_weights", None), str) \
            and self.config.init_lora_weights != "gaussian"

    @property
    def peft_type(self) -> str:
        return str(self.config.peft_type.value)

    def resolved_config(self, model: nn.Module, ctx: WrapContext) -> PeftConfig:
        """The config PEFT will apply to `model`: heads in modules_to_save, default target modules filled in."""
        cfg = copy.deepcopy(self.config)
        if ctx.head_modules and not self.prompt_learning:
            cfg.modules_to_save = sorted(set(cfg.modules_to_save or []) | set(ctx.head_modules))
        if self.prompt_learning and cfg.task_type is None:  # PEFT's prompt learners need to know the model kind
            cfg.task_type = "SEQ_CLS" if ctx.head_modules else "CAUSAL_LM"
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if not self.prompt_learning and cfg.target_modules is None:
            default = _default_modules(self.peft_type, "TARGET", model_type) or self.fallback
            if default is None:
                raise ValueError(f"{self.config_path}: PEFT has no default target_modules for model type "
                                 f"{model_type!r}; set them in the file or with method.target_modules=[...]")
            cfg.target_modules = default
        if self.peft_type == "IA3" and cfg.feedforward_modules is None:  # IA³ scales these layers' inputs
            cfg.feedforward_modules = _default_modules("IA3", "FEEDFORWARD", model_type) or set()
        return cfg

    def target_layers(self, model: nn.Module, ctx: WrapContext,
                      cfg: PeftConfig | None = None) -> dict[str, nn.Module]:
        """The layers PEFT's own matching rule (check_target_module_exists) adapts under `cfg` (default: the
        resolved config); none for prompt learning."""
        if self.prompt_learning:
            return {}
        cfg = cfg or self.resolved_config(model, ctx)
        if cfg.target_modules == "all-linear":
            skip = set(ctx.head_modules) | {"lm_head"}
            return {n: m for n, m in model.named_modules()
                    if isinstance(m, nn.Linear) and not any(n == h or n.startswith(h + ".") for h in skip)}
        found = {n: m for n, m in model.named_modules() if n and check_target_module_exists(cfg, n)}
        if not found:
            raise ValueError(f"{self.config_path}: target_modules={sorted(cfg.target_modules)} match no module of "
                             f"{type(model).__name__}; set method.target_modules to names from model.named_modules()")
        return found

    def prepare(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        layers = self.target_layers(model, ctx)
        snapshot = {n: m.weight.detach().to("cpu", torch.float32, copy=True)
                    for n, m in layers.items()} if self.rewrites_base else {}
        wrapped = self.wrap(model, ctx)
        adapted = self.tuner_layers(wrapped)
        if set(adapted) != set(layers):  # our reading of PEFT's matching rule must agree with what PEFT did
            raise RuntimeError(f"{self.config_path}: PEFT adapted {sorted(set(adapted) - set(layers))[:3]} and "
                               f"skipped {sorted(set(layers) - set(adapted))[:3]} against the predicted layers")
        self._w0 = snapshot or {n: layer.get_base_layer().weight.detach().to("cpu", torch.float32, copy=True)
                                for n, layer in adapted.items()}
        return wrapped

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        try:
            return get_peft_model(model, self.resolved_config(model, ctx))
        except (TypeError, ValueError, NotImplementedError) as e:
            raise ValueError(f"{self.config_path}: PEFT rejected the config for {type(model).__name__}: {e}") from e

    def merge(self, model: nn.Module) -> nn.Module:
        if self.prompt_learning:
            raise NotImplementedError(f"{self.peft_type} adds virtual tokens: there is no weight update to merge")
        return super().merge(model)

    def delta_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {} if self.prompt_learning else super().delta_weights(model)

    # ------------------------------------------------------------ the count each tuner's paper gives
    def expected_trainable(self, model: nn.Module, ctx: WrapContext) -> int:
        cfg = self.resolved_config(model, ctx)
        heads = head_parameter_count(model, ctx)
        if self.prompt_learning:
            return heads + self._prompt_count(model, cfg)
        return heads + sum(self.layer_trainable(layer, name, cfg)
                           for name, layer in self.target_layers(model, ctx, cfg).items())

    def layer_trainable(self, base: nn.Linear, name: str = "", cfg: PeftConfig | None = None) -> int:
        """Trainable parameters one Linear gets from this tuner: the tuner paper's formula (no PEFT code)."""
        cfg = cfg or self.config
        m, n = base.out_features, base.in_features
        kind = self.peft_type
        if kind == "LORA":
            r = cfg.rank_pattern.get(name.rsplit(".", 1)[-1], cfg.r) if cfg.rank_pattern else cfg.r
            return r * (m + n) + (m if cfg.use_dora else 0)
        if kind == "LOHA":  # ΔW = (B1 A1) ⊙ (B2 A2): two rank-r pairs
            return 2 * cfg.r * (m + n)
        if kind == "LOKR":  # ΔW = W1 ⊗ (B A), the Kronecker factors of the LyCORIS paper's factorisation
            return _lokr_count(m, n, cfg)
        if kind == "IA3":  # a learned scaling of the input (feed-forward layers) or of the output features
            ff = cfg.feedforward_modules or []
            is_ff = bool(re.fullmatch(ff, name)) if isinstance(ff, str) else any(name.endswith(k) for k in ff)
            return n if is_ff else m
        if kind == "FOURIERFT":  # n learned spectral coefficients at fixed random frequencies
            return int(cfg.n_frequency_pattern.get(name.rsplit(".", 1)[-1], cfg.n_frequency))
        if kind == "VERA":  # shared frozen A, B; scaling vectors b (m) and d (r)
            return m + cfg.r
        raise NotImplementedError(f"no parameter-count formula for PEFT {kind}; the record counts what PEFT trains")

    @staticmethod
    def _prompt_count(model: nn.Module, cfg: PeftConfig) -> int:
        """Virtual-token embeddings: tokens × hidden size (prompt tuning), ×2·layers for prefix tuning's keys and
        values; P-tuning adds its prompt encoder, whose size this formula does not give."""
        hidden = model.config.hidden_size
        tokens = cfg.num_virtual_tokens
        if cfg.peft_type.value == "PROMPT_TUNING":
            return tokens * hidden
        if cfg.peft_type.value == "PREFIX_TUNING" and not cfg.prefix_projection:
            return tokens * 2 * model.config.num_hidden_layers * hidden
        raise NotImplementedError(f"no parameter-count formula for PEFT {cfg.peft_type.value}")


def _default_modules(peft_type: str, kind: str, model_type: str | None) -> Any:
    """PEFT's default module names of a tuner for an architecture (what get_peft_model fills in): a set, a regex
    string, or None."""
    from peft.utils import constants

    mapping = getattr(PEFT_TYPE_TO_TUNER_MAPPING[peft_type], "target_module_mapping", None) if kind == "TARGET" else None
    if mapping is None:
        mapping = getattr(constants, f"TRANSFORMERS_MODELS_TO_{peft_type}_{kind}_MODULES_MAPPING", {})
    default = mapping.get(model_type)
    return set(default) if isinstance(default, (list, tuple, set)) else default


def _factor(dim: int, factor: int) -> tuple[int, int]:
    """LyCORIS's split of a dimension into (a, b), a·b = dim: (factor, dim / factor) when factor divides dim, else
    the divisor pair closest to a square whose smaller part is at most factor (-1: no bound)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    best = (1, dim)
    for a in range(1, int(dim ** 0.5) + 1):
        if dim % a == 0 and (factor <= 0 or a <= factor):
            best = (a, dim // a)
    return best


def _lokr_count(m: int, n: int, cfg: PeftConfig) -> int:
    """W1 (a_out × a_in) full unless decompose_both and r is small; W2 (b_out × b_in) as B A when r < max/2."""
    a_in, b_in = _factor(n, cfg.decompose_factor)
    a_out, b_out = _factor(m, cfg.decompose_factor)
    r = cfg.r
    w1 = r * (a_out + a_in) if cfg.decompose_both and r < max(a_out, a_in) / 2 else a_out * a_in
    w2 = r * (b_out + b_in) if r < max(b_out, b_in) / 2 else b_out * b_in
    return w1 + w2
