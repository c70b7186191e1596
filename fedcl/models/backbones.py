"""Backbones for class-incremental learning: ``features(x) -> (N, D)`` plus one linear head.

A single head over all classes is kept (class-incremental, no task id); methods slice the
logits of the classes seen so far. GroupNorm instead of BatchNorm in the small CNN keeps FedAvg
free of running statistics that non-IID clients would disagree on.

Pretrained weights: ``model.checkpoint=<file>`` loads a local safetensors / .pth / .pt / .npz file
(timm's or torchvision's layout; the classifier head in it is dropped, ours is new);
``model.pretrained=true`` loads timm's (``model=timm``) or torchvision's (``model=resnet18``)
published weights: from the local Hugging Face / torch hub cache first, downloading only when the
host answers, so an offline machine fails in seconds with a pointer to ``model.checkpoint``.
"""
from __future__ import annotations

import difflib
import functools
import os
import re
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedcl.errors import ConfigError

MODELS = ("small_cnn", "resnet18", "vit", "timm")
RESNET_STEMS = ("cifar", "imagenet")
HEAD_NAMES = ("head", "fc", "classifier", "head_dist", "last_linear")  # a file's classifier: never loaded


class ClassIncrementalNet(nn.Module):
    """A feature extractor followed by a linear head over all classes of the scenario."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def small_cnn(in_channels: int, width: int = 32, image_size: int = 32, grid: int = 2) -> tuple[nn.Module, int]:
    """Three 3x3 conv blocks (32, 64, 128 channels at width 32), each followed by a 2x2 max-pool while
    the map is larger than 4x4 (8 px: one pool; 28 px: 28 -> 14 -> 7 -> 3), then average pooling to a
    ``grid`` x ``grid`` map that is flattened. The grid keeps where a feature is: a global average
    (grid 1) cannot tell a coat from a shirt (Fashion-MNIST task 0 stayed at 60-66% under FedAvg with it,
    80% with a 2x2 grid: docs/experiments/fashion_mnist.md)."""
    w, size, layers, c_in = width, int(image_size), [], in_channels
    for c_out in (w, 2 * w, 4 * w):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.ReLU()]
        if size > 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(grid), nn.Flatten()]
    return nn.Sequential(*layers), 4 * w * grid * grid


def resnet18(in_channels: int, stem: str = "cifar", width: int = 64) -> tuple[nn.Module, int]:
    """torchvision's ResNet-18. ``stem=cifar``: 3x3 stride-1 conv and no max-pool (32 px inputs);
    ``stem=imagenet``: torchvision's own 7x7 stride-2 conv + max-pool (224 px inputs)."""
    if width != 64:
        raise ConfigError(f"model.width={width}: torchvision's ResNet-18 has width 64; set model.width=64.")
    if stem not in RESNET_STEMS:
        raise ConfigError(f"model.stem={stem!r}: choose 'cifar' (3x3 conv, no max-pool, for 32 px images) or "
                          "'imagenet' (7x7 stride-2 conv + max-pool, for 224 px images).")
    import torchvision  # here: importing torchvision costs every Ray worker about 1 s

    net = torchvision.models.resnet18(num_classes=10)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    net.fc = nn.Identity()
    return net, 512


MAX_TOKEN_GRID = 8  # model.patch_size=null: at most 8x8 patch tokens (attention's cost grows with their square)


def vit_patch_size(model_cfg, image_size: int) -> int:
    """``model.patch_size``, or where it is null the smallest patch (at least 2) that divides the
    image and leaves at most ``MAX_TOKEN_GRID`` x ``MAX_TOKEN_GRID`` tokens: 2 on 8 px digits, 4 on
    28 px Fashion-MNIST (196 tokens at 2 made every round ~4x slower)."""
    patch = model_cfg.get("patch_size", None)
    if patch is not None:
        return int(patch)
    return next(p for p in range(2, image_size + 1) if image_size % p == 0 and image_size // p <= MAX_TOKEN_GRID)


def vit(in_channels: int, image_size: int, model_cfg) -> tuple[nn.Module, int]:
    """A timm VisionTransformer sized by the config; small enough to train on CPU by default.

    ``model.stem=conv`` puts a 3x3 convolution (GroupNorm, GELU) before the patch projection, the
    "early convolutions" of Xiao et al. (2021): on tiny images from few samples a plain linear patch
    embedding trains slowly. ``model.global_pool``: ``token`` (class token) or ``avg`` (mean of the
    patch tokens)."""
    from timm.models.vision_transformer import VisionTransformer

    patch = vit_patch_size(model_cfg, image_size)
    if image_size % patch:
        raise ConfigError(f"model.patch_size={patch} does not divide the {image_size}x{image_size} images.")
    dim = int(model_cfg.get("embed_dim", 128))
    pool = str(model_cfg.get("global_pool", "token"))
    if pool not in ("token", "avg"):
        raise ConfigError(f"model.global_pool={pool!r}: choose 'token' or 'avg'.")
    net = VisionTransformer(img_size=image_size, patch_size=patch, in_chans=in_channels, num_classes=0,
                            embed_dim=dim, depth=int(model_cfg.get("depth", 4)),
                            num_heads=int(model_cfg.get("num_heads", 4)),
                            mlp_ratio=float(model_cfg.get("mlp_ratio", 2.0)), global_pool=pool,
                            class_token=pool == "token")
    stem = str(model_cfg.get("stem", "patch"))
    if stem == "conv":
        width = int(model_cfg.get("stem_channels", 32))
        net.patch_embed.proj = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GroupNorm(4, width), nn.GELU(),
            nn.Conv2d(width, dim, patch, stride=patch))
    elif stem != "patch":
        raise ConfigError(f"model.stem={stem!r}: choose 'patch' (linear patch embedding) or 'conv'.")
    return net, dim


# ---- timm models by name ------------------------------------------------------------------

def check_timm_arch(arch) -> str:
    """A timm model name (a pretrained tag such as ``.augreg_in21k`` allowed), or a ConfigError
    that lists the closest names."""
    import timm

    if arch and timm.is_model(str(arch)):
        return str(arch)
    close = difflib.get_close_matches(str(arch), timm.list_models(), n=5, cutoff=0.6) or [
        "vit_base_patch16_224", "vit_small_patch16_224", "vit_tiny_patch16_224", "deit_small_patch16_224"]
    raise ConfigError(f"model.arch={arch!r} is not a timm model name. Close ones: {', '.join(close)} "
                      "(all of them: python -c 'import timm; print(timm.list_models())').")


def timm_patch_size(arch: str) -> int | None:
    """The patch side of a timm ViT-like model (None for a CNN), from a weightless build."""
    import timm

    try:
        with torch.device("meta"):
            net = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device is checked when built
        return None
    embed = getattr(net, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    return int(size[0]) if size is not None else None


def timm_model(in_channels: int, image_size: int, model_cfg) -> tuple[nn.Module, int]:
    """``timm.create_model(model.arch, num_classes=0)`` at the run's input size (weights: see load_weights)."""
    import timm

    arch = check_timm_arch(model_cfg.get("arch", None))
    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": in_channels}
    try:
        net = timm.create_model(arch, img_size=image_size, **kwargs)
    except TypeError:  # a CNN takes any input size and has no img_size argument
        net = timm.create_model(arch, **kwargs)
    patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
    if patch and image_size % patch[0]:
        raise ConfigError(f"The {image_size} px inputs do not split into model.arch={arch}'s {patch[0]}x{patch[0]} "
                          f"patches; set dataset.image_size to a multiple of {patch[0]} (e.g. 224).")
    return net, int(getattr(net, "head_hidden_size", None) or net.num_features)


def model_input_config(model_cfg) -> dict | None:
    """What a pretrained model expects (input_size, mean, std, interpolation); None for a model
    trained from scratch. ``dataset.normalize=auto`` and ``dataset.image_size=null`` use it."""
    name = model_cfg.get("name", None)
    weights = bool(model_cfg.get("pretrained", False)) or bool(model_cfg.get("checkpoint", None))
    if name == "timm" and weights:
        from timm.data import resolve_data_config
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(check_timm_arch(model_cfg.get("arch", None)))
        return resolve_data_config(pretrained_cfg=cfg.to_dict()) if cfg is not None else None
    if name == "resnet18" and bool(model_cfg.get("pretrained", False)):  # torchvision's ImageNet weights
        from fedcl.data.transforms import IMAGENET_MEAN, IMAGENET_STD
        return {"input_size": None, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "interpolation": "bilinear"}
    return None


# ---- weights from files ---------------------------------------------------------------------

def read_state_dict(file: Path, what: str) -> dict[str, torch.Tensor] | None:
    """A state dict of tensors from safetensors / a torch pickle (``state_dict``/``model`` inside a
    training checkpoint too) / npz of named arrays; None for a big_vision ViT npz (keys with '/'),
    which timm's own loader reads."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(file))
        elif file.suffix == ".npz":
            with np.load(file, allow_pickle=False) as npz:
                if any("/" in k for k in npz.files):
                    return None
                obj = {k: torch.from_numpy(npz[k]) for k in npz.files}
        else:
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip, safetensors header errors: all mean "unreadable"
        detail = " ".join(str(err).split())[:200]
        raise ConfigError(f"{what}={file} could not be read as a {file.suffix or 'torch'} weights file "
                          f"({type(err).__name__}: {detail}). Give a state dict saved with safetensors, "
                          "torch.save(model.state_dict()) or numpy.savez.") from None
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):  # timm's training checkpoints
            if isinstance(obj.get(key, None), dict):
                obj = obj[key]
                break
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in obj.items())):
        found = f"a dict with keys {list(obj)[:5]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ConfigError(f"{what}={file} is not a state dict of named tensors (found {found}). Save "
                          "model.state_dict() (torch.save or safetensors), not the model, a tensor or a list.")
    return obj


@functools.lru_cache(maxsize=1)
def _read_cached(path: str, mtime_ns: int, size: int, what: str) -> dict[str, torch.Tensor] | None:
    """A worker builds the model for every client round: read the file once (keyed by its stamp)."""
    return read_state_dict(Path(path), what)


def _fit_to(features: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors renamed and reshaped where the difference is not architectural: a wrapper
    prefix, a position embedding for another image size, RGB weights for grey input; the file's
    classifier head dropped."""
    own = features.state_dict()
    for prefix in ("module.", "features.", "backbone.", "model."):
        cut = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sum(k in own for k in cut) > sum(k in own for k in state):
            state = cut
    state = {k: v for k, v in state.items() if k in own or k.split(".")[0] not in HEAD_NAMES}
    pos, proj = state.get("pos_embed"), "patch_embed.proj.weight"
    if pos is not None and "pos_embed" in own and pos.shape != own["pos_embed"].shape \
            and pos.shape[-1] == own["pos_embed"].shape[-1] and hasattr(features, "patch_embed"):
        from timm.layers import resample_abs_pos_embed
        prefix_tokens = 0 if getattr(features, "no_embed_class", False) else features.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(pos, list(features.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix_tokens)
    first = f"{getattr(features, 'pretrained_cfg', {}).get('first_conv', 'conv1')}.weight"
    for key in (first, proj):
        if key in state and key in own and state[key].shape[1] != own[key].shape[1] \
                and state[key].shape[2:] == own[key].shape[2:]:
            from timm.models import adapt_input_conv
            state[key] = adapt_input_conv(own[key].shape[1], state[key])
    return state


def guess_model(state: dict[str, torch.Tensor]) -> str:
    """Which fedcl model a state dict looks like, from its tensor names and shapes ('' if unknown)."""
    import timm

    if "patch_embed.proj.weight" in state and "pos_embed" in state:
        dim, _, patch, _ = state["patch_embed.proj.weight"].shape
        depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
        prefix = sum(t in state for t in ("cls_token", "dist_token"))
        prefix += state["reg_token"].shape[1] if "reg_token" in state else 0
        grid = round((state["pos_embed"].shape[1] - prefix) ** 0.5)
        size = {(192, 12): "tiny", (384, 12): "small", (768, 12): "base", (1024, 24): "large",
                (1280, 32): "huge"}.get((dim, depth))
        name = f"{'deit' if 'dist_token' in state else 'vit'}_{size}{'_distilled' if 'dist_token' in state else ''}" \
               f"_patch{patch}_{grid * patch}"
        if size and timm.is_model(name):
            return f"model=timm model.arch={name}"
        return f"a ViT with embed_dim {dim}, depth {depth}, {patch}x{patch} patches at {grid * patch} px"
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
        bottleneck = "layer1.0.conv3.weight" in state
        depth = {(False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34, (True, (3, 4, 6, 3)): 50,
                 (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152}.get((bottleneck, tuple(blocks)))
        stem = "imagenet" if state["conv1.weight"].shape[-1] == 7 else "cifar"
        if depth == 18:
            return f"model=resnet18 model.stem={stem}"
        if depth:
            return f"model=timm model.arch=resnet{depth}"
    return ""


def load_checkpoint(features: nn.Module, path: str, what: str = "model.checkpoint") -> None:
    """Load a local weights file into ``features``: every tensor must match by name and shape
    (the classifier head excepted), or a ConfigError says which do not and what the file fits."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{what}={path} is not a file; give a local .safetensors/.pt/.pth/.npz state dict.")
    stat = file.stat()
    state = _read_cached(str(file.resolve()), stat.st_mtime_ns, stat.st_size, what)
    if state is None:  # big_vision layout (Google's ViT releases): timm's npz loader knows it
        if not hasattr(features, "load_pretrained"):
            raise ConfigError(f"{what}={path} is a big_vision .npz, which only a timm ViT reads; "
                              "use model=timm model.arch=<the ViT it was saved from>.")
        try:
            features.load_pretrained(str(file))
        except Exception as err:  # noqa: BLE001 - timm's npz loader fails with whatever numpy raises
            arch = getattr(features, "pretrained_cfg", {}).get("architecture", type(features).__name__)
            raise ConfigError(f"{what}={path} does not fit this model ({arch}): {type(err).__name__}: "
                              f"{' '.join(str(err).split())[:200]}. Choose the ViT the file was saved from.") from None
        return
    state = _fit_to(features, state)
    own = features.state_dict()
    extra = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if extra or missing:
        def show(keys):
            return ", ".join(f"{k} {tuple(state[k].shape) if k in state else ''}".strip() for k in keys[:4])
        guess = guess_model(state)
        arch = getattr(features, "pretrained_cfg", {}).get("architecture", type(features).__name__)
        problems = ([f"{len(extra)} of its tensors match none of the model's by name and shape ({show(extra)})"]
                    * bool(extra) + [f"the model has {len(missing)} tensors the file lacks ({show(missing)})"]
                    * bool(missing))
        raise ConfigError(
            f"{what}={path} does not fit this model ({arch}): {' and '.join(problems)}. "
            + (f"The file looks like {guess}. " if guess else "")
            + "Choose the model the file was saved from, or a checkpoint of this one.")
    features.load_state_dict(state, strict=False)  # strict except BatchNorm's num_batches_tracked


# ---- published weights ----------------------------------------------------------------------

def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """One short connection attempt (a proxy's host when HTTPS_PROXY is set), in a thread because
    a name lookup cannot be given a timeout."""
    import socket
    from urllib.parse import urlparse

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urlparse(proxy if "//" in proxy else f"//{proxy}")
        host, port = parsed.hostname or host, parsed.port or 80
    ok = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(ok)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _no_weights(what: str, where: str) -> ConfigError:
    return ConfigError(
        f"model.pretrained=true: the {what} weights are not in the local cache ({where}) and the host they come "
        "from cannot be reached (offline, or HF_HUB_OFFLINE=1). Download them on a machine with internet and "
        "pass the file with model.checkpoint=<local .safetensors/.pth/.npz> and model.pretrained=false, or "
        "run once with internet to fill the cache.")


def pretrained_file(model_cfg) -> str:
    """A local file with the published weights of ``model.arch`` (timm) or ResNet-18 (torchvision):
    the cached one, else downloaded when the host answers one short connection attempt."""
    name = model_cfg.get("name", None)
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    if name == "resnet18":
        import torchvision

        url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
        file = hub_dir / os.path.basename(url)
        if file.is_file():
            return str(file)
        if _offline() or not _reachable("download.pytorch.org"):
            raise _no_weights("torchvision ResNet-18", str(file))
        hub_dir.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(file), progress=False)
        return str(file)
    if name != "timm":
        raise ConfigError(f"model.pretrained=true works with model=timm (model.arch=...) or model=resnet18; "
                          f"for model={name} give a local file with model.checkpoint=<file>.")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    arch = check_timm_arch(model_cfg.get("arch", None))
    cfg = get_pretrained_cfg(arch)
    hub_id, url = (cfg.hf_hub_id, cfg.url) if cfg is not None else (None, None)
    if not hub_id and not url:
        raise ConfigError(f"model.arch={arch} has no published weights in timm; set model.pretrained=false "
                          "(random init) or give model.checkpoint=<file>.")
    names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in names if hub_id else []:
        cached = try_to_load_from_cache(hub_id, filename)
        if isinstance(cached, str):
            return cached
    if url and (hub_dir / os.path.basename(url)).is_file():
        return str(hub_dir / os.path.basename(url))
    where = f"Hugging Face cache, {hub_id}" if hub_id else str(hub_dir)
    if _offline() or not _reachable("huggingface.co" if hub_id else (url.split("/")[2])):
        raise _no_weights(f"timm {arch}", where)
    try:
        if hub_id:
            from huggingface_hub.errors import EntryNotFoundError
            for filename in names[:-1]:
                try:
                    return hf_hub_download(hub_id, filename)
                except EntryNotFoundError:  # the repo holds the weights under the next name
                    pass
            return hf_hub_download(hub_id, names[-1])
        hub_dir.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(hub_dir / os.path.basename(url)), progress=False)
        return str(hub_dir / os.path.basename(url))
    except Exception as err:  # noqa: BLE001 - hub and HTTP errors alike: the user needs the fallback
        raise ConfigError(f"model.pretrained=true: downloading the {arch} weights failed ({type(err).__name__}: "
                          f"{str(err)[:200]}); give a local file with model.checkpoint=<file>.") from None


def load_weights(features: nn.Module, model_cfg) -> None:
    """``model.checkpoint`` (a local file: it wins over ``model.pretrained``), else the published
    weights when ``model.pretrained=true``; nothing otherwise (the run's seeded random init)."""
    checkpoint = model_cfg.get("checkpoint", None)
    if checkpoint:
        load_checkpoint(features, str(checkpoint))
    elif bool(model_cfg.get("pretrained", False)):
        load_checkpoint(features, pretrained_file(model_cfg), what="model.pretrained weights")


def check_model(model_cfg, image_size=None) -> None:
    """Config checks that need no data: the model's name, stem, timm arch and its patch size."""
    name = model_cfg.get("name", None)
    if name not in MODELS:
        raise ConfigError(f"model={name!r} is unknown. Choose one of {list(MODELS)}.")
    if name == "resnet18" and model_cfg.get("stem", "cifar") not in RESNET_STEMS:
        raise ConfigError(f"model.stem={model_cfg.stem!r} is unknown for model=resnet18. Choose 'cifar' "
                          "(3x3 conv, no max-pool, for 32 px images) or 'imagenet' (7x7 stride-2 conv + max-pool).")
    if name == "vit" and model_cfg.get("stem", "patch") not in ("patch", "conv"):
        raise ConfigError(f"model.stem={model_cfg.stem!r} is unknown for model=vit. Choose 'patch' or 'conv'.")
    patch = model_cfg.get("patch_size", None) if name == "vit" else None  # null: one that divides
    if name == "timm":
        patch = timm_patch_size(check_timm_arch(model_cfg.get("arch", None)))
    if patch and isinstance(image_size, int) and image_size % patch:
        raise ConfigError(f"The {image_size} px inputs (dataset.image_size; null: the images' native size) do not "
                          f"split into the model's {patch}x{patch} patches; set dataset.image_size to a multiple of "
                          f"{patch}, e.g. {max(patch, image_size // patch * patch)}.")


def build_model(model_cfg, in_channels: int, num_classes: int, image_size: int = 32) -> ClassIncrementalNet:
    name = model_cfg.name
    if name not in MODELS:
        raise ConfigError(f"model={name!r} is unknown. Choose one of {list(MODELS)}.")
    if name == "small_cnn":
        features, dim = small_cnn(in_channels, int(model_cfg.get("width", 32)), image_size,
                                  int(model_cfg.get("grid", 2)))
    elif name == "resnet18":
        features, dim = resnet18(in_channels, str(model_cfg.get("stem", "cifar")), int(model_cfg.get("width", 64)))
    elif name == "vit":
        features, dim = vit(in_channels, image_size, model_cfg)
    else:
        features, dim = timm_model(in_channels, image_size, model_cfg)
    load_weights(features, model_cfg)
    return ClassIncrementalNet(features, dim, num_classes)
